"""NormSim_2-D: NormSim_2 with the pool as its own target (Wang et al. 2024), seeded.

Without a downstream target, the pool's own second moment S = Σ f fᵀ stands in for GᵀG. The
procedure over the candidate set C (unit-norm image embeddings) with a keep count m:

1. S from a seeded sample of `sample_fraction` (default 10%) of C;
2. for each of `rounds` rounds: score every remaining x by fᵀSf, drop the lowest
   ceil((|C| - m) / rounds) (ties: the later candidate goes first), and recompute S from all
   candidates that remain (not only the initial sample's survivors); stop once m remain.

The scale of S does not change any ranking, so sums are used. Returned scores are fᵀSf under the
last S each sample was scored with (the drop-time S for dropped samples).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from curate.scoring.normsim import normsim_2, second_moment

DEFAULT_ROUNDS = 10
DEFAULT_SAMPLE_FRACTION = 0.1


def normsim2_d(
    embeddings: np.ndarray,
    keep: int,
    *,
    rounds: int = DEFAULT_ROUNDS,
    sample_fraction: float = DEFAULT_SAMPLE_FRACTION,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, fᵀSf scores) over the rows of `embeddings`; exactly min(keep, n) kept."""
    n = embeddings.shape[0]
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0.0 < sample_fraction <= 1.0:
        raise ValueError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    keep = max(0, min(keep, n))
    scores = np.zeros(n, dtype=np.float32)
    if n == 0:
        return np.zeros(0, dtype=bool), scores
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=max(1, math.ceil(sample_fraction * n)), replace=False))
    moment = second_moment(embeddings[sample], device=device)
    remaining = np.arange(n)
    chunk = math.ceil((n - keep) / rounds)
    while remaining.size > keep:
        current = normsim_2(embeddings[remaining], moment, device=device) ** 2
        scores[remaining] = current
        drop = min(chunk, remaining.size - keep)
        # Lowest score first; among equal scores the later index goes first (deterministic).
        order = np.lexsort((-remaining, current))
        remaining = np.sort(remaining[order[drop:]])
        if remaining.size > keep:
            moment = second_moment(embeddings[remaining], device=device)
    if remaining.size == n:  # nothing to drop: still report every sample's score
        scores[remaining] = normsim_2(embeddings[remaining], moment, device=device) ** 2
    mask = np.zeros(n, dtype=bool)
    mask[remaining] = True
    return mask, scores
