"""The scale section (``bench.scale``) at tiny sizes, SQLite only: its JSON's keys and its verdicts (not timed)."""

from __future__ import annotations

import json

import numpy as np

from bench.scale import LOG_TARGET_MS, PLAN_TARGET_MB, PLAN_TARGET_S, run_scale, scale_config, synthetic_index


def test_synthetic_index_has_the_presets_sources_and_sdxl_buckets():
    cfg = scale_config()
    index = synthetic_index(cfg, 1000)
    assert len(index) == 1000 and index.sources == ("laion-hd", "mj-general")
    assert set(np.unique(index.source)) == {0, 1} and len(np.unique(index.bucket)) > 3
    assert "1024x1024" in index.buckets and index.file_of.max() == len(index.files) - 1
    assert (index.row_in_file < cfg.curate.rows_per_shard).all()


def test_scale_section_at_tiny_sizes_writes_its_figures_and_verdicts(tmp_path):
    cfg = scale_config([f"state_dir={tmp_path / 'state'}"])
    report, path = run_scale(cfg, results_dir=tmp_path / "results", log=lambda line: None,
                             plots_dir=tmp_path / "plots", rows=(500, 1000), steps=(100, 200), server=False,
                             workdir=str(tmp_path))
    data = report["sections"]["scale"]
    assert "error" not in data, data.get("error")
    assert json.loads(path.read_text())["sections"]["scale"]["plans"][1]["rows"] == 1000
    assert path.name.startswith("scale_") and path.with_suffix(".md").exists()
    for plan in data["plans"]:
        assert plan["resume_at_batch"] + plan["resumed_batches"] == plan["micro_batches_per_rank"] > 0
        assert plan["rows_planned"] == plan["micro_batches_per_rank"] * cfg.train.batch_size * cfg.train.num_workers
        for part in ("build", "resume"):
            assert set(plan[part]) >= {"s", "tracemalloc_peak_mb", "rss_growth_mb"}
            assert plan[part]["tracemalloc_peak_mb"] > 0
    sqlite = data["logging"]["sqlite"]
    assert set(data["logging"]) == {"sqlite"}
    assert sqlite["steps"] == sqlite["history_points"] == 200 and sqlite["db_mb"] > 0
    assert {"loss", "mix.laion-hd", "peak_rss_mb"} <= set(sqlite["keys"])
    assert [r["steps"] for r in sqlite["runs"]] == [100, 200] and sqlite["extrapolated"]["steps"] == 128_000
    figures = {f["name"]: f for f in report["figures"]}
    targeted = [f for f in figures.values() if f["target"] is not None]
    # the largest index's build and resume (time, tracemalloc, RSS), the logger's cost measured and extrapolated
    assert len(targeted) == 8
    for f in targeted:
        bound = {"s": PLAN_TARGET_S, "MB": PLAN_TARGET_MB, "ms": LOG_TARGET_MS}[f["unit"]]
        assert f["target"] == ["<", bound] or f["target"] == ("<", bound)
        assert f["status"] == ("PASS" if f["value"] < bound else "MISS")
    assert report["missed"] == [f"scale: {f['name']}" for f in targeted if f["status"] == "MISS"]
    assert all(p.endswith(".png") for p in report["plots"])
