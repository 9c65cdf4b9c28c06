"""GPU benchmark at the real SDXL size: training throughput, MFU and peak memory; 1024x1024 inference latency.

    python -m bench.gpu_bench                  # one CUDA GPU, under 8 minutes; one JSON object on stdout
    python -m bench.gpu_bench --smoke          # CPU, tiny sizes, seconds (the test suite runs this)

Standalone on purpose: run from the repository root, it needs only torch, diffusers, transformers and
accelerate, and of the project only the pure ``components.diffusion.sdxl_base`` (SDXL's configs); no Ray,
no MLflow, no network, so it runs on a bare GPU machine (Python 3.12, torch 2.11,
diffusers from a wheel). Weights are random: speed and memory do not depend on their values.

Phases (each skipped, and said so, once the time budget is spent; logs on stderr):
1. flops -- the UNet's FLOPs per 1024x1024 image counted with torch's FlopCounterMode on the meta device
   (anchors: 6.76 TFLOP forward, 20.2 forward + backward; docs/recipe.md).
2. train -- SDXL UNet (fp32 master weights, bf16 autocast, fused AdamW, frozen text encoders in bf16 and
   VAE in fp32 resident as in training), random 128x128 latents; with gradient checkpointing on and off,
   the largest batch up to 24 that fits (OOM-driven search), then step time, images/s, peak memory and
   MFU = 20.2 TFLOP x images/s / the device's dense bf16 peak. Gradients stay allocated between steps
   (the steady state under gradient accumulation), as components/training/memory/plan.py assumes.
3. vae_encode -- the VAE encoding a batch of 1024x1024 images in fp32 without gradients (peak memory).
4. inference -- the SDXL pipeline at 1024x1024, 30 steps, CFG 7 with guidance_rescale 0.7 (ZT-SNR trailing
   v-prediction Euler): seconds per image with diffusers' defaults (bf16; diffusers already uses SDPA) vs
   fused QKV + channels_last, vs those + torch.compile of the UNet.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import inspect
import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import diffusers
import torch
import torch._inductor.config as inductor
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from components.diffusion.sdxl_base import (
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
)

SDXL_TEXT_CONFIGS = (SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG)
# --smoke: the same layout a few thousand times smaller (block types, text_time embedding, two encoders).
SMOKE_UNET_CONFIG = {**SDXL_UNET_CONFIG, "block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4],
                     "transformer_layers_per_block": [1, 1, 1], "cross_attention_dim": 64, "norm_num_groups": 8,
                     "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
                     "addition_embed_type_num_heads": 4, "layers_per_block": 1, "sample_size": 16}
SMOKE_VAE_CONFIG = {**SDXL_VAE_CONFIG, "block_out_channels": [8, 16, 16, 16], "norm_num_groups": 8,
                    "layers_per_block": 1, "sample_size": 128}
SMOKE_TEXT_CONFIGS = tuple({**c, "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                            "num_hidden_layers": 2, "projection_dim": 32, "vocab_size": 1000}
                           for c in SDXL_TEXT_CONFIGS)

FLOP_FWD_ANCHOR, FLOP_TRAIN_PER_IMAGE = 6.76e12, 20.2e12  # docs/recipe.md, per 1024x1024 image
PEAK_BF16_TFLOPS = (  # dense, no sparsity: NVIDIA datasheets; first match of the device name wins
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("B200", 2250.0),
)
TARGETS = {
    "train_mfu": (0.40, "~0.31 tuned SD2 training on H100 (MLPerf Training v4.0); ~0.28 on A100 (MosaicML)"),
    "batch_24_fits": (24, "Terminus v2 trained batch 24 on one A100-80G (model card)"),
    "inference_s_per_image": (1.5, "H100: 2.50 s diffusers baseline, 1.47 s TensorRT (Stability AI); A100: 3.31 s "
                                   "bf16+SDPA, 2.43 s compiled + fused QKV + int8 (diffusers docs)"),
}


class BudgetExceeded(BaseException):
    """Raised in the main thread by SIGALRM when the time budget is spent (a BaseException, so library
    code that catches Exception cannot swallow it)."""


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.unet_cfg = SMOKE_UNET_CONFIG if self.smoke else SDXL_UNET_CONFIG
        self.vae_cfg = SMOKE_VAE_CONFIG if self.smoke else SDXL_VAE_CONFIG
        self.text_cfgs = SMOKE_TEXT_CONFIGS if self.smoke else SDXL_TEXT_CONFIGS
        self.side = 128 if self.smoke else 1024  # pixels; latents are side / 8
        self.peak_tflops = args.peak_tflops  # by device name in environment()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.out: dict = {"schema": "terminus-gpu-bench/1", "mode": "smoke" if self.smoke else "full",
                          "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                          "budget_s": args.budget_s, "skipped": [], "errors": []}
        self._lock = threading.Lock()
        self._emitted = False

    # --- plumbing ---------------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, name: str, fn, min_s: float) -> None:
        """Run one phase unless the budget is spent; an error or OOM is recorded, never fatal."""
        if self.remaining() < min_s:
            reason = f"time budget: {self.remaining():.0f} s left, needs ~{min_s:.0f} s"
            self.out["skipped"].append({"phase": name, "reason": reason})
            log(f"skip {name}: budget")
            return
        log(f"phase {name} ({self.remaining():.0f} s left)")
        signal.setitimer(signal.ITIMER_REAL, max(self.remaining(), 0.01))
        try:
            fn()
        except BudgetExceeded:
            self.out["skipped"].append({"phase": name, "reason": "time budget ran out during the phase (partial)"})
        except Exception as err:  # noqa: BLE001 -- a benchmark reports failures, it does not stop at them
            first_line = str(err).splitlines()[0][:300]
            self.out["errors"].append({"phase": name, "error": f"{type(err).__name__}: {first_line}"})
            log(f"{name} failed: {type(err).__name__}: {err}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.free()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def gb(self, fn) -> float | None:
        return round(fn(self.device) / 1e9, 3) if self.cuda else None

    def emit(self, aborted: str | None = None) -> None:
        """Print the one JSON object, once (the watchdog thread may race the main thread)."""
        with self._lock:
            if self._emitted:
                return
            self._emitted = True
            if aborted:
                self.out["aborted"] = aborted
            self.out["elapsed_s"] = round(time.monotonic() - self.t0, 1)
            with contextlib.suppress(Exception):
                self.out["inference"]["best"] = self.best_inference()
            self.out["targets"] = self.targets()
            print(json.dumps(self.out, default=str), flush=True)

    # --- environment and models -------------------------------------------------------------------

    def environment(self) -> None:
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
               "python": sys.version.split()[0], "device": str(self.device), "cuda": torch.version.cuda}
        peak = self.args.peak_tflops
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            env.update(name=props.name, capability=f"{props.major}.{props.minor}",
                       total_gb=round(props.total_memory / 1e9, 2))
            peak = peak or peak_tflops_for(props.name)
        env["peak_bf16_tflops"] = peak
        self.peak_tflops = peak
        self.out["environment"] = env

    def build(self, kind: str, dtype=torch.float32):
        def make():
            if kind == "unet":
                return UNet2DConditionModel(**self.unet_cfg)
            if kind == "vae":
                return AutoencoderKL(**self.vae_cfg)
            if kind == "text_encoder":
                return CLIPTextModel(CLIPTextConfig(**self.text_cfgs[0]))
            return CLIPTextModelWithProjection(CLIPTextConfig(**self.text_cfgs[1]))

        try:
            with torch.device(self.device):  # random init of 2.6 B parameters is minutes on CPU, seconds on GPU
                model = make()
        except Exception as err:  # noqa: BLE001 -- fall back to the slow, always-working path
            log(f"building {kind} on {self.device} failed ({type(err).__name__}); building on CPU")
            model = make()
        return model.to(self.device, dtype)

    def step_inputs(self, batch: int, device: torch.device | None = None) -> dict:
        c, h = self.unet_cfg, self.side // 8
        pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        kw = dict(device=device or self.device)
        return {"sample": torch.randn(batch, 4, h, h, **kw), "timestep": torch.randint(0, 1000, (batch,), **kw),
                "encoder_hidden_states": torch.randn(batch, 77, c["cross_attention_dim"], **kw),
                "added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, **kw),
                                      "time_ids": torch.tensor([[self.side, self.side, 0, 0, self.side, self.side]]
                                                               * batch, **kw).float()}}

    # --- phases -----------------------------------------------------------------------------------

    def flops(self) -> None:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**self.unet_cfg)
        inputs = self.step_inputs(1, torch.device("meta"))
        counter = FlopCounterMode(display=False)
        with counter:
            pred = unet(**inputs).sample
            pred.float().pow(2).mean().backward()
        fwd_bwd = counter.get_total_flops()
        with FlopCounterMode(display=False) as fwd_counter, torch.no_grad():
            unet(**inputs)
        self.out["flops"] = {"fwd_tflop_per_image": round(fwd_counter.get_total_flops() / 1e12, 6),
                             "fwd_bwd_tflop_per_image": round(fwd_bwd / 1e12, 6),
                             "anchor_fwd_tflop": FLOP_FWD_ANCHOR / 1e12,
                             "anchor_fwd_bwd_tflop": FLOP_TRAIN_PER_IMAGE / 1e12,
                             "mfu_uses_tflop": FLOP_TRAIN_PER_IMAGE / 1e12}

    def train(self) -> None:
        self.out["train"] = {}
        unet = self.build("unet")
        frozen = [self.build("vae"), self.build("text_encoder", torch.bfloat16),
                  self.build("text_encoder_2", torch.bfloat16)]
        for m in frozen:
            m.requires_grad_(False)
        unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-7, fused=self.cuda)
        for ckpt in (True, False):
            key = f"checkpointing_{'on' if ckpt else 'off'}"
            self.out["train"][key] = result = {"status": "started"}
            (unet.enable_gradient_checkpointing if ckpt else unet.disable_gradient_checkpointing)()
            try:
                self.train_one(unet, opt, result)
            except torch.cuda.OutOfMemoryError as err:  # fitted once, then not (fragmentation): say so
                result.update(status="oom after the search", error=str(err).splitlines()[0][:300])
            self.free()
        del unet, opt, frozen

    def train_step(self, unet, opt, batch: int) -> None:
        if self.args.oom_above and batch > self.args.oom_above:  # fault injection for --smoke
            raise torch.cuda.OutOfMemoryError(f"injected OOM at batch {batch} > {self.args.oom_above}")
        inputs = self.step_inputs(batch)
        target = torch.randn_like(inputs["sample"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            pred = unet(**inputs).sample
        F.mse_loss(pred.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay resident, as under accumulation

    def train_one(self, unet, opt, result: dict) -> None:
        """Largest batch <= max_batch that runs a step, then timed steps at that batch."""
        probes, ok, bad = [], 0, self.args.max_batch + 1
        batch = self.args.max_batch
        while ok + 1 < bad and self.remaining() > 10:
            try:
                self.train_step(unet, opt, batch)
                self.sync()
                fits = True
            except torch.cuda.OutOfMemoryError:
                fits = False
            self.free()
            probes.append({"batch": batch, "fits": fits})
            ok, bad = (batch, bad) if fits else (ok, batch)
            batch = (ok + bad) // 2
        result.update(probes=probes, batch=ok or None, max_batch=self.args.max_batch,
                      fits_max_batch=any(p["fits"] and p["batch"] == self.args.max_batch for p in probes))
        if not ok:
            result["status"] = "no batch fits"
            return
        for _ in range(self.args.warmup):
            self.train_step(unet, opt, ok)
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        resident = self.gb(torch.cuda.memory_allocated)
        times = []
        for _ in range(self.args.steps):
            t = time.perf_counter()
            self.train_step(unet, opt, ok)
            self.sync()
            times.append(time.perf_counter() - t)
            if self.remaining() < 5:
                break
        step_s = sorted(times)[len(times) // 2]
        ips = ok / step_s
        result.update(status="ok", steps_timed=len(times), step_s=round(step_s, 4), images_per_s=round(ips, 3),
                      mfu=(round(FLOP_TRAIN_PER_IMAGE * ips / (self.peak_tflops * 1e12), 4)
                           if self.peak_tflops else None),
                      resident_gb=resident, peak_allocated_gb=self.gb(torch.cuda.max_memory_allocated),
                      peak_reserved_gb=self.gb(torch.cuda.max_memory_reserved))

    def vae_encode(self) -> None:
        vae = self.build("vae").requires_grad_(False)
        batch = self.args.vae_batch
        self.free()
        base = self.gb(torch.cuda.memory_allocated)
        with torch.no_grad():
            vae.encode(torch.randn(batch, 3, self.side, self.side, device=self.device)).latent_dist.sample()
        self.sync()
        peak = self.gb(torch.cuda.max_memory_allocated)
        self.out["vae_encode"] = {"batch": batch, "side": self.side, "dtype": "fp32", "resident_gb": base,
                                  "peak_allocated_gb": peak,
                                  "peak_above_resident_gb_per_image": (round((peak - base) / batch, 3)
                                                                       if self.cuda else None)}

    def pipeline(self):
        with tempfile.TemporaryDirectory(prefix="gpu_bench_tok_") as tok_dir:
            tokenizer = build_tokenizer(Path(tok_dir))  # reads the files at construction
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                           timestep_spacing="trailing")
        dtype = torch.bfloat16
        pipe = StableDiffusionXLPipeline(
            vae=self.build("vae", dtype), text_encoder=self.build("text_encoder", dtype),
            text_encoder_2=self.build("text_encoder_2", dtype), tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=self.build("unet", dtype), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def time_pipeline(self, pipe, name: str, prepare=None) -> None:
        result = self.out["inference"][name] = {"status": "started"}
        try:
            self._time_pipeline(pipe, result, prepare)
        except torch.cuda.OutOfMemoryError as err:
            result.update(status="oom", error=str(err).splitlines()[0][:300])
        except Exception as err:  # noqa: BLE001 -- one failing variant must not lose the others
            result.update(status="error", error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            log(f"inference {name} failed: {type(err).__name__}: {err}")

    def _time_pipeline(self, pipe, result: dict, prepare) -> None:
        t = time.perf_counter()
        if prepare:
            prepare(pipe)
        call = dict(prompt="a photograph of an astronaut riding a horse", height=self.side, width=self.side,
                    guidance_scale=7.0, guidance_rescale=0.7)
        gen = torch.Generator("cpu").manual_seed(0)
        pipe(**call, num_inference_steps=2, generator=gen)  # warm-up (and compilation, where asked)
        self.sync()
        result["prepare_and_warmup_s"] = round(time.perf_counter() - t, 2)
        times = []
        for _ in range(self.args.images):
            t = time.perf_counter()
            pipe(**call, num_inference_steps=self.args.infer_steps, generator=gen)
            self.sync()
            times.append(time.perf_counter() - t)
            if self.remaining() < 15:
                break
        result.update(status="ok", images=len(times), steps=self.args.infer_steps,
                      s_per_image=round(sorted(times)[len(times) // 2], 3),
                      peak_allocated_gb=self.gb(torch.cuda.max_memory_allocated))

    def inference(self) -> None:
        self.out["inference"] = {}
        pipe = self.pipeline()
        self.time_pipeline(pipe, "diffusers_defaults")
        self.time_pipeline(pipe, "fused_qkv_channels_last", optimise_eager)
        if self.args.compile == "off":
            self.out["skipped"].append({"phase": "inference.compiled", "reason": "--compile off"})
        elif self.remaining() < self.args.compile_min_s:
            self.out["skipped"].append({"phase": "inference.compiled",
                                        "reason": f"time budget: {self.remaining():.0f} s left"})
        else:
            self.time_pipeline(pipe, "compiled", lambda p: compile_unet(p, self.args.compile, self.args.compile_mode))

    def best_inference(self) -> dict | None:
        timed = {k: v["s_per_image"] for k, v in self.out["inference"].items() if v.get("status") == "ok"}
        if not timed:
            return None
        best = min(timed, key=timed.get)
        base = timed.get("diffusers_defaults")
        return {"variant": best, "s_per_image": timed[best],
                "speedup_vs_defaults": round(base / timed[best], 3) if base else None}

    def targets(self) -> list[dict]:
        train = self.out.get("train", {})
        mfus = [(v.get("mfu"), k) for k, v in train.items() if v.get("mfu") is not None]
        best_mfu = max(mfus) if mfus else (None, None)
        fits = train.get("checkpointing_on", {}).get("fits_max_batch")
        inf = (self.out.get("inference", {}).get("best") or {}).get("s_per_image")
        rows = [("train_mfu", best_mfu[0], best_mfu[0] is not None and best_mfu[0] >= TARGETS["train_mfu"][0],
                 f"best of the checkpointing settings ({best_mfu[1]})"),
                ("batch_24_fits", train.get("checkpointing_on", {}).get("batch"), fits,
                 "checkpointing on, fp32 AdamW (the preset's 8-bit AdamW needs ~15 GB less)"),
                ("inference_s_per_image", inf, inf is not None and inf <= TARGETS["inference_s_per_image"][0],
                 "best variant, 30 steps, CFG")]
        return [{"name": n, "target": TARGETS[n][0], "anchor": TARGETS[n][1], "measured": m,
                 "met": (bool(met) if m is not None else None), "note": note} for n, m, met, note in rows]

    def run(self) -> None:
        self.phase("environment", self.environment, 0)
        self.phase("flops", self.flops, 20)
        self.phase("train", self.train, 60)
        self.phase("vae_encode", self.vae_encode, 15)
        self.phase("inference", self.inference, 30)
        self.emit()


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak by device name ("NVIDIA H100 80GB HBM3" -> 989.4); None when unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_name), None)


def optimise_eager(pipe) -> None:
    """Fused QKV projections (one matmul instead of three per self-attention) and channels_last
    convolutions: the eager-mode steps of diffusers' "Speed up inference" guide."""
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)


def compile_unet(pipe, backend: str, mode: str) -> None:
    """torch.compile of the UNet (the VAE decode runs once per image: not worth its compile time here)."""
    if backend == "inductor":
        inductor.conv_1x1_as_mm = True  # diffusers' guide: 1x1 convolutions as matmuls
    pipe.unet = torch.compile(pipe.unet, backend=backend, mode=mode if backend == "inductor" else None, fullgraph=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet (same construction as components/diffusion/tiny.py; copied, standalone)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_tokenizer(directory: Path):
    """A character-level CLIP BPE tokenizer built offline (no merges); model_max_length=77 as SDXL's."""
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    ids = {t: i for i, t in enumerate(vocab)}
    if "vocab_file" not in inspect.signature(CLIPTokenizer.__init__).parameters:
        # transformers 5 takes the vocabulary itself (a vocab_file= argument would be ignored)
        return CLIPTokenizer(vocab=ids, merges=[], model_max_length=77)
    (directory / "vocab.json").write_text(json.dumps(ids))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"),
                         model_max_length=77, pad_token="<|endoftext|>")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, seconds (same code paths)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--budget-s", type=float, default=None, help="phases stop once spent (default 400; smoke 240)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (default: by name)")
    p.add_argument("--max-batch", type=int, default=None, help="largest training batch tried (default 24; smoke 4)")
    p.add_argument("--oom-above", type=int, default=None, help="inject an OOM above this batch (smoke default 3)")
    p.add_argument("--compile", default=None, choices=["inductor", "eager", "off"],
                   help="torch.compile backend for the compiled variant (default inductor; smoke eager)")
    p.add_argument("--compile-mode", default="default", help="inductor mode (max-autotune compiles for minutes)")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(budget_s=240 if smoke else 400, max_batch=4 if smoke else 24, oom_above=3 if smoke else 0,
                    compile="eager" if smoke else "inductor")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.warmup, args.steps = (1, 1) if smoke else (2, 5)
    args.images, args.infer_steps = (1, 2) if smoke else (3, 30)
    args.vae_batch = 2 if smoke else 4
    args.compile_min_s = 10 if smoke else 150
    if args.max_batch < 1 or args.budget_s <= 0:
        p.error("--max-batch must be >= 1 and --budget-s > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)  # tiny ops: extra threads only spin
    bench = Bench(args)

    def on_alarm(signum, frame):
        raise BudgetExceeded()

    signal.signal(signal.SIGALRM, on_alarm)
    # Last resort if the main thread is stuck in native code past the budget: print what there is and exit.
    watchdog = threading.Timer(args.budget_s + 40, lambda: (bench.emit("hard time limit"), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    with contextlib.suppress(KeyboardInterrupt):
        bench.run()
    bench.emit("interrupted")  # no-op when run() already printed
    watchdog.cancel()


if __name__ == "__main__":
    main()
