"""The ZT-SNR dynamic-range probe and the sanity checks of generated images.

Lin et al. 2023 (sec. 1): a model trained with a zero-terminal-SNR schedule can make very dark and very
bright images; the flawed schedule pulls both towards mid-grey. The probe generates from very dark and
very bright prompts and measures, per group, the mean of the images' luminance and its spread (the
standard deviation of the per-image means: how far apart the group's images reach), and the range
between the groups. Promotion holds them against the champion's (``evaluate.gate``).
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

LUMA = np.array([0.2126, 0.7152, 0.0722])  # Rec. 709 luma weights on the sRGB values


def luminance(images: list[np.ndarray]) -> np.ndarray:
    """Mean luma of each float image (H, W, 3) in [0, 1]; NaN for an image that has no finite pixel."""
    with warnings.catch_warnings():  # an all-NaN image has no luminance: NaN, counted by nan_images
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.array([np.nanmean(a @ LUMA) for a in images], dtype=np.float64)


def probe_stats(dark: list[np.ndarray], bright: list[np.ndarray]) -> dict[str, float]:
    """Mean and spread of each group's luminance, and the range between the groups' means."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d, b = luminance(dark), luminance(bright)
        stats = {"luminance_dark": float(np.mean(d)), "luminance_bright": float(np.mean(b)),
                 "dark_spread": float(np.std(d)), "bright_spread": float(np.std(b))}
    stats["luminance_range"] = stats["luminance_bright"] - stats["luminance_dark"]
    return stats


def image_checks(images: list[np.ndarray], blank_std: float) -> dict[str, float]:
    """How many images hold a NaN, and how many are blank: no spatial variation in any channel (a
    solid colour is blank too, although its values differ across channels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanstd of an all-NaN image
        blank = sum(float(np.nanmax(np.nanstd(a, axis=(0, 1)))) < blank_std for a in images)
    return {"nan_images": float(sum(bool(np.isnan(a).any()) for a in images)), "blank_images": float(blank)}


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.nan_to_num(image).clip(0, 1) * 255).round().astype(np.uint8)


def grid(images: list[np.ndarray], cols: int) -> Image.Image:
    """Float images (H, W, 3) in [0, 1] tiled row by row."""
    tiles = [Image.fromarray(to_uint8(a)) for a in images]
    w, h = tiles[0].size
    rows = (len(tiles) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * w, rows * h))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % cols) * w, (i // cols) * h))
    return canvas
