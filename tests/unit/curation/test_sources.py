"""Sources: manifest formats, roots (pkg:, s3://, the manifest's directory), escape refusal,
directory listings with sidecar captions, and caption/watermark policies of one record."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.config import CurateConfig, MissingCaption
from components.curation.filters import Reason
from components.curation.process import Curator
from components.curation.sources import SourceError, load_inputs, resolve_path, resolve_root
from components.storage import Store

REPO = Path(__file__).resolve().parents[3]


def test_local_paths_inside_the_root_resolve_and_escapes_are_refused(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "secret.jpg", root / "link.jpg")
    assert resolve_path(str(root), "sub/a.jpg") == (str(root / "sub/a.jpg"), "")
    assert resolve_path(str(root), str(root / "sub/a.jpg"))[0] == str(root / "sub/a.jpg")
    assert resolve_path(str(root), "sub/../a.jpg")[0] == str(root / "a.jpg")  # stays inside: fine
    for bad in ["../secret.jpg", "sub/../../secret.jpg", str(tmp_path / "secret.jpg"), "/etc/passwd",
                "link.jpg", "s3://bucket/a.jpg", ""]:
        full, why = resolve_path(str(root), bad)
        assert full is None and why, bad


def test_s3_paths_inside_the_prefix_resolve_and_escapes_are_refused():
    root = "s3://bucket/data"
    assert resolve_path(root, "a/b.jpg") == ("s3://bucket/data/a/b.jpg", "")
    assert resolve_path(root, "s3://bucket/data/x.jpg") == ("s3://bucket/data/x.jpg", "")
    for bad in ["../other/x.jpg", "a/../../x.jpg", "/abs.jpg", "s3://other/data/x.jpg", "s3://bucket/database/x.jpg"]:
        assert resolve_path(root, bad)[0] is None, bad


def test_roots():
    skimage_data = resolve_root("pkg:skimage/data", "data/demo/manifest.jsonl")
    assert os.path.isfile(os.path.join(skimage_data, "astronaut.png"))
    assert resolve_root(None, "/a/b/manifest.jsonl") == "/a/b"
    assert resolve_root(None, "s3://bkt/x/manifest.csv") == "s3://bkt/x"
    with pytest.raises(SourceError, match="no installed package"):
        resolve_root("pkg:no_such_package_here/data", "m.jsonl")


def test_demo_manifest_points_inside_scikit_image_data():
    cfg = CurateConfig(source=str(REPO / "data/demo/manifest.jsonl"), root="pkg:skimage/data")
    records = load_inputs(cfg, Store()).records.to_pylist()
    assert len(records) >= 20
    for r in records:
        assert r["reject"] is None and os.path.isfile(r["source"]) and r["caption"].strip()


ROWS = [
    {"path": "a.jpg", "caption": "first", "pwatermark": 0.25},
    {"path": "../b.jpg", "caption": "escapes", "pwatermark": None},
    {"path": "c.jpg", "caption": None, "pwatermark": 0.9},
]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_formats_give_the_same_records(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        path.write_text("path,caption,pwatermark\na.jpg,first,0.25\n../b.jpg,escapes,\nc.jpg,,0.9\n")
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    records = load_inputs(CurateConfig(source=str(path)), Store()).records.to_pylist()
    assert [r["source"] for r in records] == [str(tmp_path / "a.jpg"), "../b.jpg", str(tmp_path / "c.jpg")]
    assert [r["reject"] for r in records] == [None, "path_escape", None]
    assert [r["pwatermark"] for r in records] == [0.25, None, 0.9]
    assert records[0]["caption"] == "first" and not records[2]["caption"]


def test_manifest_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"path": "a.jpg"}\n{oops\n')
    with pytest.raises(SourceError, match=r"m.jsonl:2: not valid JSON"):
        load_inputs(CurateConfig(source=str(bad)), Store())
    bad.write_text('{"file": "a.jpg"}\n')
    with pytest.raises(SourceError, match="no 'path' column"):
        load_inputs(CurateConfig(source=str(bad)), Store())
    with pytest.raises(SourceError, match="cannot read manifest"):
        load_inputs(CurateConfig(source=str(tmp_path / "missing.jsonl")), Store())
    with pytest.raises(SourceError, match="not a directory"):
        load_inputs(CurateConfig(source=str(tmp_path / "nowhere")), Store())


def test_directory_listing_with_sidecars(tmp_path):
    (tmp_path / "x").mkdir()
    for name in ["x/one.jpg", "x/two.PNG", "x/three.webp"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "x/one.txt").write_text("caption one")
    (tmp_path / "x/readme.md").write_text("ignored")
    inputs = load_inputs(CurateConfig(source=str(tmp_path)), Store())
    records = {Path(r["source"]).name: r for r in inputs.records.to_pylist()}
    assert set(records) == {"one.jpg", "two.PNG", "three.webp"} and inputs.ignored == 1
    assert records["one.jpg"]["sidecar"] == str(tmp_path / "x/one.txt") and records["two.PNG"]["sidecar"] is None


def _jpeg(path: Path) -> None:
    Image.new("RGB", (300, 300), (40, 50, 60)).save(path, format="JPEG")


@pytest.mark.parametrize("policy,expected", [(MissingCaption.DROP, None), (MissingCaption.EMPTY, ""),
                                             (MissingCaption.FILENAME, "old dog walk")])
def test_missing_caption_policies(tmp_path, policy, expected):
    _jpeg(tmp_path / "old_dog-walk.jpg")
    cfg = CurateConfig(missing_caption=policy, buckets={"area": 65536, "min_side": 128, "max_side": 512})
    out = Curator(cfg, 0).process({"source": str(tmp_path / "old_dog-walk.jpg"), "caption": "  "})
    if expected is None:
        assert out.reason == Reason.NO_CAPTION
    else:
        assert out.kept and out.row["caption"] == expected


def test_sidecar_caption_and_watermark_threshold(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("  from the sidecar \n")
    cfg = CurateConfig(buckets={"area": 65536, "min_side": 128, "max_side": 512},
                       filters={"max_watermark": 0.7})
    cur = Curator(cfg, 0)
    rec = {"source": str(tmp_path / "a.jpg"), "sidecar": str(tmp_path / "a.txt")}
    assert cur.process(rec).row["caption"] == "from the sidecar"
    assert cur.process({**rec, "pwatermark": 0.7}).kept  # LAION: pwatermark <= 0.7 kept
    assert cur.process({**rec, "pwatermark": float("nan")}).kept  # unknown: passes
    assert cur.process({**rec, "pwatermark": 0.71}).reason == Reason.WATERMARK
    assert cur.process({**rec, "source": str(tmp_path / "gone.jpg")}).reason == Reason.UNREADABLE


def test_crop_is_deterministic_per_content_and_seed(tmp_path):
    Image.frombytes("RGB", (600, 300), os.urandom(600 * 300 * 3)).save(tmp_path / "w.png")
    cfg = CurateConfig(buckets={"area": 65536, "min_side": 128, "max_side": 512})
    a = Curator(cfg, 0).process({"source": str(tmp_path / "w.png"), "caption": "c"}).row
    b = Curator(cfg, 0).process({"source": str(tmp_path / "w.png"), "caption": "c"}).row
    assert (a["crop_top"], a["crop_left"], a["image"]) == (b["crop_top"], b["crop_left"], b["image"])
    assert Image.open(io.BytesIO(a["image"])).size == (a["target_w"], a["target_h"])
