"""Every estimator of the audit on one set of scores, each at its share of the significance.

| name | refutes | assumes | share |
|---|---|---|---|
| ``eps_delta_one_run`` | (eps, delta)-DP, by its binomial tail (Steinke, Nasr, Jagielski 2023) | nothing | 1/6 |
| ``fdp_one_run`` | mu-GDP (Mahloujifar, Melis, Chaudhuri 2025), read as the eps of that mu | nothing | 1/6 |
| ``gdp_thresholds`` | mu-GDP, from DKW bands on FPR / FNR at every threshold | independent canaries | 1/6 |
| ``gdp_gaussian_fit`` | mu-GDP, from a two-Gaussian fit | independent canaries, Gaussian scores | 1/2 |

The significance 1 - confidence is split between them in fixed shares (a weighted Bonferroni
correction: half to the Gaussian fit, the tightest on the white-box canaries' near-Gaussian scores, a
sixth to each other), so the largest of their bounds, the audit's ``epsilon_lower_bound``, holds at the
stated confidence for what its estimator refutes, under what it assumes. Only ``eps_delta_one_run``
refutes the claim itself, (eps, delta)-DP, for any scores: it alone is ``rigorous`` and gives
``rigorous_epsilon_lower_bound``. The mu-GDP ones refute "the run is as private as the Gaussian
mechanism with this (eps, delta)": DP-SGD's trade-off curve is close to a Gaussian one (central limit),
but not equal to it, so a mechanism that is (eps, delta)-DP can fail that (its subsampled tails dip
below the Gaussian curve), and a bound above the claim from them is a strong sign, not a proof.
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


ESTIMATORS = {   # name: (function(scores, included, delta, significance) -> dict with "epsilon", refutes, assumes, share)
    "eps_delta_one_run": (_eps_delta, "(eps, delta)-DP", "nothing", 1 / 6),
    "fdp_one_run": (fdp_bound, "mu-GDP", "nothing", 1 / 6),
    "gdp_thresholds": (threshold_bound, "mu-GDP", "independent canaries", 1 / 6),
    "gdp_gaussian_fit": (gaussian_fit_bound, "mu-GDP", "independent canaries with Gaussian scores", 1 / 2),
}


def estimate_all(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95) -> dict:
    """{"estimators": {name: {...bound, "rigorous", "significance"}}, "epsilon_lower_bound", "best"}."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    results = {}
    for name, (fn, refutes, assumes, share) in ESTIMATORS.items():
        significance = (1 - confidence) * share
        results[name] = {**fn(scores, included, delta, significance), "refutes": refutes, "assumes": assumes,
                         "rigorous": refutes == "(eps, delta)-DP" and assumes == "nothing",
                         "significance": significance}
    best = max(results, key=lambda n: results[n]["epsilon"])
    best_rigorous = max((n for n in results if results[n]["rigorous"]), key=lambda n: results[n]["epsilon"])
    return {"estimators": results, "best": best, "epsilon_lower_bound": results[best]["epsilon"],
            "best_rigorous": best_rigorous, "rigorous_epsilon_lower_bound": results[best_rigorous]["epsilon"]}
