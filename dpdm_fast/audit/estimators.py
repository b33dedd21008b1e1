"""Every estimator of the audit on one set of scores, each at its share of the significance.

| name | what it bounds | holds for |
|---|---|---|
| ``eps_delta_one_run`` | eps, by (eps, delta)-DP's binomial tail (Steinke, Nasr, Jagielski 2023) | any scores |
| ``fdp_one_run`` | mu then eps, against Gaussian trade-off curves (Mahloujifar, Melis, Chaudhuri 2025) | any scores |
| ``gdp_thresholds`` | mu then eps, from DKW bands on FPR / FNR at every threshold | independent canaries |
| ``gdp_gaussian_fit`` | mu then eps, from a two-Gaussian fit | independent, Gaussian scores |

The significance 1 - confidence is split between them in fixed shares (a weighted Bonferroni correction:
half to the Gaussian fit, the tightest on the white-box canaries' near-Gaussian scores, a sixth to each
other), so the largest of their bounds, the audit's ``epsilon_lower_bound``, holds at the stated
confidence (under the assumptions of the estimator that gave it: ``rigorous`` says whether it needs none).
"""
from __future__ import annotations

import numpy as np

from .bound import best_bound
from .fdp_bound import fdp_bound
from .gdp_estimate import gaussian_fit_bound, threshold_bound


def _eps_delta(scores, included, delta, significance) -> dict:
    b = best_bound(scores, included, delta, confidence=1 - significance)
    return {"epsilon": b.epsilon_lower_bound, "ceiling": b.ceiling,
            "max_ceiling": max(c["ceiling"] for c in b.candidates),
            "guesses": {"top": b.guesses.plus, "bottom": b.guesses.minus, "right": b.guesses.right},
            "candidates": b.candidates, "significance_per_candidate": b.significance}


ESTIMATORS = {   # name: (function(scores, included, delta, significance) -> dict with "epsilon", rigorous, share)
    "eps_delta_one_run": (_eps_delta, True, 1 / 6),
    "fdp_one_run": (fdp_bound, True, 1 / 6),
    "gdp_thresholds": (threshold_bound, False, 1 / 6),
    "gdp_gaussian_fit": (gaussian_fit_bound, False, 1 / 2),
}


def estimate_all(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95) -> dict:
    """{"estimators": {name: {...bound, "rigorous", "significance"}}, "epsilon_lower_bound", "best"}."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    results = {}
    for name, (fn, rigorous, share) in ESTIMATORS.items():
        significance = (1 - confidence) * share
        results[name] = {**fn(scores, included, delta, significance), "rigorous": rigorous,
                         "significance": significance}
    best = max(results, key=lambda n: results[n]["epsilon"])
    best_rigorous = max((n for n in results if results[n]["rigorous"]), key=lambda n: results[n]["epsilon"])
    return {"estimators": results, "best": best, "epsilon_lower_bound": results[best]["epsilon"],
            "best_rigorous": best_rigorous, "rigorous_epsilon_lower_bound": results[best_rigorous]["epsilon"]}
