"""Gaussian differential privacy (mu-GDP, Dong, Roth and Su, "Gaussian Differential Privacy", JRSS-B 2022,
arXiv 1905.02383): the trade-off curve, and the conversions between mu and (eps, delta) that the
audit's estimators need.

A mechanism is mu-GDP when telling D from D' is at least as hard as telling N(0, 1) from N(mu, 1):
every test with type-I error alpha has type-II error at least

    G_mu(alpha) = Phi(Phi^-1(1 - alpha) - mu).

mu-GDP holds exactly for the Gaussian mechanism with sensitivity / sigma = mu, and approximately
(central limit theorem) for DP-SGD with many steps: mu ~ q sqrt(T (exp(1 / sigma^2) - 1)).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr, ndtri

MU_MAX = 40.0     # beyond this every (eps, delta) conversion saturates: delta(eps) is 1 - 1e-300 at eps = 0


def trade_off(mu: float, alpha):
    """G_mu(alpha): the least type-II error of a test with type-I error alpha against mu-GDP."""
    return ndtr(ndtri(1 - np.asarray(alpha, dtype=np.float64)) - mu)


def blow_up_inverse(mu: float, x: float) -> float:
    """The inverse of x -> 1 - G_mu(x), i.e. Phi(Phi^-1(x) - mu): the smallest type-I error a test can have
    when its power is x (used by the f-DP one-run audit)."""
    return float(ndtr(ndtri(x) - mu))


def delta_of(mu: float, eps: float) -> float:
    """The delta at which mu-GDP is (eps, delta)-DP (Corollary 2.13 of Dong et al.), computed in logs:
    Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    if mu <= 0:
        return 0.0
    a = float(log_ndtr(-eps / mu + mu / 2))
    b = eps + float(log_ndtr(-eps / mu - mu / 2))
    return 0.0 if b >= a else math.exp(a) * -math.expm1(b - a)


def epsilon_of(mu: float, delta: float) -> float:
    """The smallest eps with mu-GDP => (eps, delta)-DP (0 when mu is 0 or delta already covers eps = 0)."""
    _check_delta(delta)
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    if mu == 0 or delta_of(mu, 0.0) <= delta:
        return 0.0
    mu = min(mu, MU_MAX)
    hi = 1.0
    while delta_of(mu, hi) > delta:      # delta_of decreases in eps
        hi *= 2
    return float(brentq(lambda e: delta_of(mu, e) - delta, 0.0, hi, xtol=1e-10))


def mu_of(eps: float, delta: float) -> float:
    """The mu whose (eps, delta) conversion is exactly (eps, delta): the Gaussian mechanism that (eps, delta)
    allows, 1 / sigma of ``get_sigma_gaussian`` in Google's dp_accounting."""
    _check_delta(delta)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if delta_of(MU_MAX, eps) <= delta:
        return MU_MAX
    lo = 1e-12
    if delta_of(lo, eps) >= delta:
        return 0.0
    return float(brentq(lambda m: delta_of(m, eps) - delta, lo, MU_MAX, xtol=1e-12))   # delta_of grows with mu


def dp_sgd_mu(sample_rate: float, noise_multiplier: float, steps: int) -> float:
    """The central-limit mu of Poisson-subsampled DP-SGD (Bu, Dong, Long, Su 2020): a reference point for
    reading an audit, not an accountant (it can under- or over-state the truth for few steps)."""
    if noise_multiplier <= 0:
        return math.inf
    return sample_rate * math.sqrt(steps * math.expm1(1 / noise_multiplier ** 2))


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
