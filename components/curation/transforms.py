"""Pixel transforms: orientation, correct conversion of every PIL mode to 8-bit sRGB, LANCZOS
downsample, crop, JPEG encode.

``Image.convert("RGB")`` alone is wrong for three common inputs, each handled here:
- 16-bit greyscale (``I;16``, ``I``): PIL clips to 255 instead of scaling, so a 16-bit photo
  turns white; we scale by 255/65535.
- alpha (``RGBA``, ``LA``, ``PA``, palette with transparency): PIL drops alpha and keeps whatever
  colour hides under transparent pixels; we composite over white, as a viewer shows it on a page.
- an embedded ICC profile (CMYK print profiles, Adobe RGB, Display P3): converted to sRGB with
  LittleCMS (``PIL.ImageCms``) so colours are not read in the wrong space; without a profile,
  PIL's CMYK formula (and Adobe's inverted-CMYK handling in its JPEG decoder) is used.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageCms, ImageOps

from components.curation.buckets import Plan

WHITE = (255, 255, 255)
_SRGB = None


def _srgb_profile():
    global _SRGB
    if _SRGB is None:
        _SRGB = ImageCms.createProfile("sRGB")
    return _SRGB


def _from_icc(im: Image.Image) -> Image.Image | None:
    """Convert to sRGB through the embedded ICC profile; None when there is none or it is unusable."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK", "L"):
        return None
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(
            im, src, _srgb_profile(), renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB"
        )
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None  # a broken profile: fall back to the plain conversion rather than drop the photo


def _scale_to_8bit(im: Image.Image) -> Image.Image:
    """Greyscale wider than 8 bits -> ``L``. ``I;16*`` and 16-bit PNGs (``I``) span 0..65535."""
    arr = np.asarray(im)
    if im.mode == "F":
        top = 1.0 if float(arr.max(initial=0.0)) <= 1.0 else 255.0  # float images: 0..1 or 0..255
        out = np.clip(arr / top * 255.0, 0, 255)
    else:
        out = np.clip(arr.astype(np.float64) * (255.0 / 65535.0), 0, 255)
    return Image.fromarray(np.round(out).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit sRGB ``RGB`` (see the module docstring for why not just ``convert``)."""
    if im.mode.startswith("I") or im.mode == "F":
        im = _scale_to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("1",):
        im = im.convert("L")
    if im.mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    converted = _from_icc(im)
    if converted is not None:
        return converted
    return im if im.mode == "RGB" else im.convert("RGB")


REDUCING_GAP = 2.0
"""A downscale by more than twice this is split (Pillow's ``resize(..., reducing_gap=)``): a box reduction by
an integer factor (``Image.reduce``), then LANCZOS for the last factor of at least ``REDUCING_GAP``."""
DRAFT_GAP = 4.0
"""A JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``) only where that still
leaves at least ``DRAFT_GAP`` times the target size, so from 8x downscales on. The DCT scaling is a cruder
low-pass than LANCZOS: with a gap of 2 it loses more than the box reduction does (docs/benchmarks.md)."""
MIN_PSNR_DB = 40.0
"""Both shortcuts together stay within this PSNR of a plain LANCZOS from the full decode on real photos
(tests/unit/curation/test_transforms.py checks it on scikit-image's photos, from 2.5x to 12x downscales)."""


def orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (ImageOps.exif_transpose), so pixels are stored as displayed.
    In place: an upright image is returned as it is rather than copied."""
    ImageOps.exif_transpose(im, in_place=True)
    return im


def draft_for(im: Image.Image, resized: tuple[int, int], swapped: bool) -> None:
    """Before ``load``: let a JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) whose size is still at
    least ``DRAFT_GAP`` times the plan's ``resized`` (h, w) -- never below the target, so nothing is
    ever upsampled. ``swapped``: the EXIF orientation turns the stored image by 90 degrees. Other formats
    (and a downscale too small for it) are decoded in full."""
    if im.format != "JPEG":
        return
    rh, rw = resized
    want = (rh, rw) if swapped else (rw, rh)  # (width, height) as stored
    im.draft(None, (math.ceil(want[0] * DRAFT_GAP), math.ceil(want[1] * DRAFT_GAP)))


def resize_and_crop(rgb: Image.Image, plan: Plan) -> Image.Image:
    """LANCZOS downsample to the plan's cover size and the bucket window at the plan's crop, in one resize of
    the window's source box (the filter still reads the pixels around it, so this equals resizing the whole
    image and cutting the window, to within float rounding: at most 1 level, tests/unit/curation/test_transforms.py);
    a large downscale is reduced by an integer factor first (``REDUCING_GAP``), and the image may come
    drafted (``draft_for``)."""
    rh, rw = plan.resized
    top, left = plan.crop
    bw, bh = plan.bucket.width, plan.bucket.height
    if rgb.size == (rw, rh):
        return rgb.crop((left, top, left + bw, top + bh))
    sx, sy = rgb.width / rw, rgb.height / rh
    box = (left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)
    return rgb.resize((bw, bh), Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def encode_jpeg(rgb: Image.Image, quality: int) -> bytes:
    """Baseline JPEG, 4:4:4 chroma (``subsampling=0``): training sees full colour resolution."""
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()
