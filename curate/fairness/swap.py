"""Counterfactual gender-swap captions (`curate rebalance --augment swap`).

A caption with gendered words gets a counterfactual copy in which each of them is swapped
("A woman and her dog" -> "A man and his dog"); it is emitted next to the original.

The swap table
    A text file of pairs, feminine term first (`spec_data/gender_swap.txt` is the default): one
    pair per line, terms separated by tabs or spaces, `#` comments and blank lines allowed. Terms
    are single words of letters, compared in lower case. Each term may be in one pair only, which
    makes the swap an involution (swap(swap(t)) = t). The exceptions are the four pronouns in
    `AMBIGUOUS_PRONOUNS`, which may only form the pairs in `PRONOUN_PAIRS`: `her his`, `her him`
    and `hers his` (plus the ordinary `she he`, `herself himself`).

Matching
    Whole words only (`\\b` boundaries on Unicode `\\w`), case-insensitive: "man" is found in
    "Man", "MAN" and "man's" but not in "human", "manage" or "woman". Multi-word terms and
    hyphenated compounds are not supported: "mother-in-law" swaps because "mother" is a word.
    Possessives need no rule: in "man's" / "man’s" the apostrophe ends the word, so it and the
    "s" stay as they are. (A plural possessive whose partner is an irregular plural keeps its bare
    apostrophe: "ladies' room" -> "gentlemen' room".)

Case
    lower -> lower, Title -> Title, UPPER -> UPPER. Any other form ("wOMAN") becomes the partner
    in lower case, capitalised when the word's first letter is upper case ("MaN" -> "Woman").

Pronouns (the context rule)
    "her" is a possessive determiner ("her dog") or an object ("saw her"); "his" a determiner
    ("his dog") or a pronoun ("it is his"). The next word decides: if the pronoun is followed,
    after whitespace, by a word that can start a noun phrase -- any word not in
    `NOT_NOUN_PHRASE_START` (determiners, pronouns, prepositions, conjunctions, auxiliaries and a
    few particles) -- it is a determiner and "her" <-> "his". Otherwise (punctuation, the end of
    the text, or a function word follows) "her" <-> "him" and "hers" <-> "his". "herself" <->
    "himself" and "she" <-> "he" are ordinary pairs.

Round trip
    For any caption whose table terms are in lower, Title or UPPER case, if `swap_caption(c)`
    returns c' then `swap_caption(c') == c` exactly (mixed case such as "wOMAN", and rare Unicode
    case variants such as the Kelvin sign, are not restored). Every table term is swapped to its
    partner, other text is untouched, and the word after a pronoun keeps its class because the
    function-word set is closed under the table (a pair with one function word counts both as
    function words); so each pronoun is read in the same context both ways, and within one
    context the swap is a one-to-one matching. This is textual, not semantic: "gave her
    flowers" -> "gave his flowers" -> "gave her flowers" round-trips though the object "her" was
    read as a determiner.

    The price is that in the noun-phrase context "her" and "his" are taken by each other, so
    "him" or "hers" there ("gave him flowers", "a photo of him smiling") has no partner that maps
    back: "her flowers" would come back as "his flowers". Such captions get no counterfactual
    (`swap_caption` returns None) rather than a half-swapped one or one that does not round-trip.
    A table with only some pronoun pairs uses each pair in the contexts where it is free
    (only `her his`: "her" <-> "his" everywhere).

Cost: one compiled regex per table (a trie of the terms, cached by the table's pairs).
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

from curate.errors import InputError, brief
from curate.io.text_files import read_text_file

__all__ = [
    "AMBIGUOUS_PRONOUNS",
    "DEFAULT_SWAP_TABLE",
    "NOT_NOUN_PHRASE_START",
    "PRONOUN_PAIRS",
    "SWAP_RULES",
    "SwapTable",
    "default_swap_table",
    "load_swap_table",
    "swap_caption",
    "swap_many",
]

SWAP_RULES = "curate-swap/1"  # hashed into `SwapTable.version`; bump when the rules here change
DEFAULT_SWAP_TABLE = "default"  # `SwapTable.source` of the packaged table
_DEFAULT_RESOURCE = "spec_data/gender_swap.txt"

AMBIGUOUS_PRONOUNS = frozenset({"her", "his", "him", "hers"})
# The only pairs an ambiguous pronoun may be in, feminine first.
PRONOUN_PAIRS = frozenset({("her", "his"), ("her", "him"), ("hers", "his")})
# Which pronoun pair wins in each context when a term could take several (first free one wins).
_DETERMINER_ORDER = (("her", "his"), ("her", "him"), ("hers", "his"))
_OTHER_ORDER = (("her", "him"), ("hers", "his"), ("her", "his"))

_FUNCTION_WORDS = {
    "determiners and pronouns": (
        "a an the this that these those my your our their its his her whose which what whatever "
        "some any no every each either neither all both another such "
        "i me you he him she hers it we us they them mine yours ours theirs myself yourself "
        "yourselves himself herself itself ourselves themselves who whom "
        "someone somebody something anyone anybody anything everyone everybody everything "
        "nobody nothing"
    ),
    "prepositions": (
        "about above across after against along amid among around as at before behind below "
        "beneath beside besides between beyond by despite down during except for from in inside "
        "into like near of off on onto out outside over past per since than through throughout "
        "till to toward towards under underneath until up upon via with within without"
    ),
    "conjunctions": (
        "and or but nor so yet if because when whenever where wherever while whereas whether "
        "although though unless once"
    ),
    "auxiliaries, modals, negation": (
        "am is are was were be been being has have had do does did will would shall should can "
        "could may might must not"
    ),
    "particles and adverbs that follow an object": (
        "away back again here there now then too also together alone apart today tonight "
        "yesterday tomorrow instead"
    ),
}
# Words that cannot start a noun phrase: after one of them, "her"/"his" is not a determiner.
NOT_NOUN_PHRASE_START = frozenset(
    word for group in _FUNCTION_WORDS.values() for word in group.split()
)

_TERM_RE = re.compile(r"[^\W\d_]+")
_NEXT_WORD_RE = re.compile(r"\s+(\w+)")


class _Unswappable(Exception):
    """A pronoun with no partner in its context: the caption gets no counterfactual."""


@dataclass(frozen=True)
class SwapTable:
    """Validated swap pairs (lower case, in file order) and where they came from."""

    pairs: tuple[tuple[str, str], ...]
    source: str  # file path or "default"

    def __post_init__(self) -> None:
        if not isinstance(self.pairs, tuple):
            kind = type(self.pairs).__name__
            raise InputError(f"{self.source}: pairs must be a tuple of pairs, not {kind}")
        where = [f"{self.source}: pair {i}" for i in range(1, len(self.pairs) + 1)]
        _validate(self.pairs, where, self.source)

    @property
    def version(self) -> str:
        """First 16 hex digits of sha256 over the rules version and the sorted pairs."""
        pairs = sorted(tuple(sorted(pair)) for pair in self.pairs)
        text = "\n".join([SWAP_RULES, *(f"{a}\t{b}" for a, b in pairs)])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def terms(self) -> frozenset[str]:
        """Every term in the table."""
        return frozenset(term for pair in self.pairs for term in pair)

    def __getstate__(self) -> dict[str, object]:
        """Pickle the fields only, not the compiled swapper (it holds a closure)."""
        return {"pairs": self.pairs, "source": self.source}

    def __setstate__(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    @cached_property
    def _swapper(self) -> tuple[re.Pattern[str], Callable[[re.Match[str]], str]]:
        """The compiled regex and replacement (kept on the table: hashing the pairs is slow)."""
        return _compiled(self.pairs)


def load_swap_table(path: str | Path) -> SwapTable:
    """Read and validate a swap-table file; errors name the file and line."""
    name = os.fspath(path)
    text = read_text_file(name, "swap table", encoding="utf-8-sig")
    return _parse(text, name, name)


@lru_cache(maxsize=1)
def default_swap_table() -> SwapTable:
    """The packaged table, `spec_data/gender_swap.txt`."""
    resource = resources.files("curate.fairness").joinpath(_DEFAULT_RESOURCE)
    text = resource.read_text(encoding="utf-8-sig")
    return _parse(text, f"curate/fairness/{_DEFAULT_RESOURCE}", DEFAULT_SWAP_TABLE)


def swap_caption(text: str, table: SwapTable) -> str | None:
    """The counterfactual caption; None if it has no term, or "him"/"hers" before a noun."""
    pattern, replace = table._swapper
    try:
        swapped, count = pattern.subn(replace, text)
    except _Unswappable:
        return None
    return swapped if count and swapped != text else None


def swap_many(texts: Sequence[str | None], table: SwapTable) -> list[str | None]:
    """`swap_caption` over many captions; a None caption gives None."""
    pattern, replace = table._swapper
    out: list[str | None] = []
    for text in texts:
        if text is None:
            out.append(None)
            continue
        try:
            swapped, count = pattern.subn(replace, text)
        except _Unswappable:
            out.append(None)
            continue
        out.append(swapped if count and swapped != text else None)
    return out


# --- parsing and validation -------------------------------------------------------------------


def _parse(text: str, label: str, source: str) -> SwapTable:
    """Pairs from the file text; `label` names the file in errors, `source` goes on the table."""
    pairs: list[tuple[str, str]] = []
    where: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [unicodedata.normalize("NFC", field).lower() for field in line.split()]
        if len(fields) != 2:
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise InputError(
                f"{label}:{number}: expected two words (feminine masculine), "
                f"got {len(fields)}: {shown!r}"
            )
        pairs.append((fields[0], fields[1]))
        where.append(f"{label}:{number}")
    if not pairs:
        raise InputError(f"{label}: no pairs (only comments and blank lines)")
    _validate(pairs, where, label)
    return SwapTable(pairs=tuple(pairs), source=source)


def _validate(pairs: Sequence[tuple[str, str]], where: Sequence[str], source: str) -> None:
    """Raise InputError for the first bad pair; `where[i]` names pair i ('file:line')."""
    if not pairs:
        raise InputError(f"{source}: no pairs")
    seen: dict[str, int] = {}  # term -> index of its first pair
    seen_pairs: dict[frozenset[str], int] = {}
    for i, pair in enumerate(pairs):
        here = where[i]
        if not (
            isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
        ):
            raise InputError(f"{here}: a pair must be a tuple of two strings, not {pair!r}")
        for term in pair:
            _check_term(term, here)
        a, b = pair
        if a == b:
            raise InputError(f"{here}: {brief(a)} is paired with itself")
        key = frozenset(pair)
        if key in seen_pairs:
            raise InputError(f"{here}: pair '{a} {b}' repeats {_place(where[seen_pairs[key]])}")
        if (a in AMBIGUOUS_PRONOUNS or b in AMBIGUOUS_PRONOUNS) and _orient(a, b) not in (
            PRONOUN_PAIRS
        ):
            raise InputError(
                f"{here}: pair '{a} {b}': her, his, him and hers may only pair as "
                "'her his', 'her him' or 'hers his'"
            )
        for term in pair:
            if term in seen and term not in AMBIGUOUS_PRONOUNS:
                first = pairs[seen[term]]
                raise InputError(
                    f"{here}: {brief(term)} is already in '{first[0]} {first[1]}' on "
                    f"{_place(where[seen[term]])}; a term may be in one pair only"
                )
            seen.setdefault(term, i)
        seen_pairs[key] = i


def _check_term(term: str, here: str) -> None:
    """A term is one lower-case word of letters that survives upper- and title-casing."""
    if not _TERM_RE.fullmatch(term):
        raise InputError(f"{here}: {brief(term)} is not a single word of letters")
    if term != term.lower() or term != unicodedata.normalize("NFC", term):
        raise InputError(f"{here}: {brief(term)} must be lower case (NFC)")
    if term.upper().lower() != term or term.title().lower() != term:
        raise InputError(
            f"{here}: {brief(term)} changes spelling when upper-cased ({brief(term.upper())})"
        )


def _place(where: str) -> str:
    """'file:12' -> 'line 12'; 'source: pair 3' -> 'pair 3'."""
    head, _, tail = where.rpartition(":")
    return f"line {tail}" if tail.isdigit() and head else tail.strip()


def _orient(a: str, b: str) -> tuple[str, str]:
    """A pronoun pair feminine first (as in `PRONOUN_PAIRS`)."""
    return (b, a) if (b, a) in PRONOUN_PAIRS else (a, b)


# --- the compiled swapper ---------------------------------------------------------------------


@lru_cache(maxsize=32)
def _compiled(
    pairs: tuple[tuple[str, str], ...],
) -> tuple[re.Pattern[str], Callable[[re.Match[str]], str]]:
    """The term regex and its replacement function for a (validated) set of pairs."""
    plain: dict[str, str] = {}
    pronoun_pairs: set[tuple[str, str]] = set()
    for a, b in pairs:
        if a in AMBIGUOUS_PRONOUNS or b in AMBIGUOUS_PRONOUNS:
            pronoun_pairs.add(_orient(a, b))
        else:
            plain[a] = b
            plain[b] = a
    determiner = _matching(pronoun_pairs, _DETERMINER_ORDER)
    other = _matching(pronoun_pairs, _OTHER_ORDER)
    # Close the function-word set under the table so that a swap never changes a word's class.
    stop = set(NOT_NOUN_PHRASE_START)
    for a, b in pairs:
        if a in stop or b in stop:
            stop.update((a, b))
    pronouns = {term for pair in pronoun_pairs for term in pair}
    next_word = _NEXT_WORD_RE.match

    def replace(match: re.Match[str]) -> str:
        word = match.group()
        key = word.lower()
        partner = plain.get(key)
        if partner is None:
            if key not in pronouns:
                return word  # an odd Unicode case variant that matched; leave it
            after = next_word(match.string, match.end())
            noun_follows = after is not None and after.group(1).lower() not in stop
            partner = (determiner if noun_follows else other).get(key)
            if partner is None:
                raise _Unswappable(key)
        return _recase(word, partner)

    words = sorted(set(plain) | pronouns)
    pattern = re.compile(r"\b(?:" + _trie_pattern(words) + r")\b", re.IGNORECASE)
    return pattern, replace


def _matching(pairs: set[tuple[str, str]], order: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A one-to-one swap from the pronoun pairs, taking them in `order` while both ends are free."""
    swap: dict[str, str] = {}
    for a, b in order:
        if (a, b) in pairs and a not in swap and b not in swap:
            swap[a] = b
            swap[b] = a
    return swap


def _recase(word: str, target: str) -> str:
    """`target` (lower case) in the case form of `word`."""
    if word.islower():
        return target
    if word.isupper():
        return target.upper()
    if word.istitle() or word[:1].isupper():
        return target.title()
    return target


def _trie_pattern(words: Sequence[str]) -> str:
    """A regex alternation of `words` factored by common prefixes (much faster than a flat one)."""
    trie: dict[str, dict] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict[str, dict]) -> str:
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" not in node:
            return body
        return f"(?:{body})?" if len(branches) == 1 and len(body) > 1 else body + "?"

    return emit(trie)
