"""CLIP tokenizing in time linear in the text: only what the context can hold goes through BPE.

open_clip's `SimpleTokenizer` (OpenAI CLIP's tokenizer) cleans a text (ftfy, HTML entities,
whitespace, lower case), splits it into words with a regex and runs BPE on each word's UTF-8
bytes. BPE costs the square of a word's length: a 120 KB caption without a space took 75 s, a
1 MB one would take hours. Yet CLIP keeps only `context_length − 2` tokens (77 − 2 = 75: its
call truncates to 77 and makes the last one the end token, which is start + the first 75 + end).

`encode_prefix` returns those first tokens and nothing more:

- words after the limit are never looked at (the regex runs lazily);
- a word that may hold more tokens than are left goes through BPE as a prefix only. A token
  covers at most `longest_token_bytes` bytes (32 in CLIP's vocabulary), and the tokens kept
  are those that end at least `CONTEXT_BYTES` bytes before the cut, so the prefix is grown
  (doubling, from 8 bytes per token needed) until enough tokens end there, and never beyond
  `need · longest + CONTEXT_BYTES` bytes, where that always holds.

Exactness. Cleaning the whole text and cutting after the limit-th token is exact. The one case
that is not proven is the word prefix: BPE merges the lowest-ranked pair first anywhere in the
word, so in theory the bytes after a cut can change tokens arbitrarily far before it. In
practice a merge decision looks a few bytes ahead: over thousands of random, periodic,
vocabulary-built, punctuation, emoji and CJK words, each cut every few dozen bytes, a cut changed
tokens at most 24 bytes before it; the kept tokens have 256 bytes of real right-hand context. So
a word of more than `8·need + 256` bytes (`need`: the tokens still missing when it comes) is the
one place where a pathological word could tokenize differently from open_clip; every shorter
word, and every text whose words are all shorter, gives open_clip's ids exactly.

Cost. Cleaning stays on the whole text (ftfy decides per line, so a cut before it would not be
exact); it is linear: about 0.05 s per MB of ASCII, up to about 1 s per MB of dense non-ASCII.
BPE then sees at most `need · longest + CONTEXT_BYTES` bytes of one word (2,656 for CLIP) and
only the words holding the first tokens.

`CappedTokenizer` wraps a `SimpleTokenizer` so that calling it gives the tensor the plain call
gives (bit for bit, see above). Other tokenizers (Hugging Face ones of some models, SigLIP's,
or a `SimpleTokenizer` with a reduction mask, which draws from every token; no open_clip config
uses one) are left as they are by `cap_tokenizer` and get the whole text, as before.
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "BPE_CACHE_LIMIT",
    "CONTEXT_BYTES",
    "CappedTokenizer",
    "bound_cache",
    "cap_tokenizer",
    "clean_text",
    "count_tokens",
    "encode_prefix",
    "is_simple_tokenizer",
    "longest_token_bytes",
]

# Bytes of a long word kept after the last token taken from a BPE'd prefix (see the docstring).
CONTEXT_BYTES = 256
# First guess of bytes per token when cutting a long word (English BPE tokens average ~4).
_GUESS_BYTES = 8
# The tokenizer memoises the BPE of every word it has seen; bound that on long runs.
BPE_CACHE_LIMIT = 500_000


def is_simple_tokenizer(tokenizer: Any) -> bool:
    """True for open_clip's `SimpleTokenizer` itself (not a subclass that may encode otherwise)."""
    module = sys.modules.get("open_clip.tokenizer")  # not imported: it cannot be one
    return module is not None and type(tokenizer) is module.SimpleTokenizer


_LONGEST: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def longest_token_bytes(tokenizer: Any) -> int:
    """Bytes in the longest vocabulary entry: no BPE token of a word covers more."""
    known = _LONGEST.get(tokenizer)
    if known is None:
        known = max(len(token.removesuffix("</w>")) for token in tokenizer.encoder)
        _LONGEST[tokenizer] = known
    return known


def clean_text(tokenizer: Any, text: str) -> str:
    """The text as `tokenizer.encode` cleans it before splitting it into words."""
    clean_fn = getattr(tokenizer, "clean_fn", None)
    if clean_fn is not None:
        return clean_fn(text)
    from open_clip.tokenizer import basic_clean, whitespace_clean  # open_clip before clean_fn

    return whitespace_clean(basic_clean(text)).lower()


def bound_cache(tokenizer: Any) -> None:
    """Empty the tokenizer's BPE memo past `BPE_CACHE_LIMIT` words, keeping special tokens."""
    cache = getattr(tokenizer, "cache", None)
    if isinstance(cache, dict) and len(cache) > BPE_CACHE_LIMIT:
        tokenizer.cache = {k: v for k, v in cache.items() if k == v}  # specials map to themselves


def _bpe(tokenizer: Any, data: bytes) -> list[str]:
    return tokenizer.bpe("".join(tokenizer.byte_encoder[b] for b in data)).split(" ")


def _word_tokens(tokenizer: Any, word: str, need: int, longest: int) -> list[str]:
    """The first `need` BPE tokens of `word` (all of them when it has fewer), as strings."""
    most = need * longest + CONTEXT_BYTES  # the first `need` tokens lie within these bytes
    data = word[: most + 1].encode("utf-8")  # a character is at least one byte
    whole = len(data) <= most
    data = data[:most]
    cut = min(len(data), need * _GUESS_BYTES + CONTEXT_BYTES)
    while True:
        if whole and cut >= len(data):
            return _bpe(tokenizer, data)  # the whole word: exact
        kept: list[str] = []
        end = 0
        for token in _bpe(tokenizer, data[:cut]):
            end += len(token.removesuffix("</w>"))  # one character per byte
            if end > cut - CONTEXT_BYTES or len(kept) == need:
                break
            kept.append(token)
        if len(kept) == need or cut >= len(data):  # at `most` bytes, `need` tokens always fit
            return kept
        cut = min(2 * cut, len(data))


def _scan(tokenizer: Any, text: str, limit: int, *, count_only: bool) -> list[str]:
    longest = longest_token_bytes(tokenizer)
    tokens: list[str] = []
    if limit <= 0:
        return tokens
    for match in tokenizer.pat.finditer(clean_text(tokenizer, text)):
        word = match.group()
        need = limit - len(tokens)
        if count_only:  # an exact verdict: BPE only whole words, of fewer than `need` tokens
            data = word.encode("utf-8")
            if -(-len(data) // longest) >= need:
                return tokens + [""] * need  # its bytes alone need all the tokens left, or more
            tokens += _bpe(tokenizer, data)  # fewer than need · longest bytes
        else:
            tokens += _word_tokens(tokenizer, word, need, longest)
        if len(tokens) >= limit:
            return tokens[:limit]
    return tokens


def encode_prefix(tokenizer: Any, text: str, limit: int) -> list[int]:
    """`tokenizer.encode(text)[:limit]` for a `SimpleTokenizer`, in time linear in `text`."""
    bound_cache(tokenizer)
    return [tokenizer.encoder[t] for t in _scan(tokenizer, text, limit, count_only=False)]


def count_tokens(tokenizer: Any, text: str, at_most: int) -> int:
    """`len(tokenizer.encode(text))` when that is at most `at_most`, else some number above it
    (exactly, no word is cut); a word whose bytes alone need the tokens left, or more, never goes
    through BPE, and the words after the limit are never looked at."""
    bound_cache(tokenizer)
    return len(_scan(tokenizer, text, at_most + 1, count_only=True))


class CappedTokenizer:
    """A `SimpleTokenizer` whose call encodes each text only as far as the context holds.

    Gives the plain call's tensor: start, the first `context_length − 2` tokens, end, zeros.
    Other attributes are the wrapped tokenizer's.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("tokenizer")  # absent while unpickling
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        import torch  # here: the rewrite validator counts tokens without torch

        tokenizer = self.tokenizer
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or tokenizer.context_length
        if not length or length < 2 or getattr(tokenizer, "reduction_fn", None) is not None:
            return tokenizer(texts, context_length=context_length)
        result = torch.zeros(len(texts), length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [tokenizer.sot_token_id, *encode_prefix(tokenizer, text, length - 2)]
            ids.append(tokenizer.eot_token_id)
            result[i, : len(ids)] = torch.tensor(ids)
        return result


def cap_tokenizer(tokenizer: Any) -> Any:
    """`tokenizer` wrapped in `CappedTokenizer` when it is a `SimpleTokenizer`, else itself."""
    if isinstance(tokenizer, CappedTokenizer) or not is_simple_tokenizer(tokenizer):
        return tokenizer
    return CappedTokenizer(tokenizer)
