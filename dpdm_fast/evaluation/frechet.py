"""The Frechet distance between two Gaussians, as FID uses it, computed carefully.

d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)). ``scipy.linalg.sqrtm`` of the product can
fail to converge or return a complex result for nearly singular covariances (few samples, 2048
features): as the reference FID code does, a failed square root is retried with eps * I added to
both covariances, and an imaginary part is dropped only when it is numerically zero; otherwise it is
an error, never a silently wrong number.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: means {mu1.shape} / {mu2.shape}, covariances "
                         f"{sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the square root of the covariance product has an imaginary component "
                             f"{np.abs(covmean.imag).max():.3g}: the statistics are too degenerate for a Frechet "
                             "distance (use more samples)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's matrix square root; a failed one comes back non-finite (checked by the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        try:
            out = linalg.sqrtm(a)
        except (linalg.LinAlgError, ValueError):
            return np.full_like(a, np.nan)
    return out[0] if isinstance(out, tuple) else out


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features in float64 (the unbiased covariance, as the reference FID)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)
