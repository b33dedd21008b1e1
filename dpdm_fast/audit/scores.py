"""White-box canary scores from the released updates (DP-SGD releases every step's noisy update, and its
guarantee covers them all: an auditor that reads each of them is within the threat model).

``updates`` is the (releases, m) matrix of each released update's component along each canary's
direction, in release order (a step released twice appears twice). The score of canary j:

- the sum over releases of its column: an included canary adds C each time it is sampled, an excluded
  one adds nothing, the noise adds N(0, sigma^2 C^2) per release. For Poisson-subsampled Gaussian
  steps this sum is close to the likelihood-ratio test of the mechanism (its mu is about the
  central-limit mu of DP-SGD), so the bound it gives is close to what the accountant allows.
- if two releases carry the same noise (a resume that restored a noise generator state twice, a step
  released twice), their rows are almost perfectly correlated; the difference of such a pair holds no
  noise at all, only the canaries sampled in one of the two steps but not the other, so the score
  becomes the summed absolute differences over such pairs. A correct run has no such pair (the rows'
  correlation is about 1 / sqrt(m)) and keeps the sum.

Both are functions of the released updates only, never of the inclusion bits, so every estimator's
guarantee holds for them.
"""
from __future__ import annotations

import numpy as np

REPEAT_CORRELATION = 0.8   # independent noise: |corr| ~ 1/sqrt(m) (0.03 for 1,000 canaries); repeated noise: ~1


def repeated_pairs(updates: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of releases (i < j) whose rows are correlated above REPEAT_CORRELATION: the same noise twice."""
    rows = np.asarray(updates, dtype=np.float64)
    centred = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    ok = norms > 0
    corr = np.zeros((len(rows), len(rows)))
    corr[np.ix_(ok, ok)] = (centred[ok] @ centred[ok].T) / np.outer(norms[ok], norms[ok])
    i, j = np.triu_indices(len(rows), k=1)
    hit = corr[i, j] > REPEAT_CORRELATION
    return list(zip(i[hit].tolist(), j[hit].tolist()))


def white_box_scores(updates: np.ndarray) -> tuple[np.ndarray, dict]:
    """(m,) scores (higher: more likely included) and how they were made."""
    rows = np.asarray(updates, dtype=np.float64)
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"updates must be a (releases, canaries) matrix with at least one release, got {rows.shape}")
    pairs = repeated_pairs(rows)
    if not pairs:
        return rows.sum(axis=0), {"statistic": "sum of released updates", "repeated_noise_pairs": 0}
    diffs = np.stack([np.abs(rows[a] - rows[b]) for a, b in pairs])
    return diffs.sum(axis=0), {"statistic": "differences of releases with repeated noise",
                               "repeated_noise_pairs": len(pairs), "pairs": pairs[:20]}
