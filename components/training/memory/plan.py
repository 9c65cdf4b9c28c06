"""The single-GPU memory plan: will this preset's fine-tune fit one A100-80G, and with how much room?

Persistent memory is counted exactly from parameter shapes: the real SDXL UNet (2.567 B parameters),
both CLIP text encoders and the VAE, built from SDXL-base's published configs (``components.diffusion.sdxl_base``)
on the meta device (shapes, no storage), times the bytes per element that the precision policy and the optimizer give
(``persistent_rows``, ``optimizer_state_bytes``).

The dynamic part -- activations, autocast's weight copies, gradients in flight, recomputation under
gradient checkpointing, and the VAE encoding the batch -- is traced at the configured batch and
resolution by components/training/memory/trace.py (one micro-step of the full-size model on meta tensors, CUDA
autocast emulated; no GPU needed). It is not an analytic guess and not a scaled-down measurement.

Added as stated assumptions, because no trace sees them: the CUDA context (``CUDA_CONTEXT_BYTES``)
and caching-allocator fragmentation plus kernel workspaces (``ALLOCATOR_SLACK`` of the traced peak).
Expected error of the planned peak: about +-10 %, most of it in those two assumptions. The GPU
benchmark (bench/gpu_bench.py) records ``max_memory_allocated`` and ``max_memory_reserved`` to
check the traced figure and calibrate the slack (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from components.config import Config, OptimizerName, Precision
from components.diffusion.sdxl_base import COMPONENTS, empty_component
from components.training.memory.trace import StepTrace, trace_unet_step, trace_vae_encode

GB = 1e9  # decimal, as docs/recipe.md's anchors ("about 41 GB") are
A100_80G_BYTES = 80 * 2**30  # nvidia-smi: 81920 MiB
CUDA_CONTEXT_BYTES = 600 * 2**20
"""Assumption: CUDA context + cuBLAS/cuDNN handles, outside PyTorch's allocator (typically 0.4-0.8 GiB)."""
ALLOCATOR_SLACK = 0.10
"""Assumption: caching-allocator fragmentation and kernel workspaces, as a fraction of the traced peak."""

# --- models on the meta device ------------------------------------------------------------------


def sdxl_models(cfg: Config | None = None) -> dict[str, torch.nn.Module]:
    """UNet, VAE and both text encoders with SDXL's shapes (the tiny model's for ``model.source: tiny``)."""
    if cfg is not None and cfg.model.source == "tiny":
        # diffusers on first use: importing this module loads torch alone, as sdxl_base does
        from components.diffusion.tiny import build_tiny

        parts = build_tiny(cfg.model.tiny)  # small enough to build for real, then drop the storage
        return {k: getattr(parts, k).to("meta") for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
    return {name: empty_component(name).to("meta") for name in COMPONENTS}


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- persistent memory --------------------------------------------------------------------------


def optimizer_state_bytes(shapes: list[torch.Size], optimizer: OptimizerName) -> int:
    """Bytes of optimizer state for parameters of these shapes (fp32 master weights).

    - adamw: two fp32 moments, 8 B/param (torch.optim.AdamW, fused or not).
    - adamw8bit: bitsandbytes ``Optimizer2State.init_state``: tensors with >= 4096 elements
      (``min_8bit_size``) keep both moments in uint8 plus one fp32 absmax per 256-element block each
      (blocksize 256 since bitsandbytes 0.44; 2048 before, a 0.1 % difference); smaller ones keep fp32.
    - adafactor: transformers' ``Adafactor`` with beta1=None (no first moment) and a factored second
      moment for tensors of rank >= 2: fp32 row (shape[:-1]) and column (shape[:-2] + shape[-1:])
      statistics; rank-1 tensors keep a full fp32 second moment.
    """
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer is OptimizerName.ADAMW:
            total += 8 * n
        elif optimizer is OptimizerName.ADAMW_8BIT:
            total += 2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n
        elif optimizer is OptimizerName.ADAFACTOR:
            if len(shape) >= 2:
                total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
            else:
                total += 4 * n
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
    return total


@dataclass(frozen=True)
class Row:
    name: str
    bytes: int
    where: str = "gpu"
    note: str = ""
    trained: bool = False
    """UNet weights, gradients or optimizer state: docs/recipe.md's "before activations" figure."""


def persistent_rows(models: dict[str, torch.nn.Module], precision: Precision, optimizer: OptimizerName,
                    ema: bool, ema_on_cpu: bool, adapter: list[torch.Size] | None = None,
                    method: str = "lora") -> list[Row]:
    """What lives for the whole run. Precision policy (components/diffusion/loss.py): fp32 master weights and
    fp32 gradients for every precision (autocast computes in bf16/fp16, stores fp32); frozen text
    encoders in the compute dtype; the VAE in fp32 (SDXL's VAE overflows in fp16).

    ``adapter``: the shapes of an adapter run's trainable tensors (``train.method: lora | lokr``). Then the UNet is
    frozen in the compute dtype like the text encoders, and the master weights, gradients, optimizer state and
    EMA are the adapter's alone (components/training/loop.py ``prepare_unet``)."""
    unet = models["unet"]
    n = count_params(unet)
    compute_bytes = 4 if precision is Precision.FP32 else 2
    text = count_params(models["text_encoder"]) + count_params(models["text_encoder_2"])
    frozen = f"{precision.value if compute_bytes == 2 else 'fp32'}"
    if adapter is not None:
        a = sum(math.prod(s) for s in adapter)
        n -= a  # the UNet's own weights (the adapter's are counted apart)
        rows = [
            Row(f"UNet weights (frozen, {frozen})", compute_bytes * n,
                note=f"{n / 1e9:.3f} B params x {compute_bytes} B"),
            Row(f"{method} adapter weights (fp32 master)", 4 * a, note=f"{a / 1e6:.2f} M params x 4 B", trained=True),
            Row(f"{method} adapter gradients (fp32)", 4 * a, note="the adapter's only", trained=True),
            Row(f"optimizer state ({optimizer.value}, adapter only)", optimizer_state_bytes(adapter, optimizer),
                note=f"{len(adapter)} adapter tensors", trained=True),
        ]
        if ema:
            rows.append(Row("EMA of the adapter (fp32)", 4 * a, "cpu" if ema_on_cpu else "gpu",
                            "diffusers EMAModel shadow"))
        return rows + [
            Row(f"frozen text encoders ({frozen})", compute_bytes * text,
                note=f"two CLIP text towers, {text / 1e6:.1f} M params"),
            Row("frozen VAE (fp32)", 4 * count_params(models["vae"]),
                note=f"{count_params(models['vae']) / 1e6:.1f} M params"),
        ]
    rows = [
        Row("UNet weights (fp32 master)", 4 * n, note=f"{n / 1e9:.3f} B params x 4 B", trained=True),
        Row("UNet gradients (fp32)", 4 * n, note="4 B/param", trained=True),
        Row(f"optimizer state ({optimizer.value})",
            optimizer_state_bytes([p.shape for p in unet.parameters()], optimizer),
            note={"adamw": "2 fp32 moments", "adamw8bit": "2 uint8 moments + block absmax",
                  "adafactor": "factored fp32 2nd moment"}[optimizer.value], trained=True),
    ]
    if ema:
        rows.append(Row("EMA weights (fp32)", 4 * n, "cpu" if ema_on_cpu else "gpu", "diffusers EMAModel shadow"))
    rows += [
        Row(f"frozen text encoders ({precision.value if compute_bytes == 2 else 'fp32'})", compute_bytes * text,
            note=f"two CLIP text towers, {text / 1e6:.1f} M params"),
        Row("frozen VAE (fp32)", 4 * count_params(models["vae"]),
            note=f"{count_params(models['vae']) / 1e6:.1f} M params"),
    ]
    return rows


# --- the plan -------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    name: str
    unet_params: int
    batch: int
    resolution: tuple[int, int]
    precision: str
    optimizer: str
    grad_checkpointing: bool
    persistent: list[Row]
    step: StepTrace
    """The trace for the configured checkpointing setting."""
    step_other: StepTrace
    """The trace with checkpointing flipped, for comparison."""
    vae_encode_peak: int
    """Encoding the batch as training does: one image at a time (``AutoencoderKL.enable_slicing()``,
    components/diffusion/loss.py ``encode_latents``)."""
    vae_encode_peak_batch: int
    """Encoding the whole batch in one call, for comparison (why training slices)."""
    export_peak: int
    """Host memory of registering the trained version (``components/training/driver.py``, a Ray task on a
    worker where ``train.export_memory_gb`` is set): the base pipeline in fp32 once, plus one tensor of the
    checkpoint's UNet as it is copied in (the UNet file is read tensor by tensor, the variant cast file to
    file). An adapter run writes the adapter alone."""
    single_file_peak: int = 0
    """Host memory of exporting a version as one fp16 file (``components/diffusion/single_file.py``, which
    streams): the largest model in fp16 plus one tensor read in fp32."""
    method: str = "full"
    """``train.method``: ``full``, or the adapter (``lora``, ``lokr``) trained beside the frozen UNet."""
    capacity: int = A100_80G_BYTES
    context: int = CUDA_CONTEXT_BYTES
    slack_fraction: float = ALLOCATOR_SLACK
    notes: list[str] = field(default_factory=list)

    @property
    def before_activations(self) -> int:
        """UNet weights + gradients + optimizer state: docs/recipe.md's "about 41 GB / 26 GB" figure."""
        return sum(r.bytes for r in self.persistent if r.trained)

    @property
    def persistent_gpu(self) -> int:
        return sum(r.bytes for r in self.persistent if r.where == "gpu")

    @property
    def dynamic_peak(self) -> int:
        """The step's peak: VAE encoding comes before the UNet forward, so the larger of the two."""
        return max(self.step.peak, self.vae_encode_peak)

    @property
    def allocated_peak(self) -> int:
        """Comparable with ``torch.cuda.max_memory_allocated()``."""
        return self.persistent_gpu + self.dynamic_peak

    @property
    def allocated_peak_cached_latents(self) -> int:
        """The same without VAE encoding (latents cached, or random as in bench/gpu_bench.py)."""
        return self.persistent_gpu + self.step.peak

    def _planned(self, step_peak: int, vae_peak: int | None = None) -> int:
        dynamic = max(step_peak, self.vae_encode_peak if vae_peak is None else vae_peak)
        return self.persistent_gpu + dynamic + self.context + int(self.slack_fraction * dynamic)

    @property
    def total(self) -> int:
        """The planned peak on the device: allocated peak + context + allocator slack."""
        return self._planned(self.step.peak)

    @property
    def headroom(self) -> int:
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def verdict(self) -> str:
        word = "FITS" if self.fits else "DOES NOT FIT"
        return (f"{word} one A100-80G ({self.capacity / GB:.1f} GB): planned peak {self.total / GB:.1f} GB, "
                f"headroom {self.headroom / GB:+.1f} GB")

    def table(self) -> str:
        h, w = self.resolution
        ck = "on" if self.grad_checkpointing else "off"
        lines = [f"memory plan: {self.name} -- UNet {self.unet_params / 1e9:.3f} B params, batch {self.batch} at "
                 f"{w}x{h}, {self.precision}, {self.optimizer}, gradient checkpointing {ck}",
                 f"{'component':<46}{'GB':>8}  where  note"]
        row = lambda name, b, where="gpu", note="": lines.append(f"{name:<46}{b / GB:>8.2f}  {where:<5}  {note}")  # noqa: E731
        for r in self.persistent:
            row(r.name, r.bytes, r.where, r.note)
        row("  = before activations (trained w + g + opt)", self.before_activations, "",
            "docs/recipe.md: ~41 GB AdamW, ~26 GB 8-bit" if self.method == "full" else "the adapter's only")
        row(f"step peak, traced (checkpointing {ck})", self.step.peak, note="activations, grads in flight, recompute")
        row("  of which autocast weight copies", self.step.weight_copies, note="cached until the autocast region ends")
        row("VAE encode peak (fp32, no grad, one image at a time)", self.vae_encode_peak,
            note="before the UNet step; max() of the two")
        row("= allocated peak", self.allocated_peak, note="compare torch.cuda.max_memory_allocated")
        row("CUDA context (assumed)", self.context)
        row(f"allocator slack (assumed {self.slack_fraction:.0%} of step peak)",
            int(self.slack_fraction * self.dynamic_peak))
        row("= planned peak", self.total)
        other = "off" if self.grad_checkpointing else "on"
        lines.append(f"(with gradient checkpointing {other}: step peak {self.step_other.peak / GB:.2f} GB, "
                     f"planned peak {self._planned(self.step_other.peak) / GB:.1f} GB)")
        lines.append("(the whole batch through the VAE in one call would peak at "
                     f"{self.vae_encode_peak_batch / GB:.1f} GB; training encodes one image at a time)")
        what = ("the base pipeline in fp32 + one checkpoint tensor (streamed in)" if self.method == "full"
                else "the adapter alone")
        lines.append("register (host memory of the export task, train.export_memory_gb): "
                     f"{self.export_peak / GB:.1f} GB = {what}")
        lines.append(f"single-file export, fp16 (streamed): {self.single_file_peak / GB:.1f} GB "
                     "= the largest model in fp16 + one tensor in fp32")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(self.verdict())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(before_activations=self.before_activations, persistent_gpu=self.persistent_gpu,
                 dynamic_peak=self.dynamic_peak, allocated_peak=self.allocated_peak,
                 allocated_peak_cached_latents=self.allocated_peak_cached_latents, total=self.total,
                 headroom=self.headroom, fits=self.fits, verdict=self.verdict())
        return d


def resolution_of(cfg: Config) -> tuple[int, int]:
    """The square side of the training buckets' pixel area (every bucket has about this area),
    rounded down to the bucket step so it stays a valid SDXL size (a multiple of 8 at least)."""
    b = cfg.curate.buckets
    side = max(b.step, int(math.isqrt(b.area)) // b.step * b.step)
    return side, side


def plan_for(cfg: Config, capacity: int = A100_80G_BYTES) -> MemoryPlan:
    """The memory plan for ``cfg.train`` on one GPU (SDXL shapes unless ``model.source`` is ``tiny``)."""
    t = cfg.train
    if t.batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {t.batch_size}")
    precision, optimizer = Precision(t.precision), OptimizerName(t.optimizer)
    models = sdxl_models(cfg)
    unet_params = count_params(models["unet"])
    trainable = adapter_on(models["unet"], cfg, precision) if t.is_adapter else None
    hw = resolution_of(cfg)
    factor = 2 ** (len(models["vae"].config.block_out_channels) - 1)
    latent_hw = (hw[0] // factor, hw[1] // factor)
    step = trace_unet_step(models["unet"], t.batch_size, latent_hw, precision, t.grad_checkpointing, trainable)
    other = trace_unet_step(models["unet"], t.batch_size, latent_hw, precision, not t.grad_checkpointing, trainable)
    vae_one = trace_vae_encode(models["vae"], 1, hw)
    vae_batch = trace_vae_encode(models["vae"], t.batch_size, hw)
    notes = []
    if cfg.model.source not in ("tiny", "sdxl-random"):
        notes.append(f"shapes of SDXL-base (model.source {cfg.model.source!r} is assumed to share its layout)")
    if trainable is not None:
        a = t.adapter
        alpha = a.alpha if a.alpha is not None else a.rank
        notes.append(f"train.method={t.method.value} (rank {a.rank}, alpha {alpha:g}, "
                     f"targets {','.join(a.target_modules)}): the UNet frozen in {precision.value}, optimizer state "
                     "for the adapter only; the export writes the adapter alone")
    adapter_shapes = [p.shape for p in trainable] if trainable is not None else None
    largest = max(t.numel() for m in models.values() for t in m.state_dict().values())
    return MemoryPlan(
        name=cfg.name, unet_params=unet_params, batch=t.batch_size, resolution=hw,
        precision=precision.value, optimizer=optimizer.value, grad_checkpointing=t.grad_checkpointing,
        persistent=persistent_rows(models, precision, optimizer, t.ema_decay is not None, t.ema_on_cpu,
                                   adapter_shapes, t.method.value),
        # Training encodes one image at a time (AutoencoderKL slicing, components/diffusion/loss.py): the
        # fp32 VAE on a whole 1 MP batch of 24 would peak at ~65 GB on its own.
        step=step, step_other=other, vae_encode_peak=vae_one, vae_encode_peak_batch=vae_batch,
        export_peak=(4 * sum(count_params(m) for m in models.values()) + 4 * largest if trainable is None
                     else 4 * sum(math.prod(s) for s in adapter_shapes)),
        single_file_peak=2 * max(count_params(m) for m in models.values()) + 4 * largest,
        capacity=capacity, notes=notes, method=t.method.value,
    )


def adapter_on(unet: torch.nn.Module, cfg: Config, precision: Precision) -> list[torch.nn.Parameter]:
    """Put ``train.adapter`` on the (meta) UNet as an adapter run does: the UNet in the compute dtype, peft's
    adapter in fp32; returns the adapter's parameters."""
    from components.diffusion.adapters import add_adapter, peft_config  # peft on first use, as above

    a = cfg.train.adapter
    if precision is not Precision.FP32:
        torch.nn.Module.to(unet, {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[precision])
    trainable = add_adapter(unet, peft_config(cfg.train.method.value, a.rank, a.alpha, a.dropout, a.target_modules,
                                              a.decompose_factor))
    for p in trainable:
        p.data = p.data.float()
    return trainable
