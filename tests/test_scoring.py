"""Scoring functions against slow, independent oracles written from the published formulas.

The oracles use float64 numpy and plain loops and share no code with curate.scoring; only the
batch plan (a documented, public output) is shared where batches must match.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curate.scoring import (
    BatchPlan,
    clipscore,
    negclip,
    negclip_batch_plan,
    normsim,
    normsim_2,
    normsim_inf,
    normsim_p,
    second_moment,
)

# Float32 logits are exact to ~1e-7 relative; R = (τ/2)·lse(s/τ) carries that to ~1e-6 absolute.
ATOL32 = 2e-5


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def correlated_pairs(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and captions that agree more than chance, like real CLIP pairs."""
    f = unit_rows(rng, n, d)
    g = f + 0.8 * rng.standard_normal((n, d)) / math.sqrt(d)
    return f, g / np.linalg.norm(g, axis=1, keepdims=True)


# ---------------------------------------------------------------- oracles (float64, plain)


def oracle_clip_loss(f: np.ndarray, g: np.ndarray, tau: float) -> np.ndarray:
    """Per-sample symmetric InfoNCE: ½(CE of row i + CE of column i) of the logits S/τ."""
    n = f.shape[0]
    logits = (f @ g.T) / tau
    loss = np.empty(n)
    for i in range(n):
        row_ce = -(logits[i, i] - math.log(sum(math.exp(v) for v in logits[i, :])))
        col_ce = -(logits[i, i] - math.log(sum(math.exp(v) for v in logits[:, i])))
        loss[i] = 0.5 * (row_ce + col_ce)
    return loss


def oracle_negclip(f: np.ndarray, g: np.ndarray, tau: float, plans: list[BatchPlan]) -> np.ndarray:
    """(1/K) Σ_k [s_ii − R_{B_k}(i)], R from the definition, batch by batch, in float64."""
    n = f.shape[0]
    total = np.zeros(n)
    for plan in plans:
        for batch, scored in zip(plan.batches, plan.scored_mask, strict=True):
            for pos, i in enumerate(batch):
                if not scored[pos]:
                    continue
                row = sum(math.exp(float(f[i] @ g[j]) / tau) for j in batch)
                col = sum(math.exp(float(f[j] @ g[i]) / tau) for j in batch)
                r = tau / 2 * math.log(row) + tau / 2 * math.log(col)
                total[i] += float(f[i] @ g[i]) - r
    return total / len(plans)


def oracle_normsim(f: np.ndarray, g: np.ndarray, p: float) -> np.ndarray:
    sims = np.abs(f @ g.T)
    if math.isinf(p):
        return sims.max(axis=1)
    return np.array([sum(v**p for v in row) ** (1 / p) for row in sims])


# ---------------------------------------------------------------- CLIPScore


def test_clipscore_matches_cosine_and_renormalises() -> None:
    rng = np.random.default_rng(0)
    f = rng.standard_normal((37, 12))
    g = rng.standard_normal((37, 12))
    want = [
        float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(f, g, strict=True)
    ]
    got = clipscore(f * 3.0, g, device="cpu", chunk_size=5)
    assert got.dtype == np.float32 and got.shape == (37,)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_clipscore_float16_and_torch_inputs() -> None:
    rng = np.random.default_rng(1)
    f, g = correlated_pairs(rng, 20, 16)
    want = np.sum(f * g, axis=1)
    got16 = clipscore(f.astype(np.float16), g.astype(np.float16), device="cpu")
    assert got16.dtype == np.float32
    np.testing.assert_allclose(got16, want, atol=2e-3)
    got_t = clipscore(torch.from_numpy(f), torch.from_numpy(g), device="cpu")
    np.testing.assert_allclose(got_t, want, atol=1e-6)


# ---------------------------------------------------------------- batch plan


PLAN_CASES = [
    (12, 4),  # n multiple of B
    (10, 10),  # n = B
    (7, 32),  # n < requested B: capped to n
    (11, 10),  # n = B + 1
    (9, 1),  # B = 1
    (101, 8),
    (23, 7),
    (50, 49),
    (1, 1),
    (1, 5),
]


@pytest.mark.parametrize(("n", "b"), PLAN_CASES)
def test_batch_plan_equal_batches_each_index_scored_once(n: int, b: int) -> None:
    k = 4
    plans = negclip_batch_plan(n, b, k, seed=3)
    assert len(plans) == k
    size = min(b, n)
    for plan in plans:
        assert plan.batches.dtype == np.int64
        assert plan.batches.shape == (math.ceil(n / size), size)
        assert plan.scored_mask.shape == plan.batches.shape
        assert plan.scored_mask.dtype == bool
        for batch in plan.batches:  # exactly `size` distinct members, all from the pool
            assert len(set(batch.tolist())) == size
            assert all(0 <= i < n for i in batch)
        scored = sorted(plan.batches[plan.scored_mask].tolist())
        assert scored == list(range(n))  # every index scored exactly once per round
        # Only the last batch may hold filler, and only when n is not a multiple of B.
        unscored_rows = {r for r, c in zip(*np.nonzero(~plan.scored_mask), strict=True)}
        if n % size:
            assert unscored_rows == {len(plan.batches) - 1}
        else:
            assert not unscored_rows


def test_batch_plan_covers_whole_pool_and_rounds_differ() -> None:
    n, b = 1000, 100
    plans = negclip_batch_plan(n, b, 3, seed=0)
    for plan in plans:
        # A whole-pool permutation mixes the pool: batches are not contiguous index ranges
        # (as cutting per file or per shard would give).
        spans = [int(batch.max() - batch.min()) for batch in plan.batches]
        assert min(spans) > 500
    orders = [plan.scored_indices().tolist() for plan in plans]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]


def test_batch_plan_seeding() -> None:
    a = negclip_batch_plan(57, 10, 3, seed=7)
    b = negclip_batch_plan(57, 10, 3, seed=7)
    c = negclip_batch_plan(57, 10, 3, seed=8)
    for pa, pb in zip(a, b, strict=True):
        assert np.array_equal(pa.batches, pb.batches)
        assert np.array_equal(pa.scored_mask, pb.scored_mask)
    assert any(not np.array_equal(pa.batches, pc.batches) for pa, pc in zip(a, c, strict=True))
    # Round r does not depend on K: fewer rounds are a prefix of more rounds.
    longer = negclip_batch_plan(57, 10, 5, seed=7)
    for pa, pl in zip(a, longer, strict=False):
        assert np.array_equal(pa.batches, pl.batches)


@pytest.mark.parametrize(
    ("n", "b", "k", "seed"), [(0, 4, 1, 0), (5, 0, 1, 0), (5, 2, 0, 0), (5, 2, 1, -1)]
)
def test_batch_plan_rejects_bad_arguments(n: int, b: int, k: int, seed: int) -> None:
    with pytest.raises(ValueError):
        negclip_batch_plan(n, b, k, seed)


# ---------------------------------------------------------------- negCLIPLoss


@pytest.mark.parametrize("n", [1, 2, 9, 40])
@pytest.mark.parametrize("tau", [0.01, 0.07])
def test_negclip_full_batch_is_minus_tau_clip_loss(n: int, tau: float) -> None:
    rng = np.random.default_rng(n)
    f, g = correlated_pairs(rng, n, 24)
    got = negclip(f, g, temperature=tau, batch_size=n, k=1, device="cpu")
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, -tau * oracle_clip_loss(f, g, tau), rtol=0, atol=ATOL32)


@pytest.mark.parametrize(
    ("n", "b", "k", "tau", "chunk"),
    [
        (30, 8, 3, 0.01, 4096),  # several batches share a block (batched matmul)
        (30, 8, 3, 0.07, 3),  # row chunks inside a batch
        (25, 5, 2, 0.01, 5),  # n multiple of B
        (11, 10, 2, 0.01, 4),  # n = B + 1: the last batch is mostly filler
        (9, 1, 2, 0.07, 2),  # B = 1: R = s_ii, score 0
        (17, 6, 2, 0.002, 4),  # τ far below 1/86: exercises the exact-lse fallback
    ],
)
def test_negclip_matches_bruteforce_on_same_plan(
    n: int, b: int, k: int, tau: float, chunk: int
) -> None:
    rng = np.random.default_rng(100 + n)
    f, g = correlated_pairs(rng, n, 16)
    plans = negclip_batch_plan(n, b, k, seed=11)
    want = oracle_negclip(f, g, tau, plans)
    got = negclip(f, g, temperature=tau, batch_size=b, k=k, seed=11, chunk_size=chunk, device="cpu")
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL32)


def test_negclip_chunking_invariance() -> None:
    rng = np.random.default_rng(5)
    f, g = correlated_pairs(rng, 64, 32)
    b = 16
    runs = [
        negclip(f, g, temperature=0.01, batch_size=b, k=2, seed=1, chunk_size=c, device="cpu")
        for c in (1, 7, b, 3 * b + 1, 10_000)
    ]
    for other in runs[1:]:
        np.testing.assert_allclose(other, runs[0], rtol=0, atol=1e-6)


def test_negclip_seed_determinism() -> None:
    rng = np.random.default_rng(6)
    f, g = correlated_pairs(rng, 50, 16)
    kw = {"temperature": 0.01, "batch_size": 8, "k": 3, "device": "cpu"}
    a = negclip(f, g, seed=4, **kw)
    b = negclip(f, g, seed=4, **kw)
    c = negclip(f, g, seed=5, **kw)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)


def test_negclip_inputs_float16_torch_and_untouched() -> None:
    rng = np.random.default_rng(9)
    f, g = correlated_pairs(rng, 20, 16)
    f16, g16 = f.astype(np.float16), g.astype(np.float16)
    f32 = f.astype(np.float32)
    f32_copy = f32.copy()
    ref = oracle_negclip(f, g, 0.07, negclip_batch_plan(20, 6, 2, seed=0))
    got16 = negclip(f16, g16, temperature=0.07, batch_size=6, k=2, device="cpu")
    assert got16.dtype == np.float32
    np.testing.assert_allclose(got16, ref, atol=5e-3)
    got_t = negclip(
        torch.from_numpy(f32),
        torch.from_numpy(g),
        temperature=0.07,
        batch_size=6,
        k=2,
        device="cpu",
    )
    np.testing.assert_allclose(got_t, ref, atol=ATOL32)
    assert np.array_equal(f32, f32_copy)  # the caller's array is not renormalised in place


def test_negclip_empty_pool() -> None:
    out = negclip(np.zeros((0, 8)), np.zeros((0, 8)), temperature=0.01, device="cpu")
    assert out.shape == (0,) and out.dtype == np.float32


def test_negclip_rejects_bad_input() -> None:
    f = np.ones((4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="same shape"):
        negclip(f, np.ones((5, 8)), temperature=0.01, device="cpu")
    with pytest.raises(ValueError, match="same shape"):
        negclip(f, np.ones((4, 7)), temperature=0.01, device="cpu")
    with pytest.raises(ValueError, match="2-D"):
        negclip(f[0], f[0], temperature=0.01, device="cpu")
    for bad_tau in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            negclip(f, f, temperature=bad_tau, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        negclip(f, f, temperature=0.01, batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="chunk_size"):
        negclip(f, f, temperature=0.01, chunk_size=0, device="cpu")
    nan = f.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        negclip(nan, f, temperature=0.01, device="cpu")
    with pytest.raises(ValueError, match="same shape"):
        clipscore(f, np.ones((3, 8)), device="cpu")


# ---------------------------------------------------------------- NormSim


@pytest.fixture(scope="module")
def pool_target() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(21)
    return unit_rows(rng, 29, 12), unit_rows(rng, 53, 12)  # 53: not a multiple of chunk sizes


def test_second_moment_and_normsim_2(pool_target: tuple[np.ndarray, np.ndarray]) -> None:
    f, g = pool_target
    m = second_moment(g, chunk_size=10, device="cpu")
    assert m.dtype == np.float64 and m.shape == (12, 12)
    want_m = sum(np.outer(t, t) for t in g)
    np.testing.assert_allclose(m, want_m, atol=1e-6)  # rows renormalised in float32
    want = np.array([math.sqrt(sum(float(x @ t) ** 2 for t in g)) for x in f])
    got = normsim_2(f, m, device="cpu", chunk_size=8)
    assert got.dtype == np.float32 and got.shape == (29,)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(normsim(f, g, p=2, device="cpu"), want, rtol=1e-5)
    np.testing.assert_allclose(normsim(f, p="2", moment=m, device="cpu"), want, rtol=1e-5)


def test_normsim_2_singular_moment_is_finite() -> None:
    # Fewer targets than dimensions: GᵀG is singular; round-off must not give NaN.
    rng = np.random.default_rng(22)
    f, g = unit_rows(rng, 10, 16), unit_rows(rng, 3, 16)
    got = normsim_2(f, second_moment(g, device="cpu"), device="cpu")
    want = np.sqrt(((f @ g.T) ** 2).sum(axis=1))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_normsim_inf(pool_target: tuple[np.ndarray, np.ndarray]) -> None:
    f, g = pool_target
    want = oracle_normsim(f, g, math.inf)
    got = normsim_inf(f, g, device="cpu", chunk_size=4, target_chunk_size=10)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    for p in (math.inf, "inf", "Infinity"):
        np.testing.assert_allclose(normsim(f, g, p=p, device="cpu"), want, atol=1e-6)


@pytest.mark.parametrize("p", [1, 1.5, 3, 10])
def test_normsim_p(pool_target: tuple[np.ndarray, np.ndarray], p: float) -> None:
    f, g = pool_target
    want = oracle_normsim(f, g, p)
    got = normsim_p(f, g, p, device="cpu", chunk_size=4, target_chunk_size=10)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(normsim(f, g, p=p, device="cpu", chunk_size=7), want, rtol=1e-5)


def test_normsim_large_p_is_stable(pool_target: tuple[np.ndarray, np.ndarray]) -> None:
    f, g = pool_target
    got50 = normsim_p(f, g, 50, device="cpu", chunk_size=4, target_chunk_size=10)
    assert np.all(np.isfinite(got50)) and np.all(got50 > 0)
    np.testing.assert_allclose(got50, oracle_normsim(f, g, 50), rtol=1e-5)
    inf = normsim_inf(f, g, device="cpu")
    # ‖·‖_∞ ≤ ‖·‖_p ≤ T^(1/p)·‖·‖_∞; for p = 1e4 that factor is 1.0004.
    huge = normsim_p(f, g, 1e4, device="cpu", target_chunk_size=10)
    assert np.all(huge >= inf * (1 - 1e-6))
    np.testing.assert_allclose(huge, inf, rtol=1e-3)
    # Tiny similarities (|s|^p underflows in float32 without the max factored out).
    tiny = normsim_p(f * 1e-3, g, 50, device="cpu", target_chunk_size=10)
    assert np.all(tiny > 0)


def test_normsim_float16_input(pool_target: tuple[np.ndarray, np.ndarray]) -> None:
    f, g = pool_target
    got = normsim_inf(f.astype(np.float16), g.astype(np.float16), device="cpu")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, oracle_normsim(f, g, math.inf), atol=3e-3)


def test_normsim_rejects_bad_input(pool_target: tuple[np.ndarray, np.ndarray]) -> None:
    f, g = pool_target
    for bad_p in (0.5, 0, -1, "0.9", "abc", float("nan")):
        with pytest.raises(ValueError, match="p must be"):
            normsim(f, g, p=bad_p, device="cpu")
    with pytest.raises(ValueError, match="p must be"):
        normsim_p(f, g, 0.5, device="cpu")
    with pytest.raises(ValueError, match="same embedding dim"):
        normsim_inf(f, g[:, :5], device="cpu")
    with pytest.raises(ValueError, match="same embedding dim"):
        normsim_p(f, g[:, :5], 3, device="cpu")
    with pytest.raises(ValueError, match="moment"):
        normsim_2(f, np.eye(5), device="cpu")
    with pytest.raises(ValueError, match="needs a target"):
        normsim(f, p=math.inf, device="cpu")
    with pytest.raises(ValueError, match="needs a target or a precomputed moment"):
        normsim(f, p=2, device="cpu")


def test_pool_index_keeps_the_first_embedded_occurrence_of_each_uid() -> None:
    """PoolIndex.first_occurrences against a dictionary walk over the rows in pool order."""
    import pyarrow as pa

    from curate.io.uid_files import uid_pairs, uids_to_pairs
    from curate.scoring.pool import PoolIndex

    rng = np.random.default_rng(11)
    for _ in range(20):
        n = int(rng.integers(0, 60))
        # a shared first half for some: equal hi, different lo
        vocabulary = [f"{int(v):032x}" for v in rng.integers(0, 2**62, size=6)]
        vocabulary += [vocabulary[0][:16] + "f" * 16, vocabulary[1][:16] + "e" * 16]
        uids = [vocabulary[int(i)] for i in rng.integers(0, 8, size=n)]
        embedded = rng.random(n) < 0.7
        hi, lo, _ = uid_pairs(pa.array(uids, pa.string()))
        index = PoolIndex(
            stems=["a"],
            hi=hi,
            lo=lo,
            embedded=embedded,
            shard_of=np.zeros(n, np.int32),
            rows_per_shard=np.array([n]),
        )
        kept, (rows, firsts) = index.first_occurrences()
        earlier = dict(zip(rows.tolist(), firsts.tolist(), strict=True))
        seen: dict[str, int] = {}
        for i, uid in enumerate(uids):
            if not embedded[i]:
                assert not kept[i] and i not in earlier
                continue
            assert kept[i] == (uid not in seen)
            seen.setdefault(uid, i)
            assert earlier.get(i, i) == seen[uid]
        assert rows.tolist() == sorted(rows.tolist())
        pairs = uids_to_pairs(uids)
        assert (index.hi == pairs["f0"]).all() and (index.lo == pairs["f1"]).all()
