"""Bucket and crop math: property tests (never upsampled, crop inside the resized image, time ids
consistent) and the published SDXL bucket list."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.config import BucketConfig, ConfigError, CropMode, load_config
from components.curation.buckets import Bucket, choose_bucket, cover_size, make_buckets, plan

SDXL = make_buckets(BucketConfig())
TINY = make_buckets(BucketConfig(area=65536, step=64, min_side=128, max_side=512))

sides = st.integers(min_value=1, max_value=6000)
presets = st.sampled_from([SDXL, TINY])
modes = st.sampled_from(list(CropMode))


def test_sdxl_published_buckets_are_generated():
    # SDXL's 1 MP training buckets (Podell et al. 2023, app. I) and their transposes.
    names = {b.name for b in SDXL}
    for w, h in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640)]:
        assert f"{w}x{h}" in names and f"{h}x{w}" in names


@pytest.mark.parametrize("buckets", [SDXL, TINY])
def test_buckets_are_on_the_grid_within_area_and_symmetric(buckets):
    cfg = BucketConfig() if buckets is SDXL else BucketConfig(area=65536, step=64, min_side=128, max_side=512)
    for b in buckets:
        assert b.width % cfg.step == 0 and b.height % cfg.step == 0
        assert cfg.min_side <= min(b.width, b.height) and max(b.width, b.height) <= cfg.max_side
        assert b.width * b.height <= cfg.area
        assert Bucket(b.height, b.width) in buckets


def test_tiny_preset_buckets():
    assert {b.name for b in TINY} == {
        "256x256", "320x192", "192x320", "384x128", "128x384", "448x128", "128x448", "512x128", "128x512"
    }


def test_impossible_bucket_config_is_a_clear_error():
    with pytest.raises(ValueError, match="no bucket"):
        make_buckets(BucketConfig(area=64 * 64, step=64, min_side=128, max_side=256))


def test_known_choices():
    assert choose_bucket(896, 1152, SDXL).name == "1152x896"
    assert choose_bucket(1152, 896, SDXL).name == "896x1152"
    assert choose_bucket(300, 451, TINY).name == "320x192"  # chelsea.png
    assert cover_size(300, 451, Bucket(320, 192)) == (213, 320)
    assert cover_size(191, 384, Bucket(320, 192)) is None  # one row short: never upsample


@settings(max_examples=400, deadline=None)
@given(h=sides, w=sides, buckets=presets, mode=modes, seed=st.integers(0, 2**32))
def test_plan_never_upsamples_and_crops_inside(h, w, buckets, mode, seed):
    p = plan(h, w, buckets, mode, random.Random(seed))
    bucket = choose_bucket(h, w, buckets)
    if p is None:
        assert h < bucket.height or w < bucket.width  # refused only when it would need upsampling
        return
    rh, rw = p.resized
    # Never upsampled, and the resized image covers the bucket.
    assert bucket.height <= rh <= h and bucket.width <= rw <= w
    # Aspect ratio preserved by the resize (to rounding: one pixel on either side).
    assert abs(rw / rh - w / h) <= (w / h) * (1 / rh + 1 / rw) + 1e-9
    # One side matches the bucket exactly (the tightest cover), up to rounding.
    assert min(rh - bucket.height, rw - bucket.width) <= 1
    # The crop window lies inside the resized image.
    top, left = p.crop
    assert 0 <= top and top + bucket.height <= rh
    assert 0 <= left and left + bucket.width <= rw
    # SDXL time ids: original (h, w), crop (top, left), target (h, w).
    assert p.time_ids() == (h, w, top, left, bucket.height, bucket.width)
    if mode == CropMode.CENTER:
        assert (top, left) == ((rh - bucket.height) // 2, (rw - bucket.width) // 2)


@settings(max_examples=200, deadline=None)
@given(h=sides, w=sides, buckets=presets)
def test_chosen_bucket_has_the_closest_log_aspect(h, w, buckets):
    chosen = choose_bucket(h, w, buckets)
    err = abs(chosen.log_aspect - math.log(w / h))
    assert all(err <= abs(b.log_aspect - math.log(w / h)) + 1e-12 for b in buckets)
    # Transposing the image transposes the choice.
    assert choose_bucket(w, h, buckets) == Bucket(chosen.height, chosen.width)


@settings(max_examples=100, deadline=None)
@given(h=st.integers(1024, 4000), w=st.integers(1024, 4000), seed=st.integers(0, 2**32))
def test_random_crop_is_reproducible_from_its_seed(h, w, seed):
    a = plan(h, w, SDXL, CropMode.RANDOM, random.Random(seed))
    b = plan(h, w, SDXL, CropMode.RANDOM, random.Random(seed))
    assert a == b


def test_bucket_config_without_any_bucket_is_refused_at_load():
    with pytest.raises(ConfigError, match="no bucket"):
        load_config(None, ["curate.buckets.area=4096", "curate.buckets.min_side=128", "curate.buckets.max_side=256"])
