"""Paired comparison of two models measured on the same samples: the relative change of a figure, with a
seeded percentile-bootstrap confidence interval. Pure: numpy only.

- ``paired_change``: a mean of per-sample figures. Challenger and reference are scored on the same held-out
  rows with the same noise and timesteps (or the same prompt and seed), so their per-sample figures pair;
  resampling the samples (with replacement) and taking the ratio of the two means in each resample gives the
  interval of ``mean(challenger) / mean(reference) - 1``.
- ``paired_set_change``: a statistic of whole sets (FID, KID, a spread). Each resample draws one set of
  indices per sample set and evaluates the statistic of both models on those very indices (the generated
  images of the same prompts and seeds, against the same resampled held-out images), so the interval is of
  the paired ratio, not of two independent ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PairedChange:
    n: int
    """Paired samples."""
    reference: float
    challenger: float
    change: float
    """``challenger / reference - 1`` on the full sample: +0.05 is 5 % higher."""
    low: float
    high: float
    """The interval's bounds of ``change``."""
    confidence: float
    resamples: int

    def as_dict(self) -> dict:
        return asdict(self)


def paired_change(challenger: list[float] | np.ndarray, reference: list[float] | np.ndarray, resamples: int = 2000,
                  confidence: float = 0.95, seed: int = 0) -> PairedChange:
    """The relative change of the mean from ``reference`` to ``challenger`` (paired by position) and its
    percentile-bootstrap interval at ``confidence`` over ``resamples`` seeded resamples of the pairs.
    Identical samples give an interval of exactly [0, 0]."""
    a, b = np.asarray(challenger, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired samples must be two equal-length non-empty lists, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired samples must be finite")
    if b.mean() <= 0:
        raise ValueError(f"the reference's mean must be positive for a relative change, got {b.mean()}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    ratios = a[idx].mean(axis=1) / np.maximum(b[idx].mean(axis=1), np.finfo(np.float64).tiny) - 1.0
    return _interval(len(a), float(a.mean()), float(b.mean()), ratios, confidence)


SetStatistic = Callable[..., tuple[float, float]]
"""``statistic(*indices) -> (challenger, reference)``: both models' figure on the samples the index arrays pick,
one array per sample set."""


def paired_set_change(statistic: SetStatistic, sizes: Sequence[int], resamples: int = 200, confidence: float = 0.95,
                      seed: int = 0) -> PairedChange:
    """The relative change ``challenger / reference - 1`` of a set statistic and its percentile-bootstrap interval:
    each of ``resamples`` seeded resamples draws, for each sample set of ``sizes``, indices with replacement,
    and the statistic of both models on those indices gives one ratio. ``n`` is the first set's size (the
    paired samples). A resample whose reference is not positive or whose figures are not finite makes the
    interval NaN (no interval to decide on)."""
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"each sample set needs at least one sample, got sizes {list(sizes)}")
    challenger, reference = statistic(*(np.arange(n) for n in sizes))
    if not (np.isfinite(challenger) and np.isfinite(reference)):
        raise ValueError(f"the statistic is not finite on the full sample ({challenger}, {reference})")
    if reference <= 0:
        raise ValueError(f"the reference's figure must be positive for a relative change, got {reference}")
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    for r in range(resamples):
        mine, theirs = statistic(*(rng.integers(0, n, size=n) for n in sizes))
        ratios[r] = mine / theirs - 1.0 if theirs > 0 else np.nan
    return _interval(int(sizes[0]), float(challenger), float(reference), ratios, confidence)


def _interval(n: int, challenger: float, reference: float, ratios: np.ndarray, confidence: float) -> PairedChange:
    tail = (1.0 - confidence) / 2.0
    if np.isfinite(ratios).all():
        low, high = (float(q) for q in np.quantile(ratios, [tail, 1.0 - tail]))
    else:
        low = high = float("nan")
    return PairedChange(n, reference, challenger, challenger / reference - 1.0, low, high, confidence, len(ratios))
