"""Pixel conversions, orientation, the EXIF checks and the luma filter, each against a value
computed independently here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from components.curation import filters as flt
from components.curation import transforms as tf
from components.curation.buckets import Bucket, Plan
from components.curation.transforms import encode_jpeg, orient, to_rgb
from tests.fixtures.http_images import skimage_data


def test_16bit_grey_is_scaled_not_clipped():
    im = Image.fromarray(np.full((8, 8), 30000, np.uint16))
    assert im.mode == "I;16"
    assert im.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # the PIL behaviour we must avoid
    assert to_rgb(im).getpixel((0, 0)) == (round(30000 * 255 / 65535),) * 3


def test_32bit_int_png_range_and_float_images():
    assert to_rgb(Image.fromarray(np.full((4, 4), 65535, np.int32), "I")).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")).getpixel((0, 0)) == (128, 128, 128)


def test_alpha_is_composited_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red under the alpha
    rgba[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (out[:2] == [200, 0, 0]).all() and (out[2:] == 255).all()
    la = Image.fromarray(np.dstack([np.full((2, 2), 10, np.uint8), np.full((2, 2), 0, np.uint8)]), "LA")
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_and_cmyk_and_bilevel():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert to_rgb(p).getpixel((0, 0)) == (10, 20, 30)
    p.info["transparency"] = 1
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # full magenta + yellow = red
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_embedded_icc_profile_is_applied_and_a_broken_one_ignored():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    im = Image.new("RGB", (2, 2), (120, 60, 30))
    im.info["icc_profile"] = srgb
    assert np.abs(np.asarray(to_rgb(im), int) - [120, 60, 30]).max() <= 1  # sRGB -> sRGB: unchanged
    im.info["icc_profile"] = b"not a profile"
    assert to_rgb(im).getpixel((0, 0)) == (120, 60, 30)


def test_exif_orientation_is_applied():
    stored = np.zeros((4, 6, 3), np.uint8)  # 6 wide, 4 tall
    stored[0, 0] = 255  # top-left marker
    im = Image.open(io.BytesIO(_png(stored, orientation=6)))
    exif = im.getexif()
    assert flt.oriented_size(im.size, exif) == (6, 4)  # (h, w) as displayed
    upright = np.asarray(orient(im))
    assert upright.shape == (6, 4, 3) and upright[0, -1].max() == 255  # rotated 90 degrees clockwise


def _png(arr: np.ndarray, **tags) -> bytes:
    exif = Image.Exif()
    if "orientation" in tags:
        exif[flt.TAG_ORIENTATION] = tags["orientation"]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", exif=exif.tobytes())
    return buf.getvalue()


def test_camera_tags_by_id_including_the_sub_ifds():
    exif = Image.Exif()
    assert flt.camera_tags(exif) == []
    exif.get_ifd(flt.TAG_EXIF_IFD)[flt.TAG_DATETIME_ORIGINAL] = "2023:01:01 00:00:00"
    reread = Image.Exif()
    reread.load(exif.tobytes())
    assert flt.camera_tags(reread) == ["DateTimeOriginal"]
    exif = Image.Exif()
    exif[flt.TAG_MAKE] = "  "  # blank values do not count
    exif[flt.TAG_MODEL] = "X100V"
    assert flt.camera_tags(exif) == ["Model"]


def test_editing_software_is_matched_case_insensitively():
    known = ["photoshop", "gimp"]
    exif = Image.Exif()
    exif[flt.TAG_SOFTWARE] = "Adobe Photoshop Lightroom Classic 12.0"
    assert flt.editing_software(exif, known) == "Adobe Photoshop Lightroom Classic 12.0"
    exif[flt.TAG_SOFTWARE] = "Firmware 1.2"
    assert flt.editing_software(exif, known) is None
    exif[flt.TAG_PROCESSING_SOFTWARE] = "GIMP 2.10"
    assert flt.editing_software(exif, known) == "GIMP 2.10"


@pytest.mark.parametrize("colour,expected", [((255, 255, 255), 1.0), ((0, 0, 0), 0.0), ((0, 255, 0), 0.7152),
                                             ((255, 0, 0), 0.2126), ((0, 0, 255), 0.0722)])
def test_mean_luma_is_bt709_on_encoded_values(colour, expected):
    assert flt.mean_luma(Image.new("RGB", (3, 3), colour)) == pytest.approx(expected)


def test_mean_luma_on_the_reduction_matches_the_full_image():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(2048, 1536, 3), dtype=np.uint8)
    full = float((arr.astype(np.float64) @ flt.LUMA_709).mean() / 255)
    assert flt.mean_luma(Image.fromarray(arr)) == pytest.approx(full, abs=2e-3)


def test_jpeg_is_baseline_444_at_size():
    data = encode_jpeg(Image.new("RGB", (64, 32), (10, 200, 30)), 95)
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.size == (64, 32) and im.layer[0][1:3] == (1, 1)  # no chroma subsampling


# --- the shortcuts of a large downscale: JPEG draft and integer reduction, against a plain LANCZOS ---------------

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "retina.jpg", "brick.png", "grass.png", "gravel.png", "camera.png")


def _photo_jpegs() -> list[tuple[str, bytes]]:
    out = []
    for name in SKIMAGE_PHOTOS:
        buf = io.BytesIO()
        Image.open(skimage_data() / name).convert("RGB").save(buf, "JPEG", quality=95)
        out.append((name, buf.getvalue()))
    return out


def _psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("factor", [2.5, 4, 6, 8, 12])
def test_large_downscale_shortcuts_match_plain_lanczos(factor):
    """draft_for + resize_and_crop (what Curator runs) against LANCZOS from the full decode: within
    MIN_PSNR_DB on every photo, never below the target size, and the shortcuts really taken from 4x
    (reduce) and 8x (draft) on, so a change that drops the quality or the speed-up fails here."""
    for name, data in _photo_jpegs():
        full = Image.open(io.BytesIO(data))
        full.load()
        tw, th = round(full.width / factor), round(full.height / factor)
        plan = Plan(bucket=Bucket(tw, th), original=(full.height, full.width), resized=(th, tw), crop=(0, 0))
        plain = full.resize((tw, th), Image.Resampling.LANCZOS)
        im = Image.open(io.BytesIO(data))
        tf.draft_for(im, plan.resized, swapped=False)
        im.load()
        drafted = im.size != full.size
        assert not drafted or (im.width >= tw * tf.DRAFT_GAP and im.height >= th * tf.DRAFT_GAP), (name, im.size)
        if factor > 2 * tf.DRAFT_GAP:
            assert drafted, (name, factor)
        elif factor < 2 * tf.DRAFT_GAP:
            assert not drafted, (name, factor, im.size)
        fast = tf.resize_and_crop(im.convert("RGB"), plan)
        assert fast.size == (tw, th)
        assert _psnr(fast, plain) >= tf.MIN_PSNR_DB, (name, factor, _psnr(fast, plain))
        if factor < 2 * tf.REDUCING_GAP:
            assert _psnr(fast, plain) == float("inf")  # small downscales are a plain LANCZOS, bit for bit


def test_drafted_decode_keeps_the_luma_decision():
    """The luminance filter reads the drafted image: libjpeg's DCT scaling keeps each block's DC term (its
    mean), so the mean luma stays within 0.002 of the full decode's."""
    for name, data in _photo_jpegs():
        full = Image.open(io.BytesIO(data)).convert("RGB")
        im = Image.open(io.BytesIO(data))
        tf.draft_for(im, (im.height // 8, im.width // 8), swapped=False)
        im.load()
        assert im.size != full.size, name  # really drafted
        assert flt.mean_luma(im.convert("RGB")) == pytest.approx(flt.mean_luma(full), abs=2e-3), name


def test_draft_is_turned_by_the_exif_orientation():
    """A portrait target on a landscape-stored JPEG with orientation 6: the request is in stored axes."""
    buf = io.BytesIO()
    Image.new("RGB", (1600, 800), (90, 60, 30)).save(buf, "JPEG")
    im = Image.open(io.BytesIO(buf.getvalue()))
    tf.draft_for(im, (100, 50), swapped=True)  # oriented 800 wide x 1600 high -> 50 x 100
    im.load()
    assert im.size == (400, 200)  # 1/4: 200 >= 4 x 50, 400 >= 4 x 100; 1/8 would be too small


def test_resizing_the_crop_window_equals_resize_then_crop():
    """resize_and_crop resizes only the bucket window's source box; the LANCZOS filter still reads the pixels
    around it, so the result is the crop of the whole resized image, to within 1 level of float rounding."""
    for name, data in _photo_jpegs()[:4]:
        full = Image.open(io.BytesIO(data)).convert("RGB")
        rw, rh = round(full.width / 1.7), round(full.height / 1.7)
        bucket = Bucket(rw - 13, rh - 7)
        plan = Plan(bucket=bucket, original=(full.height, full.width), resized=(rh, rw), crop=(5, 9))
        whole = full.resize((rw, rh), Image.Resampling.LANCZOS).crop((9, 5, 9 + bucket.width, 5 + bucket.height))
        window = tf.resize_and_crop(full, plan)
        diff = np.abs(np.asarray(window, int) - np.asarray(whole, int))
        assert window.size == whole.size and diff.max() <= 1, (name, diff.max())
        assert (diff > 0).mean() < 0.01, name
