"""Per-sample data-curation scores computed from stored (L2-normalised) CLIP embeddings.

- :func:`clipscore`: cosine of each image with its own caption (DataComp's CLIPScore).
- :func:`negclip`: negCLIPLoss, CLIPScore minus a batch-contrastive normaliser averaged over K
  seeded rounds of equal-size batches (:func:`negclip_batch_plan` gives those batches).
- :func:`normsim` and its variants: how close each pool image is to a target set
  (:func:`second_moment` streams the target once for p = 2).

All are pure functions over embedding arrays (numpy or torch) returning float32 numpy arrays.
"""

from __future__ import annotations

from curate.scoring.clipscore import clipscore
from curate.scoring.negclip import BatchPlan, negclip, negclip_batch_plan
from curate.scoring.normsim import normsim, normsim_2, normsim_inf, normsim_p, second_moment

__all__ = [
    "BatchPlan",
    "clipscore",
    "negclip",
    "negclip_batch_plan",
    "normsim",
    "normsim_2",
    "normsim_inf",
    "normsim_p",
    "second_moment",
]
