"""The training and caching benchmarks at trivially small sizes, and the report's verdicts (not timed)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import components.diffusion.loss as loss
from bench import training as bench_training
from bench.curation import cpu_breakdown
from bench.report import Figure, cpu_precision, figures, table
from bench.training import benchmark_caching, benchmark_input, benchmark_training, build_trainee, used_precision
from components.config import Precision, load_config
from components.diffusion.loss import effective_precision
from components.training import loop

REPO = Path(__file__).resolve().parents[3]
SMALL = ["curate.buckets.area=16384", "train.batch_size=2"]  # 128 x 128 images, 2 per step


@pytest.fixture
def small_cfg(tmp_path):
    return load_config(REPO / "flows/configs/tiny.yaml", [f"state_dir={tmp_path / 'state'}", *SMALL])


def _sane_steps(stats: dict, steps: int) -> None:
    assert stats["steps"] == steps and len(stats["times_s"]) == steps
    assert all(t > 0 for t in stats["times_s"]) and stats["finite"]
    assert stats["min_s"] <= stats["median_s"] <= stats["max_s"]
    assert math.isclose(stats["s_per_step"], sum(stats["times_s"]) / steps, rel_tol=1e-3)
    assert 0 <= stats["fetch_s"] < stats["s_per_step"]


@pytest.mark.slow
def test_training_benchmark_smoke(ray_local, small_cfg, tmp_path):
    out = benchmark_training(small_cfg, warmup=1, steps=2, epoch_probe=False, workdir=str(tmp_path))
    assert out["rows"] == 2 * 3 and out["image_side"] == 128 and out["batch_size"] == 2
    for side in ("plain_before", "plain_after", "ray"):
        _sane_steps(out[side], 2)
    assert out["ray"]["leftover_batches"] == 0  # exactly one epoch: every row was trained on
    assert out["threads_match"] and out["ray"]["torch_threads"] == small_cfg.train.cpus_per_worker
    assert out["malloc_pinned"]  # both sides ran with the same glibc thresholds
    assert out["precision_used"] == _precision_here(small_cfg) == out["ray"]["precision"]
    plain = (sum(out["plain_before"]["times_s"]) + sum(out["plain_after"]["times_s"])) / 4
    assert math.isclose(out["plain_s_per_step"], plain, rel_tol=1e-3)
    assert math.isclose(out["overhead"], out["ray_s_per_step"] / out["plain_s_per_step"] - 1, rel_tol=1e-6)
    assert out["ray_startup_s"] > 0 and out["ray_epoch_start_s"] is None  # the probe is off here
    assert not list(tmp_path.iterdir())  # data and Ray Train storage cleaned up
    rows = {f.name: f for f in figures({"training": out})}
    overhead = rows["Ray Train overhead per step"]
    assert overhead.target == ("<=", 5.0) and overhead.status == ("PASS" if out["overhead"] <= 0.05 else "MISS")


def _precision_here(cfg) -> str:
    return str(effective_precision(cfg.train.precision, torch.device("cpu")))


def test_the_benchmarks_train_in_the_precision_the_training_loop_uses(small_cfg, monkeypatch):
    """On a CPU that emulates bf16 the training loop runs fp32 (components/diffusion/loss.py); the benchmarks'
    steps must too, or they time a step no run takes (emulated bf16 is about 10x slower there)."""
    assert small_cfg.train.precision is Precision.BF16
    monkeypatch.setattr(loss, "native_bf16", lambda device: False)  # an AVX2-only CPU
    emulated = build_trainee(small_cfg)
    assert emulated.cfg.train.precision is Precision.FP32 and emulated.parts.text_encoder.dtype == torch.float32
    monkeypatch.setattr(loss, "native_bf16", lambda device: True)  # AVX512-BF16 or AMX
    native = build_trainee(small_cfg)
    assert native.cfg.train.precision is Precision.BF16 and native.parts.text_encoder.dtype == torch.bfloat16


def test_sides_that_trained_in_different_precisions_are_refused():
    assert used_precision({"precision": "bf16"}, {"precision": "bf16"}) == "bf16"
    with pytest.raises(RuntimeError, match="different precisions"):
        used_precision({"precision": "bf16"}, {"precision": "fp32"})


def test_the_table_names_the_cpu_kernels_and_the_precision_used():
    meta = {"date": "today", "host": "h", "cpu": "c", "cores": 2, "load_start": [1, 2, 3], "cpu_capability": "AVX2",
            "bf16_native": False}
    sections = {name: {"precision": "bf16", "precision_used": "fp32", "wall_s": 1.0, "load_before": [1.0],
                       "load_after": [1.0]} for name in ("training", "caching")}
    header = table({"meta": meta, "sections": sections, "figures": []}).splitlines()[1]
    assert header == ("torch CPU kernels AVX2, bf16 in hardware: no (emulated: bf16 runs as fp32); "
                      "training, caching computed in fp32 (configured bf16)")
    assert cpu_precision()["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_caching_benchmark_smoke(small_cfg, tmp_path):
    out = benchmark_caching(small_cfg, rows=4, warmup=1, steps=2, workdir=str(tmp_path))
    assert out["precision"] == "bf16" and out["precision_used"] == _precision_here(small_cfg)
    _sane_steps(out["pixels"], 2)
    _sane_steps(out["cached"], 2)
    assert out["latent_dist_shape"] == [8, 16, 16]  # posterior mean + log-variance of 128 px images
    assert math.isclose(out["speedup"], out["pixels_s_per_step"] / out["cached_s_per_step"], rel_tol=1e-6)
    assert out["cache_encode_s_per_image"] > 0
    assert not list(tmp_path.iterdir())
    rows = {f.name.strip(): f for f in figures({"caching": out})}
    removed = rows["of which: the on-the-fly step's share that the cache removes (1 - cached / on the fly)"].value
    assert removed == pytest.approx(100 * (1 - 1 / out["speedup"]))  # the speed-up is 1 / (1 - that share)


def test_input_benchmark_smoke(small_cfg, tmp_path):
    out = benchmark_input(small_cfg, batches=4, workdir=str(tmp_path))
    assert out["precision_used"] == _precision_here(small_cfg)
    assert out["image_side"] == 128 and out["batch_size"] == 2
    assert math.isclose(out["emulated_step_s"], out["step_s"] / 10, rel_tol=1e-9)
    assert out["prefetch"]["depth"] == small_cfg.train.prefetch_batches > 0 and out["no_prefetch"]["depth"] == 0
    for arm in ("prefetch", "no_prefetch"):
        assert 0 <= out[arm]["wait_share"] < 1 and out[arm]["wall_s"] >= 3 * out["emulated_step_s"]
    rows = {f.name: f for f in figures({"input": out})}
    share = next(f for name, f in rows.items() if name.startswith("data wait share, prefetch"))
    assert share.target == ("<", 2.0) and share.status == ("PASS" if out["prefetch"]["wait_share"] < 0.02 else "MISS")
    assert not list(tmp_path.iterdir())


def test_verdicts_and_table():
    assert Figure("s", "overhead", 6.2, "%", ("<=", 5.0)).status == "MISS"
    assert Figure("s", "overhead", 4.9, "%", ("<=", 5.0)).status == "PASS"
    assert Figure("s", "speed-up", 1.69, "x", (">=", 1.7)).status == "MISS"
    assert Figure("s", "wait", 1.99, "%", ("<", 2.0)).status == "PASS"
    assert Figure("s", "wait", 2.0, "%", ("<", 2.0)).status == "MISS"
    assert Figure("s", "ratio", 0.9, "x", (">", 1.0), claim=True).status == "NOT SEEN"
    assert Figure("s", "ratio", 1.8, "x", (">", 1.0), claim=True).status == "HOLDS"
    assert Figure("s", "plain", 0.4, "s/step").status == "-"
    assert Figure("s", "broken", None).status == "ERROR"
    sections = {"caching": {"error": "RuntimeError: boom", "wall_s": 1.0, "load_before": [3.0], "load_after": [4.0]}}
    figs = [f.as_dict() for f in figures(sections)]
    figs.append(Figure("serving", "overhead", 12.5, "ms", ("<=", 10.0)).as_dict())
    report = {"meta": {"date": "today", "host": "h", "cpu": "c", "cores": 2, "load_start": [1, 2, 3],
                       "load_end": [2, 2, 3], "total_s": 5}, "sections": sections, "figures": figs}
    text = table(report)
    assert "ERROR" in text and "boom" in text
    miss = next(line for line in text.splitlines() if line.startswith("serving"))
    assert "12.5 ms" in miss and "<= 10 ms" in miss and miss.endswith("MISS")
    assert "load average" in text and "caching 3.0->4.0" in text


def test_the_curation_breakdown_splits_cpu_by_process_and_its_rows_follow_it():
    before = {1: 1.0, 2: 0.0, 3: 5.0}  # pid -> CPU s: the driver, two workers
    after = {1: 1.5, 2: 8.0, 3: 13.0, 4: 0.25}  # a process that started during the run counts whole
    cpu = cpu_breakdown(before, after, wall_s=10.0, cores=2, workers=2, loop_cpu_s=15.0)
    assert cpu["pipeline_cpu_s"] == pytest.approx(16.75) and cpu["workers_cpu_s"] == pytest.approx(16.0)
    assert cpu["others_cpu_s"] == pytest.approx(0.75) and cpu["cores_busy"] == pytest.approx(16.75 / 20)
    assert cpu["cpu_vs_loop"] == pytest.approx(16.75 / 15) and cpu["workers_cpu_vs_loop"] == pytest.approx(16 / 15)
    data = {"n_images": 8, "size": "64x64", "workers": 2, "cpus": 2, "loop_images_per_s": 1.0,
            "pipeline_images_per_s": 1.6, "first_run_images": 2, "first_run_s": 1.0, "speedup": 1.6,
            "same_output": True, "cpu": cpu}
    rows = {f.name.strip(): f for f in figures({"curation": data})}
    busy = rows["of which: the cores the pipeline's processes kept busy (CPU s / wall x 2)"]
    assert busy.value == pytest.approx(83.75)
    assert rows["Ray's own processes and the driver / the loop's CPU"].value == pytest.approx(5.0)
    data["cpu"] = None  # a cluster at RAY_ADDRESS: no breakdown rows, the rest unchanged
    assert not any("of which" in f.name for f in figures({"curation": data}))


def test_flow_rejects_unknown_section():
    proc = subprocess.run([sys.executable, str(REPO / "flows/bench.py"), "--only", "training,nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown section(s) ['nope']" in proc.stderr


def test_multiplex_rows_compare_one_replica_with_one_per_adapter():
    side = {"p50_s": 0.05, "p99_s": 0.09, "throughput_rps": 20.0, "errors": 0}
    d = {"adapters": 2, "rank": 16, "concurrency": 4, "errors": 0, "latency_ratio_p50": 1.1, "memory_ratio": 0.55,
         "multiplexed": {**side, "memory": {"peak_rss_bytes": 550 * 2**20}},
         "dedicated": {**side, "memory": {"peak_rss_bytes": 1000 * 2**20}}}
    rows = {f.name: f for f in figures({"multiplex": d})}
    memory = rows["multiplexed / dedicated memory"]
    assert memory.value == 0.55 and memory.status == "PASS"
    assert Figure("multiplex", "memory", 1.2, "x", ("<", 1.0)).status == "MISS"
    assert rows["replica peak RSS: dedicated (sum of 2)"].value == 1000
    assert rows["failed requests"].status == "PASS"


def test_the_benchmark_step_is_the_worker_loops_step(small_cfg, monkeypatch, tmp_path):
    """The benchmark times the step training takes: its trainee is the loop's (scaler, LR schedule, EMA when
    configured) and each step goes through ``loop.train_step``, which moves the weights and the LR schedule."""
    called = []
    shipped = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: called.append(1) or shipped(*a, **k))
    cfg = small_cfg.model_copy(update={"train": small_cfg.train.model_copy(update={"ema_decay": 0.99})})
    t = bench_training.build_trainee(cfg)
    assert isinstance(t.loop, loop.Trainee) and t.loop.ema is not None
    before = [p.detach().clone() for p in t.loop.trainable[:4]]
    size = cfg.train.batch_size
    manifest = bench_training.write_bench_dataset(tmp_path / "data", size, bench_training.bucket_side(cfg), cfg.seed)
    rows = bench_training.read_rows(manifest)[:size]
    loss = bench_training.train_step(t, rows, 0)
    assert called == [1] and math.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, t.loop.trainable[:4], strict=True))
    assert t.loop.lr_scheduler.last_epoch == 1
