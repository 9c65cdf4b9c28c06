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


def orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (ImageOps.exif_transpose), so pixels are stored as displayed."""
    return ImageOps.exif_transpose(im)


def resize_and_crop(rgb: Image.Image, plan: Plan) -> Image.Image:
    """LANCZOS downsample to the plan's cover size, then cut the bucket window at the plan's crop."""
    rh, rw = plan.resized
    if (rh, rw) != plan.original:
        rgb = rgb.resize((rw, rh), Image.Resampling.LANCZOS)
    top, left = plan.crop
    return rgb.crop((left, top, left + plan.bucket.width, top + plan.bucket.height))


def encode_jpeg(rgb: Image.Image, quality: int) -> bytes:
    """Baseline JPEG, 4:4:4 chroma (``subsampling=0``): training sees full colour resolution."""
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()
