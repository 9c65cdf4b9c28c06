"""The paired bootstrap interval the promotion gate decides val_loss on."""

from __future__ import annotations

import numpy as np
import pytest

from components.evaluation.paired import paired_change


def test_identical_samples_give_an_interval_of_exactly_zero():
    rows = [0.3, 0.1, 0.25, 0.4, 0.2, 0.33, 0.15, 0.28]
    got = paired_change(rows, rows)
    assert (got.change, got.low, got.high, got.n) == (0.0, 0.0, 0.0, 8)


def test_a_uniform_scaling_is_measured_exactly_and_the_interval_is_seeded():
    rows = np.random.default_rng(0).uniform(0.1, 0.5, 16)
    got = paired_change(rows * 1.2, rows)
    assert got.change == pytest.approx(0.2) and got.low == pytest.approx(0.2) and got.high == pytest.approx(0.2)
    noisy = rows * 1.1 + np.random.default_rng(1).normal(0, 0.02, 16)
    assert paired_change(noisy, rows, seed=3) == paired_change(noisy, rows, seed=3)
    assert paired_change(noisy, rows, seed=3) != paired_change(noisy, rows, seed=4)


def test_the_interval_covers_the_true_change_about_as_often_as_it_claims():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        ref = rng.uniform(0.1, 0.5, 24)
        cand = ref * (1.05 + rng.normal(0, 0.05, 24))  # a true change of +5 % in expectation
        got = paired_change(cand, ref, resamples=1000, seed=trial)
        truth = float((ref * 1.05).mean() / ref.mean() - 1)
        covered += got.low <= truth <= got.high
    assert 0.85 <= covered / 200 <= 0.99  # nominal 95 %; a percentile bootstrap on 24 pairs runs a little under


def test_the_interval_widens_with_fewer_pairs():
    rng = np.random.default_rng(2)
    ref = rng.uniform(0.1, 0.5, 64)
    cand = ref * (1 + rng.normal(0, 0.1, 64))
    few, many = paired_change(cand[:8], ref[:8]), paired_change(cand, ref)
    assert few.high - few.low > many.high - many.low


@pytest.mark.parametrize(("a", "b", "message"), [
    ([1.0, 2.0], [1.0], "equal-length"), ([], [], "non-empty"), ([np.nan], [1.0], "finite"),
    ([1.0], [0.0], "positive")])
def test_bad_samples_are_refused(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_change(a, b)
