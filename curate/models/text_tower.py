"""The text tower on the shortest context that holds every caption of the batch.

open_clip's CLIP text tower runs all `context_length` positions (77 for OpenAI's models) of
every caption, however short. Its attention is causal and its output is read at one position
per caption (the end-of-text token: ``argmax`` or ``eos`` pooling), so positions after the last
such token of a batch cannot change the result: cutting the tokens, the positional embedding
and the causal mask to that length computes the same embedding with less work (web captions
hold ~15 tokens: the text tower then costs a fifth of its full-context time). The sums run over
fewer masked positions, so the floats agree to rounding (~1e-6), not bit for bit.

Towers where later positions do matter (no causal mask, other pooling, Hugging Face text models
in ``CustomTextCLIP``) run unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["cut_agrees", "encode_text", "shortened_context"]


def shortened_context(model: torch.nn.Module, tokens: torch.Tensor) -> int | None:
    """The context length that gives `model` the same text embeddings for `tokens` (one past
    the last read position of any row), or None when the tower cannot be cut."""
    from open_clip.model import CLIP

    if type(model) is not CLIP or getattr(model, "attn_mask", None) is None:
        return None
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        return None
    pool = getattr(model, "text_pool_type", None)
    if pool == "argmax":
        read = tokens.argmax(dim=-1)
    elif pool == "eos" and getattr(model, "text_eos_id", None) is not None:
        read = (tokens == model.text_eos_id).int().argmax(dim=-1)  # type: ignore[operator]
    else:
        return None
    length = int(read.max()) + 1
    return length if length < tokens.shape[1] else None


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` (unnormalised), on the shortened context where it is exact
    (`shortened_context`)."""
    length = shortened_context(model, tokens)
    if length is None:
        return model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    eos = getattr(model, "text_eos_id", None)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=eos)
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def cut_agrees(model: torch.nn.Module, tokens: torch.Tensor, tolerance: float = 1e-4) -> bool:
    """Whether the shortened tower gives `model`'s own embeddings for the probe `tokens` (to
    `tolerance`, relative): checked once per loaded model, so an open_clip whose text tower
    is built differently falls back to the full context instead of computing something else."""
    if shortened_context(model, tokens) is None:
        return False
    try:
        with torch.inference_mode():
            full = model.encode_text(tokens).float()
            cut = encode_text(model, tokens).float()
    except Exception:  # a tower the probe cannot run (vocabulary, shapes): keep it whole
        return False
    scale = float(full.abs().max()) or 1.0
    return full.shape == cut.shape and float((full - cut).abs().max()) <= tolerance * scale
