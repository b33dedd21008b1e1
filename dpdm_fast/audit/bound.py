"""The one-run audit's statistics (Steinke, Nasr, Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023, arXiv 2305.08846).

m canaries are each included in training independently with probability 1/2. An auditor guesses
"included" for the r+ highest scores and "excluded" for the r- lowest (r = r+ + r- guesses), and
v of the r guesses are right. If training is (eps, delta)-DP, the paper's main theorem bounds the
chance of v or more right guesses by

    p(eps, delta) = beta + 2 m delta * alpha,
    beta  = P[Binomial(r, q) >= v],   q = e^eps / (1 + e^eps),
    alpha = max_{i = 1..v} (P[Binomial(r, q) >= v - i] - beta) / i,

so every eps with p(eps, delta) <= significance is refuted at confidence 1 - significance, and the
audit's lower bound is the largest such eps. With all r guesses right, the bound cannot exceed its
*ceiling*: about 3.5 for r = 100, 5.8 for r = 1000, 7.4 for r = 5000 at 95% (delta -> 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom

EPS_MAX = 50.0     # beyond this the search stops (q = 1 - 2e-22: far above any ceiling of a real audit)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's bound on P[at least v of r guesses right] for an (eps, delta)-DP mechanism."""
    _check_counts(m, r, v)
    if v == 0:
        return 1.0
    q = float(expit(eps))
    beta = float(binom.sf(v - 1, r, q))            # P[Bin(r, q) >= v]
    if delta == 0:
        return beta
    i = np.arange(1, v + 1)
    alpha = float(np.max((binom.sf(v - i - 1, r, q) - beta) / i))   # sf(v - i - 1) = P[Bin >= v - i]
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float = 0.05) -> float:
    """The largest eps refuted at confidence 1 - significance by v right guesses out of r (0 when none is)."""
    _check_counts(m, r, v)
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    refuted = lambda eps: p_value(m, r, v, eps, delta) <= significance   # noqa: E731 (decreasing in eps)
    if not refuted(0.0):
        return 0.0
    if refuted(EPS_MAX):
        return EPS_MAX
    # p_value increases with eps: the boundary is where it crosses the significance level
    root = brentq(lambda eps: p_value(m, r, v, eps, delta) - significance, 0.0, EPS_MAX, xtol=1e-9)
    return max(0.0, float(root) - 1e-8)     # (on the refuted side of the crossing)


def ceiling(m: int, r: int, delta: float, significance: float = 0.05) -> float:
    """The most this audit can show: the lower bound when all r guesses are right."""
    return epsilon_lower_bound(m, r, r, delta, significance)


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= right guesses ({v}) <= guesses ({r}) <= canaries ({m})")


@dataclass(frozen=True)
class Guesses:
    plus: int            # guessed "included": the highest scores
    minus: int           # guessed "excluded": the lowest scores
    right: int

    @property
    def total(self) -> int:
        return self.plus + self.minus


def guess(scores: np.ndarray, included: np.ndarray, plus: int, minus: int, seed: int = 0) -> Guesses:
    """Guess "included" for the ``plus`` highest scores and "excluded" for the ``minus`` lowest; ties are
    broken at random (seeded), so equal scores carry no information."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if plus + minus > len(scores):
        raise ValueError(f"{plus} + {minus} guesses but only {len(scores)} canaries")
    # (its own stream: a tie-break drawn like the inclusion bits would guess them)
    tiebreak = np.random.default_rng([seed, 0x71EB]).random(len(scores))
    order = np.lexsort((tiebreak, scores))          # ascending by score, ties in random order
    low, high = order[:minus], order[len(order) - plus:]
    return Guesses(plus, minus, int(included[high].sum() + (~included[low]).sum()))


@dataclass(frozen=True)
class AuditBound:
    epsilon_lower_bound: float
    guesses: Guesses
    ceiling: float
    significance: float       # per candidate (the overall confidence is 1 - significance * candidates)
    candidates: list


def best_bound(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95,
               fractions: tuple = (0.05, 0.1, 0.2, 0.5, 1.0)) -> AuditBound:
    """The lower bound over a few guess counts fixed in advance (r = fraction * m, half top, half bottom),
    with a Bonferroni correction (each at significance (1 - confidence) / #counts), so that picking
    the best one keeps the stated confidence."""
    m = len(scores)
    counts = sorted({max(2, 2 * int(f * m / 2)) for f in fractions if f * m >= 2})
    counts = [r for r in counts if r <= m]
    if not counts:
        raise ValueError(f"{m} canaries are too few to guess")
    alpha = (1 - confidence) / len(counts)
    best = None
    for r in counts:
        g = guess(scores, included, r // 2, r - r // 2)
        eps = epsilon_lower_bound(m, g.total, g.right, delta, alpha)
        if best is None or eps > best[0]:
            best = (eps, g)
    eps, g = best
    return AuditBound(eps, g, ceiling(m, g.total, delta, alpha), alpha,
                      [{"guesses": r, "ceiling": ceiling(m, r, delta, alpha)} for r in counts])


def randomized_response_right_guesses(eps: float, r: int, rng: np.random.Generator, trials: int) -> np.ndarray:
    """Right guesses out of r in the guessing game against randomized response, an exactly eps-DP
    mechanism (it reports each canary's bit truthfully with probability e^eps / (1 + e^eps)): the
    Monte Carlo reference the tests compare the bound with."""
    return rng.binomial(r, 1 / (1 + math.exp(-eps)), size=trials)
