"""SDXL aspect buckets and the resize/crop plan, as pure integer math (property-tested).

Buckets (SDXL, Podell et al. 2023, sec. 2.3 "multi-aspect training"; the published 1 MP list
1024x1024, 1152x896, 1216x832, 1344x768, 1536x640 and their transposes is exactly what
``make_buckets`` yields for those widths): for every width ``w`` on the ``step`` grid in
[min_side, max_side], the height is the largest multiple of ``step`` with ``w * h <= area``; landscape
buckets (``h <= w``) are kept and each is added transposed, so portrait and landscape images get
mirror-image choices.

Plan for one image of (oriented) size (h, w), following the Terminus card ("never upsampled,
downsampled with LANCZOS, trained on crops with SDXL's crop coordinates"):

1. the bucket whose aspect ratio is closest to the image's, in log space (so 2:1 and 1:2 are
   equally far from 1:1);
2. the cover scale ``s = max(W / w, H / h)``; if ``s > 1`` the image would have to be upsampled, so it
   is refused as too small -- decided on the original size, before any pixel is decoded;
3. resize to ``(round(w * s), round(h * s))`` (at least the bucket, never more than the original);
4. crop a ``W x H`` window inside the resized image (centre, or uniformly random from a seeded RNG).

The SDXL time ids are then (original_h, original_w, crop_top, crop_left, target_h, target_w):
diffusers' ``train_text_to_image_sdxl.py`` records the pre-resize size and the crop in the
resized image, as here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from components.config import BucketConfig, CropMode


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def log_aspect(self) -> float:
        return math.log(self.width / self.height)


@dataclass(frozen=True)
class Plan:
    bucket: Bucket
    original: tuple[int, int]  # (h, w) before any resize
    resized: tuple[int, int]  # (h, w) after the LANCZOS downsample, covers the bucket
    crop: tuple[int, int]  # (top, left) of the bucket window inside the resized image

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)."""
        return (*self.original, *self.crop, self.bucket.height, self.bucket.width)


def make_buckets(cfg: BucketConfig) -> tuple[Bucket, ...]:
    buckets = set()
    for width in range(cfg.min_side, cfg.max_side + 1, cfg.step):
        height = (cfg.area // width) // cfg.step * cfg.step
        if cfg.min_side <= height <= width:
            buckets.update((Bucket(width, height), Bucket(height, width)))
    if not buckets:
        raise ValueError(
            f"no bucket has sides in [{cfg.min_side}, {cfg.max_side}] with area {cfg.area}; widen the side range"
        )
    return tuple(sorted(buckets))


def choose_bucket(h: int, w: int, buckets: tuple[Bucket, ...]) -> Bucket:
    """Closest aspect ratio in log space; ties go to the larger bucket, then the wider one."""
    target = math.log(w / h)
    return min(buckets, key=lambda b: (abs(b.log_aspect - target), -b.width * b.height, -b.width))


def cover_size(h: int, w: int, bucket: Bucket) -> tuple[int, int] | None:
    """(h, w) after scaling so the image just covers the bucket; None if that would upsample."""
    if h < bucket.height or w < bucket.width:
        return None
    scale = max(bucket.width / w, bucket.height / h)
    # Clamp both ways: at least the bucket (float rounding), at most the original (never upsample).
    rh = min(h, max(bucket.height, round(h * scale)))
    rw = min(w, max(bucket.width, round(w * scale)))
    return rh, rw


def crop_origin(resized: tuple[int, int], bucket: Bucket, mode: CropMode, rng: random.Random) -> tuple[int, int]:
    rh, rw = resized
    spare_h, spare_w = rh - bucket.height, rw - bucket.width
    if mode == CropMode.CENTER:
        return spare_h // 2, spare_w // 2
    return rng.randint(0, spare_h), rng.randint(0, spare_w)


def plan(h: int, w: int, buckets: tuple[Bucket, ...], mode: CropMode, rng: random.Random) -> Plan | None:
    """The full plan for an image of original size (h, w), or None if it is too small for its bucket."""
    bucket = choose_bucket(h, w, buckets)
    resized = cover_size(h, w, bucket)
    if resized is None:
        return None
    return Plan(bucket=bucket, original=(h, w), resized=resized, crop=crop_origin(resized, bucket, mode, rng))
