"""The Terminus filters as small pure checks, and the reasons a record can be dropped.

Each dropped record carries exactly one reason: the first check it fails, in the order of
``Reason`` below (cheap metadata first, so a watermarked LAION row is refused before it is
downloaded, and full decoding last). Every check is configurable per source
(``curate.sources.<name>.filters``, or ``curate.filters`` for the one-source shorthand); the Terminus
preset (flows/configs/terminus_v2.yaml) turns them on for its LAION-HD source, after the model card:
"LAION-HD filtered to samples with EXIF and without watermarks, luminance capped at 100 (0.5)", and
leaves its Midjourney source unfiltered.
"""

from __future__ import annotations

import enum

import numpy as np
from PIL import Image, ImageStat


class Reason(enum.StrEnum):
    """Why a record was dropped, in the order the checks run."""

    PATH_ESCAPE = "path_escape"  # manifest path outside its root (``..``, absolute elsewhere)
    NO_CAPTION = "no_caption"  # missing caption under ``missing_caption: drop``
    WATERMARK = "watermark"  # metadata watermark probability above ``max_watermark``
    WATERMARK_UNCHECKED = "watermark_unchecked"  # no watermark score, under ``require_watermark_check``
    UNSAFE = "unsafe"  # metadata ``punsafe`` above ``max_punsafe``
    LOW_SIMILARITY = "low_similarity"  # metadata ``similarity`` below ``min_similarity``
    HTTP_ERROR = "http_error"  # a URL answered 4xx/5xx (after retries), refused to connect, or redirected too often
    TIMEOUT = "timeout"  # a URL did not answer in ``download.timeout_s`` (after retries)
    TOO_LARGE = "too_large"  # a URL's body is larger than ``download.max_bytes``
    UNREADABLE = "unreadable"  # the file could not be read (missing, permission, S3 error)
    EMPTY = "empty"  # zero bytes
    NOT_AN_IMAGE = "not_an_image"  # no image format recognises the bytes (or a URL's Content-Type is not image/*)
    DECOMPRESSION_BOMB = "decompression_bomb"  # header's pixel count above ``max_pixels``
    BAD_ASPECT = "bad_aspect"  # width / height outside [min_aspect, max_aspect]
    TOO_SMALL = "too_small"  # smaller than its bucket: would need upsampling
    NO_EXIF = "no_exif"  # none of the camera tags (``require_exif``)
    EDITED = "edited"  # EXIF Software names a known editor (``drop_edited``)
    TRUNCATED = "truncated"  # the pixel data ends early
    CORRUPT = "corrupt"  # the pixel data does not decode
    TOO_BRIGHT = "too_bright"  # mean luma above ``max_luminance`` (under ``luminance_policy: drop``)
    DUPLICATE = "duplicate"  # same bytes as a kept record with a smaller source URI


# EXIF tag ids (EXIF 2.32, CIPA DC-008, tables 4-8); looked up by id, not by name, so a reader's
# naming quirks do not matter. IFD0 holds Make/Model/Software and the GPS IFD pointer; the Exif
# sub-IFD (pointer 0x8769) holds DateTimeOriginal and LensModel.
TAG_MAKE = 0x010F
TAG_MODEL = 0x0110
TAG_SOFTWARE = 0x0131
TAG_PROCESSING_SOFTWARE = 0x000B
TAG_ORIENTATION = 0x0112
TAG_GPS_IFD = 0x8825
TAG_EXIF_IFD = 0x8769
TAG_DATETIME_ORIGINAL = 0x9003
TAG_LENS_MODEL = 0xA434


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, bytes | str):
        return bool(value.strip(b"\x00 " if isinstance(value, bytes) else "\x00 "))
    return True


def camera_tags(exif: Image.Exif) -> list[str]:
    """Which of Make, Model, DateTimeOriginal, LensModel, GPSInfo the EXIF carries."""
    try:
        return _camera_tags(exif)
    except Exception:  # a malformed sub-IFD pointer: no usable camera EXIF
        return []


def _camera_tags(exif: Image.Exif) -> list[str]:
    found = []
    if _present(exif.get(TAG_MAKE)):
        found.append("Make")
    if _present(exif.get(TAG_MODEL)):
        found.append("Model")
    sub = exif.get_ifd(TAG_EXIF_IFD) if TAG_EXIF_IFD in exif else {}
    if _present(sub.get(TAG_DATETIME_ORIGINAL)):
        found.append("DateTimeOriginal")
    if _present(sub.get(TAG_LENS_MODEL)):
        found.append("LensModel")
    if TAG_GPS_IFD in exif and exif.get_ifd(TAG_GPS_IFD):
        found.append("GPSInfo")
    return found


def editing_software(exif: Image.Exif, known: list[str]) -> str | None:
    """The EXIF Software/ProcessingSoftware value if it names one of ``known`` (case-insensitive)."""
    for tag in (TAG_SOFTWARE, TAG_PROCESSING_SOFTWARE):
        value = exif.get(tag)
        if isinstance(value, bytes):
            value = value.decode("latin-1", errors="replace")
        if isinstance(value, str):
            lowered = value.lower()
            if any(name.lower() in lowered for name in known):
                return value.strip()
    return None


def oriented_size(size: tuple[int, int], exif: Image.Exif) -> tuple[int, int]:
    """(h, w) as displayed: EXIF orientations 5-8 rotate by 90 degrees and swap the sides."""
    w, h = size
    if exif.get(TAG_ORIENTATION) in (5, 6, 7, 8):
        w, h = h, w
    return h, w


# Rec. ITU-R BT.709-6, item 3.2: Y' = 0.2126 R' + 0.7152 G' + 0.0722 B'. Applied to the
# gamma-encoded sRGB values / 255 (sRGB shares BT.709's primaries), i.e. luma, not relative (linear)
# luminance: a uniform grey of 128 reads 128/255 = 0.502. It is the quantity an "average brightness" cap
# on photographs means; 0.5 is the card's "Luminance value of samples capped to 100 (.5)" (docs/recipe.md).
LUMA_709 = np.array([0.2126, 0.7152, 0.0722], dtype=np.float64)


def mean_luma(rgb: Image.Image, max_side: int = 512) -> float:
    """Mean BT.709 luma in [0, 1] of an RGB image.

    Computed on a box-filtered reduction (``Image.reduce``, an exact block average) no larger than
    ``max_side``: the mean of block means equals the full mean up to the ragged edge blocks,
    at a fraction of the cost on a 40 MP photo.
    """
    if rgb.mode != "RGB":
        raise ValueError(f"mean_luma expects an RGB image, got {rgb.mode}")
    factor = max(1, max(rgb.size) // max_side)
    small = rgb.reduce(factor) if factor > 1 else rgb
    means = np.array(ImageStat.Stat(small).mean, dtype=np.float64)  # per channel, from the histograms
    return float(means @ LUMA_709 / 255.0)


def clamp_luma(rgb: Image.Image, cap: float, luma: float | None = None) -> Image.Image:
    """``rgb`` darkened so its mean luma is ``cap`` (``luminance_policy: clamp``): every channel of every pixel
    multiplied by cap / mean luma (``luma``: that mean, as ``mean_luma`` measured it), rounded and clipped to
    0..255. Luma is linear in R'G'B', so the scale alone lands on the cap exactly; rounding to integers moves
    the mean by at most 0.5/255. The scale is below 1 (only an image above the cap is clamped), so no channel
    leaves 0..255 and the clip never bites: nothing saturates, and hue and contrast ratios are kept. An image
    at or under the cap is returned as it is."""
    luma = mean_luma(rgb) if luma is None else luma
    if luma <= cap:
        return rgb
    scaled = np.asarray(rgb, dtype=np.float64) * (cap / luma)  # (H, W, 3)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "RGB")
