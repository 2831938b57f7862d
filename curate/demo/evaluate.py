"""How well a score separates injected noise from clean pairs: AUROC by the rank-sum formula."""

from __future__ import annotations

import numpy as np


def auroc(clean_scores: np.ndarray, noisy_scores: np.ndarray) -> float:
    """P(score of a random clean pair > score of a random noisy pair), ties counted half.

    This is the Mann-Whitney U statistic divided by n_clean·n_noisy, computed from average ranks.
    """
    clean = np.asarray(clean_scores, dtype=np.float64)
    noisy = np.asarray(noisy_scores, dtype=np.float64)
    if clean.size == 0 or noisy.size == 0:
        return float("nan")
    both = np.concatenate([clean, noisy])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    sorted_vals = both[order]
    # Average rank within each run of equal values.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    ends = np.r_[starts[1:], both.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[: clean.size].sum() - clean.size * (clean.size + 1) / 2.0
    return float(u / (clean.size * noisy.size))
