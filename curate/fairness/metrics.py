"""Demographic bias metrics as pure array functions: skew, NDKL, representation and association.

Groups are integers ``0..K−1``; the label ``−1`` means "no label" (unknown, mixed, or not a
person) and such rows are left out of every count and share. Every count may be weighted: with
per-sample ``weights`` (float, ≥ 0; ``None`` means all 1) a count is the sum of the weights of
the samples it counts, which is how rebalancing weights are evaluated.

Retrieval (the top k images for a neutral concept prompt, ranked by similarity, descending)::

    Skew_a@k  = ln(p_top-k,a / p_desired,a)     p_top-k,a = (n_a + α) / (k + α·K)
    MaxSkew@k = max_a Skew_a@k                  MinSkew@k = min_a Skew_a@k
    NDKL      = (1/Z) Σ_{i=1..k} KL(D_top-i ‖ D_desired) / log2(i + 1),
    Z         = Σ_{i=1..k} 1 / log2(i + 1),     KL(P ‖ Q) = Σ_a P_a ln(P_a / Q_a)

``n_a`` is the number of results of group a among the top k and ``D_top-i`` the group
distribution of the top i results. Smoothing (α = ``alpha``, 1.0 by default: Laplace) applies to
skew only and shrinks the top-k shares towards uniform; with α = 0 a group missing from the top k
has skew −inf. NDKL uses the raw top-i distribution with 0·ln 0 = 0. The desired distribution is
used as given and must be strictly positive: uniform (equal opportunity) or the pool's shares
(demographic parity), which the caller computes, e.g. with `smoothed_shares`
``(counts + α) / (Σ counts + α·K)`` so that no group gets share 0. k is usually 1000, capped at
the number of labelled candidates (`top_k_labels`); k = 0 gives NaN metrics.

Dataset level, against a target distribution π (``target``, non-negative, summing to 1)::

    representation bias = max_k |P(group k | person) − π_k|
    association bias    = max_{k, r} |P(group k | concept r) − π_k|

where P(group k | concept r) is the share of group k among the labelled samples that carry
concept r. A `ShareTable` holds one row per share distribution (one row for representation, one
per concept for association) with each share's 95% Wilson score interval::

    centre ± half = (p + z²/2n ± z·sqrt(p(1 − p)/n + z²/4n²)) / (1 + z²/n),   z = 1.96

With weights, p is the weighted share and n is Kish's effective sample size
n_eff = (Σw)² / Σw² over the row's labelled samples. A row whose total is 0 has NaN shares, diffs
and bias, the interval (0, 1), and never counts towards the maximum bias; if no row has a
positive total the maximum bias is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "RetrievalBias",
    "ShareTable",
    "association_bias",
    "representation_bias",
    "retrieval_bias",
    "smoothed_shares",
    "top_k_labels",
    "wilson_interval",
]

_SUM_TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_num_groups(num_groups: int) -> int:
    """`num_groups` as an int ≥ 1, or ValueError."""
    if int(num_groups) != num_groups or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    return int(num_groups)


def _check_distribution(dist: np.ndarray, num_groups: int, name: str, positive: bool) -> np.ndarray:
    """`dist` as a float64 (K,) array of finite shares summing to 1, or ValueError."""
    dist = np.asarray(dist, dtype=np.float64)
    if dist.shape != (num_groups,):
        raise ValueError(f"{name} must have shape ({num_groups},), got {dist.shape}")
    if not np.all(np.isfinite(dist)):
        raise ValueError(f"{name} must be finite")
    if positive and np.any(dist <= 0):
        raise ValueError(f"{name} must be strictly positive, got {dist.tolist()}")
    if np.any(dist < 0):
        raise ValueError(f"{name} must be non-negative, got {dist.tolist()}")
    if abs(float(dist.sum()) - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"{name} must sum to 1, sums to {float(dist.sum())!r}")
    return dist


def _check_labels(labels: np.ndarray, num_groups: int, name: str, lowest: int) -> np.ndarray:
    """`labels` as a 1-D integer array with values in [lowest, num_groups), or ValueError."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {labels.dtype}")
    if labels.size and (labels.min() < lowest or labels.max() >= num_groups):
        raise ValueError(f"{name} must lie in [{lowest}, {num_groups}), got values outside")
    return labels


def _check_weights(weights: np.ndarray | None, n: int) -> np.ndarray | None:
    """`weights` as a float64 (n,) array of finite values ≥ 0 (or None), or ValueError."""
    if weights is None:
        return None
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {weights.shape}")
    if not np.all(np.isfinite(weights)):
        raise ValueError("weights must be finite")
    if np.any(weights < 0):
        raise ValueError("weights must be non-negative")
    return weights


def _check_alpha(alpha: float) -> float:
    """`alpha` as a finite float ≥ 0, or ValueError."""
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be finite and non-negative, got {alpha!r}")
    return float(alpha)


# --------------------------------------------------------------------------------------------
# Shares and intervals
# --------------------------------------------------------------------------------------------


def smoothed_shares(counts: np.ndarray, alpha: float) -> np.ndarray:
    """(counts + α) / (Σ counts + α·K) along the last axis (groups); NaN where that sum is 0."""
    alpha = _check_alpha(alpha)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim == 0 or counts.shape[-1] == 0:
        raise ValueError("counts must have a non-empty last axis (groups)")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts must be finite and non-negative")
    numerator = counts + alpha
    denominator = np.sum(numerator, axis=-1, keepdims=True)
    out = np.full(np.broadcast_shapes(numerator.shape, denominator.shape), np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def wilson_interval(
    shares: np.ndarray, n: np.ndarray, z: float = 1.96
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of each share p with sample size n (elementwise); n == 0 → (0, 1)."""
    p = np.asarray(shares, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 0) or np.any(np.isnan(n)):
        raise ValueError("n must be non-negative")
    if not np.isfinite(z) or z < 0:
        raise ValueError(f"z must be finite and non-negative, got {z!r}")
    p, n = np.broadcast_arrays(p, n)
    empty = n == 0
    n_safe = np.where(empty, 1.0, n)
    p_safe = np.where(empty, 0.5, p)
    z2 = z * z
    scale = 1.0 + z2 / n_safe
    centre = (p_safe + z2 / (2.0 * n_safe)) / scale
    spread = p_safe * (1.0 - p_safe) / n_safe + z2 / (4.0 * n_safe * n_safe)
    half = z * np.sqrt(np.maximum(spread, 0.0)) / scale
    low = np.where(empty, 0.0, np.clip(centre - half, 0.0, 1.0))
    high = np.where(empty, 1.0, np.clip(centre + half, 0.0, 1.0))
    return low, high


@dataclass(frozen=True, eq=False)
class ShareTable:
    """Group shares per row (one row for representation, one per concept for association)."""

    counts: np.ndarray  # (R, K) float64 weighted counts
    totals: np.ndarray  # (R,) Σ_k counts
    n_eff: np.ndarray  # (R,) Kish's effective sample size (== totals when unweighted)
    shares: np.ndarray  # (R, K) counts / totals (NaN where total == 0)
    target: np.ndarray  # (K,)
    diff: np.ndarray  # (R, K) shares − target
    ci_low: np.ndarray  # (R, K) Wilson bounds of the share
    ci_high: np.ndarray
    bias: np.ndarray  # (R,) max_k |diff| (NaN where total == 0)

    @property
    def max_bias(self) -> float:
        """The largest row bias over rows with a positive total; NaN if there are none."""
        valid = self.totals > 0
        return float(self.bias[valid].max()) if valid.any() else float("nan")

    def worst(self) -> tuple[int, int]:
        """(row, group) of the largest |diff| among rows with total > 0 (first one on ties)."""
        valid = self.totals > 0
        if not valid.any():
            raise ValueError("no row has a positive total")
        gaps = np.where(valid[:, None], np.abs(np.nan_to_num(self.diff, nan=0.0)), -1.0)
        row, group = np.unravel_index(int(np.argmax(gaps)), gaps.shape)
        return int(row), int(group)


def _share_table(counts: np.ndarray, squares: np.ndarray | None, target: np.ndarray) -> ShareTable:
    """A ShareTable from (R, K) weighted counts and (R,) Σw² per row (None when unweighted)."""
    totals = counts.sum(axis=1)
    valid = totals > 0
    if squares is None:
        n_eff = totals.copy()
    else:
        n_eff = np.zeros_like(totals)
        np.divide(totals * totals, squares, out=n_eff, where=valid & (squares > 0))
    shares = np.full_like(counts, np.nan)
    np.divide(counts, totals[:, None], out=shares, where=valid[:, None])
    diff = shares - target[None, :]
    bias = np.full_like(totals, np.nan)
    if valid.any():
        bias[valid] = np.abs(diff[valid]).max(axis=1)
    ci_low, ci_high = wilson_interval(shares, np.broadcast_to(n_eff[:, None], shares.shape))
    arrays = (counts, totals, n_eff, shares, target.copy(), diff, ci_low, ci_high, bias)
    for array in arrays:
        array.flags.writeable = False
    return ShareTable(*arrays)


def representation_bias(
    labels: np.ndarray,
    num_groups: int,
    target: np.ndarray,
    weights: np.ndarray | None = None,
) -> ShareTable:
    """Group shares among labelled samples against `target` (one row): max_k |P(k) − π_k|."""
    num_groups = _check_num_groups(num_groups)
    target = _check_distribution(target, num_groups, "target", positive=False)
    labels = _check_labels(labels, num_groups, "labels", lowest=-1)
    weights = _check_weights(weights, labels.size)
    keep = labels >= 0
    groups = labels[keep].astype(np.int64)
    if weights is None:
        counts = np.bincount(groups, minlength=num_groups).astype(np.float64)
        squares = None
    else:
        kept = weights[keep]
        counts = np.bincount(groups, weights=kept, minlength=num_groups).astype(np.float64)
        squares = np.array([np.dot(kept, kept)])
    return _share_table(counts[None, :], squares, target)


def association_bias(
    labels: np.ndarray,
    concept_indptr: np.ndarray,
    concept_indices: np.ndarray,
    num_concepts: int,
    num_groups: int,
    target: np.ndarray,
    weights: np.ndarray | None = None,
) -> ShareTable:
    """Group shares among labelled samples carrying each concept (one row per concept).

    Sample i carries ``concept_indices[concept_indptr[i]:concept_indptr[i + 1]]`` (CSR, no
    repeats within a row). The table's max_bias is max_{k, r} |P(k | r) − π_k|.
    """
    num_groups = _check_num_groups(num_groups)
    if int(num_concepts) != num_concepts or num_concepts < 0:
        raise ValueError(f"num_concepts must be a non-negative integer, got {num_concepts!r}")
    num_concepts = int(num_concepts)
    target = _check_distribution(target, num_groups, "target", positive=False)
    indptr = np.asarray(concept_indptr)
    indices = np.asarray(concept_indices)
    if indptr.ndim != 1 or indptr.size < 1 or not np.issubdtype(indptr.dtype, np.integer):
        raise ValueError("concept_indptr must be a non-empty 1-D integer array")
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError("concept_indices must be a 1-D integer array")
    if indptr[0] < 0 or indptr[-1] > indices.size or np.any(np.diff(indptr) < 0):
        raise ValueError("concept_indptr must be non-decreasing within [0, len(concept_indices)]")
    labels = _check_labels(labels, num_groups, "labels", lowest=-1)
    n = indptr.size - 1
    if labels.size != n:
        raise ValueError(f"labels has length {labels.size}, concept_indptr describes {n} samples")
    weights = _check_weights(weights, n)
    used = indices[int(indptr[0]) : int(indptr[-1])]
    if used.size and (used.min() < 0 or used.max() >= num_concepts):
        raise ValueError(f"concept_indices must lie in [0, {num_concepts})")

    sample = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    groups = labels[sample]
    keep = groups >= 0
    sample = sample[keep]
    concepts = used[keep].astype(np.int64)
    cells = concepts * num_groups + groups[keep].astype(np.int64)
    size = num_concepts * num_groups
    if weights is None:
        counts = np.bincount(cells, minlength=size).astype(np.float64)
        squares = None
    else:
        w = weights[sample]
        counts = np.bincount(cells, weights=w, minlength=size).astype(np.float64)
        squares = np.bincount(concepts, weights=w * w, minlength=num_concepts).astype(np.float64)
    return _share_table(counts.reshape(num_concepts, num_groups), squares, target)


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RetrievalBias:
    """Skew and NDKL of one ranked top-k list."""

    k: int  # the k actually used (min(requested, candidates))
    counts: np.ndarray  # (K,) group counts in the top k
    skew: np.ndarray  # (K,) Skew_a@k (smoothed)
    max_skew: float
    min_skew: float
    ndkl: float


def top_k_labels(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Labels of the k best-scoring candidates with label ≥ 0, best first (ties: lower index).

    k is capped at the number of such candidates. O(N + k log k): a partition finds the k-th
    best score, every candidate above it is kept, ties at it are taken in index order, and the
    k kept candidates are stably sorted.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores {scores.shape}, labels {labels.shape} must be 1-D, one length")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
    if np.any(np.isnan(scores)):
        raise ValueError("scores must not be NaN")
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    candidates = np.flatnonzero(labels >= 0)
    k = min(int(k), candidates.size)
    if k == 0:
        return labels[:0].copy()
    negated = -scores[candidates]  # ascending order of `negated` is best first
    cut = negated[np.argpartition(negated, k - 1)[k - 1]]
    better = np.flatnonzero(negated < cut)
    tied = np.flatnonzero(negated == cut)[: k - better.size]
    chosen = np.concatenate([better, tied])
    chosen.sort()
    chosen = chosen[np.argsort(negated[chosen], kind="stable")]
    return labels[candidates[chosen]]


def _retrieval(k: int, counts: np.ndarray, skew: np.ndarray, ndkl: float) -> RetrievalBias:
    """A RetrievalBias with read-only arrays; max and min skew are NaN when k == 0."""
    counts.flags.writeable = False
    skew.flags.writeable = False
    if k == 0:
        return RetrievalBias(0, counts, skew, float("nan"), float("nan"), ndkl)
    return RetrievalBias(k, counts, skew, float(skew.max()), float(skew.min()), ndkl)


def retrieval_bias(
    ranked_labels: np.ndarray, num_groups: int, desired: np.ndarray, alpha: float = 1.0
) -> RetrievalBias:
    """Skew_a@k (smoothed with α), MaxSkew@k, MinSkew@k and NDKL of a ranked list of groups."""
    num_groups = _check_num_groups(num_groups)
    desired = _check_distribution(desired, num_groups, "desired", positive=True)
    alpha = _check_alpha(alpha)
    ranked = _check_labels(ranked_labels, num_groups, "ranked_labels", lowest=0)
    k = int(ranked.size)
    if k == 0:
        nan = float("nan")
        return _retrieval(0, np.zeros(num_groups), np.full(num_groups, nan), nan)
    counts = np.bincount(ranked.astype(np.int64), minlength=num_groups).astype(np.float64)
    top_share = (counts + alpha) / (k + alpha * num_groups)
    with np.errstate(divide="ignore"):  # α = 0 and a missing group: ln 0 = −inf
        skew = np.log(top_share) - np.log(desired)

    one_hot = np.zeros((k, num_groups))
    one_hot[np.arange(k), ranked] = 1.0
    ranks = np.arange(1, k + 1, dtype=np.float64)
    prefix = np.cumsum(one_hot, axis=0) / ranks[:, None]  # D_top-i, row i − 1
    log_ratio = np.zeros_like(prefix)
    np.log(prefix, out=log_ratio, where=prefix > 0)
    log_ratio -= np.log(desired)[None, :]
    kl = np.sum(np.where(prefix > 0, prefix * log_ratio, 0.0), axis=1)
    discount = 1.0 / np.log2(ranks + 1.0)
    ndkl = float(np.dot(kl, discount) / discount.sum())
    return _retrieval(k, counts, skew, ndkl)
