"""One record in, one outcome out: fetch -> filters -> orient/convert -> plan -> resize/crop -> JPEG.

``Curator.process`` is plain Python with no Ray in it, so the Ray Data stage (pipeline.py), the
single-process benchmark baseline (bench.py) and the unit tests run exactly the same code. Every
input record yields exactly one outcome -- kept, or dropped under one ``Reason`` -- which is why the
report's counts add up to the inputs by construction.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from components.config import CurateConfig, MissingCaption
from components.curation import buckets as bk
from components.curation import filters as flt
from components.curation import transforms as tf
from components.curation.filters import Reason
from components.storage import StorageUnavailable, Store

DECODE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
"""The only formats PIL may decode here: the API's (PNG, JPEG, WebP, deploy/api.py ``IMAGE_FORMATS``) and
the other formats of ``sources.IMAGE_EXTENSIONS`` (the demo photos include a GIF; PPM covers .pgm).
Anything else is ``not_an_image`` whatever its name says: without the list PIL picks a decoder by the
content, and PostScript named .jpg would be handed to Ghostscript (an interpreter) where it is installed."""


@dataclass
class Outcome:
    source: str
    reason: Reason | None = None
    detail: str = ""
    row: dict = field(default_factory=dict)  # the curated.SCHEMA columns when kept

    @property
    def kept(self) -> bool:
        return self.reason is None


def split_of(sha256: str, holdout_fraction: float) -> str:
    """``val`` for the first ``holdout_fraction`` of the hash space: stable across runs and machines,
    and the same for byte-identical files wherever they live."""
    return "val" if int(sha256[:16], 16) / 2.0**64 < holdout_fraction else "train"


def caption_from_filename(source: str) -> str:
    stem = os.path.splitext(source.rstrip("/").rsplit("/", 1)[-1])[0]
    return " ".join(stem.replace("_", " ").replace("-", " ").split())


class Curator:
    """Holds the per-worker setup (buckets, S3 client) and processes records."""

    def __init__(self, cfg: CurateConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.buckets = bk.make_buckets(cfg.buckets)
        self.store = Store(cfg.s3_endpoint_url)

    # -- metadata (before any download) ------------------------------------------------------
    def _caption(self, record: dict) -> str | None:
        caption = record.get("caption")
        if isinstance(caption, str) and caption.strip():
            return caption.strip()
        if record.get("sidecar"):
            text = self.store.read_text_or_none(record["sidecar"])
            if text and text.strip():
                return text.strip()
        policy = self.cfg.missing_caption
        if policy == MissingCaption.EMPTY:
            return ""
        if policy == MissingCaption.FILENAME:
            return caption_from_filename(record["source"])
        return None

    def process(self, record: dict) -> Outcome:
        source = record["source"]
        if record.get("reject"):
            return Outcome(source, Reason(record["reject"]), record.get("detail") or "")
        caption = self._caption(record)
        if caption is None:
            return Outcome(source, Reason.NO_CAPTION, "no caption column value and no sidecar .txt")
        f = self.cfg.filters
        mark = record.get("pwatermark")
        if f.max_watermark is not None and mark is not None and not math.isnan(mark) and mark > f.max_watermark:
            return Outcome(source, Reason.WATERMARK, f"pwatermark {mark:.3f} > {f.max_watermark}")
        try:
            data = self.store.read(source)
        except StorageUnavailable:
            raise  # the store is down, not this input: stop the run instead of dropping the rest
        except Exception as err:  # missing file, permission, S3 NoSuchKey/AccessDenied
            return Outcome(source, Reason.UNREADABLE, f"{type(err).__name__}: {err}"[:300])
        if not data:
            return Outcome(source, Reason.EMPTY, "0 bytes")
        return self._image(source, caption, data)

    # -- pixels ------------------------------------------------------------------------------
    @staticmethod
    def _decode_failure(source: str, err: Exception) -> Outcome:
        """PIL says "image file is truncated" when the data ends early; anything else is corrupt."""
        reason = Reason.TRUNCATED if "truncated" in str(err).lower() else Reason.CORRUPT
        return Outcome(source, reason, f"{type(err).__name__}: {err}"[:300])

    def _image(self, source: str, caption: str, data: bytes) -> Outcome:
        f = self.cfg.filters
        sha = hashlib.sha256(data).hexdigest()
        with warnings.catch_warnings():
            # Our own pixel cap (below) replaces PIL's warning; PIL still raises past 2x its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
            except UnidentifiedImageError:
                return Outcome(source, Reason.NOT_AN_IMAGE,
                               f"{len(data)} bytes, not {', '.join(DECODE_FORMATS)}")
            except Image.DecompressionBombError as err:
                return Outcome(source, Reason.DECOMPRESSION_BOMB, str(err)[:300])
            except Exception as err:  # a header PIL recognised but cannot parse
                return Outcome(source, Reason.CORRUPT, f"{type(err).__name__}: {err}"[:300])
            w, h = im.size
            if w * h > f.max_pixels:
                return Outcome(source, Reason.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > {f.max_pixels}")
            try:
                exif = im.getexif()  # PNG: may decode the pixels to reach an eXIf chunk after IDAT
            except Exception as err:
                return self._decode_failure(source, err)
            h, w = flt.oriented_size((w, h), exif)
            aspect = w / h
            if not f.min_aspect <= aspect <= f.max_aspect:
                return Outcome(source, Reason.BAD_ASPECT, f"{w}x{h} aspect {aspect:.2f} outside [{f.min_aspect}, {f.max_aspect}]")
            rng = random.Random(f"{self.seed}:{sha}")
            plan = bk.plan(h, w, self.buckets, self.cfg.crop, rng)
            if plan is None:
                bucket = bk.choose_bucket(h, w, self.buckets)
                return Outcome(source, Reason.TOO_SMALL, f"{w}x{h} smaller than its bucket {bucket.name}")
            if f.require_exif and not flt.camera_tags(exif):
                return Outcome(source, Reason.NO_EXIF, "none of Make, Model, DateTimeOriginal, LensModel, GPSInfo")
            if f.drop_edited:
                software = flt.editing_software(exif, f.edited_software)
                if software:
                    return Outcome(source, Reason.EDITED, f"Software: {software}"[:300])
            try:
                im.load()
            except Image.DecompressionBombError as err:
                return Outcome(source, Reason.DECOMPRESSION_BOMB, str(err)[:300])
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... on bad data
                return self._decode_failure(source, err)
        try:
            rgb = tf.to_rgb(tf.orient(im))
        except Exception as err:
            return Outcome(source, Reason.CORRUPT, f"conversion failed: {type(err).__name__}: {err}"[:300])
        if rgb.size != (w, h):  # orientation tag and pixel data disagree; trust the pixels
            return Outcome(source, Reason.CORRUPT, f"oriented size {rgb.size} != header {w}x{h}")
        if f.max_luminance is not None:
            luma = flt.mean_luma(rgb)
            if luma > f.max_luminance:
                return Outcome(source, Reason.TOO_BRIGHT, f"mean BT.709 luma {luma:.3f} > {f.max_luminance}")
        crop = tf.resize_and_crop(rgb, plan)
        row = {
            "image": tf.encode_jpeg(crop, self.cfg.jpeg_quality),
            "caption": caption,
            "original_h": h,
            "original_w": w,
            "crop_top": plan.crop[0],
            "crop_left": plan.crop[1],
            "target_h": plan.bucket.height,
            "target_w": plan.bucket.width,
            "bucket": plan.bucket.name,
            "source": source,
            "sha256": sha,
        }
        return Outcome(source, None, "", row)
