"""negCLIPLoss (a.k.a. s-CLIPLoss; Wang et al., NeurIPS 2024).

For a batch B holding sample i, temperature τ and s_ij = f_i·g_j (image i, text j):

    R_B(i) = (τ/2)·logsumexp_{j∈B}(s_ij/τ) + (τ/2)·logsumexp_{j∈B}(s_ji/τ)
    negCLIPLoss(i) = (1/K) Σ_k [ s_ii − R_{B_k}(i) ]  = −τ · mean_k CLIPLoss_{B_k}(i)

Batches (see :func:`negclip_batch_plan`) are cut from a seeded permutation of the *whole* pool and
all have exactly |B| members: the reference code cut them per file, so the last batch of a file was
small, R (≈ τ·log|B|) shrank, and those samples got a spurious boost of ~0.01.

Cost: n·|B|·D multiply-adds per round, done as matmuls in float32; the B×B logit matrix is never
held whole: blocks of at most ``chunk_size`` rows are formed, exponentiated and reduced, each
batch costing one B×B×D product. benchmarks/bench_negclip.py compares the achieved rate with
the machine's matmul rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from curate.scoring.clipscore import _TINY_NORM, _check_pair, _resolve_device

__all__ = ["BatchPlan", "negclip", "negclip_batch_plan"]

# A row/column sum of exp(logit − shift) below this (or non-finite) is recomputed exactly: above
# it, terms lost to float32 underflow (< 1.4e-45 each) change the sum by < 1e-10 relatively.
_SUM_FLOOR = 1e-30
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2
# CPU tile of the logit block (rows × columns); see negclip. Tuned with
# benchmarks/bench_negclip.py on a 2-core AVX-512 machine.
_CPU_TILE_ROWS = 256
_CPU_TILE_COLS = 1024


@dataclass(frozen=True)
class BatchPlan:
    """The batches of one round.

    batches: (num_batches, batch_size) int64 pool indices, each row distinct indices.
    scored_mask: same shape, True where that batch *scores* the sample. Every pool index is
        scored exactly once per round; False marks filler samples of the last batch, which only
        serve as negatives so that the last batch has the full size.
    """

    batches: np.ndarray
    scored_mask: np.ndarray

    @property
    def num_batches(self) -> int:
        return int(self.batches.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.batches.shape[1])

    def scored_indices(self) -> np.ndarray:
        """Pool indices in the order the plan scores them (a permutation of range(n))."""
        return self.batches[self.scored_mask]


def _round_plan(n: int, batch_size: int, rng: np.random.Generator) -> BatchPlan:
    """One round: permute the whole pool, cut equal batches, complete the last one.

    With r = n mod B ≠ 0 the last batch holds the r left-over samples (scored, first) followed by
    the first B − r samples of the same permutation (filler, negatives only). Those are uniformly
    random, distinct from the left-overs, and all exist because n ≥ B.
    """
    perm = rng.permutation(n).astype(np.int64, copy=False)
    full, rem = divmod(n, batch_size)
    if rem == 0:
        batches = perm.reshape(full, batch_size)
        return BatchPlan(batches, np.ones(batches.shape, dtype=bool))
    batches = np.empty((full + 1, batch_size), dtype=np.int64)
    batches[:full] = perm[: full * batch_size].reshape(full, batch_size)
    batches[full, :rem] = perm[full * batch_size :]
    batches[full, rem:] = perm[: batch_size - rem]
    scored = np.ones(batches.shape, dtype=bool)
    scored[full, rem:] = False
    return BatchPlan(batches, scored)


def _round_rngs(seed: int, k: int) -> list[np.random.Generator]:
    """Round r uses default_rng(SeedSequence(seed).spawn(k)[r]).

    Spawned children are keyed by their index only, so round r's plan does not depend on k (the
    plan for k = 5 is the first five rounds of the plan for k = 10) and rounds are independent.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(k)]


def _check_plan_args(n: int, batch_size: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"the pool must hold at least one sample, got n={n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if k < 1:
        raise ValueError(f"k (number of rounds) must be >= 1, got {k}")


def negclip_batch_plan(n: int, batch_size: int, k: int, seed: int) -> list[BatchPlan]:
    """The K rounds of batches used by :func:`negclip` for a pool of ``n`` samples.

    Batch size is min(batch_size, n) for every batch. Each round is a fresh permutation of the
    whole pool (round r drawn from default_rng(SeedSequence(seed).spawn(k)[r])); when n is not a
    multiple of the batch size the last batch is completed with filler samples of the same round
    that it does not already hold (see :class:`BatchPlan`).
    """
    _check_plan_args(n, batch_size, k)
    b = min(batch_size, n)
    return [_round_plan(n, b, rng) for rng in _round_rngs(seed, k)]


def _log2_sum_exp2_rows(
    a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
    """log2 Σ_j 2^(a[r]·b[j]) for the given rows r, by the stable max-subtracting method."""
    out = torch.empty(rows.numel(), dtype=a.dtype, device=a.device)
    for start in range(0, rows.numel(), chunk_rows):
        sel = rows[start : start + chunk_rows]
        x = a.index_select(0, sel) @ b.T
        out[start : start + sel.numel()] = torch.logsumexp(x * _LN2, dim=1) / _LN2
    return out


def _tiles(size: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(s + step, size)) for s in range(0, size, step)]


def _on_device(emb: np.ndarray | torch.Tensor, dev: torch.device) -> torch.Tensor:
    """The embeddings as a contiguous tensor on ``dev``, kept in their storage dtype when that
    is float16/bfloat16/float32 (no copy at all when already there; half the memory and half
    the gather traffic for float16), float32 otherwise. Never written to."""
    t = torch.from_numpy(np.ascontiguousarray(emb)) if isinstance(emb, np.ndarray) else emb.detach()
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        t = t.to(torch.float32)
    return t.to(dev).contiguous()


def _row_stats(
    img: torch.Tensor, txt: torch.Tensor, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1/‖f_i‖, 1/‖g_i‖ (float32) and s_ii = f_i·g_i/(‖f_i‖‖g_i‖) (float64), one chunked pass.

    A NaN/inf anywhere in a row makes its norm non-finite, so the norms are the finiteness check.
    """
    n, d = img.shape
    inv_f = torch.empty(n, dtype=torch.float32, device=img.device)
    inv_g = torch.empty_like(inv_f)
    diag = torch.empty(n, dtype=torch.float64, device=img.device)
    a_buf = torch.empty(min(n, step), d, dtype=torch.float32, device=img.device)
    b_buf = torch.empty_like(a_buf)
    for start in range(0, n, step):
        stop = min(start + step, n)
        a = a_buf[: stop - start].copy_(img[start:stop])
        b = b_buf[: stop - start].copy_(txt[start:stop])
        for name, x, inv in (("image_emb", a, inv_f), ("text_emb", b, inv_g)):
            norms = torch.linalg.vector_norm(x, dim=1)
            if not bool(torch.isfinite(norms).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
            inv[start:stop] = norms.clamp_min_(_TINY_NORM).reciprocal_()
        dots = a.mul_(b).sum(dim=1)
        diag[start:stop] = dots.to(torch.float64) * inv_f[start:stop] * inv_g[start:stop]
    return inv_f, inv_g, diag


def _gather(
    src: torch.Tensor,
    factor: torch.Tensor,
    sel: torch.Tensor,
    tmp: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[:, :D] = src[sel] · factor[sel] (row-wise), converted to float32 on the way.

    The rows are renormalised (and for images scaled to base-2 logits) here, per batch, from the
    stored embeddings: O(B·D) work against the O(B²·D) matmul, and no float32 copy of the pool.
    """
    rows = torch.index_select(src, 0, sel, out=tmp[: sel.numel()])
    torch.mul(rows, factor.index_select(0, sel).unsqueeze(1), out=out[:, : src.shape[1]])


def negclip(
    image_emb: np.ndarray | torch.Tensor,
    text_emb: np.ndarray | torch.Tensor,
    *,
    temperature: float,
    batch_size: int = 32768,
    k: int = 10,
    seed: int = 0,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
) -> np.ndarray:
    """negCLIPLoss(i) = (1/K) Σ_k [ s_ii − R_{B_k}(i) ] over K seeded rounds of equal batches.

    Batches come from :func:`negclip_batch_plan` (same arguments give byte-identical scores).
    The pool is moved to ``device`` (None → CUDA if available, else CPU) once, in its storage
    dtype (float16 stays float16: half the memory); each gathered batch is renormalised and
    converted to float32 there, and all arithmetic is float32 (sums of R in float64).
    ``chunk_size`` bounds the logit block held at once to chunk_size × B floats; when
    B < chunk_size several batches share one block (a batched matmul). On CPU blocks are cut
    further to fit the cache. On CUDA, TF32 matmuls are used only if the global torch setting
    enables them (off by default); keep it off, since TF32 errors (~1e-3) are scaled by 1/τ.
    Returns float32 scores of shape (n,).
    """
    n = _check_pair(image_emb, text_emb)
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if n == 0:
        _check_plan_args(1, batch_size, k)
        return np.empty(0, dtype=np.float32)
    _check_plan_args(n, batch_size, k)
    rngs = _round_rngs(seed, k)
    tau = float(temperature)
    dev = _resolve_device(device)
    bsz = min(batch_size, n)

    # Logits are taken in base 2, L₂ = s·log2(e)/τ, because exp2 is ~3× cheaper than exp on
    # CPU and e^x = 2^(x·log2 e) exactly. |s| ≤ 1 after renormalising, so one scalar shift
    # c = log2(e)/τ − h with h = 124 − log2(B) keeps every term 2^(L₂−c) ≤ 2^h and any sum of B
    # of them ≤ 2^124 < float32 max. The shift enters the matmul as an extra column
    # (−c on the image side, 1 on the text side), so the product is already L₂ − c.
    scale = _LOG2E / tau
    shift = scale * (1.0 + 1e-6) - (124.0 - math.log2(bsz))
    img = _on_device(image_emb, dev)
    txt = _on_device(text_emb, dev)
    inv_f, inv_g, diag = _row_stats(img, txt, 4096)
    img_factor = inv_f.mul_(scale)  # image rows become base-2 logit weights
    dim = img.shape[1]

    # Tiles of the logit block. On GPU a tile is chunk_size rows × the whole batch. On CPU it
    # is further cut (rows and columns) to stay in the per-core L2 cache, where exp2 and the
    # two sums cost a few % of the matmul; a DRAM-sized block would make them memory-bound.
    if dev.type == "cpu":
        rows_cap, cols_cap = _CPU_TILE_ROWS, _CPU_TILE_COLS
    else:
        rows_cap, cols_cap = chunk_size, bsz
    tile_rows = min(chunk_size, bsz, rows_cap)
    tile_cols = min(bsz, cols_cap)
    # Small batches: g whole batches share one tile (batched matmul) so that per-call overhead
    # is paid once per tile; g·B ≤ chunk_size keeps the memory bound.
    group = max(1, min(chunk_size, rows_cap * cols_cap // bsz) // bsz)
    tile_buf = torch.empty(group * tile_rows * tile_cols, dtype=torch.float32, device=dev)
    # Gathered batches, float32, with the shift column preset once: −c (images), 1 (texts).
    img_buf = torch.empty(group * bsz, dim + 1, dtype=torch.float32, device=dev)
    txt_buf = torch.empty_like(img_buf)
    img_buf[:, dim] = -shift
    txt_buf[:, dim] = 1.0
    src_buf = torch.empty(group * bsz, dim, dtype=img.dtype, device=dev)
    row_tiles = _tiles(bsz, tile_rows)
    col_tiles = _tiles(bsz, tile_cols)

    r_sum = torch.zeros(n, dtype=torch.float64, device=dev)
    for rng in rngs:
        plan = _round_plan(n, bsz, rng)
        nb = plan.num_batches
        idx = torch.from_numpy(plan.batches).to(dev)
        # Σ_j 2^(L₂−c) per row and per column of every batch of the round.
        row_sum = torch.zeros(nb, bsz, dtype=torch.float32, device=dev)
        col_sum = torch.zeros(nb, bsz, dtype=torch.float32, device=dev)
        for b0 in range(0, nb, group):
            g = min(group, nb - b0)
            sel = idx[b0 : b0 + g].reshape(-1)
            _gather(img, img_factor, sel, src_buf, img_buf[: g * bsz])
            _gather(txt, inv_g, sel, src_buf, txt_buf[: g * bsz])
            ib = img_buf[: g * bsz].view(g, bsz, dim + 1)
            tbt = txt_buf[: g * bsz].view(g, bsz, dim + 1).transpose(1, 2)
            rs, cs = row_sum[b0 : b0 + g], col_sum[b0 : b0 + g]
            for r0, r1 in row_tiles:
                for c0, c1 in col_tiles:
                    tile = tile_buf[: g * (r1 - r0) * (c1 - c0)].view(g, r1 - r0, c1 - c0)
                    if g == 1:
                        torch.mm(ib[0, r0:r1], tbt[0, :, c0:c1], out=tile[0])
                    else:
                        torch.bmm(ib[:, r0:r1], tbt[:, :, c0:c1], out=tile)
                    torch.special.exp2(tile, out=tile)
                    # add_ on views (`x[...] += y` would add a setitem copy).
                    rs[:, r0:r1].add_(tile.sum(dim=2))
                    cs[:, c0:c1].add_(tile.sum(dim=1))

        # A sum below the floor lost terms to underflow (all similarities of that row/column
        # far below the bound, only for τ well under 0.01): redo those exactly. inf/NaN cannot
        # occur by construction but are caught the same way.
        ok = (row_sum > _SUM_FLOOR) & (row_sum < math.inf) & (col_sum > _SUM_FLOOR)
        ok &= col_sum < math.inf
        row_sum.log2_()
        col_sum.log2_()
        if not bool(ok.all()):
            for b in torch.nonzero(~ok.all(dim=1)).flatten().tolist():
                members = idx[b]
                ib = torch.empty(bsz, dim + 1, dtype=torch.float32, device=dev)
                tb = torch.empty_like(ib)
                ib[:, dim] = -shift
                tb[:, dim] = 1.0
                _gather(img, img_factor, members, src_buf, ib)
                _gather(txt, inv_g, members, src_buf, tb)
                bad = torch.nonzero(~ok[b]).flatten()
                row_sum[b, bad] = _log2_sum_exp2_rows(ib, tb, bad, tile_rows)
                col_sum[b, bad] = _log2_sum_exp2_rows(tb, ib, bad, tile_rows)
        # R = (τ/2)·(lse_row + lse_col) with lse = ln2·(c + log2 Σ).
        r_vals = row_sum.add_(col_sum).add_(2.0 * shift).mul_(0.5 * tau * _LN2)
        scored = torch.from_numpy(plan.scored_mask).to(dev)
        r_sum.index_add_(0, idx[scored], r_vals[scored].to(torch.float64))

    scores = diag - r_sum / k
    return scores.to(torch.float32).cpu().numpy()
