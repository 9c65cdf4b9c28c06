"""Smoke test of the benchmark harness (not a timing test): sane keys and identical outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.curation import benchmark_curation
from components.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_returns_sane_figures(ray_local, tmp_path):
    cfg = load_config(REPO / "flows/configs/tiny.yaml", ["curate.filters.require_exif=true"])
    out = benchmark_curation(4, width=320, height=240, workers=1, cfg=cfg, workdir=str(tmp_path))
    assert out["n_images"] == 4 and out["size"] == "320x240" and out["kept"] == 4
    assert out["same_output"] is True  # the loop and the pipeline wrote the same dataset
    assert out["first_run_images"] == 4 and out["first_run_s"] > 0  # the warm-up run, reported apart
    assert out["loop_images_per_s"] > 0 and out["pipeline_images_per_s"] > 0
    assert abs(out["speedup"] - out["pipeline_images_per_s"] / out["loop_images_per_s"]) < 0.01
    cpu = out["cpu"]  # the test's own local cluster: its processes all run below this one
    assert cpu["loop_cpu_s"] > 0 and cpu["workers_cpu_s"] > 0 and cpu["others_cpu_s"] >= 0
    assert 0 < cpu["cores_busy"] <= 1.05 and cpu["cores"] >= 1
    assert cpu["pipeline_cpu_s"] == pytest.approx(cpu["workers_cpu_s"] + cpu["others_cpu_s"])
    assert not list(tmp_path.iterdir())  # generated images and both outputs cleaned up
