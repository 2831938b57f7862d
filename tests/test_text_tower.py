"""The shortened text tower against open_clip's own full-context encode_text."""

from __future__ import annotations

import random

import pytest
import torch

from curate.models.loading import load_model
from curate.models.text_tower import cut_agrees, encode_text, shortened_context

WORDS = tuple(
    [
        "a",
        "photo",
        "of",
        "red",
        "blue",
        "green",
        "circle",
        "square",
        "dog",
        "cat",
        "on",
        "the",
        "grass",
        "near",
        "tree",
    ]
)


@pytest.fixture(scope="module")
def tiny():
    return load_model("curate-tiny", None, device="cpu")


def captions(rng: random.Random, count: int, longest: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(0, longest))) for _ in range(count)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cut_tower_equals_the_full_context(tiny, seed: int) -> None:
    rng = random.Random(seed)
    tokens = tiny.tokenizer(captions(rng, 24, longest=12))
    ends = tokens.argmax(dim=-1)  # open_clip reads the end-of-text token (the largest id)
    assert shortened_context(tiny.model, tokens) == int(ends.max()) + 1 < tokens.shape[1]
    with torch.inference_mode():
        full = tiny.model.encode_text(tokens)
        cut = encode_text(tiny.model, tokens)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
    assert tiny.short_text  # the loader's probe agreed


def test_full_context_batches_and_other_towers_are_not_cut(tiny) -> None:
    model = tiny.model
    full_row = tiny.tokenizer([" ".join(["dog"] * 100)])  # fills the context: nothing to cut
    assert shortened_context(model, full_row) is None
    tokens = tiny.tokenizer(["a red circle"])
    saved_pool, saved_mask = model.text_pool_type, model.attn_mask
    try:
        model.text_pool_type = "last"  # the last position is read: cutting would change it
        assert shortened_context(model, tokens) is None
        model.text_pool_type = saved_pool
        model.attn_mask = None  # not causal: every position reaches every other
        assert shortened_context(model, tokens) is None
    finally:
        model.text_pool_type, model.attn_mask = saved_pool, saved_mask
    assert shortened_context(model, tokens) is not None


def test_probe_refuses_a_tower_built_differently(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tiny.tokenizer(["a red circle", "two dogs"])
    assert cut_agrees(tiny.model, tokens)
    original = type(tiny.model).encode_text

    # An open_clip whose encode_text does more than the cut path reproduces.
    def doubled(self, text, normalize=False):
        return 2 * original(self, text)

    monkeypatch.setattr(type(tiny.model), "encode_text", doubled)
    assert not cut_agrees(tiny.model, tokens)
