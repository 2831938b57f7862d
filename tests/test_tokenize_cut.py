"""Captions are cut before BPE (issue 13): open_clip's ids exactly, and a huge caption is cheap.

The oracle is open_clip's own `SimpleTokenizer` called on the whole, uncut text (a separate
instance, so no BPE memo is shared). Time is never measured: the tests bound what reaches BPE.
"""

from __future__ import annotations

import pickle
import random
import string
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from shardkit import make_shard

from curate.embedding.loader import DecodeDataset, plan_units

# 75 tokens of at most 32 bytes (the longest vocabulary entry) and 256 bytes of context after.
PIECE_LIMIT = 75 * 32 + 256
HUGE = 1_000_000

_WORDS = [
    "a", "photo", "of", "the", "dog", "cat", "red", "blue", "car", "on", "in", "at", "with",
    "and", "running", "jumped", "over", "lazy", "brown", "fox", "street", "tree", "house",
    "people", "woman", "man", "child", "beautiful", "sunset", "mountain", "lake", "2019", "42",
]  # fmt: skip
_ODD = [
    "&amp;", "&lt;b&gt;", "&#39;", "&amp;amp;amp;", "&nbsp;", "&quot;hi&quot;", "&eacute;",
    "Café", "東京", "日本語のテキスト", "😀", "👍🏽", "❤️", "Ã©tÃ©", "ﬂubberiﬁc", "ＬＯＵＤ",
    "Straße", "İstanbul", "Ελληνικά", "русский", "العربية", "עברית", "한국어", "\u0301e",
    "don't", "it's", "we'll", "'s", "<start_of_text>", "<end_of_text>", "<b>", "...", "!!",
    "--", "(", ")", ",", ".", "#tag", "@user", "http://example.com/x?y=1", "$9.99", "½",
    "\x00", "\u200b", "\u00ad", "\ufeff",
]  # fmt: skip
_SPACES = [" ", " ", " ", "  ", "\t", "\n", "\u3000", "\u00a0", "", " \r\n "]


def _vocab_pieces() -> list[str]:
    encoder = SimpleTokenizer().encoder
    return [t for t in encoder if t.isascii() and t.isalpha() and len(t) >= 3][:20000]


_PIECES = _vocab_pieces()


def _long_word(rng: random.Random, size: int) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return "".join(rng.choices(string.ascii_lowercase, k=size))
    if kind == 1:  # made of vocabulary entries, so BPE builds long tokens
        out = ""
        while len(out) < size:
            out += rng.choice(_PIECES)
        return out[:size]
    if kind == 2:
        unit = "".join(rng.choices(string.ascii_letters, k=rng.randint(1, 7)))
        return (unit * size)[:size]
    if kind == 3:
        return "".join(rng.choices(string.punctuation, k=size))
    if kind == 4:
        return "".join(rng.choices("😀😂🎉❤👍🔥✨.!?-~*", k=size // 2))
    if kind == 5:
        return "".join(rng.choices("日本語中文字東京한국어", k=size // 3))
    if kind == 6:
        return "".join(rng.choices("éàüßøñçœæÉÀÜ" + string.ascii_lowercase, k=size))
    return "".join(rng.choices("aeiou", k=size))


def _caption(rng: random.Random) -> str:
    parts: list[str] = []
    for _ in range(rng.choice([0, 1, 3, 8, 20, 40, 70, 74, 75, 76, 80, 120])):
        roll = rng.random()
        if roll < 0.6:
            word = rng.choice(_WORDS)
            parts.append(word.upper() if rng.random() < 0.1 else word)
        elif roll < 0.9:
            parts.append(rng.choice(_ODD))
        else:
            parts.append("".join(rng.choices(string.printable, k=rng.randint(1, 12))))
    if rng.random() < 0.4:  # one long word somewhere
        parts.insert(rng.randint(0, len(parts)), _long_word(rng, rng.randint(200, 2000)))
    return "".join(p + rng.choice(_SPACES) for p in parts)


def _captions(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    texts = [_caption(rng) for _ in range(n)]
    for k in (73, 74, 75, 76, 77):  # around CLIP's 75 content tokens
        texts += ["dog " * k, "&amp; " * k, "\u3000".join(["cat"] * k), "ab" * (16 * k)]
    texts += ["", " ", "\n", "<start_of_text>", "&", "a" * 2400, "z" * 2656, "😀" * 700]
    return texts


def _score_path_tokenizer(tokenizer: SimpleTokenizer) -> Callable[[list[str]], torch.Tensor]:
    """The tokenizer the embed/score stage's workers call (`DecodeDataset` holds it)."""
    return DecodeDataset([], lambda image: image, tokenizer, batch_size=8).tokenizer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_path_ids_are_open_clips(seed: int) -> None:
    oracle = SimpleTokenizer()
    tokenize = _score_path_tokenizer(SimpleTokenizer())
    texts = _captions(seed, 150)
    for start in range(0, len(texts), 16):
        batch = texts[start : start + 16]
        expected, got = oracle(batch), tokenize(batch)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        for text, want, have in zip(batch, expected, got, strict=True):
            assert torch.equal(want, have), repr(text[:120])


def test_a_long_word_after_any_number_of_tokens() -> None:
    """Every `need` the word-prefix path can be asked for, on each kind of long word."""
    rng = random.Random(7)
    oracle = SimpleTokenizer()
    tokenize = _score_path_tokenizer(SimpleTokenizer())
    for size in (300, 900, 1800, 3000):
        word = _long_word(rng, size)
        texts = [" ".join(["dog"] * k + [word, "cat"]) for k in range(0, 78)]
        assert torch.equal(oracle(texts), tokenize(texts)), word[:60]


def test_other_cleaning_and_context_lengths() -> None:
    from curate.models.tokens import CappedTokenizer

    texts = _captions(5, 60)
    for kwargs in ({"clean": "canonicalize"}, {"clean": "whitespace"}, {"context_length": 32}):
        oracle, capped = SimpleTokenizer(**kwargs), CappedTokenizer(SimpleTokenizer(**kwargs))
        assert torch.equal(oracle(texts), capped(texts)), kwargs
    oracle, capped = SimpleTokenizer(), CappedTokenizer(SimpleTokenizer())
    for length in (2, 3, 16, 100):
        assert torch.equal(oracle(texts, context_length=length), capped(texts, length))
    assert torch.equal(oracle("a single dog"), capped("a single dog"))
    assert torch.equal(oracle([]), capped([]))


def test_the_cut_word_path_agrees_with_the_whole_word() -> None:
    """Words long enough to be cut (over 8 bytes per needed token + 256), every kind."""
    from curate.models.tokens import encode_prefix

    rng = random.Random(11)
    oracle, cut = SimpleTokenizer(), SimpleTokenizer()
    for _ in range(60):
        word = _long_word(rng, rng.randint(400, 2000))
        full = oracle.encode(word)
        for need in (1, 2, 5, 20, 40, 75):
            assert encode_prefix(cut, word, need) == full[:need], (need, word[:60])


def test_wrapping() -> None:
    from curate.models.tokens import CappedTokenizer, cap_tokenizer

    plain = SimpleTokenizer(context_length=32)
    capped = cap_tokenizer(plain)
    assert isinstance(capped, CappedTokenizer) and cap_tokenizer(capped) is capped
    assert capped.context_length == 32 and capped.eot_token_id == plain.eot_token_id
    again = pickle.loads(pickle.dumps(capped))  # DataLoader workers get a pickled copy
    assert torch.equal(again(["a dog"]), plain(["a dog"]))

    def other(texts: list[str]) -> torch.Tensor:  # an HF or SigLIP tokenizer: left as it is
        return torch.zeros(len(texts), 4, dtype=torch.long)

    assert cap_tokenizer(other) is other

    class Sub(SimpleTokenizer):  # may encode otherwise: not capped
        pass

    sub = Sub()
    assert cap_tokenizer(sub) is sub
    masked = SimpleTokenizer(reduction_mask="simple")  # needs every token: falls through
    assert cap_tokenizer(masked)(["a dog"]).shape == (1, 77)


# --- a huge caption: bounded work -------------------------------------------------------------


def _spy_bpe(tokenizer: SimpleTokenizer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the length of every piece handed to BPE; huge pieces are not really run."""
    real = tokenizer.bpe
    seen: list[int] = []

    def bpe(token: str) -> str:
        seen.append(len(token))
        return real(token) if len(token) <= 4096 else "x</w>"  # the real one takes hours

    monkeypatch.setattr(tokenizer, "bpe", bpe)
    return seen


def _huge_captions() -> list[str]:
    rng = random.Random(3)
    return [
        "".join(rng.choices(string.ascii_lowercase, k=HUGE)),  # 1 MB without a space
        " ".join(rng.choice(_WORDS) for _ in range(HUGE // 5)),  # 1 MB of words
        "".join(rng.choices("日本語中文字東京", k=HUGE // 3)),  # 1 MB of CJK letters
        "😀" * (HUGE // 4),  # 1 MB of one emoji (a punctuation run)
    ]


def test_huge_captions_in_the_score_path_reach_bpe_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captions = ["a photo of a dog", *_huge_captions()]
    shard = tmp_path / "00000.tar"
    make_shard(shard, len(captions), caption_fn=captions.__getitem__)
    tokenizer = SimpleTokenizer()
    seen = _spy_bpe(tokenizer, monkeypatch)
    dataset = DecodeDataset(
        plan_units([str(shard)], [0], 1), lambda image: torch.zeros(3, 4, 4), tokenizer,
        batch_size=8,
    )  # fmt: skip
    (batch,) = list(dataset)
    assert [row.error for row in batch.rows] == [None] * len(captions)
    assert batch.tokens is not None and batch.tokens.shape == (len(captions), 77)
    assert max(seen) <= PIECE_LIMIT  # never a whole 1 MB word
    assert sum(seen) <= len(captions) * 2 * PIECE_LIMIT
    assert len(seen) <= len(captions) * 80  # words after the 75th token are never looked at
    oracle = SimpleTokenizer()
    assert torch.equal(batch.tokens[0], oracle(captions[0])[0])
    for text, row in zip(captions[1:], batch.tokens[1:], strict=True):
        head = text[:4000] if " " not in text[:4000] else text[:20000].rsplit(" ", 1)[0]
        assert torch.equal(row, oracle(head)[0]), text[:40]  # same first 75 tokens
        assert int(row[76]) == oracle.eot_token_id


def test_huge_prompts_through_a_loaded_model_reach_bpe_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`LoadedModel.encode_texts` (audit's prompt ensembles, NormSim texts) is capped too."""
    from curate.models.loading import load_model

    model = load_model("curate-tiny", None, device="cpu")
    seen = _spy_bpe(getattr(model.tokenizer, "tokenizer", model.tokenizer), monkeypatch)
    emb = model.encode_texts(_huge_captions()[:2])
    assert emb.shape == (2, model.embed_dim)
    assert max(seen) <= 30 * 32 + 256 and len(seen) <= 2 * 40  # its context is 32 tokens


def test_rewrite_counts_with_the_same_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """The validator's count is the shared one: a huge word never reaches BPE at all."""
    from curate.rewriting import validate

    tokenizer = validate._clip_tokenizer()
    seen = _spy_bpe(tokenizer, monkeypatch)
    assert validate.clip_token_count(_huge_captions()[0], at_most=75) > 75
    assert seen == []


def test_rules_rewrite_of_a_huge_caption_reaches_bpe_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rules rewriter ranks its fallback options by a capped count, never a 1 MB word."""
    from curate.rewriting import validate
    from curate.rewriting.rules import rules_rewrite

    seen = _spy_bpe(validate._clip_tokenizer(), monkeypatch)
    for caption in _huge_captions()[:2]:
        out = rules_rewrite(caption, uid="u0", index=5, seed=0)  # past the 4 frames
        assert out and out != caption
    assert max(seen, default=0) <= 76 * 32  # whole words of fewer than 76 tokens only
