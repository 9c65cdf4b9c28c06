"""FID and KID from feature vectors, cheap enough to recompute on every bootstrap resample. Pure: numpy only.

torchmetrics computes the reported FID and KID from images (``quality.distribution_distance``). The paired
intervals resample the same features many times, so they need the two distances as functions of features:

- Fréchet distance: ``|mu_x - mu_y|^2 + tr(S_x) + tr(S_y) - 2 tr((S_x S_y)^(1/2))`` with sample covariances
  (``n - 1``). With centred feature rows ``A`` (n x d) and ``B`` (m x d), the non-zero eigenvalues of
  ``S_x S_y`` are the squared singular values of ``A B^T / sqrt((n - 1)(m - 1))``, so the trace of the square
  root is that matrix's nuclear norm: an (n x m) SVD instead of a (d x d) matrix square root, exact for any n,
  m and d.
- Kernel distance: the unbiased squared MMD under torchmetrics' polynomial kernel
  ``k(x, y) = (x . y / d + 1)^3``; on two sets of the same size it is torchmetrics' KID of one subset holding
  every sample.
"""

from __future__ import annotations

import numpy as np


def _rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: need a (n, d) feature array with n >= 2, got shape {x.shape}")
    return x


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """FID between feature sets ``x`` (n, d) and ``y`` (m, d)."""
    x, y = _rows(x, "x"), _rows(y, "y")
    a, b = x - x.mean(axis=0), y - y.mean(axis=0)
    n, m = len(x), len(y)
    mean_term = float(np.sum((x.mean(axis=0) - y.mean(axis=0)) ** 2))
    traces = float(np.sum(a * a)) / (n - 1) + float(np.sum(b * b)) / (m - 1)
    cross = float(np.linalg.svd(a @ b.T, compute_uv=False).sum()) / np.sqrt((n - 1) * (m - 1))
    return mean_term + traces - 2.0 * cross


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """torchmetrics' KID kernel: ``(x @ y.T / d + 1) ** 3``."""
    return (np.asarray(x, np.float64) @ np.asarray(y, np.float64).T / x.shape[1] + 1.0) ** 3


def mmd_from_kernels(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased squared MMD from the kernel matrices within ``x``, within ``y`` and between them."""
    n, m = len(k_xx), len(k_yy)
    if n < 2 or m < 2:
        raise ValueError(f"the kernel distance needs at least 2 samples per set, got {n} and {m}")
    within_x = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * k_xy.sum() / (n * m))


def kernel_distance(x: np.ndarray, y: np.ndarray) -> float:
    """KID between feature sets ``x`` (n, d) and ``y`` (m, d), every sample in one subset."""
    x, y = _rows(x, "x"), _rows(y, "y")
    return mmd_from_kernels(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
