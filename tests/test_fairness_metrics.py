"""Independent checks of `curate.fairness.metrics`.

The oracles below are written from the published formulas (skew and NDKL of Geyik et al. 2019
as used for CLIP retrieval bias; representation and association bias against a target
distribution; the textbook Wilson score interval; Kish's effective sample size) as plain Python
loops over samples and ranks with `math`, never from the vectorised code. Random inputs cover
K = 2..5, −1 labels, samples with no concepts or several, weights (zeros included) and random
desired distributions.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest

from curate.fairness.metrics import (
    RetrievalBias,
    ShareTable,
    association_bias,
    representation_bias,
    retrieval_bias,
    smoothed_shares,
    top_k_labels,
    wilson_interval,
)

Z = 1.96
TOL = {"rtol": 1e-10, "atol": 1e-12}

# --------------------------------------------------------------------------------------------
# Oracles, from the published formulas
# --------------------------------------------------------------------------------------------


def wilson_oracle(p: float, n: float, z: float = Z) -> tuple[float, float]:
    """Textbook Wilson score interval; n == 0 → (0, 1)."""
    if n == 0:
        return 0.0, 1.0
    denominator = 1 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / denominator), min(1.0, (centre + half) / denominator)


def table_oracle(
    labels: list[int],
    rows: list[list[int]],
    num_groups: int,
    target: list[float],
    weights: list[float] | None,
) -> dict[str, list]:
    """Per row (a list of sample ids): counts, total, n_eff, shares, diff, Wilson bounds, bias."""
    out: dict[str, list] = {key: [] for key in ("counts", "totals", "n_eff", "shares", "diff")}
    out.update(ci_low=[], ci_high=[], bias=[])
    for members in rows:
        counts = [0.0] * num_groups
        square_sum = 0.0
        for i in members:
            if labels[i] < 0:
                continue
            w = 1.0 if weights is None else weights[i]
            counts[labels[i]] += w
            square_sum += w * w
        total = sum(counts)
        n_eff = total  # unweighted: the sample count
        if weights is not None:  # Kish: (Σw)² / Σw²
            n_eff = total * total / square_sum if square_sum > 0 else 0.0
        if total > 0:
            shares = [c / total for c in counts]
            diff = [s - t for s, t in zip(shares, target, strict=True)]
            bias = max(abs(d) for d in diff)
        else:
            shares = [math.nan] * num_groups
            diff = [math.nan] * num_groups
            bias = math.nan
        bounds = [wilson_oracle(s, n_eff) if total > 0 else (0.0, 1.0) for s in shares]
        out["counts"].append(counts)
        out["totals"].append(total)
        out["n_eff"].append(n_eff)
        out["shares"].append(shares)
        out["diff"].append(diff)
        out["ci_low"].append([b[0] for b in bounds])
        out["ci_high"].append([b[1] for b in bounds])
        out["bias"].append(bias)
    valid = [b for b, t in zip(out["bias"], out["totals"], strict=True) if t > 0]
    out["max_bias"] = [max(valid) if valid else math.nan]
    return out


def skew_oracle(ranked: list[int], num_groups: int, desired: list[float], alpha: float) -> list:
    """Skew_a@k = ln(((n_a + α) / (k + α·K)) / desired_a), counting n_a in a loop."""
    k = len(ranked)
    result = []
    for a in range(num_groups):
        n_a = sum(1 for g in ranked if g == a)
        p = (n_a + alpha) / (k + alpha * num_groups)
        result.append(math.log(p / desired[a]) if p > 0 else -math.inf)
    return result


def ndkl_oracle(ranked: list[int], num_groups: int, desired: list[float]) -> float:
    """(1/Z) Σ_i KL(D_top-i ‖ desired) / log2(i + 1), recounting each prefix from scratch."""
    numerator = 0.0
    z = 0.0
    for i in range(1, len(ranked) + 1):
        prefix = ranked[:i]
        kl = 0.0
        for a in range(num_groups):
            p = Fraction(prefix.count(a), i)
            if p > 0:
                kl += float(p) * math.log(float(p) / desired[a])
        numerator += kl / math.log2(i + 1)
        z += 1 / math.log2(i + 1)
    return numerator / z


def top_k_oracle(scores: list[float], labels: list[int], k: int) -> list[int]:
    """Full sort of labelled candidates by (−score, index), first k."""
    order = sorted((i for i in range(len(labels)) if labels[i] >= 0), key=lambda i: (-scores[i], i))
    return [labels[i] for i in order[:k]]


# --------------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------------


def random_distribution(rng: random.Random, num_groups: int, allow_zero: bool) -> list[float]:
    """A random distribution over K groups; zeros possible when `allow_zero`."""
    raw = [rng.random() + 0.01 for _ in range(num_groups)]
    if allow_zero and rng.random() < 0.3:
        raw[rng.randrange(num_groups)] = 0.0
    total = sum(raw)
    return [x / total for x in raw]


def random_dataset(seed: int) -> dict:
    """Random labels (with −1), CSR concepts (0..3 per sample), maybe weights (with zeros)."""
    rng = random.Random(seed)
    n = rng.randrange(0, 120)
    num_groups = rng.randint(2, 5)
    num_concepts = rng.randint(1, 8)
    unlabelled = rng.random() * 0.6
    labels = [-1 if rng.random() < unlabelled else rng.randrange(num_groups) for _ in range(n)]
    concepts = [
        rng.sample(range(num_concepts), rng.randint(0, min(3, num_concepts))) for _ in labels
    ]
    weights = None
    if rng.random() < 0.6:
        weights = [0.0 if rng.random() < 0.1 else rng.uniform(0.0, 3.0) for _ in range(n)]
    indptr = [0]
    for row in concepts:
        indptr.append(indptr[-1] + len(row))
    return {
        "labels": labels,
        "concepts": concepts,
        "indptr": np.array(indptr, dtype=np.int64),
        "indices": np.array([c for row in concepts for c in row], dtype=np.int32),
        "num_concepts": num_concepts,
        "num_groups": num_groups,
        "target": random_distribution(rng, num_groups, allow_zero=True),
        "weights": weights,
    }


def as_weights(weights: list[float] | None) -> np.ndarray | None:
    """The weights as an array (None stays None)."""
    return None if weights is None else np.array(weights)


def assert_table(table: ShareTable, expected: dict[str, list]) -> None:
    """Every field of `table` equals the oracle's, NaN where the oracle has NaN."""
    for name in ("counts", "totals", "n_eff", "shares", "diff", "ci_low", "ci_high", "bias"):
        np.testing.assert_allclose(getattr(table, name), np.array(expected[name]), **TOL)
    np.testing.assert_allclose(table.max_bias, expected["max_bias"][0], **TOL)


def assert_tables_close(a: ShareTable, b: ShareTable) -> None:
    """Two tables agree field by field (NaN matching NaN)."""
    for name in ("shares", "diff", "ci_low", "ci_high", "bias", "target"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), **TOL)


# --------------------------------------------------------------------------------------------
# Hand-computed examples
# --------------------------------------------------------------------------------------------


def test_skew_hand_example() -> None:
    # 3 women (group 0) and 1 man (group 1) among the top 4, uniform desired, no smoothing.
    result = retrieval_bias(np.array([0, 1, 0, 0]), 2, np.array([0.5, 0.5]), alpha=0.0)
    assert result.k == 4
    np.testing.assert_array_equal(result.counts, [3.0, 1.0])
    assert result.skew[0] == pytest.approx(math.log(0.75 / 0.5))  # 0.405465
    assert result.skew[1] == pytest.approx(math.log(0.25 / 0.5))  # −0.693147
    assert result.max_skew == pytest.approx(0.4054651081081644)
    assert result.min_skew == pytest.approx(-0.6931471805599453)


def test_skew_laplace_hand_example() -> None:
    # α = 1: p_top = (3 + 1) / (4 + 2) = 2/3 and (1 + 1) / 6 = 1/3.
    result = retrieval_bias(np.array([0, 1, 0, 0]), 2, np.array([0.5, 0.5]))
    np.testing.assert_allclose(result.skew, [math.log(4 / 3), math.log(2 / 3)], **TOL)


def test_ndkl_hand_example() -> None:
    # Ranking (w, m, w), uniform desired over 2 groups:
    #   i=1: D=(1, 0)     KL = ln 2                              = 0.693147, discount 1
    #   i=2: D=(1/2, 1/2) KL = 0                                             discount 1/log2 3
    #   i=3: D=(2/3, 1/3) KL = 2/3 ln(4/3) + 1/3 ln(2/3)         = 0.056633, discount 1/2
    #   Z = 1 + 0.630930 + 0.5 = 2.130930; NDKL = (0.693147 + 0.028317) / 2.130930 = 0.338568
    result = retrieval_bias(np.array([0, 1, 0]), 2, np.array([0.5, 0.5]))
    assert result.ndkl == pytest.approx(0.3385675597627429, rel=1e-12)
    # Same ranking against desired (1/4, 3/4):
    #   KL_1 = ln 4 = 1.386294; KL_2 = ½ ln 2 + ½ ln(2/3) = 0.143841;
    #   KL_3 = 2/3 ln(8/3) + 1/3 ln(4/9) = 0.383576
    #   NDKL = (1.386294 + 0.143841 · 0.630930 + 0.383576 · 0.5) / 2.130930 = 0.783149
    skewed = retrieval_bias(np.array([0, 1, 0]), 2, np.array([0.25, 0.75]))
    assert skewed.ndkl == pytest.approx(0.7831492315331173, rel=1e-12)


def test_ndkl_is_zero_for_a_single_matching_group() -> None:
    # K = 1 with desired (1,): every prefix matches the desired distribution exactly.
    result = retrieval_bias(np.array([0, 0, 0]), 1, np.array([1.0]))
    assert result.ndkl == 0.0
    assert result.max_skew == 0.0 and result.min_skew == 0.0


def test_representation_hand_example() -> None:
    # Labelled: groups 0, 0, 1, 2 (one −1 dropped); shares (1/2, 1/4, 1/4) vs uniform thirds.
    table = representation_bias(np.array([0, 0, 1, -1, 2]), 3, np.full(3, 1 / 3))
    np.testing.assert_allclose(table.shares, [[0.5, 0.25, 0.25]])
    np.testing.assert_allclose(table.diff, [[1 / 6, -1 / 12, -1 / 12]], **TOL)
    assert table.max_bias == pytest.approx(1 / 6)
    assert table.worst() == (0, 0)
    np.testing.assert_array_equal(table.n_eff, [4.0])


def test_association_hand_example() -> None:
    # Concept 0 ("doctor"): samples 0, 1, 2 → groups 0, 0, 1 → shares (2/3, 1/3).
    # Concept 1 ("nurse"): samples 2, 3 → groups 1, −1 → shares (0, 1).
    # Concept 2: only sample 4 (unlabelled) → total 0, excluded.
    labels = np.array([0, 0, 1, -1, -1])
    indptr = np.array([0, 1, 2, 4, 5, 6])
    indices = np.array([0, 0, 0, 1, 1, 2], dtype=np.int32)
    table = association_bias(labels, indptr, indices, 3, 2, np.array([0.5, 0.5]))
    np.testing.assert_allclose(table.counts, [[2, 1], [0, 1], [0, 0]])
    np.testing.assert_allclose(table.bias[:2], [1 / 6, 0.5], **TOL)
    assert math.isnan(table.bias[2])
    assert np.isnan(table.shares[2]).all()
    np.testing.assert_array_equal(table.ci_low[2], [0, 0])
    np.testing.assert_array_equal(table.ci_high[2], [1, 1])
    assert table.max_bias == pytest.approx(0.5)
    assert table.worst() == (1, 0)


def test_weighted_hand_example() -> None:
    # Weights 1, 3 on groups 0, 1: shares (1/4, 3/4); n_eff = 4² / (1 + 9) = 1.6.
    table = representation_bias(np.array([0, 1]), 2, np.array([0.5, 0.5]), np.array([1.0, 3.0]))
    np.testing.assert_allclose(table.shares, [[0.25, 0.75]])
    np.testing.assert_allclose(table.n_eff, [1.6])
    low, high = wilson_oracle(0.25, 1.6)
    np.testing.assert_allclose(table.ci_low[0, 0], low, **TOL)
    np.testing.assert_allclose(table.ci_high[0, 0], high, **TOL)


def test_smoothed_shares() -> None:
    np.testing.assert_allclose(smoothed_shares(np.array([3, 1]), 1.0), [4 / 6, 2 / 6])
    np.testing.assert_allclose(smoothed_shares(np.array([3, 1]), 0.0), [0.75, 0.25])
    np.testing.assert_allclose(smoothed_shares(np.array([0, 0, 0]), 0.5), [1 / 3] * 3)
    two_d = smoothed_shares(np.array([[1.0, 0.0], [0.0, 0.0]]), 0.0)
    np.testing.assert_allclose(two_d[0], [1.0, 0.0])
    assert np.isnan(two_d[1]).all()


# --------------------------------------------------------------------------------------------
# Wilson interval
# --------------------------------------------------------------------------------------------


def test_wilson_matches_textbook() -> None:
    rng = random.Random(7)
    ps = [0.0, 1.0, 0.5] + [rng.random() for _ in range(200)]
    ns = [1, 1, 2] + [rng.choice([1, 2, 3, 10, 1000]) * rng.uniform(0.3, 5) for _ in range(200)]
    low, high = wilson_interval(np.array(ps), np.array(ns))
    for p, n, lo, hi in zip(ps, ns, low, high, strict=True):
        expected = wilson_oracle(p, n)
        assert lo == pytest.approx(expected[0], rel=1e-12, abs=1e-14)
        assert hi == pytest.approx(expected[1], rel=1e-12, abs=1e-14)
        assert 0.0 <= lo <= p <= hi <= 1.0


def test_wilson_known_values_and_edges() -> None:
    # 5 of 10 at z = 1.96: z² = 3.8416, 1 + z²/n = 1.38416, centre = (0.5 + 0.19208) / 1.38416
    # = 0.5, half = 1.96 · sqrt(0.025 + 0.009604) / 1.38416 = 0.263410 → (0.236590, 0.763410).
    # (Tables quoting 0.236593 use z = 1.959964.)
    low, high = wilson_interval(np.array(0.5), np.array(10))
    assert float(low) == pytest.approx(0.2365896, abs=1e-6)
    assert float(high) == pytest.approx(0.7634104, abs=1e-6)
    low, high = wilson_interval(np.array([0.0, 1.0, 0.3]), np.array([20, 20, 0]))
    assert low[0] == pytest.approx(0.0, abs=1e-15) and high[2] == 1.0
    assert high[1] == pytest.approx(1.0) and low[2] == 0.0
    # Broadcasting, and another z.
    low, high = wilson_interval(np.array([[0.2, 0.8]]), np.array([[5.0], [50.0]]), z=1.0)
    assert low.shape == (2, 2)
    assert low[1, 0] == pytest.approx(wilson_oracle(0.2, 50.0, z=1.0)[0], rel=1e-12)


# --------------------------------------------------------------------------------------------
# Share tables against the oracles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(60))
def test_representation_matches_oracle(seed: int) -> None:
    data = random_dataset(seed)
    table = representation_bias(
        np.array(data["labels"], dtype=np.int64),
        data["num_groups"],
        np.array(data["target"]),
        as_weights(data["weights"]),
    )
    rows = [list(range(len(data["labels"])))]
    expected = table_oracle(
        data["labels"], rows, data["num_groups"], data["target"], data["weights"]
    )
    assert table.counts.shape == (1, data["num_groups"])
    assert_table(table, expected)


@pytest.mark.parametrize("seed", range(60))
def test_association_matches_oracle(seed: int) -> None:
    data = random_dataset(seed)
    table = association_bias(
        np.array(data["labels"], dtype=np.int8),
        data["indptr"],
        data["indices"],
        data["num_concepts"],
        data["num_groups"],
        np.array(data["target"]),
        as_weights(data["weights"]),
    )
    rows = [
        [i for i, carried in enumerate(data["concepts"]) if r in carried]
        for r in range(data["num_concepts"])
    ]
    expected = table_oracle(
        data["labels"], rows, data["num_groups"], data["target"], data["weights"]
    )
    assert table.counts.shape == (data["num_concepts"], data["num_groups"])
    assert_table(table, expected)
    valid = [r for r in range(data["num_concepts"]) if expected["totals"][r] > 0]
    if valid:
        best = max(
            (abs(expected["diff"][r][g]), -r, -g) for r in valid for g in range(data["num_groups"])
        )
        assert table.worst() == (-best[1], -best[2])
    else:
        with pytest.raises(ValueError):
            table.worst()


def test_unweighted_n_eff_equals_totals_and_unit_weights_agree() -> None:
    data = random_dataset(3)
    labels = np.array(data["labels"])
    target = np.array(data["target"])
    args = (data["indptr"], data["indices"], data["num_concepts"], data["num_groups"], target)
    plain = association_bias(labels, *args)
    np.testing.assert_array_equal(plain.n_eff, plain.totals)
    ones = association_bias(labels, *args, weights=np.ones(labels.size))
    np.testing.assert_allclose(ones.counts, plain.counts)
    np.testing.assert_allclose(ones.n_eff, plain.n_eff, **TOL)
    assert_tables_close(ones, plain)


def test_zero_weight_is_like_no_label() -> None:
    data = random_dataset(11)
    labels = np.array(data["labels"])
    weights = np.random.default_rng(0).uniform(0.1, 2.0, labels.size)
    dropped = np.arange(labels.size) % 3 == 0
    zeroed = np.where(dropped, 0.0, weights)
    unlabelled = np.where(dropped, -1, labels)
    target = np.array(data["target"])
    args = (data["indptr"], data["indices"], data["num_concepts"], data["num_groups"], target)
    a = association_bias(labels, *args, weights=zeroed)
    b = association_bias(unlabelled, *args, weights=weights)
    np.testing.assert_allclose(a.counts, b.counts, **TOL)
    np.testing.assert_allclose(a.n_eff, b.n_eff, **TOL)


def test_all_rows_empty() -> None:
    table = representation_bias(np.array([-1, -1]), 2, np.array([0.5, 0.5]))
    assert math.isnan(table.max_bias)
    assert np.isnan(table.shares).all() and np.isnan(table.bias).all()
    np.testing.assert_array_equal(table.n_eff, [0.0])
    with pytest.raises(ValueError):
        table.worst()
    weighted = representation_bias(np.array([0, 1]), 2, np.array([0.5, 0.5]), np.zeros(2))
    assert math.isnan(weighted.max_bias)
    np.testing.assert_array_equal(weighted.n_eff, [0.0])
    empty = association_bias(
        np.zeros(0, dtype=np.int64),
        np.array([0]),
        np.zeros(0, dtype=np.int32),
        2,
        3,
        np.ones(3) / 3,
    )
    assert empty.counts.shape == (2, 3) and math.isnan(empty.max_bias)


def test_association_accepts_an_offset_csr() -> None:
    # A slice of a larger CSR: indptr starting past 0 and indices with a head and tail.
    labels = np.array([0, 1, 1])
    indptr = np.array([2, 3, 5, 5])
    indices = np.array([9, 9, 0, 0, 1, 9], dtype=np.int32)
    table = association_bias(labels, indptr, indices, 2, 2, np.array([0.5, 0.5]))
    np.testing.assert_allclose(table.counts, [[1, 1], [0, 1]])


def test_tables_are_read_only() -> None:
    table = representation_bias(np.array([0, 1]), 2, np.array([0.5, 0.5]))
    with pytest.raises(ValueError):
        table.shares[0, 0] = 1.0


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_permuting_samples_changes_nothing(seed: int) -> None:
    data = random_dataset(100 + seed)
    n = len(data["labels"])
    order = list(range(n))
    random.Random(seed).shuffle(order)
    labels = np.array(data["labels"])
    weights = as_weights(data["weights"])
    target = np.array(data["target"])
    k, r = data["num_groups"], data["num_concepts"]
    original = association_bias(labels, data["indptr"], data["indices"], r, k, target, weights)
    concepts = [data["concepts"][i] for i in order]
    indptr = np.cumsum([0] + [len(c) for c in concepts])
    indices = np.array([c for row in concepts for c in row], dtype=np.int32)
    moved_weights = None if weights is None else weights[order]
    shuffled = association_bias(labels[order], indptr, indices, r, k, target, moved_weights)
    np.testing.assert_allclose(shuffled.counts, original.counts, **TOL)
    np.testing.assert_allclose(shuffled.n_eff, original.n_eff, **TOL)
    assert_tables_close(shuffled, original)
    rep_a = representation_bias(labels, k, target, weights)
    rep_b = representation_bias(labels[order], k, target, moved_weights)
    assert_tables_close(rep_a, rep_b)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e4])
def test_scaling_weights_keeps_shares(scale: float) -> None:
    data = random_dataset(21)
    labels = np.array(data["labels"])
    weights = np.random.default_rng(1).uniform(0.0, 2.0, labels.size)
    target = np.array(data["target"])
    args = (data["indptr"], data["indices"], data["num_concepts"], data["num_groups"], target)
    base = association_bias(labels, *args, weights=weights)
    scaled = association_bias(labels, *args, weights=weights * scale)
    np.testing.assert_allclose(scaled.counts, base.counts * scale, rtol=1e-10)
    np.testing.assert_allclose(scaled.n_eff, base.n_eff, rtol=1e-10)
    assert_tables_close(scaled, base)


# --------------------------------------------------------------------------------------------
# Retrieval against the oracles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(60))
def test_retrieval_matches_oracle(seed: int) -> None:
    rng = random.Random(seed)
    num_groups = rng.randint(2, 5)
    k = rng.randint(1, 80)
    ranked = [rng.randrange(num_groups) for _ in range(k)]
    if rng.random() < 0.3:  # a group missing from the top k
        ranked = [g for g in ranked if g != 0] or [1]
    desired = random_distribution(rng, num_groups, allow_zero=False)
    alpha = rng.choice([0.0, 0.5, 1.0, 2.0])
    result = retrieval_bias(np.array(ranked, dtype=np.int16), num_groups, np.array(desired), alpha)
    expected_skew = skew_oracle(ranked, num_groups, desired, alpha)
    assert isinstance(result, RetrievalBias)
    assert result.k == len(ranked)
    np.testing.assert_array_equal(result.counts, [ranked.count(a) for a in range(num_groups)])
    np.testing.assert_allclose(result.skew, expected_skew, **TOL)
    assert result.max_skew == max(result.skew) and result.min_skew == min(result.skew)
    assert result.max_skew == pytest.approx(max(expected_skew), rel=1e-10, abs=1e-12)
    expected_ndkl = ndkl_oracle(ranked, num_groups, desired)
    assert result.ndkl == pytest.approx(expected_ndkl, rel=1e-10, abs=1e-12)


def test_retrieval_empty_and_missing_groups() -> None:
    empty = retrieval_bias(np.zeros(0, dtype=np.int64), 3, np.ones(3) / 3)
    assert empty.k == 0
    np.testing.assert_array_equal(empty.counts, [0, 0, 0])
    assert np.isnan(empty.skew).all()
    assert math.isnan(empty.max_skew) and math.isnan(empty.min_skew) and math.isnan(empty.ndkl)
    unsmoothed = retrieval_bias(np.array([0, 0]), 2, np.array([0.5, 0.5]), alpha=0.0)
    assert unsmoothed.skew[1] == -math.inf and unsmoothed.min_skew == -math.inf
    assert math.isfinite(unsmoothed.ndkl)


def test_top_k_then_retrieval() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.95, 0.2])
    labels = np.array([0, 1, -1, 1, 0, 0])
    ranked = top_k_labels(scores, labels, 1000)  # capped at the 5 labelled candidates
    np.testing.assert_array_equal(ranked, [0, 0, 1, 0, 1])
    result = retrieval_bias(ranked, 2, np.array([0.5, 0.5]), alpha=0.0)
    assert result.k == 5
    np.testing.assert_allclose(result.skew, [math.log(0.6 / 0.5), math.log(0.4 / 0.5)])


# --------------------------------------------------------------------------------------------
# top_k_labels against a full sort
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(80))
def test_top_k_matches_full_sort(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randrange(0, 150)
    distinct = rng.choice([2, 3, 5, 1000])  # few distinct scores → many ties
    scores = [float(rng.randrange(distinct)) / 7 for _ in range(n)]
    labels = [rng.randrange(-1, 4) for _ in range(n)]
    k = rng.choice([0, 1, 2, 5, rng.randrange(0, 200), 10_000])
    got = top_k_labels(np.array(scores, dtype=np.float32), np.array(labels, dtype=np.int32), k)
    expected = top_k_oracle([float(np.float32(s)) for s in scores], labels, k)
    assert got.tolist() == expected
    assert got.dtype == np.int32


def test_top_k_ties_prefer_lower_index() -> None:
    scores = np.array([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    labels = np.array([10, 11, 12, -1, 14, 15])
    assert top_k_labels(scores, labels, 2).tolist() == [11, 12]
    assert top_k_labels(scores, labels, 4).tolist() == [11, 12, 15, 10]
    assert top_k_labels(scores, labels, 0).tolist() == []
    assert top_k_labels(np.array([-np.inf, 0.0]), np.array([1, 2]), 2).tolist() == [2, 1]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

_U = np.array([0.5, 0.5])
_IP = np.array([0, 1, 2])
_IX = np.array([0, 1], dtype=np.int32)


@pytest.mark.parametrize(
    "call",
    [
        lambda: representation_bias(np.array([0, 1]), 2, np.array([0.5, 0.4])),  # sum ≠ 1
        lambda: representation_bias(np.array([0, 1]), 2, np.array([1.5, -0.5])),  # negative
        lambda: representation_bias(np.array([0, 1]), 2, np.array([1.0])),  # shape
        lambda: representation_bias(np.array([0, 2]), 2, _U),  # label ≥ K
        lambda: representation_bias(np.array([0, -2]), 2, _U),  # label < −1
        lambda: representation_bias(np.array([0.0, 1.0]), 2, _U),  # float labels
        lambda: representation_bias(np.array([0, 1]), 2, _U, np.array([1.0, -1.0])),
        lambda: representation_bias(np.array([0, 1]), 2, _U, np.array([1.0])),
        lambda: representation_bias(np.array([0, 1]), 2, _U, np.array([1.0, np.nan])),
        lambda: representation_bias(np.array([0, 1]), 0, np.zeros(0)),
        lambda: association_bias(np.array([0, 1]), _IP, np.array([0, 2], dtype=np.int32), 2, 2, _U),
        lambda: association_bias(
            np.array([0, 1]), _IP, np.array([0, -1], dtype=np.int32), 2, 2, _U
        ),
        lambda: association_bias(np.array([0, 1, 1]), _IP, _IX, 2, 2, _U),  # labels length
        lambda: association_bias(np.array([0, 1]), np.array([0, 2, 1]), _IX, 2, 2, _U),
        lambda: association_bias(np.array([0, 1]), np.array([0, 1, 3]), _IX, 2, 2, _U),
        lambda: association_bias(np.array([0, 1]), _IP, _IX, 2, 2, _U, np.array([1.0, -1.0])),
        lambda: association_bias(np.array([0, 1]), _IP, _IX, 2, 2, np.array([0.2, 0.2])),
        lambda: retrieval_bias(np.array([0, 1]), 2, np.array([1.0, 0.0])),  # desired not > 0
        lambda: retrieval_bias(np.array([0, 1]), 2, np.array([0.7, 0.7])),
        lambda: retrieval_bias(np.array([0, -1]), 2, _U),  # ranked labels must be ≥ 0
        lambda: retrieval_bias(np.array([0, 1]), 2, _U, alpha=-1.0),
        lambda: top_k_labels(np.array([0.1, 0.2]), np.array([0, 1]), -1),
        lambda: top_k_labels(np.array([0.1, np.nan]), np.array([0, 1]), 1),
        lambda: top_k_labels(np.array([0.1, 0.2]), np.array([0, 1, 1]), 1),
        lambda: smoothed_shares(np.array([1.0, 2.0]), -0.5),
        lambda: smoothed_shares(np.array([1.0, -2.0]), 1.0),
        lambda: wilson_interval(np.array([0.5]), np.array([-1.0])),
    ],
)
def test_validation_errors(call) -> None:
    with pytest.raises(ValueError):
        call()
