"""NormSim (Wang et al., NeurIPS 2024): how close a pool image is to a target set, by image
embeddings only. Pool embedding f (of x), target embeddings G = [g_t] (same teacher):

    NormSim_p(x) = ( Σ_{t∈T} |f·g_t|^p )^(1/p)        NormSim_∞(x) = max_t |f·g_t|
    NormSim_2(x)² = fᵀ (GᵀG) f

NormSim_2 needs only the D×D second moment GᵀG (the target is streamed once). The others are
chunked matmuls (pool chunk × target chunk) with a running reduction, so the N×T similarity
matrix is never held. Rows of both sets are renormalised in float32 (float16 storage shifts
norms by ~1e-3), and all scores are float32 arrays of shape (N,).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from curate.scoring.clipscore import _check_finite, _check_matrix, _resolve_device, _to_rows

__all__ = ["normsim", "normsim_2", "normsim_inf", "normsim_p", "second_moment"]

Array = np.ndarray | torch.Tensor


def _check_chunk(chunk_size: int, name: str = "chunk_size") -> None:
    if chunk_size < 1:
        raise ValueError(f"{name} must be >= 1, got {chunk_size}")


def _check_dims(pool: Array, target: Array) -> tuple[int, int]:
    n, d = _check_matrix(pool, "pool")
    _, dt = _check_matrix(target, "target")
    if d != dt:
        raise ValueError(f"pool and target must have the same embedding dim, got {d} and {dt}")
    return n, d


def second_moment(
    target: Array, *, chunk_size: int = 65536, device: str | torch.device | None = None
) -> np.ndarray:
    """M = GᵀG = Σ_t g_t g_tᵀ, a D×D float64 array, streaming G in row chunks.

    On CPU each chunk's product is taken in float64; on GPU in float32 per chunk (fast), with the
    running sum kept in float64 so long targets do not lose precision.
    """
    _, d = _check_matrix(target, "target")
    _check_chunk(chunk_size)
    dev = _resolve_device(device)
    acc = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for start in range(0, target.shape[0], chunk_size):
        g = _to_rows(target[start : start + chunk_size], dev)
        _check_finite(g, "target")
        if dev.type == "cpu":
            g = g.to(torch.float64)
            acc.addmm_(g.T, g)
        else:
            acc += (g.T @ g).to(torch.float64)
    return acc.cpu().numpy()


def _moment_factor(moment: Array, d: int, device: torch.device) -> torch.Tensor:
    """W (D×D, float32) with WᵀW = M, so fᵀMf = ‖W f‖².

    From the eigendecomposition M = V Λ Vᵀ in float64: W = Λ₊^(1/2) Vᵀ, negative round-off
    eigenvalues clamped to 0. A sum of squares has no cancellation, so float32 is enough for the
    per-sample work, and the result is never negative (the "clamp tiny negatives" of the direct
    quadratic form is built in).
    """
    m = torch.as_tensor(np.ascontiguousarray(moment) if isinstance(moment, np.ndarray) else moment)
    if m.ndim != 2 or tuple(m.shape) != (d, d):
        raise ValueError(f"moment must be a {d}×{d} matrix (D×D), got shape {tuple(m.shape)}")
    m = m.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("moment contains NaN or infinite values")
    m = 0.5 * (m + m.T)  # symmetrise: eigh reads only one triangle
    evals, evecs = torch.linalg.eigh(m)
    w = evals.clamp_min(0.0).sqrt().unsqueeze(1) * evecs.T
    return w.to(device=device, dtype=torch.float32)


def normsim_2(
    pool: Array,
    moment: Array,
    *,
    device: str | torch.device | None = None,
    chunk_size: int = 65536,
) -> np.ndarray:
    """NormSim_2(x) = sqrt(fᵀ M f) with M = GᵀG (from :func:`second_moment`)."""
    n, d = _check_matrix(pool, "pool")
    _check_chunk(chunk_size)
    dev = _resolve_device(device)
    w_t = _moment_factor(moment, d, dev).T.contiguous()
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk_size):
        f = _to_rows(pool[start : start + chunk_size], dev)
        _check_finite(f, "pool")
        proj = f @ w_t  # rows are (W f)ᵀ
        out[start : start + f.shape[0]] = torch.linalg.vector_norm(proj, dim=1).cpu().numpy()
    return out


def _target_chunks(target: Array, dev: torch.device, target_chunk_size: int) -> list[torch.Tensor]:
    """The target, converted and checked once, as row chunks (views of one device tensor)."""
    g = _to_rows(target, dev)
    _check_finite(g, "target")
    return list(torch.split(g, target_chunk_size))


def _prepare_target(
    pool: Array,
    target: Array,
    device: str | torch.device | None,
    chunk_size: int,
    target_chunk_size: int,
) -> tuple[int, torch.device, list[torch.Tensor]]:
    """Validate a pool/target pair and put the target's normalised chunks on the device."""
    n, _ = _check_dims(pool, target)
    _check_chunk(chunk_size)
    _check_chunk(target_chunk_size, "target_chunk_size")
    if target.shape[0] == 0:
        raise ValueError("target must hold at least one embedding")
    dev = _resolve_device(device)
    return n, dev, _target_chunks(target, dev, target_chunk_size)


def normsim_inf(
    pool: Array,
    target: Array,
    *,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    target_chunk_size: int = 65536,
) -> np.ndarray:
    """NormSim_∞(x) = max_t |f·g_t|: pool chunks × target chunks with a running max."""
    n, dev, targets = _prepare_target(pool, target, device, chunk_size, target_chunk_size)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk_size):
        f = _to_rows(pool[start : start + chunk_size], dev)
        _check_finite(f, "pool")
        best = torch.zeros(f.shape[0], dtype=torch.float32, device=dev)  # |·| ≥ 0
        for g in targets:
            best = torch.maximum(best, (f @ g.T).abs_().amax(dim=1))
        out[start : start + f.shape[0]] = best.cpu().numpy()
    return out


def normsim_p(
    pool: Array,
    target: Array,
    p: float,
    *,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    target_chunk_size: int = 65536,
) -> np.ndarray:
    """NormSim_p(x) = (Σ_t |f·g_t|^p)^(1/p) for finite p ≥ 1 (p = inf is passed to normsim_inf).

    Stable for large p: with m the running max of |f·g_t| over the target chunks seen so far,
    acc = Σ (|s|/m)^p ≤ T never overflows; when m grows, acc is rescaled by (m_old/m_new)^p.
    Result = m · acc^(1/p). acc is kept in float64 across chunks.
    """
    p = _parse_p(p)
    if math.isinf(p):
        return normsim_inf(
            pool, target, device=device, chunk_size=chunk_size, target_chunk_size=target_chunk_size
        )
    n, dev, targets = _prepare_target(pool, target, device, chunk_size, target_chunk_size)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk_size):
        f = _to_rows(pool[start : start + chunk_size], dev)
        _check_finite(f, "pool")
        rows = f.shape[0]
        m = torch.zeros(rows, dtype=torch.float32, device=dev)
        acc = torch.zeros(rows, dtype=torch.float64, device=dev)
        for g in targets:
            a = (f @ g.T).abs_()
            m_new = torch.maximum(m, a.amax(dim=1))
            # Rows whose max is still 0 contribute nothing yet; divide by 1 to avoid 0/0.
            denom = torch.where(m_new > 0, m_new, torch.ones_like(m_new))
            acc.mul_((m / denom).to(torch.float64).pow_(p))
            acc.add_(a.div_(denom.unsqueeze(1)).pow_(p).sum(dim=1, dtype=torch.float64))
            m = m_new
        res = m.to(torch.float64) * acc.pow(1.0 / p)
        out[start : start + rows] = res.to(torch.float32).cpu().numpy()
    return out


def _parse_p(p: float | str) -> float:
    """p as a float: numbers, or strings such as "2", "inf", "infinity"; p ≥ 1 required."""
    if isinstance(p, bool):
        raise ValueError(f"p must be a number >= 1 or 'inf', got {p!r}")
    try:
        val = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"p must be a number >= 1 or 'inf', got {p!r}") from None
    if math.isnan(val) or val < 1:
        raise ValueError(f"p must be >= 1 (NormSim_p is a norm only for p >= 1), got {p!r}")
    return val


def normsim(
    pool: Array,
    target: Array | None = None,
    *,
    p: float | str,
    moment: Array | None = None,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    target_chunk_size: int = 65536,
) -> np.ndarray:
    """NormSim_p of every pool row against the target set.

    p == 2: via the moment matrix GᵀG (``moment`` if given, else computed from ``target``);
    p == inf (float('inf') or "inf"): :func:`normsim_inf`; any other p ≥ 1: :func:`normsim_p`.
    ``chunk_size`` (pool rows per step) defaults to each function's own default.
    """
    pv = _parse_p(p)
    kw = {} if chunk_size is None else {"chunk_size": chunk_size}
    if pv == 2:
        if moment is None:
            if target is None:
                raise ValueError("normsim with p=2 needs a target or a precomputed moment")
            moment = second_moment(target, device=device)
        return normsim_2(pool, moment, device=device, **kw)
    if target is None:
        raise ValueError(f"normsim with p={p!r} needs a target (only p=2 can use a moment)")
    if math.isinf(pv):
        return normsim_inf(pool, target, device=device, target_chunk_size=target_chunk_size, **kw)
    return normsim_p(pool, target, pv, device=device, target_chunk_size=target_chunk_size, **kw)
