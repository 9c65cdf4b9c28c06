"""FID and KID from feature vectors (what the paired intervals resample), checked against torchmetrics'
own computation on the same features, with fewer samples than dimensions as well as more."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from components.evaluation.distances import frechet_distance, kernel_distance


class Passthrough(nn.Module):
    """A feature extractor that hands torchmetrics the features it was given."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _sets(n: int, m: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, d)) @ rng.normal(0, 0.5, (d, d))
    y = rng.normal(0.3, 1.2, (m, d)) @ rng.normal(0, 0.5, (d, d))
    return x, y


def _torchmetrics_fid(x: np.ndarray, y: np.ndarray) -> float:
    fid = FrechetInceptionDistance(feature=Passthrough(x.shape[1]))
    fid.update(torch.from_numpy(x), real=True)
    fid.update(torch.from_numpy(y), real=False)
    return float(fid.compute())


@pytest.mark.parametrize(("n", "m", "d"), [(40, 40, 8), (12, 9, 32), (30, 50, 16)])
def test_frechet_distance_is_torchmetrics_fid_of_the_same_features(n, m, d):
    x, y = _sets(n, m, d)
    assert frechet_distance(x, y) == pytest.approx(_torchmetrics_fid(x, y), rel=1e-6)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize(("n", "d"), [(40, 8), (10, 32)])
def test_kernel_distance_is_torchmetrics_kid_of_one_subset_holding_every_sample(n, d):
    x, y = _sets(n, n, d, seed=1)
    kid = KernelInceptionDistance(feature=Passthrough(d), subset_size=n, subsets=3)
    kid.update(torch.from_numpy(x), real=True)
    kid.update(torch.from_numpy(y), real=False)
    mean, std = kid.compute()
    assert float(std) == pytest.approx(0.0, abs=1e-9)  # every subset is the whole set
    assert kernel_distance(x, y) == pytest.approx(float(mean), rel=1e-6)


def test_fewer_than_two_samples_are_refused():
    x, y = _sets(1, 5, 4)
    with pytest.raises(ValueError, match="n >= 2"):
        frechet_distance(x, y)
    with pytest.raises(ValueError, match="n >= 2"):
        kernel_distance(y, x)
