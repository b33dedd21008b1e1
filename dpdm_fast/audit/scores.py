"""White-box canary scores from the released updates (DP-SGD releases every step's noisy update, and its
guarantee covers them all: an auditor that reads each of them is within the threat model).

``updates`` is the (releases, m) matrix of each released update's component along each canary's
direction, in release order (a step released twice appears twice). The score of canary j:

- the sum over releases of its column: an included canary adds C each time it is sampled, an excluded
  one adds nothing, the noise adds N(0, sigma^2 C^2) per release. For Poisson-subsampled Gaussian
  steps this sum is close to the likelihood-ratio test of the mechanism (its mu is about the
  central-limit mu of DP-SGD), so the bound it gives is close to what the accountant allows.
- if two releases carry the same noise (a resume that restored a noise generator state twice, a step
  released twice with the same noise), their difference holds no noise at all, only the canaries
  sampled in one of the two steps but not the other. Such pairs are found from the noise scale the run
  claims: with fresh noise the difference of two releases has variance 2 (sigma C / divisor)^2 along
  every canary direction, whatever else the releases share (a slowly changing real-data gradient
  cancels in it); a pair whose difference varies across the canaries by less than a quarter of that
  cannot have fresh noise. The score then becomes the summed absolute differences over such pairs.
  Exactly identical releases (a step recomputed the same way) count once. With fewer than
  MIN_CANARIES_TO_DETECT canaries, or without noise, nothing is detected.

Both are functions of the released updates only, never of the inclusion bits, so every estimator's
guarantee holds for them.
"""
from __future__ import annotations

import numpy as np

REPEAT_VARIANCE_FRACTION = 0.25   # fresh noise: the pair's difference has 2 noise variances (chi-square / m ~ 1)
MIN_CANARIES_TO_DETECT = 50       # below this the spread across canaries is too noisy an estimate of the variance


def distinct_releases(updates: np.ndarray) -> np.ndarray:
    """The releases with exact repeats removed (the first of each kept, order kept)."""
    rows = np.asarray(updates, dtype=np.float64)
    _, first = np.unique(rows, axis=0, return_index=True)
    return rows[np.sort(first)]


def repeated_pairs(updates: np.ndarray, noise_sd: float) -> list[tuple[int, int]]:
    """Pairs of releases (i < j) whose difference is far less spread than fresh noise of std ``noise_sd`` (per
    release, along a canary direction) would make it: the same noise twice."""
    rows = np.asarray(updates, dtype=np.float64)
    if noise_sd <= 0 or rows.shape[1] < MIN_CANARIES_TO_DETECT:
        return []
    limit = REPEAT_VARIANCE_FRACTION * 2 * noise_sd ** 2
    pairs = []
    for i in range(len(rows) - 1):
        spread = (rows[i + 1:] - rows[i]).var(axis=1)
        pairs += [(i, i + 1 + int(k)) for k in np.flatnonzero(spread < limit)]
    return pairs


def white_box_scores(updates: np.ndarray, noise_sd: float) -> tuple[np.ndarray, dict]:
    """(m,) scores (higher: more likely included) and how they were made; ``noise_sd``: the claimed std of the
    noise of one release along a unit canary direction (sigma * C / divisor)."""
    rows = np.asarray(updates, dtype=np.float64)
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"updates must be a (releases, canaries) matrix with at least one release, got {rows.shape}")
    rows = distinct_releases(rows)
    pairs = repeated_pairs(rows, noise_sd)
    if not pairs:
        return rows.sum(axis=0), {"statistic": "sum of released updates", "repeated_noise_pairs": 0,
                                  "distinct_releases": len(rows)}
    diffs = np.stack([np.abs(rows[a] - rows[b]) for a, b in pairs])
    return diffs.sum(axis=0), {"statistic": "differences of releases with repeated noise",
                               "repeated_noise_pairs": len(pairs), "distinct_releases": len(rows),
                               "pairs": pairs[:20]}
