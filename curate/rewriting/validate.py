"""Clean a model's rewrite and decide whether to keep it.

`clean_output` undoes harmless formatting (surrounding whitespace and quotes, a repeated `=>`);
`check_rewrite` then returns None for a usable rewrite or a reason code, checked in this order:

- ``empty``: nothing left;
- ``identical``: the original again (ignoring case, spacing and final punctuation);
- ``multi_line``: more than one line (the model went on with another example, or explained);
- ``too_long``: more than `max_tokens` CLIP tokens (75 fit in CLIP's 77 with start and end);
  counting stops once past the limit and never runs BPE on a word too long to fit, so any
  text, however long, is judged in time linear in its length (the verdict is the full
  tokenizer's);
- ``refusal``: an apology or refusal ("I'm sorry", "As an AI", "I cannot ...");
- ``boilerplate``: a preamble ("Sure", "Here is", "Rewritten caption:").

A refusal or preamble pattern that also matches the original caption is not held against the
rewrite (a caption may well read "Sorry, we're closed" or "Here's Johnny").
"""

from __future__ import annotations

import functools
import re
import string
import threading
from collections.abc import Callable
from typing import Any

from curate.models.tokens import bound_cache, count_tokens

__all__ = [
    "MAX_CLIP_TOKENS",
    "REASONS",
    "approx_token_count",
    "check_rewrite",
    "clean_output",
    "clip_token_count",
    "comparable",
    "warm_up",
]

MAX_CLIP_TOKENS = 75
REASONS = ("empty", "identical", "multi_line", "too_long", "refusal", "boilerplate")

# Refusals are searched anywhere in texts of at most this many words, else only at the start.
SHORT_TEXT_WORDS = 30

_QUOTES = (('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("«", "»"))
_LINE_BREAK = re.compile(r"[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_FINAL_PUNCT = string.punctuation + "…。！？"
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "`": "'"})

_REFUSALS = [
    r"i'?m (?:so |very |really |truly )?sorry",
    r"i am (?:so |very |really |truly )?sorry",
    r"sorry, (?:but )?i\b",
    r"(?:my )?apologies\b",
    r"i apologi[sz]e",
    r"i (?:cannot|can ?not|can'?t|won'?t|will not|could not|couldn'?t)\b",
    r"i(?:'?m| am) (?:unable|not able)\b",
    r"as an ai\b",
    r"as an? (?:ai )?(?:language model|assistant|chatbot)",
    r"ai (?:language )?model\b",
    r"unable to (?:help|assist|comply|rewrite|provide|fulfil|fulfill|complete)",
    r"(?:not|\w+n't) (?:able|allowed|permitted) to (?:help|assist|rewrite|provide|comply)",
    r"i do(?:n'?t| not) (?:have|see) (?:any |an? |the )?(?:image|picture|caption|access)",
    r"against (?:my|the|our) (?:guidelines|polic(?:y|ies))",
    r"content polic(?:y|ies)",
]
_REFUSAL_START = [re.compile(r"^\W*(?:" + p + ")", re.IGNORECASE) for p in _REFUSALS]
# (?<![\w']): a pattern starts a word ("Hawaii cannot" holds no "I cannot")
_REFUSAL_ANYWHERE = [re.compile(r"(?<![\w'])(?:" + p + ")", re.IGNORECASE) for p in _REFUSALS]

_BOILERPLATE = [
    r"sure\b",
    r"certainly\b",
    r"of course\b",
    r"absolutely\b",
    r"ok(?:ay)?\s*[,!.:]",
    r"here(?:'s| is| are| you go)\b",
    r"(?:the |a |my )?(?:rewritten|revised|improved|paraphrased|alternative|edited)"
    r" (?:caption|version|text|description)\b",
    r"(?:the |a |my )?new caption\b",
    r"(?:rewritten|revised|rewrite|caption|output|answer|result|response|paraphrase|alt[- ]?text"
    r"|description)\s*:",
    r"(?:a |one )?possible (?:rewrite|caption|version)\b",
    r"let me\b",
    r"i(?: would|'d| will|'ll) (?:rewrite|describe|say)\b",
]
_BOILERPLATE_START = [
    re.compile(r"^[\s\"'*#>`-]*(?:" + p + ")", re.IGNORECASE) for p in _BOILERPLATE
]


def clean_output(text: str) -> str:
    """Strip what a model wraps around a rewrite; line breaks inside are kept for checking.

    Removes surrounding whitespace, a leading ``=>`` (the model repeated the arrow), one pair of
    matching surrounding quotes (only when they enclose the whole text: none of the same quote
    inside, apart from apostrophes within words), and collapses runs of spaces and tabs.
    """
    text = text.strip()
    if text.startswith("=>"):
        text = text[2:].strip()
    text = _strip_quotes(text).strip()
    return re.sub(r"[ \t]{2,}|\t", " ", text)


def _strip_quotes(text: str) -> str:
    for left, right in _QUOTES:
        if len(text) >= 2 and text[0] == left and text[-1] == right:
            inner = text[1:-1]
            if left == "'" or right == "’":
                # apostrophes between letters ("dog's") do not count as quotes
                inner_quotes = re.sub(r"(?<=\w)['’](?=\w)", "", inner)
            else:
                inner_quotes = inner
            if left in inner_quotes or right in inner_quotes:
                return text
            return inner
    return text


def comparable(text: str) -> str:
    """`text` as `identical` compares it: casefolded, spacing collapsed, final punctuation gone."""
    return " ".join(text.casefold().split()).rstrip(_FINAL_PUNCT + " ")


def check_rewrite(
    original: str,
    text: str,
    *,
    max_tokens: int = MAX_CLIP_TOKENS,
    count_tokens: Callable[[str], int] | None = None,
) -> str | None:
    """None when `text` (already passed through `clean_output`) is a usable rewrite of
    `original`, else the first failing reason of `REASONS`."""
    body = text.strip()
    if not body:
        return "empty"
    if comparable(body) == comparable(original):
        return "identical"
    if _LINE_BREAK.search(body):
        return "multi_line"
    tokens = count_tokens(body) if count_tokens else clip_token_count(body, at_most=max_tokens)
    if tokens > max_tokens:
        return "too_long"
    said = body.translate(_APOSTROPHES)
    before = original.translate(_APOSTROPHES)
    refusals = _REFUSAL_ANYWHERE if len(said.split()) <= SHORT_TEXT_WORDS else _REFUSAL_START
    for pattern, anywhere in zip(refusals, _REFUSAL_ANYWHERE, strict=True):
        if pattern.search(said) and not anywhere.search(before):
            return "refusal"
    for pattern in _BOILERPLATE_START:
        if pattern.search(said) and not pattern.search(before):
            return "boilerplate"
    return None


_TOKENIZER_LOCK = threading.Lock()  # validation runs in worker threads: build it once


def _clip_tokenizer() -> Any:
    with _TOKENIZER_LOCK:
        return _load_tokenizer()


def warm_up() -> None:
    """Load the CLIP tokenizer now (importing open_clip takes seconds), not in the first check."""
    _clip_tokenizer()


@functools.lru_cache(maxsize=1)
def _load_tokenizer() -> Any:
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:
        return None
    return SimpleTokenizer()


def clip_token_count(text: str, *, at_most: int | None = None) -> int:
    """CLIP BPE tokens in `text`, without the start and end tokens (so 75 fit CLIP's 77).

    Uses open_clip's `SimpleTokenizer` (the tokenizer of OpenAI CLIP and open_clip's CLIP
    models). Without open_clip it falls back to `approx_token_count`.

    With `at_most`, the count is exact when it is at most `at_most` and otherwise only some
    number above it, found in time linear in `text` (`curate.models.tokens.count_tokens`): BPE
    costs the square of a word's length (a 120 KB word took 75 s), so counting stops once past
    `at_most`, and a word whose bytes alone need the tokens left never goes through BPE.
    """
    tokenizer = _clip_tokenizer()
    if tokenizer is None:
        return approx_token_count(text)
    if at_most is None:
        bound_cache(tokenizer)
        return len(tokenizer.encode(text))
    return count_tokens(tokenizer, text, at_most)


_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)


def approx_token_count(text: str) -> int:
    """Approximate CLIP token count, used only when open_clip is missing: CLIP's pre-tokens
    (words, single digits, punctuation runs), plus about one per further 4 letters of a word
    longer than 9 letters, and one per 2 UTF-8 bytes of a word outside ASCII (which the byte-level
    BPE splits finely). Within a few tokens of the real count on ordinary English captions."""
    count = 0
    for match in _PRETOKEN.finditer(text.lower()):
        piece = match.group()
        if not piece.isascii():
            count += max(1, (len(piece.encode("utf-8")) + 1) // 2)
        elif piece[0].isalpha() and len(piece) > 9:
            count += 1 + (len(piece) - 6) // 4
        else:
            count += 1
    return count
