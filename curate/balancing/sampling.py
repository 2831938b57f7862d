"""MetaCLIP balancing as array functions: entry counts, the threshold t, keep probabilities, draws.

The published rule (Xu et al. 2023): count how many texts of the whole pool match each entry
(``count_e``); then a text is kept when, for any matched entry e,
``random() < min(1, t / count_e)``.
So a text is kept with probability ``1 − Π_e (1 − min(1, t / count_e))`` and a text that matches
nothing is dropped. The uniform numbers here are one per text, a pure function of (seed, uid);
`balance.draws` turns them and the keep probabilities into the subset (MetaCLIP's coin per
text, or systematic rounding within texts matching the same entries), so the result does not
depend on how the pool is split into shards or tasks.

Matches are held as CSR arrays: ``offsets`` (n_texts + 1, int64) and ``entry_ids`` (int32); the
entries of text i are ``entry_ids[offsets[i]:offsets[i + 1]]``, distinct.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from enum import Enum

import numpy as np

__all__ = [
    "DEFAULT_TAIL_SHARE",
    "TailRule",
    "ThresholdChoice",
    "count_entries",
    "draw_bits",
    "entry_probabilities",
    "expected_kept",
    "keep_probabilities",
    "tail_share",
    "threshold_for_size",
    "threshold_from_tail_share",
    "uniform_draws",
]

DEFAULT_TAIL_SHARE = 0.06  # MetaCLIP: entries below t hold ~6% of all matches (t = 20k of 1.6B)

_U64 = np.uint64
_MASK_53 = float(2.0**-53)


class TailRule(str, Enum):
    """How `threshold_from_tail_share` turns a tail share into t."""

    curate = "curate"  # the smallest integer t whose tail holds at least the share
    metaclip2 = "metaclip2"  # MetaCLIP 2's p_to_t: the count whose cumulative share is nearest


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold t and how it was chosen (`rule`: given, tail_share, tail_share_metaclip2
    or target_size)."""

    t: float
    rule: str
    tail_share: float  # share of all matches held by entries with count < t, before balancing
    expected_kept: float | None = None  # for target_size
    note: str | None = None


def count_entries(entry_ids: np.ndarray, n_entries: int) -> np.ndarray:
    """Texts matching each entry (int64, length `n_entries`)."""
    return np.bincount(np.asarray(entry_ids, dtype=np.int64), minlength=n_entries).astype(np.int64)


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """min(1, t / count) per entry; entries nobody matched get 1 (never used)."""
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(counts > 0, np.minimum(1.0, t / np.maximum(counts, 1.0)), 1.0)


def keep_probabilities(
    offsets: np.ndarray, entry_ids: np.ndarray, counts: np.ndarray, t: float
) -> np.ndarray:
    """P(keep) = 1 − Π_e (1 − min(1, t/count_e)) per text; 0 for texts without matches."""
    n = len(offsets) - 1
    if n <= 0:
        return np.zeros(0, dtype=np.float64)
    p = entry_probabilities(counts, t)[np.asarray(entry_ids, dtype=np.int64)]
    rows = np.repeat(np.arange(n), np.diff(offsets))
    certain = np.bincount(rows, weights=(p >= 1.0).astype(np.float64), minlength=n) > 0
    with np.errstate(divide="ignore"):
        log_miss = np.where(p < 1.0, np.log1p(-p), 0.0)
    keep = -np.expm1(np.bincount(rows, weights=log_miss, minlength=n))
    keep[certain] = 1.0
    return np.maximum(keep, 0.0)  # no -0.0 for texts without matches


def expected_kept(
    offsets: np.ndarray, entry_ids: np.ndarray, counts: np.ndarray, t: float
) -> float:
    """Expected number of kept texts at threshold t."""
    return float(keep_probabilities(offsets, entry_ids, counts, t).sum())


def tail_share(counts: np.ndarray, t: float) -> float:
    """Share of all matches held by entries with 0 < count < t."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return 0.0
    return float(counts[counts < t].sum() / total)


def threshold_from_tail_share(
    counts: np.ndarray, share: float = DEFAULT_TAIL_SHARE, rule: TailRule | str = TailRule.curate
) -> ThresholdChoice:
    """t from the share of all matches that entries below t should hold.

    ``curate`` (the default): the smallest integer t whose tail (entries with count < t) holds at
    least `share` of all matches. The tail share only changes at t = v + 1 for the distinct
    counts v, so t is one more than the smallest count v with Σ_{c ≤ v} c / Σ c ≥ share. That
    share is computed as MetaCLIP's ``t_to_p`` computes it (one correctly rounded division), so
    the rule round-trips: for a share p = t_to_p(counts, t0), the t found has t_to_p = p exactly
    (and a share written as a decimal, 7 of 100 matches at 0.07, lands on its boundary).

    ``metaclip2``: MetaCLIP 2's ``p_to_t``, step for step: sort every entry's count (zeros
    included), divide the cumulative sums by the total, take the first index whose share is
    nearest `share`, and t is the count there. That count's own matches are inside the share it
    was picked by, but ``t_to_p`` and the keep rule treat an entry with count t as head, so the
    tail below t holds less than `share` (p_to_t(t_to_p(t)) is not t in general). When zeros are
    nearest (or nothing matched) t is 0 and no text is kept, as in the reference.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"tail share must be between 0 and 1 (exclusive), got {share}")
    counts = np.asarray(counts, dtype=np.int64)
    if TailRule(rule) is TailRule.metaclip2:
        return _p_to_t(counts, share)
    counts = counts[counts > 0]
    if counts.size == 0:
        return ThresholdChoice(t=1.0, rule="tail_share", tail_share=0.0, note="no matches")
    values, per_value = np.unique(counts, return_counts=True)
    cumulative = np.cumsum(values * per_value).tolist()
    total = cumulative[-1]
    shares = [c / total for c in cumulative]  # Python ints: correctly rounded, any size
    v = int(values[bisect.bisect_left(shares, share)])
    t = float(v + 1)
    return ThresholdChoice(t=t, rule="tail_share", tail_share=tail_share(counts, t))


def _p_to_t(counts: np.ndarray, share: float) -> ThresholdChoice:
    """MetaCLIP 2's ``p_to_t(entry_counts, p)`` on every entry's count (see the caller)."""
    rule = "tail_share_metaclip2"
    ordered = np.sort(counts)
    total = int(ordered.sum())
    if total == 0:  # the reference's shares are all NaN and argmin takes index 0: t = 0
        return ThresholdChoice(t=0.0, rule=rule, tail_share=0.0, note="no matches")
    portion = np.cumsum(ordered) / ordered.sum()
    t = float(ordered[int(np.abs(portion - share).argmin())])
    note = None
    if t == 0:
        note = "MetaCLIP 2's rule picked an entry nobody matched: t = 0 keeps no text"
    return ThresholdChoice(t=t, rule=rule, tail_share=tail_share(counts, t), note=note)


def threshold_for_size(
    offsets: np.ndarray, entry_ids: np.ndarray, counts: np.ndarray, target: int
) -> ThresholdChoice:
    """The t (a real number) whose expected kept count is `target`, by bisection.

    The expected count grows with t and reaches the number of matched texts at t = max count;
    a larger target is reported in `note` and answered with that t.
    """
    if target <= 0:
        raise ValueError(f"target size must be positive, got {target}")
    hi = float(max(int(np.max(counts, initial=0)), 1))
    best = expected_kept(offsets, entry_ids, counts, hi)
    if best <= target:
        note = None
        if best < target:
            note = f"target {target} is above the {best:.0f} texts that match any entry"
        return ThresholdChoice(hi, "target_size", tail_share(counts, hi), best, note)
    lo = 0.0
    for _ in range(100):
        mid = (lo + hi) / 2
        value = expected_kept(offsets, entry_ids, counts, mid)
        if value < target:
            lo = mid
        else:
            hi, best = mid, value
        if hi - lo <= 1e-9 * hi or abs(best - target) < 1e-6:
            break
    return ThresholdChoice(hi, "target_size", tail_share(counts, hi), best)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised (uint64 arithmetic wraps modulo 2^64)."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def draw_bits(hi: np.ndarray, lo: np.ndarray, seed: int) -> np.ndarray:
    """The 53-bit integers (uint64) behind `uniform_draws`, from the uids' two halves: the
    128-bit uid and the 64-bit seed go through SplitMix64 rounds and the top 53 bits remain.
    They order rows exactly as the uniform numbers do."""
    seed_word = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    h = _splitmix64(np.asarray(hi, dtype=np.uint64) ^ seed_word)
    h = _splitmix64(h ^ np.asarray(lo, dtype=np.uint64))
    return h >> _U64(11)


def uniform_draws(pairs: np.ndarray, seed: int) -> np.ndarray:
    """One uniform number in [0, 1) per uid, a pure function of (seed, uid) (`draw_bits`).

    `pairs` is the DataComp (f0, f1) form of the uids (`io.uid_files.uid_pairs`).
    """
    first, second = pairs.dtype.names or ("", "")
    return draw_bits(pairs[first], pairs[second], seed).astype(np.float64) * _MASK_53
