"""Attribute labels from captions: word-boundary term matching.

Each attribute compiles its groups' terms into one regular expression: case-insensitive, a term
matches where it is not preceded or followed by a word character (``\\w``, any script), and
whitespace inside a multi-word term matches any run of whitespace. Alternatives are tried
longest first, so ``old man`` (senior) wins over ``man`` (adult) at the same position, and
matches do not overlap.

A caption's label for an attribute is the one group whose terms it contains, ``mixed`` when it
names several groups ("a man and a woman"), or None when it names none. A caption mentions a
person when it contains a person term or any group term of any attribute.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cached_property

import numpy as np

from curate.fairness.spec import Attribute, AttributeSpec, normalize_term

__all__ = ["MIXED", "TermLexicon", "caption_labels", "caption_mentions_person"]

MIXED = "mixed"


def _term_pattern(terms: Iterable[str]) -> re.Pattern[str]:
    ordered = sorted(set(terms), key=lambda t: (-len(t), t))
    alternatives = "|".join(r"\s+".join(re.escape(w) for w in t.split()) for t in ordered)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


class TermLexicon:
    """Terms mapped to labels (group indexes), matched on word boundaries."""

    def __init__(self, terms: dict[str, int]) -> None:
        self.labels = {normalize_term(t): label for t, label in terms.items()}

    @cached_property
    def pattern(self) -> re.Pattern[str] | None:
        return _term_pattern(self.labels) if self.labels else None

    def find(self, text: str) -> set[int]:
        """The labels of every term in `text`."""
        if self.pattern is None:
            return set()
        return {self.labels[normalize_term(m)] for m in self.pattern.findall(text)}

    @classmethod
    def for_attribute(cls, attribute: Attribute) -> TermLexicon:
        return cls({t: i for i, g in enumerate(attribute.groups) for t in g.terms})

    @classmethod
    def for_person(cls, spec: AttributeSpec) -> TermLexicon:
        terms = {t: 0 for t in spec.person_terms}
        for attribute in spec.attributes:
            terms.update({t: 0 for g in attribute.groups for t in g.terms})
        return cls(terms)


def caption_labels(captions: Sequence[str | None], attribute: Attribute) -> list[str | None]:
    """Per caption: the single group named, ``mixed``, or None (no term, or no caption)."""
    lexicon = TermLexicon.for_attribute(attribute)
    names = attribute.group_names
    out: list[str | None] = []
    for caption in captions:
        found = lexicon.find(caption) if caption else set()
        out.append(None if not found else names[found.pop()] if len(found) == 1 else MIXED)
    return out


def caption_mentions_person(captions: Sequence[str | None], spec: AttributeSpec) -> np.ndarray:
    """Per caption: does it contain a person term or any group term?"""
    lexicon = TermLexicon.for_person(spec)
    pattern = lexicon.pattern
    if pattern is None:
        return np.zeros(len(captions), dtype=bool)
    return np.fromiter(
        (bool(c) and pattern.search(c) is not None for c in captions),
        dtype=bool,
        count=len(captions),
    )
