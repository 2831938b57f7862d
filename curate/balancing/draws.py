"""Seeded subsets from keep probabilities: independent per-uid draws or systematic rounding.

Both balance (MetaCLIP keep probabilities) and rebalance (M4 / resample weights) turn a keep
probability q_i per sample into a subset. Two rules, both pure functions of (seed, uids, q), so
the subset does not depend on row order or on how the input was split into shards or tasks:

- ``independent``: sample i is kept when u_i < q_i, u_i one SplitMix64 uniform per (seed, uid)
  (`balance.sampling.uniform_draws`). This is the published MetaCLIP rule. On small classes the
  kept counts scatter like binomials: 7 samples with q = 0.3 keep anywhere from 0 to 7.
- ``systematic`` (the default): samples are grouped into exact classes (same concepts / matched
  entries, same labels); within a class they are ordered by (u_i, uid), and an offset
  U ∈ [0, 1) walks the cumulative weights: sample j is kept when an integer lies in
  [C_{j-1} + U, C_j + U), C_j the cumulative q up to j. Every sample is still kept with
  probability exactly q_i, and each class keeps ⌊Σq⌋ or ⌈Σq⌉ samples. U is a uniform of
  (seed, concepts) shared by the classes that differ only in their labels, so the groups of one
  concept round up or down together (dependent rounding): the subset realises the weights'
  group shares per concept instead of scattering around them.

The cumulative sums run in 32.32 fixed point in uint64 (weights rounded to 2^-32), so the
floor / ceiling property holds exactly: no float drift over pools of billions of samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import numpy as np
import pyarrow as pa

from curate.balancing.sampling import _splitmix64, draw_bits, uniform_draws
from curate.io.uid_files import DATACOMP_DTYPE, repeated_groups, uid_pairs

__all__ = [
    "DrawRule",
    "class_keys",
    "class_offsets",
    "class_ranks",
    "draw_subset",
    "systematic_from_ranks",
    "systematic_keep",
]

_U64 = np.uint64
_ONE = 1 << 32  # fixed-point unit of the cumulative weights
_LANES = (0x243F6A8885A308D3, 0x13198A2E03707344)  # two independent 64-bit hash lanes
_CLASS_SALT = 0xA4093822299F31D0  # separates the class offsets' seed from the per-uid draws


class DrawRule(str, Enum):
    """How keep probabilities become a subset (see the module docstring)."""

    systematic = "systematic"
    independent = "independent"


def class_keys(
    indptr: np.ndarray, indices: np.ndarray, labels: Sequence[np.ndarray] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """A 128-bit key (two uint64 arrays) per row naming its exact class: the set of ids in its
    CSR row (order and repeats within a row do not matter) and its value in each label array.

    Rows with equal sets and labels get equal keys; different classes collide with probability
    about n² / 2^128. A collision would only merge two classes' rounding, never change a
    sample's keep probability.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    ids = np.asarray(indices, dtype=np.int64)[indptr[0] : indptr[-1]]
    order = np.lexsort((ids, rows))
    rows, ids = rows[order], ids[order]
    fresh = np.ones(len(ids), dtype=bool)
    fresh[1:] = (rows[1:] != rows[:-1]) | (ids[1:] != ids[:-1])
    rows, ids = rows[fresh], ids[fresh]
    lengths = np.bincount(rows, minlength=n).astype(np.uint64)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths.astype(np.int64), out=starts[1:])
    keys = []
    for lane in _LANES:
        h = _splitmix64(np.full(n, lane, dtype=np.uint64) ^ lengths)
        for values in labels:
            h = _splitmix64(h ^ (np.asarray(values, dtype=np.int64) + 1).astype(np.uint64))
        for p in range(int(lengths.max(initial=0))):
            at = np.flatnonzero(lengths > p)
            h[at] = _splitmix64(h[at] ^ (ids[starts[at] + p] + 1).astype(np.uint64))
        keys.append(h)
    return keys[0], keys[1]


def systematic_keep(
    weights: np.ndarray,
    keys: tuple[np.ndarray, np.ndarray],
    offset_keys: tuple[np.ndarray, np.ndarray],
    draws: np.ndarray,
    pairs: np.ndarray,
    seed: int,
) -> np.ndarray:
    """Systematic rounding within classes: which rows are kept (boolean, row order).

    `weights` are keep probabilities (clipped to [0, 1]), `keys` the rows' class keys
    (`class_keys`), `offset_keys` coarser keys whose classes share one offset (rows with equal
    `keys` must have equal `offset_keys`), `draws` the per-uid uniforms that order each class,
    `pairs` the uids' (f0, f1) form that breaks ties. Each row is kept with probability `weights`
    (to 2^-32) and each class keeps the floor or the ceiling of its total weight.
    """
    n = len(weights)
    if n == 0:
        return np.zeros(0, dtype=bool)
    first, second = pairs.dtype.names or ("", "")
    order = np.lexsort((pairs[second], pairs[first], draws, keys[1], keys[0]))
    k0, k1 = keys[0][order], keys[1][order]
    fixed = np.rint(np.clip(np.asarray(weights, dtype=np.float64), 0.0, 1.0) * _ONE)
    step = fixed.astype(np.uint64)[order]
    start = np.ones(n, dtype=bool)
    start[1:] = (k0[1:] != k0[:-1]) | (k1[1:] != k1[:-1])
    class_of = np.cumsum(start) - 1
    after = np.cumsum(step, dtype=np.uint64)  # wraps modulo 2^64; differences stay exact
    before = after - step
    within_after = after - before[start][class_of]
    within_before = within_after - step
    o0, o1 = offset_keys[0][order][start], offset_keys[1][order][start]
    offset = class_offsets(o0, o1, seed)[class_of]
    unit = _U64(32)
    kept_sorted = ((within_after + offset) >> unit) > ((within_before + offset) >> unit)
    kept = np.empty(n, dtype=bool)
    kept[order] = kept_sorted
    return kept


def class_offsets(o0: np.ndarray, o1: np.ndarray, seed: int) -> np.ndarray:
    """The offset U of each class (its two offset-key halves) in 32.32 fixed point (uint64)."""
    offset_seed = (seed ^ _CLASS_SALT) & 0xFFFFFFFFFFFFFFFF
    lane = _splitmix64(o0 ^ _splitmix64(np.array([offset_seed], dtype=np.uint64))[0])
    return _splitmix64(lane ^ o1) >> _U64(32)


def class_ranks(
    class_key: np.ndarray, eligible: np.ndarray, hi: np.ndarray, lo: np.ndarray, seed: int
) -> np.ndarray:
    """Each eligible row's rank (uint32) among the eligible rows of its class, in the
    systematic rule's order: by draw (`draw_bits` of the uid), then uid. Rows of a class are
    those with equal `class_key` (the first half of `class_keys`; two classes sharing it, with
    probability about classes² / 2^65, are ranked as one). 0 for rows alone in their class
    and for rows not eligible. Only rows whose key repeats are ordered, a piece of keys at a
    time (`repeated_groups`): memory is 4 bytes a row plus the largest piece."""
    ranks = np.zeros(class_key.size, dtype=np.uint32)
    for members in repeated_groups(class_key, eligible):
        h, low, key = hi[members], lo[members], class_key[members]
        order = np.lexsort((low, h, draw_bits(h, low, seed), key))
        del h, low
        key = key[order]
        start = np.ones(order.size, dtype=bool)
        start[1:] = key[1:] != key[:-1]
        position = np.arange(order.size)
        first = np.maximum.accumulate(np.where(start, position, 0))
        ranks[members[order]] = (position - first).astype(np.uint32)
    return ranks


def systematic_from_ranks(
    weights: np.ndarray, ranks: np.ndarray, offset_keys: tuple[np.ndarray, np.ndarray], seed: int
) -> np.ndarray:
    """`systematic_keep` for classes whose rows share one weight, given each row's rank in its
    class (`class_ranks`): the row of rank r is kept when an integer lies in
    [r·q + U, (r+1)·q + U) (32.32 fixed point), U its class's offset (`class_offsets` of its
    `offset_keys`). Row by row, so the decisions can be made a unit at a time."""
    fixed = np.rint(np.clip(np.asarray(weights, dtype=np.float64), 0.0, 1.0) * _ONE)
    step = fixed.astype(np.uint64)
    rank = np.asarray(ranks).astype(np.uint64)
    offset = class_offsets(offset_keys[0], offset_keys[1], seed)
    unit = _U64(32)
    return (((rank + _U64(1)) * step + offset) >> unit) > ((rank * step + offset) >> unit)


def draw_subset(
    weights: np.ndarray,
    uids: Sequence[str] | pa.Array | pa.ChunkedArray,
    ok: np.ndarray,
    seed: int,
    rule: DrawRule,
    indptr: np.ndarray | None = None,
    indices: np.ndarray | None = None,
    labels: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """The kept rows (boolean) for keep probabilities `weights` under `rule`; rows not `ok` are
    never kept. The systematic rule needs each row's concepts or matched entries as CSR arrays
    (`indptr`, `indices`) and its labels: together they name the exact classes."""
    ok = np.asarray(ok, dtype=bool)
    column = uids if isinstance(uids, pa.Array | pa.ChunkedArray) else pa.array(uids, pa.string())
    if len(column) != ok.size:
        raise ValueError(f"{len(column)} uids for {ok.size} rows")
    hi, lo, _ = uid_pairs(column)  # vectorised: no Python int per uid
    # Rows not ok (their uid may be malformed) draw as the all-zero uid; they are never kept.
    pairs = np.zeros(ok.size, dtype=DATACOMP_DTYPE)
    pairs["f0"], pairs["f1"] = np.where(ok, hi, 0), np.where(ok, lo, 0)
    del hi, lo
    draws = uniform_draws(pairs, seed)
    weights = np.where(ok, np.asarray(weights, dtype=np.float64), 0.0)
    if rule is DrawRule.independent:
        return ok & (draws < weights)
    if indptr is None or indices is None:
        raise ValueError("the systematic rule needs the rows' concepts or entries (CSR)")
    keys = class_keys(indptr, indices, labels)
    shared = class_keys(indptr, indices) if labels else keys
    return ok & systematic_keep(weights, keys, shared, draws, pairs, seed)
