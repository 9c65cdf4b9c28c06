"""Paired comparison of two models measured on the same samples: the relative change of a mean, with a
seeded percentile-bootstrap confidence interval.

Challenger and reference are scored on the same held-out rows with the same noise and timesteps, so their
per-row figures pair; resampling the rows (with replacement) and taking the ratio of the two means in each
resample gives the interval of ``mean(challenger) / mean(reference) - 1``. Pure: numpy only.
"""

from __future__ import annotations

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
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return PairedChange(len(a), float(b.mean()), float(a.mean()), float(a.mean() / b.mean() - 1.0),
                        float(low), float(high), confidence, resamples)
