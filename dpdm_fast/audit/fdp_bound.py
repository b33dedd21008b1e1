"""The f-DP one-run audit (Mahloujifar, Melis and Chaudhuri, "Auditing f-Differential Privacy in One Run",
ICML 2025, arXiv 2410.22235), against Gaussian trade-off curves.

The game is the one of ``bound.py``: m canaries, each included with probability 1/2; the auditor guesses
"included" for its k highest scores and abstains on the rest; v of the k guesses are right. Where the
(eps, delta) analysis of Steinke et al. bounds the chance of v right guesses through a binomial tail,
Mahloujifar et al. bound it for any mechanism whose trade-off curve is at least f, through a recursion
over the number of right guesses. The recursion (their "audit with cap") tracks two masses, r for right
and h for wrong guesses, starting from r = alpha v / m and h = alpha (k - v) / m; stepping i from v - 1
down to 0, f forces h up to at least the blow-up inverse of r (the least type-I error of a test whose
power is r), and r grows by i / (k - i) times that increase of h. If the masses end above k / m, the
claim "f-DP" is refuted at significance alpha.

Against the family of Gaussian curves G_mu this refutes every mu up to a largest one, the audit's lower
bound on mu; the bound on eps is that mu's (eps, delta) (``gaussian_dp.epsilon_of``): the largest eps
whose Gaussian mechanism is refuted. It needs no assumption on the scores, but what it refutes is
mu-GDP, not (eps, delta)-DP: a mechanism can be (eps, delta)-DP without being as private as the Gaussian
mechanism with that (eps, delta) (the (eps, delta) trade-off curve dips below the Gaussian one), so a
bound from it above a claim is strong evidence about DP-SGD (whose curve is near-Gaussian), not a proof.
"""
from __future__ import annotations

import numpy as np

from .bound import guess
from .gaussian_dp import MU_MAX, blow_up_inverse, epsilon_of


def refutes_gaussian(mu: float, m: int, k: int, v: int, significance: float) -> bool:
    """Whether v right guesses of k, among m canaries, refute mu-GDP at ``significance``."""
    _check(m, k, v, significance)
    if v == 0:
        return False
    r, h = significance * v / m, significance * (k - v) / m
    for i in range(v - 1, -1, -1):
        h_next = max(h, blow_up_inverse(mu, r))
        if h_next == h:          # nothing moves any more: neither mass can change again
            break
        r, h = min(r + i / (k - i) * (h_next - h), 1.0), h_next
    return r + h > k / m


def mu_lower_bound(m: int, k: int, v: int, significance: float, tol: float = 1e-6) -> float:
    """The largest mu that v right guesses of k refute (0 when none is; MU_MAX when every mu is)."""
    if not refutes_gaussian(tol, m, k, v, significance):
        return 0.0
    if refutes_gaussian(MU_MAX, m, k, v, significance):
        return MU_MAX
    lo, hi = tol, 1.0
    while refutes_gaussian(hi, m, k, v, significance):   # refutation gets harder as mu grows
        lo, hi = hi, 2 * hi
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if refutes_gaussian(mid, m, k, v, significance) else (lo, mid)
    return lo


def fdp_bound(scores: np.ndarray, included: np.ndarray, delta: float, significance: float,
              fractions: tuple = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)) -> dict:
    """The f-DP one-run bound over guess counts fixed in advance (k = fraction * m "included" guesses on the
    top scores), Bonferroni-corrected across them, so that taking the best keeps ``significance``."""
    m = len(scores)
    counts = sorted({max(1, int(f * m)) for f in fractions})
    alpha = significance / len(counts)
    best = {"mu": 0.0, "guesses": counts[0], "right": 0}
    for k in counts:
        v = guess(scores, included, plus=k, minus=0).right
        mu = mu_lower_bound(m, k, v, alpha)
        if mu > best["mu"]:
            best = {"mu": mu, "guesses": k, "right": v}
    return {"epsilon": epsilon_of(best["mu"], delta), "mu": best["mu"], "guesses": best["guesses"],
            "right": best["right"], "guess_counts": counts, "significance_per_count": alpha}


def _check(m: int, k: int, v: int, significance: float) -> None:
    if not (0 <= v <= k <= m and k >= 1):
        raise ValueError(f"need 0 <= right guesses ({v}) <= guesses ({k}) <= canaries ({m}), k >= 1")
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
