"""Seeded subsets from keep probabilities (`balance.draws`) against slow, obvious oracles.

The oracles name classes with Python tuples (frozenset of ids, labels), count kept rows per
class with dictionaries and estimate inclusion probabilities by repeating the draw over many
seeds; none of them reuses the module's hashing or fixed-point arithmetic.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict

import numpy as np
import pytest

from curate.balancing.draws import DrawRule, class_keys, draw_subset
from curate.balancing.sampling import uniform_draws
from curate.io.uid_files import uids_to_pairs


def uids(n: int, salt: str = "") -> list[str]:
    return [hashlib.md5(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def random_pool(rng: np.random.Generator, n: int, entries: int = 4, groups: int = 2):
    """CSR concept lists (with repeats and shuffled order inside rows), labels and weights."""
    lists = []
    for _ in range(n):
        size = int(rng.integers(0, 3))
        row = [int(x) for x in rng.integers(0, entries, size)]
        if row and rng.random() < 0.3:
            row.append(row[0])  # a repeat inside a row does not change the class
        lists.append(row)
    indptr = np.zeros(n + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in lists])
    indices = np.array([x for r in lists for x in r], dtype=np.int64)
    labels = rng.integers(-1, groups, n)
    weights = rng.random(n)
    weights[rng.random(n) < 0.1] = 1.0
    weights[rng.random(n) < 0.1] = 0.0
    return lists, indptr, indices, labels, weights


def oracle_classes(lists: list[list[int]], labels: np.ndarray) -> list[tuple]:
    return [(frozenset(row), int(label)) for row, label in zip(lists, labels, strict=True)]


@pytest.mark.parametrize("seed", range(6))
def test_class_keys_name_exact_classes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lists, indptr, indices, labels, _ = random_pool(rng, 300)
    k0, k1 = class_keys(indptr, indices, [labels])
    keys = list(zip(k0.tolist(), k1.tolist(), strict=True))
    classes = oracle_classes(lists, labels)
    for i in range(0, 300, 7):
        for j in range(300):
            assert (keys[i] == keys[j]) == (classes[i] == classes[j])
    # Without labels only the set matters.
    s0, s1 = class_keys(indptr, indices)
    sets = [frozenset(r) for r in lists]
    for i in range(0, 300, 11):
        for j in range(300):
            assert ((s0[i], s1[i]) == (s0[j], s1[j])) == (sets[i] == sets[j])


@pytest.mark.parametrize("seed", range(8))
def test_systematic_keeps_floor_or_ceiling_per_class(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    lists, indptr, indices, labels, weights = random_pool(rng, n)
    ok = rng.random(n) > 0.05
    ids = uids(n, f"s{seed}")
    kept = draw_subset(weights, ids, ok, seed, DrawRule.systematic, indptr, indices, [labels])
    total: dict[tuple, float] = defaultdict(float)
    count: dict[tuple, int] = defaultdict(int)
    for cls, w, good, k in zip(oracle_classes(lists, labels), weights, ok, kept, strict=True):
        if good:
            total[cls] += float(w)
        count[cls] += int(k)
    for cls, w in total.items():
        assert math.floor(w + 1e-6) <= count[cls] <= math.ceil(w - 1e-6), (cls, w, count[cls])
    assert not kept[~ok].any()
    assert kept[ok & (weights == 1.0)].all()
    assert not kept[weights == 0.0].any()


def test_every_sample_keeps_its_probability() -> None:
    """Over many seeds each row is kept with frequency q (4.5 sigma), in both rules."""
    rng = np.random.default_rng(0)
    n = 24
    _, indptr, indices, labels, weights = random_pool(rng, n, entries=2)
    ids = uids(n, "marginal")
    ok = np.ones(n, dtype=bool)
    trials = 3000
    for rule in DrawRule:
        hits = np.zeros(n)
        for seed in range(trials):
            hits += draw_subset(weights, ids, ok, seed, rule, indptr, indices, [labels])
        sigma = np.sqrt(weights * (1 - weights) / trials)
        assert np.all(np.abs(hits / trials - weights) <= 4.5 * sigma + 1e-12), rule


def test_independent_rule_is_one_coin_per_uid() -> None:
    rng = np.random.default_rng(3)
    n = 500
    ids = uids(n, "coin")
    weights = rng.random(n)
    ok = rng.random(n) > 0.1
    kept = draw_subset(weights, ids, ok, 11, DrawRule.independent)
    coins = uniform_draws(uids_to_pairs(ids), 11)
    assert kept.tolist() == [bool(g and c < w) for g, c, w in zip(ok, coins, weights, strict=True)]


@pytest.mark.parametrize("seed", range(4))
def test_rows_order_does_not_matter(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    lists, indptr, indices, labels, weights = random_pool(rng, n)
    ids = uids(n, f"order{seed}")
    ok = np.ones(n, dtype=bool)
    kept = draw_subset(weights, ids, ok, 5, DrawRule.systematic, indptr, indices, [labels])
    perm = rng.permutation(n)
    shuffled = [lists[i] for i in perm]
    p_indptr = np.zeros(n + 1, dtype=np.int64)
    p_indptr[1:] = np.cumsum([len(r) for r in shuffled])
    p_indices = np.array([x for r in shuffled for x in r], dtype=np.int64)
    again = draw_subset(
        weights[perm],
        [ids[i] for i in perm],
        ok,
        5,
        DrawRule.systematic,
        p_indptr,
        p_indices,
        [labels[perm]],
    )
    assert {ids[i] for i in np.flatnonzero(kept)} == {ids[perm[i]] for i in np.flatnonzero(again)}
    other_seed = draw_subset(weights, ids, ok, 6, DrawRule.systematic, indptr, indices, [labels])
    assert other_seed.tolist() != kept.tolist()


def test_groups_of_one_concept_round_together() -> None:
    """Two label classes of the same concept set with equal fractional totals keep equal
    counts under every seed (they share the offset), so the concept's group shares hold."""
    n = 10
    indptr = np.arange(n + 1, dtype=np.int64)
    indices = np.zeros(n, dtype=np.int64)  # every row carries concept 0
    labels = np.array([0] * 5 + [1] * 5)
    weights = np.full(n, 0.5)  # each group expects 2.5
    ids = uids(n, "pair")
    for seed in range(200):
        kept = draw_subset(
            weights, ids, np.ones(n, bool), seed, DrawRule.systematic, indptr, indices, [labels]
        )
        assert kept[:5].sum() == kept[5:].sum() in (2, 3)


def test_systematic_needs_classes() -> None:
    with pytest.raises(ValueError, match="CSR"):
        draw_subset(np.ones(2), uids(2), np.ones(2, bool), 0, DrawRule.systematic)
