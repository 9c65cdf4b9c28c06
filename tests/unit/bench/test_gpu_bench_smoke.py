"""bench/gpu_bench.py in --smoke mode (CPU, tiny sizes), so the GPU benchmark cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from components.diffusion import sdxl_base
from components.environment import snapshot

REPO = Path(__file__).resolve().parents[3]
BENCH = REPO / "bench/gpu_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke() -> dict:
    env = {**snapshot(), "CUDA_VISIBLE_DEVICES": ""}  # the bare-machine path; never touches a GPU here
    # As on a bare GPU host: a module run from the repository root.
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_bench", "--smoke", "--peak-tflops", "1.0"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, "stdout must hold exactly one JSON object"
    return json.loads(lines[0])


def test_smoke_run_completes_every_phase(smoke):
    assert smoke["schema"] == "terminus-gpu-bench/1" and smoke["mode"] == "smoke"
    assert smoke["errors"] == [] and smoke["skipped"] == [] and "aborted" not in smoke
    assert smoke["environment"]["device"] == "cpu" and smoke["environment"]["peak_bf16_tflops"] == 1.0
    assert 0 < smoke["elapsed_s"] <= smoke["budget_s"]


def test_smoke_flop_count_is_consistent(smoke):
    flops = smoke["flops"]
    assert flops["fwd_tflop_per_image"] > 0
    assert 2.5 <= flops["fwd_bwd_tflop_per_image"] / flops["fwd_tflop_per_image"] <= 3.5  # backward ~ 2x forward
    assert flops["mfu_uses_tflop"] == 20.2


@pytest.mark.parametrize("mode", ["checkpointing_on", "checkpointing_off"])
def test_smoke_training_batch_search_and_throughput(smoke, mode):
    run = smoke["train"][mode]
    assert run["status"] == "ok"
    # --smoke injects an OOM above batch 3: the search tries 4 (fails), then 2, then 3.
    assert run["probes"] == [{"batch": 4, "fits": False}, {"batch": 2, "fits": True}, {"batch": 3, "fits": True}]
    assert run["batch"] == 3 and run["fits_max_batch"] is False
    assert run["step_s"] > 0 and run["images_per_s"] == pytest.approx(3 / run["step_s"], rel=0.01)
    assert run["mfu"] == pytest.approx(20.2 * run["images_per_s"] / 1.0, rel=0.01)  # peak given as 1 TFLOP/s
    assert run["peak_allocated_gb"] is None  # no CUDA: no allocator figures, not zeros


def test_smoke_inference_variants(smoke):
    inf = smoke["inference"]
    variants = ("diffusers_defaults", "fused_qkv_channels_last", "compiled")
    assert all(inf[v]["status"] == "ok" and inf[v]["s_per_image"] > 0 for v in variants)
    assert inf["best"]["s_per_image"] == min(inf[v]["s_per_image"] for v in variants)
    assert smoke["vae_encode"]["batch"] == 2


def test_smoke_targets_next_to_anchors(smoke):
    targets = {t["name"]: t for t in smoke["targets"]}
    assert set(targets) == {"train_mfu", "batch_24_fits", "inference_s_per_image"}
    assert targets["batch_24_fits"]["met"] is False and targets["batch_24_fits"]["measured"] == 3
    assert all(t["anchor"] for t in targets.values())


def test_the_benchmark_builds_from_the_library_configs():
    bench = load_bench()
    assert bench.SDXL_UNET_CONFIG is sdxl_base.SDXL_UNET_CONFIG
    assert bench.SDXL_VAE_CONFIG is sdxl_base.SDXL_VAE_CONFIG
    assert bench.SDXL_TEXT_CONFIGS == (sdxl_base.SDXL_TEXT_ENCODER_CONFIG, sdxl_base.SDXL_TEXT_ENCODER_2_CONFIG)


def test_device_peak_lookup():
    bench = load_bench()
    assert bench.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops_for("NVIDIA L40") == 181.0
    assert bench.peak_tflops_for("Some Future GPU") is None


def test_phase_budget_and_errors_are_reported_not_fatal():
    bench = load_bench()
    b = bench.Bench(bench.parse(["--smoke", "--budget-s", "30"]))
    b.phase("too_long", lambda: None, min_s=1000)

    def boom():
        raise RuntimeError("kaput")

    def overrun():
        raise bench.BudgetExceeded()

    b.phase("broken", boom, min_s=0)
    b.phase("overrun", overrun, min_s=0)
    assert [s["phase"] for s in b.out["skipped"]] == ["too_long", "overrun"]
    assert b.out["errors"] == [{"phase": "broken", "error": "RuntimeError: kaput"}]
