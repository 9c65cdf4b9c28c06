"""The paired bootstrap interval the promotion gate decides val_loss on."""

from __future__ import annotations

import numpy as np
import pytest

from components.evaluation.paired import paired_change, paired_set_change


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


def _fid_statistic(challenger: np.ndarray, reference: np.ndarray, real: np.ndarray):
    from components.evaluation.distances import frechet_distance

    return lambda fake, held_out: (frechet_distance(real[held_out], challenger[fake]),
                                   frechet_distance(real[held_out], reference[fake]))


def test_a_set_statistic_of_identical_models_has_an_interval_of_exactly_zero():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(0, 1, (30, 6)), rng.normal(0.5, 1, (20, 6))
    got = paired_set_change(_fid_statistic(fake, fake, real), (20, 30), resamples=100, seed=1)
    assert (got.change, got.low, got.high, got.n, got.resamples) == (0.0, 0.0, 0.0, 20, 100)


def test_a_set_statistic_interval_separates_a_worse_model_and_is_seeded():
    rng = np.random.default_rng(1)
    real = rng.normal(0, 1, (40, 6))
    reference = rng.normal(0.2, 1, (40, 6))
    worse = reference + rng.normal(1.0, 0.3, (40, 6))  # the same prompts' images, pushed away from the real ones
    stat = _fid_statistic(worse, reference, real)
    got = paired_set_change(stat, (40, 40), resamples=200, seed=2)
    assert got.low > 0.5 and got.low <= got.change <= got.high
    assert got == paired_set_change(stat, (40, 40), resamples=200, seed=2)
    assert got != paired_set_change(stat, (40, 40), resamples=200, seed=3)


def test_pairing_narrows_the_interval_of_a_set_statistic():
    rng = np.random.default_rng(4)
    dark = rng.uniform(0.0, 0.3, 24)
    slightly = dark * 1.02 + rng.normal(0, 0.002, 24)

    def spread(idx):
        return float(np.std(slightly[idx])), float(np.std(dark[idx]))

    def unpaired(idx, other):
        return float(np.std(slightly[idx])), float(np.std(dark[other]))

    paired = paired_set_change(spread, (24,), resamples=300, seed=0)
    independent = paired_set_change(unpaired, (24, 24), resamples=300, seed=0)
    assert paired.high - paired.low < (independent.high - independent.low) / 5


@pytest.mark.parametrize(("values", "message"), [((np.nan, 1.0), "not finite"), ((1.0, 0.0), "positive")])
def test_a_set_statistic_without_a_relative_change_is_refused(values, message):
    with pytest.raises(ValueError, match=message):
        paired_set_change(lambda idx: values, (4,))


def test_a_resample_without_a_positive_reference_leaves_no_interval():
    figures = np.array([1.0, 1.0, 1.0, -5.0])
    got = paired_set_change(lambda idx: (float(figures[idx].sum()) + 3, float(figures[idx].sum()) + 3), (4,),
                            resamples=200)
    assert got.change == 0.0 and np.isnan(got.low) and np.isnan(got.high)
