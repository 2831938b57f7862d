"""Attribute labels from images: zero-shot classification with the pool's own CLIP model.

Each class is a prompt ensemble (CLIP's recipe): the prompts' L2-normalised text embeddings are
averaged and the mean is normalised again. A sample's class probabilities are
``softmax(logit_scale · image_emb · class_embᵀ)`` with the model's own logit scale. A label is
given only when the top probability reaches the confidence threshold; otherwise the sample stays
unlabelled ("unknown"), as the published audits do.

Person detection is the same classifier over one "person" ensemble and each "other" prompt as a
class of its own; the person probability is the first column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["class_probabilities", "confident_labels", "prompt_ensembles"]

Encoder = Callable[[list[str]], np.ndarray]


def prompt_ensembles(encode: Encoder, prompt_lists: Sequence[Sequence[str]]) -> np.ndarray:
    """(classes, dim) float32: per class, the normalised mean of its prompts' embeddings."""
    flat = [p for prompts in prompt_lists for p in prompts]
    if not flat or any(not prompts for prompts in prompt_lists):
        raise ValueError("every class needs at least one prompt")
    emb = np.asarray(encode(flat), dtype=np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out = np.empty((len(prompt_lists), emb.shape[1]), dtype=np.float64)
    start = 0
    for i, prompts in enumerate(prompt_lists):
        mean = emb[start : start + len(prompts)].mean(axis=0)
        out[i] = mean / np.linalg.norm(mean)
        start += len(prompts)
    return out.astype(np.float32)


def class_probabilities(
    image_emb: np.ndarray, class_emb: np.ndarray, logit_scale: float, chunk: int = 65536
) -> np.ndarray:
    """(N, classes) float32 softmax probabilities; rows of zeros (missing images) give NaN."""
    n = image_emb.shape[0]
    out = np.empty((n, class_emb.shape[0]), dtype=np.float32)
    classes = class_emb.astype(np.float32).T
    for start in range(0, n, chunk):
        block = image_emb[start : start + chunk].astype(np.float32)
        logits = logit_scale * (block @ classes)
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        missing = ~np.any(block != 0, axis=1)
        logits[missing] = np.nan
        out[start : start + chunk] = logits
    return out


def confident_labels(probs: np.ndarray, min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the argmax class (−1 when its probability is below the threshold or NaN) and
    that probability (NaN for missing rows)."""
    filled = np.nan_to_num(probs, nan=-1.0)
    best = filled.argmax(axis=1) if probs.shape[1] else np.zeros(len(probs), dtype=np.int64)
    confidence = (
        probs[np.arange(len(probs)), best] if probs.shape[1] else np.full(len(probs), np.nan)
    )
    labels = np.where(np.nan_to_num(confidence, nan=-1.0) >= min_confidence, best, -1)
    return labels.astype(np.int64), confidence.astype(np.float32)
