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
from PIL import EpsImagePlugin, Image

from components.config import CurateConfig, MissingCaption, load_config
from components.curation.filters import Reason
from components.curation.pipeline import prepare
from components.curation.process import Curator
from components.curation.sources import (
    SourceError,
    check_no_overlap,
    from_listing,
    load_inputs,
    resolve_path,
    resolve_root,
)
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


# --- a folder source stays inside the folder ---------------------------------------------------------


def test_folder_symlinks_out_of_the_source_are_refused_as_path_escape(tmp_path):
    """A symlink in a folder source that leads out of it, as the image or as its .txt caption, is refused
    as ``path_escape`` before any read (as the same link given through a manifest is); links that stay
    inside are followed. Before: the linked file outside was read, and a caption linked to a credentials
    file became a training caption."""
    outside, src = tmp_path / "outside", tmp_path / "src"
    outside.mkdir()
    src.mkdir()
    _jpeg(outside / "secret.jpg")
    (outside / "credentials").write_text("[default]\naws_secret_access_key = not-for-training\n")
    _jpeg(src / "inside.jpg")
    _jpeg(src / "captioned.jpg")
    (src / "link_out.jpg").symlink_to(outside / "secret.jpg")
    (src / "ok_link.jpg").symlink_to(src / "inside.jpg")
    (src / "captioned.txt").symlink_to(outside / "credentials")
    (src / "dir_link").symlink_to(outside, target_is_directory=True)  # not walked: os.walk keeps to the folder

    loaded = load_inputs(CurateConfig(source=str(src)), Store())
    records = {Path(r["source"]).name: r for r in loaded.records.to_pylist()}
    assert set(records) == {"inside.jpg", "captioned.jpg", "link_out.jpg", "ok_link.jpg"}
    assert records["link_out.jpg"]["reject"] == "path_escape" and "outside" in records["link_out.jpg"]["detail"]
    assert records["captioned.jpg"]["reject"] == "path_escape" and "caption" in records["captioned.jpg"]["detail"]
    assert records["captioned.jpg"]["sidecar"] is None
    assert records["inside.jpg"]["reject"] is None and records["ok_link.jpg"]["reject"] is None

    class Reads(Store):
        def __init__(self):
            super().__init__()
            self.read_paths: list[str] = []

        def read(self, uri):
            self.read_paths.append(os.path.realpath(uri))
            return super().read(uri)

    curator = Curator(CurateConfig(buckets={"area": 65536, "min_side": 128, "max_side": 512},
                                   missing_caption=MissingCaption.FILENAME), 0)
    curator.store = Reads()
    outcomes = {name: curator.process(r) for name, r in records.items()}
    assert str(outcomes["link_out.jpg"].reason) == "path_escape"
    assert str(outcomes["captioned.jpg"].reason) == "path_escape"
    assert outcomes["inside.jpg"].kept and outcomes["ok_link.jpg"].kept
    assert all(not p.startswith(str(outside)) for p in curator.store.read_paths), curator.store.read_paths


def test_s3_keys_with_dot_segments_are_refused_as_path_escape():
    """A listed S3 key with ``..`` segments is refused before any read (an HTTP layer may resolve it to
    another object)."""
    class Listing(Store):
        def list(self, root):
            yield from ["s3://b/in/a.jpg", "s3://b/in/x/../../secret.jpg", "s3://b/in/./b.jpg"]

    records = from_listing(CurateConfig(source="s3://b/in"), Listing()).records.to_pylist()
    assert [r["reject"] for r in records] == [None, "path_escape", "path_escape"]
    with pytest.raises(ValueError, match="segments"):
        Store().read("s3://b/in/x/../../secret.jpg")  # refused before any client is made


# --- the output never overlaps a source --------------------------------------------------------------


def _photos(folder: Path, names: list[str]) -> list[Path]:
    paths = []
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        _jpeg(folder / name)
        paths.append(folder / name)
    return paths


@pytest.mark.parametrize("where", ["same", "parent", "child", "manifest-root", "manifest-folder-parent",
                                   "cache-output-in-source"])
def test_an_output_that_overlaps_a_source_is_refused_before_any_work(tmp_path, where):
    """Publishing deletes the files under the output's train/, val/ and rejects/ that the run did not
    write. With the output at (or above) a source whose photos sit in train/ and val/ subfolders, that
    deleted the photos; the output is now refused, in one line, before anything is created or read."""
    photos = tmp_path / "photos"
    originals = _photos(photos, ["train/a.jpg", "train/b.jpg", "val/c.jpg"])
    source, extra = str(photos), []
    output = {"same": photos, "parent": tmp_path, "child": photos / "curated", "manifest-root": photos,
              "manifest-folder-parent": tmp_path, "cache-output-in-source": tmp_path / "out"}[where]
    if where.startswith("manifest"):
        manifest = tmp_path / "lists" / "m.jsonl"
        manifest.parent.mkdir()
        manifest.write_text("".join(json.dumps({"path": str(p.relative_to(photos)), "caption": "c"}) + "\n"
                                    for p in originals))
        source, extra = str(manifest), [f"curate.root={photos}"]
    if where == "cache-output-in-source":
        extra = ["curate.cache_latents=true", f"curate.cache_output={photos / 'latents'}"]
    cfg = load_config(REPO / "flows/configs/tiny.yaml", [f"state_dir={tmp_path / 'state'}", f"curate.source={source}",
                                                         f"curate.output={output}", *extra])
    with pytest.raises(SourceError) as err:
        prepare(cfg)
    message = str(err.value)
    assert "\n" not in message and "must be a separate folder" in message, message
    assert all(p.is_file() for p in originals)
    assert not (photos / "curated").exists() and not (tmp_path / "out").exists()


def test_overlap_is_by_whole_path_segments_and_s3_prefixes():
    for source, output in [("s3://b/in", "s3://b/in"), ("s3://b/in/", "s3://b/in/out"), ("s3://b/in", "s3://b"),
                           ("s3://b/in/x/..", "s3://b/in/y")]:
        with pytest.raises(SourceError, match="must be a separate folder"):
            check_no_overlap(CurateConfig(source=source, output=output))
    for source, output in [("s3://b/in", "s3://b/input"), ("s3://b/in", "s3://c/in"), ("/data/in", "/data/input"),
                           ("/data/in", "s3://b/data/in")]:
        check_no_overlap(CurateConfig(source=source, output=output))


# --- decoding is limited to image formats ---------------------------------------------------------


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 300 300\n%%EndComments\n"
       b"newpath 0 0 moveto 300 300 lineto stroke showpage\n%%EOF\n")


def test_postscript_named_jpg_is_never_handed_to_ghostscript(tmp_path, monkeypatch):
    """PIL picks its decoder by content: PostScript saved as .jpg was opened as EPS and its load ran
    Ghostscript where installed. Decoding is now limited to image formats (DECODE_FORMATS); the file is
    ``not_an_image`` and Ghostscript is never called (its entry point is replaced by a recorder here, so
    the test does not depend on Ghostscript being installed)."""
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or Image.new("RGB", (300, 300)))
    (tmp_path / "photo.jpg").write_bytes(EPS)
    assert Image.open(tmp_path / "photo.jpg").format == "EPS"  # what PIL makes of it without the list
    cfg = CurateConfig(buckets={"area": 65536, "min_side": 128, "max_side": 512})
    out = Curator(cfg, 0).process({"source": str(tmp_path / "photo.jpg"), "caption": "c"})
    assert out.reason == Reason.NOT_AN_IMAGE and calls == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM"])
def test_every_listed_image_format_still_decodes(tmp_path, fmt):
    Image.new("RGB", (300, 300), (40, 50, 60)).save(tmp_path / "x.img", format=fmt)
    cfg = CurateConfig(buckets={"area": 65536, "min_side": 128, "max_side": 512})
    assert Curator(cfg, 0).process({"source": str(tmp_path / "x.img"), "caption": "c"}).kept
