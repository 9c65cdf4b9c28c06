"""Curating from S3 and writing to S3, against the loopback moto server (a real HTTP S3 API)."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components import dataset
from components.config import load_config
from components.curation.pipeline import curate
from components.curation.sources import SourceError

REPO = Path(__file__).resolve().parents[2]


def jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 160, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def test_curate_s3_prefix_to_s3(ray_local, s3_env, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="lake")
    objects = {
        "in/a/cat_on_sofa.jpg": jpeg(400, 300, 1),  # caption from its sidecar
        "in/a/cat_on_sofa.txt": b"a grey cat asleep on a sofa\n",
        "in/b/red_door.jpg": jpeg(300, 400, 2),  # no sidecar: the file name (missing_caption: filename)
        "in/b/copy.jpg": jpeg(400, 300, 1),  # same bytes as cat_on_sofa.jpg
        "in/b/tiny.jpg": jpeg(100, 80, 3),
        "in/b/broken.png": b"\x89PNG\r\n\x1a\n not really",
        "in/notes.md": b"not an input",
    }
    for key, body in objects.items():
        s3.put_object(Bucket="lake", Key=key, Body=body)
    out = "s3://lake/curated/demo"
    cfg = load_config(REPO / "flows/configs/tiny.yaml", [
        "curate.source=s3://lake/in/", f"curate.output={out}", "curate.track=false", "curate.rows_per_shard=2",
        f"state_dir={tmp_path / 'state'}",
    ])
    report = curate(cfg)
    assert report["inputs"] == 5 and report["ignored_files"] == 1
    assert report["kept"] == 2 and report["kept"] + report["dropped"] == report["inputs"]
    assert {k: v for k, v in report["reasons"].items() if v} == {"duplicate": 1, "too_small": 1, "not_an_image": 1}

    m = dataset.read_manifest(out)  # endpoint from AWS_ENDPOINT_URL_S3
    assert m.rows["train"] + m.rows["val"] == 2 and m.rows["train"] >= 1
    tables = []
    for uri in m.paths("train") + m.paths("val"):
        body = s3.get_object(Bucket="lake", Key=uri[len("s3://lake/"):])["Body"].read()
        tables.append(pq.read_table(io.BytesIO(body)))
    rows = {r["source"].rsplit("/", 1)[-1]: r for t in tables for r in t.to_pylist()}
    assert rows.keys() <= {"cat_on_sofa.jpg", "copy.jpg", "red_door.jpg"} and "red_door.jpg" in rows
    cat = rows.get("cat_on_sofa.jpg") or rows["copy.jpg"]
    assert cat["caption"] in ("a grey cat asleep on a sofa", "copy")
    assert rows["red_door.jpg"]["caption"] == "red door"
    door = rows["red_door.jpg"]
    assert door["bucket"] == "192x320" and (door["original_h"], door["original_w"]) == (400, 300)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="lake", Prefix="curated/demo/")["Contents"]}
    assert "curated/demo/_SUCCESS" in keys and "curated/demo/report.json" in keys
    assert {k for k in keys if k.endswith(".parquet") and "/rejects/" not in k} == {
        "curated/demo/" + p for split in dataset.SPLITS for p in m.files[split]}


def test_missing_output_bucket_fails_before_any_work(s3_env, tmp_path):
    cfg = load_config(REPO / "flows/configs/tiny.yaml", ["curate.output=s3://no-such-bucket/x", "curate.track=false"])
    with pytest.raises(SourceError, match="bucket 'no-such-bucket' not usable"):
        curate(cfg)  # no Ray session needed: it stops before the pipeline
