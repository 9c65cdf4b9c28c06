"""One record in, one outcome out: caption and metadata checks -> fetch -> filters -> orient/convert ->
plan -> resize/crop -> JPEG.

``Curator.process`` is plain Python with no Ray in it, so the Ray Data stage (pipeline.py), the
single-process benchmark baseline (bench.py) and the unit tests run exactly the same code. Every
input record yields exactly one outcome -- kept, or dropped under one ``Reason`` -- which is why the
report's counts add up to the inputs by construction. ``Curator.process_all`` gives the same outcomes
for a block, with the reads and downloads of the next records running ahead in a few threads (URL
sources spend their time waiting on the network), and the decoding one image at a time, in order.

Each record is curated under its own source's settings (``curate.sources``): filters, caption column
and missing-caption policy. The caption comes from, in order: the caption column, a sidecar ``.txt``,
the captioning model (``caption_origin`` ``pending`` here; the captioning stage fills it), then the
source's ``missing_caption`` policy (``empty``, or the ``filename`` only where the config allows it,
else the image is dropped as ``no_caption``). Every kept row records where its caption came from
(``caption_origin``) and whether its watermark score was checked (``watermark_check``: ``passed``,
``unchecked`` when the source has a threshold but the row no score, ``off`` when the source has none).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from components.config import CurateConfig, LuminancePolicy, MissingCaption, SourceConfig
from components.curation import buckets as bk
from components.curation import filters as flt
from components.curation import transforms as tf
from components.curation.download import Downloader, DownloadFailed
from components.curation.filters import Reason
from components.storage import StorageUnavailable, Store

DECODE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
"""The only formats PIL may decode here: the API's (PNG, JPEG, WebP, deploy/api.py ``IMAGE_FORMATS``) and
the other formats of ``sources.IMAGE_EXTENSIONS`` (the demo photos include a GIF; PPM covers .pgm).
Anything else is ``not_an_image`` whatever its name says: without the list PIL picks a decoder by the
content, and PostScript named .jpg would be handed to Ghostscript (an interpreter) where it is installed."""


PENDING = "pending"
"""``caption_origin`` of a kept image waiting for the captioning model."""


@dataclass
class Outcome:
    source: str
    reason: Reason | None = None
    detail: str = ""
    row: dict = field(default_factory=dict)  # the curated.SCHEMA columns when kept (+ caption_fallback)
    source_name: str = ""

    @property
    def kept(self) -> bool:
        return self.reason is None


@dataclass
class Screened:
    """A record that passed the checks made before any read: its source, caption and watermark status."""

    src: SourceConfig
    caption: str | None  # None while ``origin`` is ``pending``
    origin: str  # column, sidecar, pending, empty, filename
    fallback: str | None  # the caption if the model gives none (the missing-caption policy); None: drop
    watermark: str  # passed, unchecked, off


def split_of(sha256: str, holdout_fraction: float) -> str:
    """``val`` for the first ``holdout_fraction`` of the hash space: stable across runs and machines,
    and the same for byte-identical files wherever they live."""
    return "val" if int(sha256[:16], 16) / 2.0**64 < holdout_fraction else "train"


def caption_from_filename(source: str) -> str:
    stem = os.path.splitext(source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])[0]
    return " ".join(stem.replace("_", " ").replace("-", " ").split())


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class Curator:
    """Holds the per-worker setup (buckets, S3 client, the downloader) and processes records.

    ``workers``: how many curation tasks run at once, so that this one takes its share of
    ``download.max_per_host`` (default ``cfg.workers``)."""

    def __init__(self, cfg: CurateConfig, seed: int, workers: int | None = None):
        self.cfg = cfg
        self.seed = seed
        self.buckets = bk.make_buckets(cfg.buckets)
        self.store = Store(cfg.s3_endpoint_url)
        self.sources = {s.name: s for s in cfg.resolved_sources()}
        self.first = next(iter(self.sources.values()))
        self.captioning = cfg.captioner.model is not None
        self._per_host = max(1, cfg.download.max_per_host // max(1, workers or cfg.workers))
        self._downloader: Downloader | None = None

    @property
    def downloader(self) -> Downloader:
        if self._downloader is None:
            self._downloader = Downloader(self.cfg.download, self._per_host)
        return self._downloader

    def source_of(self, record: dict) -> SourceConfig:
        return self.sources.get(record.get("source_name") or "", self.first)

    # -- metadata (before any download) ------------------------------------------------------
    def _fallback(self, record: dict, src: SourceConfig) -> tuple[str | None, str]:
        """The missing-caption policy's caption and its origin; (None, "") when the image must be dropped."""
        if src.missing_caption == MissingCaption.EMPTY:
            return "", "empty"
        if src.missing_caption == MissingCaption.FILENAME:
            name = record.get("name") or (None if record.get("fetch") == "inline" else record["source"])
            stem = caption_from_filename(name) if name else ""
            if stem:
                return stem, "filename"
        return None, ""

    def _caption(self, record: dict, src: SourceConfig) -> tuple[str | None, str, str | None]:
        """(caption, origin, fallback): column, then sidecar, then the model (pending), then the policy."""
        caption = record.get("caption")
        if isinstance(caption, str) and caption.strip():
            return caption.strip(), "column", None
        if record.get("sidecar"):
            text = self.store.read_text_or_none(record["sidecar"])
            if text and text.strip():
                return text.strip(), "sidecar", None
        fallback, origin = self._fallback(record, src)
        if self.captioning and src.caption_with_model:
            return None, PENDING, fallback
        return fallback, origin, None

    def screen(self, record: dict) -> Outcome | Screened:
        """Every check made before the image is read: a refusal from the source listing, the caption,
        the metadata scores. A dropped record's Outcome, or what the rest of the work needs."""
        source = record["source"]
        src = self.source_of(record)
        if record.get("reject"):
            return Outcome(source, Reason(record["reject"]), record.get("detail") or "", source_name=src.name)
        caption, origin, fallback = self._caption(record, src)
        if caption is None and origin != PENDING:
            return Outcome(source, Reason.NO_CAPTION, "no caption column value, no sidecar .txt, no model caption",
                           source_name=src.name)
        f = src.filters
        mark = record.get("pwatermark")
        watermark = "off"
        if f.max_watermark is not None:
            if _missing(mark):
                if f.require_watermark_check:
                    return Outcome(source, Reason.WATERMARK_UNCHECKED,
                                   "no watermark score (filters.require_watermark_check)", source_name=src.name)
                watermark = "unchecked"
            elif mark > f.max_watermark:
                return Outcome(source, Reason.WATERMARK, f"pwatermark {mark:.3f} > {f.max_watermark}",
                               source_name=src.name)
            else:
                watermark = "passed"
        unsafe = record.get("punsafe")
        if f.max_punsafe is not None and not _missing(unsafe) and unsafe > f.max_punsafe:
            return Outcome(source, Reason.UNSAFE, f"punsafe {unsafe:.3f} > {f.max_punsafe}", source_name=src.name)
        similarity = record.get("similarity")
        if f.min_similarity is not None and not _missing(similarity) and similarity < f.min_similarity:
            return Outcome(source, Reason.LOW_SIMILARITY, f"similarity {similarity:.3f} < {f.min_similarity}",
                           source_name=src.name)
        return Screened(src, caption, origin, fallback, watermark)

    def fetch(self, record: dict) -> bytes | Outcome:
        """The record's bytes, or its drop: ``unreadable``/``empty`` for files, the download's reason for URLs.
        A failing store raises ``StorageUnavailable`` (the run stops; no input is dropped for it)."""
        source, name = record["source"], self.source_of(record).name
        how = record.get("fetch") or "path"
        if how == "inline":
            data = record.get("data")
        elif how == "url":
            try:
                data = self.downloader.get(source)
            except DownloadFailed as err:
                return Outcome(source, err.reason, err.detail[:300], source_name=name)
        else:
            try:
                data = self.store.read(source)
            except StorageUnavailable:
                raise  # the store is down, not this input: stop the run instead of dropping the rest
            except Exception as err:  # missing file, permission, S3 NoSuchKey/AccessDenied
                return Outcome(source, Reason.UNREADABLE, f"{type(err).__name__}: {err}"[:300], source_name=name)
        if not data:
            return Outcome(source, Reason.EMPTY, "0 bytes", source_name=name)
        return data

    def process(self, record: dict) -> Outcome:
        screened = self.screen(record)
        if isinstance(screened, Outcome):
            return screened
        data = self.fetch(record)
        if isinstance(data, Outcome):
            return data
        return self.finish(record, screened, data)

    def process_all(self, records: list[dict]) -> list[Outcome]:
        """``[self.process(r) for r in records]``, with the reads (downloads, S3 or file reads) of up to
        ``2 x download.threads`` records ahead running in ``download.threads`` threads; decoding stays on
        the calling thread, one image at a time, so memory holds the bytes of that window only."""
        threads = self.cfg.download.threads
        if len(records) < 2 or threads < 2:
            return [self.process(r) for r in records]
        screened = [self.screen(r) for r in records]
        outcomes: list[Outcome] = []
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch") as pool:
            window: deque = deque()
            todo = iter(range(len(records)))

            def refill() -> None:
                while len(window) < 2 * threads:
                    i = next(todo, None)
                    if i is None:
                        return
                    pending = isinstance(screened[i], Screened)
                    window.append((i, pool.submit(self.fetch, records[i]) if pending else None))

            refill()
            while window:
                i, future = window.popleft()
                refill()
                s = screened[i]
                if future is None:
                    outcomes.append(s)
                    continue
                data = future.result()  # re-raises StorageUnavailable
                outcomes.append(data if isinstance(data, Outcome) else self.finish(records[i], s, data))
        return outcomes

    def finish(self, record: dict, screened: Screened, data: bytes) -> Outcome:
        out = self._image(record["source"], screened.caption, data, screened.src)
        out.source_name = screened.src.name
        if out.kept:
            out.row.update(source_name=screened.src.name, caption_origin=screened.origin,
                           watermark_check=screened.watermark, caption_fallback=screened.fallback)
        return out

    # -- pixels ------------------------------------------------------------------------------
    @staticmethod
    def _decode_failure(source: str, err: Exception) -> Outcome:
        """PIL says "image file is truncated" when the data ends early; anything else is corrupt."""
        reason = Reason.TRUNCATED if "truncated" in str(err).lower() else Reason.CORRUPT
        return Outcome(source, reason, f"{type(err).__name__}: {err}"[:300])

    def _image(self, source: str, caption: str | None, data: bytes, src: SourceConfig) -> Outcome:
        f = src.filters
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
                return Outcome(source, Reason.BAD_ASPECT,
                               f"{w}x{h} aspect {aspect:.2f} outside [{f.min_aspect}, {f.max_aspect}]")
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
            swapped = exif.get(flt.TAG_ORIENTATION) in (5, 6, 7, 8)
            tf.draft_for(im, plan.resized, swapped)  # a large JPEG downscale starts at a DCT scale
            try:
                im.load()
            except Image.DecompressionBombError as err:
                return Outcome(source, Reason.DECOMPRESSION_BOMB, str(err)[:300])
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... on bad data
                return self._decode_failure(source, err)
        dw, dh = im.size  # as decoded (a JPEG draft: a DCT scale of the header's size), before orient
        decoded = (dh, dw) if swapped else (dw, dh)
        try:
            rgb = tf.to_rgb(tf.orient(im))
        except Exception as err:
            return Outcome(source, Reason.CORRUPT, f"conversion failed: {type(err).__name__}: {err}"[:300])
        if rgb.size != decoded:  # orientation tag and pixel data disagree; trust the pixels
            return Outcome(source, Reason.CORRUPT, f"oriented size {rgb.size} != header {w}x{h}")
        clamped = False
        if f.max_luminance is not None:
            luma = flt.mean_luma(rgb)
            if luma > f.max_luminance and f.luminance_policy is LuminancePolicy.DROP:
                return Outcome(source, Reason.TOO_BRIGHT, f"mean BT.709 luma {luma:.3f} > {f.max_luminance}")
            if luma > f.max_luminance:  # clamp: kept, darkened to the cap, and its row says so
                rgb, clamped = flt.clamp_luma(rgb, f.max_luminance, luma), True
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
            "luma_clamped": clamped,
        }
        return Outcome(source, None, "", row)
