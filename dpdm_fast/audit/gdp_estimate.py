"""Gaussian-DP estimators: a lower confidence bound on mu from the canaries' scores, read as eps at delta.

Both treat the canaries as independent trials: the scores of included canaries as draws from one
distribution, those of excluded canaries from another (true when each canary's score depends only on
its own coordinate of the noise and its own Poisson draws, as with the white-box gradient canaries; an
assumption elsewhere). Unlike ``bound.py`` and ``fdp_bound.py`` they are estimates resting on that
assumption, not proofs for any scores.

- ``thresholds`` (non-parametric; the approach of Nasr et al. 2023 and jax_privacy's
  ``epsilon_from_gdp``): at every threshold t, upper confidence bounds on the false-positive rate
  FPR(t) and the false-negative rate FNR(t) make mu >= Phi^-1(1 - FPR(t)) - Phi^-1(FNR(t)) for a
  mu-GDP mechanism (the trade-off curve passes above every achievable (FPR, FNR)). The bounds hold at
  every threshold at once (the one-sided Dvoretzky-Kiefer-Wolfowitz-Massart band of each score
  distribution), so the best threshold may be picked after seeing the scores.
- ``gaussian_fit`` (parametric, for scores that are Gaussian with one variance, as the summed noisy
  gradient of a white-box canary is: its noise is Gaussian and dominates its Poisson count):
  mu = (mean_in - mean_out) / sd, estimated by the standardised difference d; d / sqrt(1/n_in + 1/n_out)
  is Student's t with n - 2 degrees of freedom and non-centrality mu / sqrt(1/n_in + 1/n_out), so the
  lower confidence bound is the exact inversion of that non-central t (not a normal approximation).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtri
from scipy.stats import nct

from .gaussian_dp import MU_MAX, epsilon_of


def threshold_bound(scores: np.ndarray, included: np.ndarray, delta: float, significance: float) -> dict:
    """mu and eps lower bounds from the uniform (DKW) confidence bands of the two score distributions."""
    s_in, s_out = _split(scores, included)
    n_in, n_out = len(s_in), len(s_out)
    # one-sided DKW (Massart's constant): P[sup_t (F_hat - F)(t) > e] <= exp(-2 n e^2); significance/2 per band
    band_in = math.sqrt(math.log(2 / significance) / (2 * n_in))
    band_out = math.sqrt(math.log(2 / significance) / (2 * n_out))
    thresholds = np.unique(np.concatenate([s_in, s_out, [np.inf]]))
    # at threshold t, guess "included" for scores >= t
    fnr = np.searchsorted(np.sort(s_in), thresholds, side="left") / n_in            # included below t
    fpr = 1 - np.searchsorted(np.sort(s_out), thresholds, side="left") / n_out      # excluded at or above t
    fnr_ub, fpr_ub = np.minimum(fnr + band_in, 1.0), np.minimum(fpr + band_out, 1.0)
    ok = (fnr_ub < 1) & (fpr_ub < 1)
    if not ok.any():
        return {"epsilon": 0.0, "mu": 0.0, "threshold": None, "bands": [band_in, band_out]}
    with np.errstate(divide="ignore"):
        mus = ndtri(1 - fpr_ub[ok]) - ndtri(fnr_ub[ok])
    best = int(np.argmax(mus))
    mu = float(min(max(mus[best], 0.0), MU_MAX))
    return {"epsilon": epsilon_of(mu, delta), "mu": mu, "threshold": float(thresholds[ok][best]),
            "fpr_upper": float(fpr_ub[ok][best]), "fnr_upper": float(fnr_ub[ok][best]), "bands": [band_in, band_out]}


def gaussian_fit_bound(scores: np.ndarray, included: np.ndarray, delta: float, significance: float) -> dict:
    """mu and eps lower bounds from a two-Gaussian, one-variance fit of the scores."""
    s_in, s_out = _split(scores, included)
    n_in, n_out = len(s_in), len(s_out)
    if n_in < 2 or n_out < 2:
        raise ValueError("the Gaussian fit needs at least 2 included and 2 excluded canaries")
    n = n_in + n_out
    pooled = ((n_in - 1) * s_in.var(ddof=1) + (n_out - 1) * s_out.var(ddof=1)) / (n - 2)
    gap = float(s_in.mean() - s_out.mean())
    if pooled == 0:      # no spread at all (e.g. no noise): any separation is infinitely many sds
        mu_hat = MU_MAX if gap > 0 else 0.0
        return {"epsilon": epsilon_of(mu_hat, delta), "mu": mu_hat, "mu_estimate": mu_hat}
    d = gap / math.sqrt(pooled)
    scale = math.sqrt(1 / n_in + 1 / n_out)
    mu = min(_noncentrality_lower(d / scale, n - 2, significance) * scale, MU_MAX)
    return {"epsilon": epsilon_of(mu, delta), "mu": mu, "mu_estimate": d}


def _noncentrality_lower(t: float, df: int, significance: float) -> float:
    """The smallest non-centrality >= 0 not refuted by t at ``significance``: P[T >= t | ncp] = significance."""
    tail = lambda ncp: float(nct.sf(t, df, ncp)) - significance   # noqa: E731 (grows with ncp)
    if tail(0.0) >= 0:
        return 0.0
    hi = max(1.0, 2 * t)
    while tail(hi) < 0:
        hi *= 2
    return float(brentq(tail, 0.0, hi, xtol=1e-10))


def _split(scores: np.ndarray, included: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and inclusion bits {included.shape} must be matching vectors")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if included.all() or not included.any():
        raise ValueError("a Gaussian-DP estimate needs both included and excluded canaries")
    return scores[included], scores[~included]
