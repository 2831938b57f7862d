"""Sub-string matching of captions against metadata entries, with an Aho-Corasick automaton.

Two modes, chosen by name:

``metaclip`` (default) follows MetaCLIP's reference semantics exactly. The text is padded as
``" " + text + " "``, each of the seven marks ``, . ; : ? !`` and backtick gets a space on each
side, and tab, newline and carriage return become spaces. Entry ``e`` matches when
``" " + e + " "`` is a sub-string of that padded text. Nothing is lowercased, so ``Cat`` and ``cat``
are different entries. Consequences worth knowing: ``-``, ``/``, ``(`` and quotes are not
boundaries (``dog`` does not match ``dog-friendly``), and an entry with one of the seven marks
that is not itself surrounded by spaces (``U.S.``) can never match (`never_matches` finds them).

``words`` is the Unicode-aware alternative: text and entries are case-folded (``str.casefold``,
so ``Straße`` matches ``STRASSE``) and an entry matches where it is not preceded or followed by a
word character (letters, digits and underscore in any script, as ``re``'s ``\\w``). Here
``dog`` matches ``dog-friendly`` and ``"dog"``, and ``U.S.`` matches ``the U.S. army``.

Captions arrive as written (every source delivers the decoded text unchanged: no strip, no
BOM removal). A named normalisation, applied here so every source gets the same one, runs
before either mode: ``none`` (default; MetaCLIP's ``substr_matching`` sees the raw text, so
``"\xa0dog"`` does not match ``dog``) or ``strip`` (Python's ``str.strip()``, which MetaCLIP 2's
curation applies to each text before matching: every character with ``str.isspace()`` goes
from both ends, a BOM ``\ufeff`` does not).

The automaton reports every occurrence of every pattern, overlapping ones included, so the
match set equals looping ``pattern in text`` over all entries (MetaCLIP's original approach),
at a cost that grows with the text length instead of the number of entries.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from enum import Enum

import ahocorasick

__all__ = [
    "MatchMode",
    "Matcher",
    "Normalization",
    "never_matches",
    "pad_text",
]

PADDED_MARKS = (",", ".", ";", ":", "?", "!", "`")
SPACED_CHARS = ("\t", "\n", "\r")
_PAD_TABLE = str.maketrans(
    {**{m: f" {m} " for m in PADDED_MARKS}, **dict.fromkeys(SPACED_CHARS, " ")}
)
_WORD_CHAR = re.compile(r"\w")


class MatchMode(str, Enum):
    """How captions are matched against entries (see the module docstring)."""

    metaclip = "metaclip"
    words = "words"


class Normalization(str, Enum):
    """What is done to a caption before matching (see the module docstring)."""

    none = "none"  # the text as written (MetaCLIP)
    strip = "strip"  # str.strip(), as MetaCLIP 2's curation does before matching


def pad_text(text: str) -> str:
    """MetaCLIP's text normalisation: outer spaces, spaced marks, whitespace controls as spaces."""
    return f" {text} ".translate(_PAD_TABLE)


def _is_word_char(ch: str) -> bool:
    return _WORD_CHAR.match(ch) is not None


def never_matches(entry: str, mode: MatchMode | str = MatchMode.metaclip) -> bool:
    """True when no caption at all can match `entry` under `mode`.

    Under ``metaclip`` a padded text contains no tab/newline/CR, and every mark has a space of
    its own on each side (two marks are at least three characters apart), so
    ``" " + entry + " "`` must have the same property to ever occur in one. Under ``words`` only
    an entry that case-folds to nothing can never match.
    """
    if MatchMode(mode) is MatchMode.words:
        return not entry.casefold()
    padded = f" {entry} "
    if any(ch in padded for ch in SPACED_CHARS):
        return True
    previous_mark = -3
    for i, ch in enumerate(padded):
        if ch not in PADDED_MARKS:
            continue
        if padded[i - 1] != " " or padded[i + 1] != " " or i - previous_mark < 3:
            return True
        previous_mark = i
    return False


class Matcher:
    """An automaton over metadata entries; `match(text)` gives the sorted ids of matched entries.

    Entry ids are positions in `entries`. Entries must be distinct; an entry that can never match
    is kept (its id stays valid) but not put into the automaton. `normalize` is applied to every
    text before matching.
    """

    def __init__(
        self,
        entries: Sequence[str],
        mode: MatchMode | str = MatchMode.metaclip,
        *,
        normalize: Normalization | str = Normalization.none,
    ) -> None:
        self.mode = MatchMode(mode)
        self.normalize = Normalization(normalize)
        self.size = len(entries)
        automaton = ahocorasick.Automaton()
        # Several entries can share one pattern in `words` mode (case folding): keep them all.
        patterns: dict[str, list[int]] = {}
        for entry_id, entry in enumerate(entries):
            if never_matches(entry, self.mode):
                continue
            pattern = f" {entry} " if self.mode is MatchMode.metaclip else entry.casefold()
            patterns.setdefault(pattern, []).append(entry_id)
        for pattern, ids in patterns.items():
            automaton.add_word(pattern, (len(pattern), tuple(ids)))
        self.patterns = len(patterns)
        if patterns:
            automaton.make_automaton()
        self._automaton = automaton if patterns else None

    def match(self, text: str) -> list[int]:
        """Sorted, distinct ids of the entries that `text` matches."""
        if self._automaton is None:
            return []
        if self.normalize is Normalization.strip:
            text = text.strip()
        found: set[int] = set()
        if self.mode is MatchMode.metaclip:
            for _end, (_length, ids) in self._automaton.iter(pad_text(text)):
                found.update(ids)
        else:
            folded = text.casefold()
            last = len(folded) - 1
            for end, (length, ids) in self._automaton.iter(folded):
                start = end - length + 1
                if start > 0 and _is_word_char(folded[start - 1]):
                    continue
                if end < last and _is_word_char(folded[end + 1]):
                    continue
                found.update(ids)
        return sorted(found)

    def match_many(self, texts: Iterable[str]) -> list[list[int]]:
        """`match` over many texts."""
        return [self.match(text) for text in texts]
