"""The single-A100 memory plan (components/training/memory/plan.py) and its meta-device tracer
(components/training/memory/trace.py)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from components.config import ConfigError, OptimizerName, Precision, load_config
from components.diffusion.sdxl_base import SDXL_UNET_PARAMS
from components.training.memory import plan as mp
from components.training.memory.trace import CudaAutocastEmulation, LiveBytes, trace_unet_step

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def sdxl():
    return mp.sdxl_models()


def low_precision_params(module: torch.nn.Module) -> int:
    """Parameters autocast copies to bf16: all but the norms' (group_norm and layer_norm run in fp32)."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    in_norms = sum(p.numel() for m in module.modules() if isinstance(m, norms) for p in m.parameters(recurse=False))
    return mp.count_params(module) - in_norms


def test_sdxl_models_have_the_published_sizes(sdxl):
    assert all(p.device.type == "meta" for m in sdxl.values() for p in m.parameters())
    assert mp.count_params(sdxl["unet"]) == SDXL_UNET_PARAMS
    assert round(SDXL_UNET_PARAMS / 1e9, 3) == 2.567  # docs/recipe.md
    assert mp.count_params(sdxl["text_encoder"]) == 123_060_480  # CLIP ViT-L/14 text tower
    assert mp.count_params(sdxl["text_encoder_2"]) == 694_659_840  # OpenCLIP bigG text tower + projection
    assert mp.count_params(sdxl["vae"]) == 83_653_863


# docs/recipe.md: "about 41 GB with fp32 master weights, grads and AdamW states; about 26 GB with 8-bit AdamW".
# Tolerance 0.5 GB (about 2 %): "about" figures, rounded to the GB.
@pytest.mark.parametrize(("optimizer", "anchor_gb"), [(OptimizerName.ADAMW, 41.0), (OptimizerName.ADAMW_8BIT, 26.0)])
def test_before_activations_matches_recipe_anchors(sdxl, optimizer, anchor_gb):
    rows = mp.persistent_rows(sdxl, Precision.BF16, optimizer, ema=False, ema_on_cpu=False)
    before = sum(r.bytes for r in rows if r.trained)
    assert abs(before / 1e9 - anchor_gb) <= 0.5


def test_eight_bit_adamw_saves_about_six_bytes_per_param(sdxl):
    shapes = [p.shape for p in sdxl["unet"].parameters()]
    saved = (mp.optimizer_state_bytes(shapes, OptimizerName.ADAMW)
             - mp.optimizer_state_bytes(shapes, OptimizerName.ADAMW_8BIT))
    assert 5.9 <= saved / SDXL_UNET_PARAMS <= 6.0  # 8 -> 2 bytes, less the block absmax


def test_optimizer_state_rules_per_tensor():
    small, big, conv = torch.Size([320]), torch.Size([1280, 1280]), torch.Size([320, 4, 3, 3])
    n = 1280 * 1280
    assert mp.optimizer_state_bytes([small], OptimizerName.ADAMW_8BIT) == 8 * 320  # < min_8bit_size: fp32
    assert mp.optimizer_state_bytes([big], OptimizerName.ADAMW_8BIT) == 2 * n + 8 * math.ceil(n / 256)
    assert mp.optimizer_state_bytes([big], OptimizerName.ADAFACTOR) == 4 * (1280 + 1280)
    assert mp.optimizer_state_bytes([conv], OptimizerName.ADAFACTOR) == 4 * (320 * 4 * 3 + 320 * 4 * 3)
    assert mp.optimizer_state_bytes([small], OptimizerName.ADAFACTOR) == 4 * 320


def test_ema_on_cpu_is_not_gpu_memory(sdxl):
    rows = mp.persistent_rows(sdxl, Precision.BF16, OptimizerName.ADAMW, ema=True, ema_on_cpu=True)
    ema = [r for r in rows if r.name.startswith("EMA")]
    assert len(ema) == 1 and ema[0].where == "cpu" and ema[0].bytes == 4 * SDXL_UNET_PARAMS
    on_gpu = mp.persistent_rows(sdxl, Precision.BF16, OptimizerName.ADAMW, ema=True, ema_on_cpu=False)
    assert [r.where for r in on_gpu if r.name.startswith("EMA")] == ["gpu"]


def test_live_bytes_counts_new_storage_until_freed():
    x, w = torch.randn(64, 128), torch.randn(128, 256)
    one = 64 * 256 * 4
    with LiveBytes() as live:
        y = x @ w
        assert live.current == one
        v = y.t()
        y.add_(1.0)  # a view and an in-place op allocate nothing
        assert live.current == one
        z = y * 2
        assert live.peak == 2 * one
        del y, v  # last references to y's storage
        assert live.current == one
        del z
        assert live.current == 0 and live.peak == 2 * one


def test_trace_on_meta_equals_trace_on_real_tensors():
    """The point of tracing on meta: the same allocations as a real run of the same code."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=8, groups=8)

    def peak(device: str) -> int:
        b = copy.deepcopy(block).to(device)
        x, temb = torch.randn(2, 16, 12, 12, device=device), torch.randn(2, 8, device=device)
        with LiveBytes() as live:
            b(x, temb).sum().backward()
        return live.peak

    assert peak("meta") == peak("cpu") > 0


def test_autocast_emulation_follows_the_cuda_policy():
    lin, norm = torch.nn.Linear(8, 8, device="meta"), torch.nn.GroupNorm(2, 8, device="meta")
    emu = CudaAutocastEmulation(torch.bfloat16)
    x = torch.empty(4, 8, device="meta")
    with emu:
        y, again = lin(x), lin(x)
        z = norm(y.view(4, 8, 1))
    assert y.dtype == again.dtype == torch.bfloat16  # linear: low precision
    assert z.dtype == torch.float32  # group_norm: fp32 on CUDA
    assert emu.weight_copy_bytes == (8 * 8 + 8) * 2  # weight and bias cast once, then cached


def test_attention_memory_is_linear_in_sequence_length():
    q = torch.empty(1, 2, 4096, 64, device="meta", dtype=torch.bfloat16)
    with LiveBytes() as live, CudaAutocastEmulation(torch.bfloat16):
        F.scaled_dot_product_attention(q, q, q)
    assert q.nbytes <= live.peak < 2 * 4096 * 4096  # the output, never the 4096 x 4096 scores


def test_unet_trace_checkpointing_and_batch_scaling():
    unet = mp.sdxl_models(load_config(REPO / "flows/configs/tiny.yaml"))["unet"]
    off = {b: trace_unet_step(unet, b, (32, 32), Precision.BF16, False) for b in (1, 2, 4)}
    on = trace_unet_step(unet, 4, (32, 32), Precision.BF16, True)
    assert on.peak < off[4].peak
    assert off[1].weight_copies == 2 * low_precision_params(unet)  # one bf16 copy of each, cached
    activations = {b: t.forward_end - t.weight_copies for b, t in off.items()}
    assert activations[4] - activations[2] == 2 * (activations[2] - activations[1]) > 0  # linear in batch


def test_a_bad_batch_is_refused_by_the_config_and_by_the_plan():
    with pytest.raises(ConfigError, match="batch_size"):  # flows/plan.py: exit 2 before any tracing
        load_config(REPO / "flows/configs/tiny.yaml", ["train.batch_size=0"])
    cfg = load_config(REPO / "flows/configs/tiny.yaml")
    cfg.train.__dict__["batch_size"] = 0  # past validation, as a caller building configs by hand could
    with pytest.raises(ValueError, match="batch_size"):
        mp.plan_for(cfg)


def test_tiny_preset_plan_table():
    plan = mp.plan_for(load_config(REPO / "flows/configs/tiny.yaml"))
    assert plan.fits and plan.resolution == (256, 256) and plan.batch == 4
    table = plan.table()
    assert "FITS one A100-80G" in table and "gradient checkpointing off" in table
    json.dumps(plan.to_dict())


def test_plan_command_on_the_terminus_preset(sdxl):
    """`python flows/plan.py --config flows/configs/terminus_v2.yaml --json`, as a user runs it."""
    proc = subprocess.run([sys.executable, "flows/plan.py", "--config", "flows/configs/terminus_v2.yaml", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    plan = json.loads(proc.stdout)
    assert proc.returncode == (0 if plan["fits"] else 1), proc.stderr[-2000:]
    assert plan["unet_params"] == SDXL_UNET_PARAMS and plan["batch"] == 24 and plan["resolution"] == [1024, 1024]
    assert abs(plan["before_activations"] / 1e9 - 26.0) <= 0.5
    assert plan["step"]["weight_copies"] == 2 * low_precision_params(sdxl["unet"])
    assert plan["step_other"]["peak"] > 5 * plan["step"]["peak"]  # checkpointing off costs > 5x
    assert plan["vae_encode_peak_batch"] > 10 * plan["vae_encode_peak"]  # why training encodes one image at a time
    assert plan["fits"]  # the seed recipe fits one A100-80G (components/diffusion/loss.py slices the VAE encode)
    assert plan["total"] > plan["allocated_peak"] >= plan["allocated_peak_cached_latents"]
    assert plan["verdict"].startswith("FITS" if plan["fits"] else "DOES NOT FIT")
    # Exporting streams (the largest model in fp16, the UNet); registering holds the base pipeline in fp32 once.
    unet_fp16 = 2 * SDXL_UNET_PARAMS
    assert unet_fp16 < plan["single_file_peak"] <= 8e9
    fp32_pipeline = 4 * sum(sum(p.numel() for p in m.parameters()) for m in sdxl.values())
    assert fp32_pipeline < plan["export_peak"] < 1.05 * fp32_pipeline


def test_an_adapter_plan_freezes_the_unet_in_bf16_and_keeps_optimizer_state_for_the_adapter_only():
    full = mp.plan_for(load_config(REPO / "flows/configs/tiny.yaml", ["train.precision=bf16"]))
    lora = mp.plan_for(load_config(REPO / "flows/configs/tiny.yaml", ["train.precision=bf16", "train.method=lora",
                                                                      "train.adapter.rank=4"]))
    rows = {r.name: r for r in lora.persistent}
    frozen = rows["UNet weights (frozen, bf16)"]
    assert frozen.bytes == 2 * full.unet_params and not frozen.trained
    adapter = [r for r in lora.persistent if r.trained]
    optimizer = load_config(REPO / "flows/configs/tiny.yaml").train.optimizer
    assert [r.name for r in adapter] == ["lora adapter weights (fp32 master)", "lora adapter gradients (fp32)",
                                         f"optimizer state ({optimizer.value}, adapter only)"]
    unet = mp.sdxl_models(load_config(REPO / "flows/configs/tiny.yaml"))["unet"]
    cfg = load_config(REPO / "flows/configs/tiny.yaml",
                      ["train.precision=bf16", "train.method=lora", "train.adapter.rank=4"])
    shapes = [p.shape for p in mp.adapter_on(unet, cfg, Precision.BF16)]
    assert adapter[2].bytes == mp.optimizer_state_bytes(shapes, OptimizerName(cfg.train.optimizer))
    assert adapter[0].bytes == 4 * sum(math.prod(s) for s in shapes) < full.persistent[0].bytes / 10
    assert lora.before_activations < full.before_activations / 10
    assert "frozen in bf16" in lora.table() and "the adapter alone" in lora.table()
