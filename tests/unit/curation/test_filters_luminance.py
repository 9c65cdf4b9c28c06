"""The luminance cap: mean BT.709 luma of the gamma-encoded image (a grey of 128 reads 0.502), and what
``luminance_policy`` does above the cap: ``drop`` refuses the image as ``too_bright``, ``clamp`` keeps it
darkened to the cap and marks its row. On scikit-image's photos, through the curation's own image step."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from components.config import ConfigError, LuminancePolicy, load_config
from components.curation import filters as flt
from components.curation.filters import Reason
from components.curation.process import Curator
from tests.fixtures.http_images import skimage_data
from tests.fixtures.processes import REPO

CAP = 0.5
BRIGHT = "ihc.png"  # a colour photo (immunohistochemistry stain), mean luma 0.64


def _bright() -> Image.Image:
    return Image.open(skimage_data() / BRIGHT).convert("RGB")


def test_luma_of_a_grey_of_128_is_its_encoded_value():
    assert flt.mean_luma(Image.new("RGB", (8, 8), (128, 128, 128))) == pytest.approx(0.502, abs=5e-4)


def test_clamp_lands_the_mean_on_the_cap_and_keeps_the_colours_in_proportion():
    photo = _bright()
    before = flt.mean_luma(photo)
    assert before > CAP + 0.1
    out = flt.clamp_luma(photo, CAP)
    assert out.size == photo.size and out.mode == "RGB"
    assert flt.mean_luma(out) == pytest.approx(CAP, abs=2e-3)
    a, b = np.asarray(photo, np.float64), np.asarray(out, np.float64)
    assert np.abs(b - a * CAP / before).max() <= 0.5 + 1e-9  # one scale for every channel, then rounding
    dark = Image.new("RGB", (8, 8), (40, 50, 60))
    assert flt.clamp_luma(dark, CAP) is dark  # under the cap: untouched


def _curate(policy: str):
    cfg = load_config(REPO / "flows/configs/tiny.yaml", [f"curate.filters.max_luminance={CAP}",
                                                          f"curate.filters.luminance_policy={policy}"])
    curator = Curator(cfg.curate, seed=0)
    buf = io.BytesIO()
    _bright().save(buf, "PNG")
    return curator._image(BRIGHT, "a stained tissue sample", buf.getvalue(), curator.first)


def test_drop_refuses_and_clamp_keeps_a_bright_photo_marked():
    dropped = _curate("drop")
    assert not dropped.kept and dropped.reason is Reason.TOO_BRIGHT and "luma 0.6" in dropped.detail
    kept = _curate("clamp")
    assert kept.kept and kept.row["luma_clamped"] is True
    crop = Image.open(io.BytesIO(kept.row["image"])).convert("RGB")
    assert flt.mean_luma(crop) <= CAP + 0.03  # the crop of a clamped image (a part of it, then JPEG)
    cfg = load_config(REPO / "flows/configs/tiny.yaml", ["curate.filters.luminance_policy=clamp"])  # cap 0.75
    curator, buf = Curator(cfg.curate, seed=0), io.BytesIO()
    _bright().save(buf, "PNG")
    assert curator._image(BRIGHT, "c", buf.getvalue(), curator.first).row["luma_clamped"] is False


def test_the_policy_is_validated_and_drop_is_the_default():
    cfg = load_config(REPO / "flows/configs/tiny.yaml")
    assert cfg.curate.filters.luminance_policy is LuminancePolicy.DROP
    with pytest.raises(ConfigError, match="luminance_policy") as err:
        load_config(REPO / "flows/configs/tiny.yaml", ["curate.filters.luminance_policy=darken"])
    assert "\n" not in str(err.value)
