"""CLIPScore: the cosine similarity of each image embedding with its own caption's embedding.

    CLIPScore(i) = s_ii = f_i · g_i / (‖f_i‖ ‖g_i‖)

DataComp stores this raw cosine (not the captioning metric 2.5·max(s, 0)·100), so that is what is
returned. This module also holds the small input helpers shared by the other scoring modules
(device choice, conversion to float32 rows, shape checks).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["clipscore"]

# Norms below this are treated as zero vectors (they stay zero instead of turning into NaN).
_TINY_NORM = 1e-12


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """None → CUDA when available, else CPU; strings and devices are passed through."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_matrix(x: np.ndarray | torch.Tensor, name: str) -> tuple[int, int]:
    """Shape of a 2-D embedding matrix, with a clear error for anything else."""
    if not isinstance(x, np.ndarray | torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows × dim), got shape {tuple(x.shape)}")
    if not (
        x.dtype.is_floating_point
        if isinstance(x, torch.Tensor)
        else np.issubdtype(x.dtype, np.floating)
    ):
        raise ValueError(f"{name} must hold floating-point values, got dtype {x.dtype}")
    return int(x.shape[0]), int(x.shape[1])


def _check_pair(image_emb: np.ndarray | torch.Tensor, text_emb: np.ndarray | torch.Tensor) -> int:
    """Both matrices 2-D with identical shapes; returns the row count."""
    ni, di = _check_matrix(image_emb, "image_emb")
    nt, dt = _check_matrix(text_emb, "text_emb")
    if (ni, di) != (nt, dt):
        raise ValueError(
            f"image_emb and text_emb must have the same shape (one row per pair), "
            f"got {(ni, di)} and {(nt, dt)}"
        )
    return ni


def _to_rows(
    x: np.ndarray | torch.Tensor,
    device: torch.device,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """float32 copy of ``x`` on ``device``, rows renormalised to unit L2 norm.

    Embeddings are stored as float16, whose rounding moves norms by ~1e-3; renormalising in
    float32 removes that before similarities are taken. The caller's array is never modified.
    """
    src = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.detach()
    t = src.to(device=device, dtype=torch.float32)
    # ``to`` returns the input itself when nothing changes: then work out of place so the
    # caller's memory (a numpy array or tensor) is never written.
    shared = t.data_ptr() == src.data_ptr()
    if normalize:
        norms = torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min_(_TINY_NORM)
        t = t / norms if shared else t.div_(norms)
    elif shared:
        t = t.clone()
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    """NaN/inf would silently poison whole batches (negCLIPLoss) or every row (NormSim)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def clipscore(
    image_emb: np.ndarray | torch.Tensor,
    text_emb: np.ndarray | torch.Tensor,
    *,
    device: str | torch.device | None = None,
    chunk_size: int = 65536,
) -> np.ndarray:
    """Row-wise cosine similarity s_ii = f_i·g_i/(‖f_i‖‖g_i‖), float32 array of shape (n,).

    Rows are renormalised in float32 (float16 storage shifts norms); processed in row chunks of
    ``chunk_size`` so only a chunk of each matrix is on ``device`` at a time.
    """
    n = _check_pair(image_emb, text_emb)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dev = _resolve_device(device)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        f = _to_rows(image_emb[start:stop], dev)
        g = _to_rows(text_emb[start:stop], dev)
        out[start:stop] = (f * g).sum(dim=1).cpu().numpy()
    return out
