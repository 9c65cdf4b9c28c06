"""flows/curate.py on the tiny preset and scikit-image's photos: most kept, drops with reasons,
the curated contract honoured, MLflow lineage recorded; a rerun replaces the dataset cleanly."""

from __future__ import annotations

import io
import json
import runpy
import sys
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
from PIL import Image

from components import dataset
from components.config import load_config
from components.curation.pipeline import curate

REPO = Path(__file__).resolve().parents[2]


def run_flow(monkeypatch, capsys, *args: str) -> dict:
    monkeypatch.syspath_prepend(str(REPO / "flows"))
    monkeypatch.setattr(sys, "argv", ["curate.py", *args])
    runpy.run_path(str(REPO / "flows/curate.py"), run_name="__main__")
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_curate_flow_on_the_demo_then_rerun(ray_local, monkeypatch, capsys, tmp_path):
    out, state = tmp_path / "demo", tmp_path / "state"
    sets = [f"curate.output={out}", f"state_dir={state}", f"tracking.tracking_uri=sqlite:///{state}/mlflow.db"]
    result = run_flow(monkeypatch, capsys, "--config", str(REPO / "flows/configs/tiny.yaml"),
                      *[x for s in sets for x in ("--set", s)])

    demo = [json.loads(line) for line in (REPO / "data/demo/manifest.jsonl").read_text().splitlines()]
    assert result["inputs"] == len(demo)
    assert result["kept"] >= 0.75 * len(demo)  # most photos are kept
    assert result["reasons"]["too_small"] >= 3  # chessboard 200x200, microaneurysms 102x102, the 14x25 gif
    assert result["kept"] + sum(result["reasons"].values()) == result["inputs"]
    report = json.loads(Path(result["report"]).read_text())
    small = {Path(e["source"]).name for e in report["examples"]["too_small"]}
    assert {"chessboard_RGB.png", "microaneurysms.png", "no_time_for_that_tiny.gif"} <= small

    m = dataset.read_manifest(str(out))
    assert m.digest == result["digest"] and m.rows["val"] >= 1 and m.rows["train"] >= 1
    table = pq.read_table(m.paths("train") + m.paths("val"))
    assert table.schema.equals(dataset.SCHEMA) and table.num_rows == result["kept"]
    captions = {Path(r["source"]).name: r["caption"] for r in table.to_pylist()}
    assert captions["chelsea.png"] == "close-up of a tabby cat looking at the camera"
    for r in table.to_pylist():
        assert Image.open(io.BytesIO(r["image"])).size == (r["target_w"], r["target_h"])
        assert r["target_w"] * r["target_h"] <= 65536 and r["original_h"] >= r["target_h"]


    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.metrics["kept"] == result["kept"]
    def context(d) -> str:
        return {t.key: t.value for t in d.tags}["mlflow.data.context"]

    assert [d.dataset.digest for d in run.inputs.dataset_inputs if context(d) == "curated"] == [result["digest"]]
    assert [d.dataset.name for d in run.inputs.dataset_inputs if context(d) == "source"] == ["default"]
    # The one-source shorthand is the source "default"; its counts add up, every caption from the manifest.
    (name, src), = report["sources"].items()
    assert name == "default" and src["inputs"] == result["inputs"] and src["kept"] == result["kept"]
    assert src["kept"] + sum(src["reasons"].values()) == src["inputs"]
    assert src["captions"] == {"column": result["kept"]} == report["captions"]
    assert {r["source_name"] for r in table.to_pylist()} == {"default"}

    # Rerun into the same output: same inputs and seed give the same digest; no stale shard remains.
    cfg = load_config(REPO / "flows/configs/tiny.yaml", sets + ["curate.track=false"])
    again = curate(cfg)
    m2 = dataset.read_manifest(str(out))
    assert again["digest"] == m2.digest == result["digest"] and again["run_id"] != report["run_id"]
    listed = {p for split in dataset.SPLITS for p in m2.files[split]}
    on_disk = {str(p.relative_to(out)) for split in dataset.SPLITS for p in (out / split).glob("*")}
    assert on_disk == listed
