"""Curation on a bad-input corpus generated here: the Terminus preset counts every bad file
under the right reason, keeps every good image (CMYK, palette, 16-bit, grey, RGBA, EXIF-rotated
included), never crashes, and its counts add up to the inputs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components import dataset
from components.config import load_config
from components.curation.filters import Reason
from components.curation.pipeline import curate
from components.curation.process import Curator
from components.curation.sources import load_inputs
from components.storage import Store

REPO = Path(__file__).resolve().parents[2]
W, H = 1152, 896  # exactly SDXL's 1152x896 bucket, so good images fit the Terminus preset


def camera_exif(software: str | None = None, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x0110] = "Canon EOS 5D Mark IV"  # Model
    exif.get_ifd(0x8769)[0x9003] = "2023:06:01 10:00:00"  # DateTimeOriginal
    if software:
        exif[0x0131] = software
    if orientation:
        exif[0x0112] = orientation
    return exif.tobytes()


def photo(w: int, h: int, seed: int, level: float = 0.3) -> np.ndarray:
    """A smooth, dark-ish (mean luma ~level) RGB image, distinct per seed: (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = level * 255 + 35 * np.sin(xx / (60 + seed) + seed) + 25 * np.cos(yy / (45 + seed))
    tint = rng.uniform(-20, 20, size=3)
    img = base[..., None] + tint + rng.normal(0, 6, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def save(im: Image.Image, path: Path, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def make_corpus(root: Path) -> tuple[Path, dict[str, str | None]]:
    """Write the corpus (under root/images, the manifest's root) and its manifest beside it;
    returns (manifest, {manifest path: expected reason or None})."""
    d = root / "images"
    d.mkdir(parents=True)
    ex = camera_exif()
    expect: dict[str, str | None] = {}
    rows: list[dict] = []

    def add(name: str, reason: Reason | None, **extra):
        rows.append({"path": name, "caption": f"a photo called {name}", **extra})
        expect[name] = None if reason is None else str(reason)

    # -- good images, every one must be kept ----------------------------------------------------
    rgb = save(Image.fromarray(photo(W, H, 1)), d / "good_rgb.jpg", "JPEG", quality=90, exif=ex)
    add("good_rgb.jpg", None, pwatermark=0.1)
    save(Image.fromarray(photo(W, H, 2)).convert("CMYK"), d / "good_cmyk.jpg", "JPEG", quality=90, exif=ex)
    add("good_cmyk.jpg", None)
    save(Image.fromarray(photo(W, H, 3)).quantize(64), d / "good_palette.png", "PNG", exif=ex, compress_level=1)
    add("good_palette.png", None)
    grey16 = (photo(W, H, 4)[..., 0].astype(np.uint16) * 257)  # 16-bit grey, mean ~0.3 of full scale
    save(Image.fromarray(grey16), d / "good_16bit.png", "PNG", exif=ex, compress_level=1)
    add("good_16bit.png", None)
    save(Image.fromarray(photo(W, H, 5)).convert("L"), d / "good_grey.jpg", "JPEG", quality=90, exif=ex)
    add("good_grey.jpg", None)
    rgba = np.dstack([photo(W, H, 6), np.full((H, W), 255, np.uint8)])
    rgba[:64, :64, 3] = 0  # a transparent corner: composited over white
    save(Image.fromarray(rgba, "RGBA"), d / "good_rgba.png", "PNG", exif=ex, compress_level=1)
    add("good_rgba.png", None)
    # Stored portrait (896 wide, 1152 tall), EXIF orientation 6: displayed landscape 1152x896.
    save(Image.fromarray(photo(H, W, 7)), d / "good_rotated.jpg", "JPEG", quality=90, exif=camera_exif(orientation=6))
    add("good_rotated.jpg", None)

    # -- bad files, one of each kind ------------------------------------------------------------
    (d / "good_rgb_copy.jpg").write_bytes(rgb)  # sorts after good_rgb.jpg, which therefore stays
    add("good_rgb_copy.jpg", Reason.DUPLICATE)
    (d / "empty.jpg").write_bytes(b"")
    add("empty.jpg", Reason.EMPTY)
    (d / "not_image.jpg").write_text("this is a text file with a .jpg name\n")
    add("not_image.jpg", Reason.NOT_AN_IMAGE)
    png = save(Image.fromarray(photo(W, H, 8)), d / "corrupt.png", "PNG", exif=ex, compress_level=1)
    start = png.find(b"IDAT") + 64
    broken = bytearray(png)
    broken[start:start + 4000] = bytes(b ^ 0xFF for b in broken[start:start + 4000])
    (d / "corrupt.png").write_bytes(bytes(broken))
    add("corrupt.png", Reason.CORRUPT)
    jpg = save(Image.fromarray(photo(W, H, 9)), d / "truncated.jpg", "JPEG", quality=90, exif=ex)
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) * 6 // 10])
    add("truncated.jpg", Reason.TRUNCATED)
    save(Image.new("1", (8000, 5001)), d / "bomb.png", "PNG", exif=ex)  # 40 M pixels in ~5 kB
    add("bomb.png", Reason.DECOMPRESSION_BOMB)
    save(Image.fromarray(photo(640, 480, 10)), d / "small.jpg", "JPEG", exif=ex)
    add("small.jpg", Reason.TOO_SMALL)
    save(Image.fromarray(photo(W, H, 11)), d / "no_exif.jpg", "JPEG", quality=90)
    add("no_exif.jpg", Reason.NO_EXIF)
    save(Image.fromarray(photo(W, H, 12)), d / "edited.jpg", "JPEG", exif=camera_exif("Adobe Photoshop 25.0 (Windows)"))
    add("edited.jpg", Reason.EDITED)
    save(Image.fromarray(photo(W, H, 13)), d / "watermarked.jpg", "JPEG", exif=ex)
    add("watermarked.jpg", Reason.WATERMARK, pwatermark=0.9)
    save(Image.fromarray(photo(W, H, 14, level=0.8)), d / "bright.jpg", "JPEG", exif=ex)
    add("bright.jpg", Reason.TOO_BRIGHT)
    save(Image.fromarray(photo(2100, 500, 15)), d / "panorama.jpg", "JPEG", exif=ex)  # 4.2:1
    add("panorama.jpg", Reason.BAD_ASPECT)
    add("missing.jpg", Reason.UNREADABLE)
    shutil.copy(d / "good_rgb.jpg", root / "outside.jpg")
    rows.append({"path": "../outside.jpg", "caption": "escapes its root"})
    expect["../outside.jpg"] = str(Reason.PATH_ESCAPE)
    rows.append({"path": str(root / "outside.jpg"), "caption": "absolute path outside the root"})
    expect[str(root / "outside.jpg")] = str(Reason.PATH_ESCAPE)

    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, expect


GOOD = {"good_rgb.jpg", "good_cmyk.jpg", "good_palette.png", "good_16bit.png", "good_grey.jpg",
        "good_rgba.png", "good_rotated.jpg"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest, expect = make_corpus(root)
    return root, manifest, expect


def terminus_cfg(manifest: Path, output: Path, **extra: str):
    """The preset's LAION-HD source with its filter policy, reading the corpus' manifest (a ``files``
    source) instead of LAION's URLs; the Hub source is left out (this test is offline)."""
    laion = "curate.sources.laion-hd"
    sets = [f"{laion}.kind=files", f"{laion}.location={manifest}", f"{laion}.root={manifest.parent / 'images'}",
            f"{laion}.caption_column=caption", f"curate.output={output}", "curate.workers=2",
            "curate.rows_per_shard=4", "curate.track=false", f"state_dir={output.parent / 'state'}"]
    cfg = load_config(REPO / "flows/configs/terminus_v2.yaml", sets + [f"{k}={v}" for k, v in extra.items()])
    cfg.curate.sources = [s for s in cfg.curate.sources if s.name == "laion-hd"]
    return cfg


def _key(source: str, root: Path) -> str:
    path = Path(source)
    return path.name if path.parent == (root / "images").resolve() else source


def test_curator_gives_each_file_its_reason(corpus, tmp_path):
    """No Ray: the per-record code alone. It keeps the byte copy too: duplicates are found over the
    whole dataset once it is written (the pipeline test below)."""
    root, manifest, expect = corpus
    cfg = terminus_cfg(manifest, tmp_path / "out")
    inputs = load_inputs(cfg.curate, Store())
    curator = Curator(cfg.curate, cfg.seed)
    got = {}
    for record in inputs.records.to_pylist():
        outcome = curator.process(record)
        got[_key(record["source"], root)] = None if outcome.kept else str(outcome.reason)
        if outcome.kept:
            im = Image.open(io.BytesIO(outcome.row["image"]))
            assert im.mode == "RGB" and im.size == (outcome.row["target_w"], outcome.row["target_h"])
    assert got == expect | {"good_rgb_copy.jpg": None}


def test_terminus_preset_on_the_corpus(ray_local, corpus, tmp_path):
    root, manifest, expect = corpus
    out = tmp_path / "out"
    report = curate(terminus_cfg(manifest, out))

    bad = [r for r in expect.values() if r is not None]
    assert report["inputs"] == len(expect)
    assert report["kept"] + report["dropped"] == report["inputs"] == sum(report["reasons"].values()) + report["kept"]
    assert report["reasons"] == {str(r): bad.count(str(r)) for r in Reason}

    m = dataset.read_manifest(str(out))
    assert m.digest == report["digest"] and m.rows == report["splits"]
    assert m.rows["train"] >= 1 and m.rows["val"] >= 1  # 7 kept: val is non-empty
    kept = pq.read_table(m.paths("train") + m.paths("val"))
    assert kept.schema.equals(dataset.SCHEMA) and kept.num_rows == report["kept"]
    rows = {Path(r["source"]).name: r for r in kept.to_pylist()}
    # The original and its byte copy: the smaller source URI stays, whichever worker saw it first.
    assert set(rows) == GOOD

    rejects = pq.read_table([str(out / p) for p in json.loads((out / dataset.SUCCESS).read_text())["rejects"]])
    by_source = {_key(r["source"], root): r["reason"] for r in rejects.to_pylist()}
    assert by_source == {k: v for k, v in expect.items() if v is not None}

    for name, r in rows.items():
        im = Image.open(io.BytesIO(r["image"]))
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (r["target_w"], r["target_h"])
        assert r["bucket"] == f"{r['target_w']}x{r['target_h']}" == "1152x896"
        assert (r["original_h"], r["original_w"]) == (H, W), name  # the rotated one included: as displayed
        assert 0 <= r["crop_top"] <= r["original_h"] - r["target_h"]
        assert 0 <= r["crop_left"] <= r["original_w"] - r["target_w"]
    # 16-bit grey was scaled, not clipped (PIL's convert would make it white); same content as stored.
    grey16 = np.asarray(Image.open(io.BytesIO(rows["good_16bit.png"]["image"])), dtype=np.float64)
    assert abs(grey16.mean() - photo(W, H, 4)[..., 0].mean()) < 3
    # The transparent corner of the RGBA image is white, the opaque rest keeps its pixels.
    rgba = np.asarray(Image.open(io.BytesIO(rows["good_rgba.png"]["image"])))
    assert rgba[:8, :8].min() > 240 and rgba[200:, 200:].mean() < 128
    # The rotated photo was turned upright: its pixels match the stored ones rotated 90 degrees clockwise.
    upright = np.rot90(photo(H, W, 7), k=-1).astype(np.float64)
    stored = np.asarray(Image.open(io.BytesIO(rows["good_rotated.jpg"]["image"])), np.float64)
    assert np.abs(stored - upright).mean() < 6
