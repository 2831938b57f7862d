"""Building metadata from offline sources: word lists, WordNet, and n-grams mined from captions.

MetaCLIP's 500k entries are WordNet synset head lemmas, Wikipedia unigrams seen at least 100
times, Wikipedia bigrams with a high PMI, and Wikipedia article titles. Here the n-grams are
mined from any text corpus (captions, an article dump turned into lines) and `merge_sources`
concatenates the sources, keeping the first occurrence of each entry.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from string import hexdigits

from curate.balance.matching import PADDED_MARKS, pad_text
from curate.errors import InputError

__all__ = [
    "NgramResult",
    "SourceCount",
    "default_wordnet_dirs",
    "find_wordnet",
    "merge_sources",
    "mine_ngrams",
    "read_word_list",
    "read_wordnet",
]

WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of `path` (BOM removed), or InputError naming `what` and the file."""
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(
            f"{what} {path} is not UTF-8 text (bad byte at offset {error.start})"
        ) from None
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror or error}") from None


def read_word_list(path: Path | str) -> list[str]:
    """Entries of a word list: one a line, stripped, blank lines skipped, order and repeats kept."""
    text = _read_text(Path(path), "word list")
    return [word for word in (line.strip() for line in text.split("\n")) if word]


def default_wordnet_dirs() -> list[Path]:
    """The folders `find_wordnet` looks in, in order (environment variables first)."""
    dirs: list[Path] = []
    if os.environ.get("WNHOME"):
        dirs.append(Path(os.environ["WNHOME"]) / "dict")
    if os.environ.get("WNSEARCHDIR"):
        dirs.append(Path(os.environ["WNSEARCHDIR"]))
    dirs += [
        Path("/usr/share/wordnet"),
        Path("/usr/local/share/wordnet"),
        Path.home() / "nltk_data" / "corpora" / "wordnet",
        Path("/usr/share/nltk_data/corpora/wordnet"),
    ]
    return dirs


def find_wordnet(candidates: Sequence[Path | str] | None = None) -> Path | None:
    """The first candidate folder holding WordNet's ``data.noun``, or None if there is none."""
    for folder in default_wordnet_dirs() if candidates is None else candidates:
        if (Path(folder) / "data.noun").is_file():
            return Path(folder)
    return None


def _head_lemma(line: str, where: str) -> str:
    """The head lemma of one WordNet data line, underscores as spaces and no adjective marker."""
    fields = line.split()
    try:
        if not fields[0].isdigit():
            raise ValueError
        word_count = int(fields[3], 16)
        word = fields[4]
    except (IndexError, ValueError):
        raise InputError(f"{where} is not a WordNet data line") from None
    words_end = 4 + 2 * word_count  # words and their one-hex-digit lex_ids, then p_cnt
    lex_ids = fields[5:words_end:2]
    if (
        word_count < 1
        or len(fields) <= words_end
        or not fields[words_end].isdigit()
        or not all(len(lex_id) == 1 and lex_id in hexdigits for lex_id in lex_ids)
    ):
        raise InputError(f"{where} is not a WordNet data line (word count {fields[3]!r})")
    return _ADJ_MARKER.sub("", word).replace("_", " ")


def read_wordnet(folder: Path | str) -> list[str]:
    """Head lemmas of every synset in a WordNet 3.x ``dict`` folder (noun, verb, adj, adv order).

    Lines starting with two spaces (the license header) are skipped. Repeats are kept.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"WordNet folder {folder} does not exist")
    files = [folder / name for name in WORDNET_FILES if (folder / name).is_file()]
    if not files:
        raise InputError(f"WordNet folder {folder} has none of {', '.join(WORDNET_FILES)}")
    lemmas: list[str] = []
    for path in files:
        text = _read_text(path, "WordNet file")
        for number, line in enumerate(text.split("\n"), start=1):
            if line.startswith("  ") or not line.strip():
                continue
            lemmas.append(_head_lemma(line, f"{path} line {number}"))
    return lemmas


@dataclass
class NgramResult:
    """Unigrams and bigrams mined by `mine_ngrams`, with the corpus counts behind them."""

    unigrams: list[str]
    bigrams: list[str]
    tokens: int
    texts: int
    skipped: int = 0
    bigram_positions: int = 0
    bigram_pmi: dict[str, float] = field(default_factory=dict)


def _segments(caption: str) -> list[list[str]]:
    """Runs of tokens in a caption; the seven marks and whitespace-only tokens separate runs."""
    runs: list[list[str]] = [[]]
    for token in pad_text(caption).split(" "):
        if not token:
            continue
        if token in PADDED_MARKS or token.isspace():
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(token)
    return [run for run in runs if run]


def mine_ngrams(
    captions: Iterable[str],
    *,
    min_unigram_count: int = 100,
    min_bigram_count: int = 5,
    min_bigram_pmi: float = 30.0,
) -> NgramResult:
    """Frequent unigrams and high-PMI bigrams of a text corpus, tokenised as matching sees it.

    Tokens are ``pad_text(caption).split(" ")`` without empty tokens. The marks
    ``, . ; : ? !`` and backtick separate tokens and are not tokens (no bigram spans one); a token
    that is only whitespace (a no-break space, say) is treated the same way. Case is kept.

    A unigram is kept when it occurs at least `min_unigram_count` times. A bigram ``"a b"`` (two
    adjacent tokens) is kept when it occurs at least `min_bigram_count` times and its PMI is at
    least `min_bigram_pmi`, where PMI is the ratio ``P(ab) / (P(a) P(b))`` with
    ``P(ab) = count(ab) / bigram_positions`` and ``P(a) = count(a) / tokens``. That ratio is
    2 to the power of the PMI in bits; the paper's threshold of 30 is read on this ratio scale.
    The threshold is compared exactly (with fractions), so results do not hinge on rounding.

    Unigrams are ordered by count (descending) then string; bigrams by PMI (descending) then
    string. Captions that are not strings or are blank are skipped and counted in ``skipped``.
    """
    unigram_counts: Counter[str] = Counter()
    bigram_counts: Counter[tuple[str, str]] = Counter()
    texts = skipped = 0
    for caption in captions:
        if not isinstance(caption, str) or not caption.strip():
            skipped += 1
            continue
        texts += 1
        for run in _segments(caption):
            unigram_counts.update(run)
            bigram_counts.update(pairwise(run))
    tokens = sum(unigram_counts.values())
    positions = sum(bigram_counts.values())

    unigrams = sorted(
        (word for word, count in unigram_counts.items() if count >= min_unigram_count),
        key=lambda word: (-unigram_counts[word], word),
    )
    threshold = Fraction(min_bigram_pmi)
    pmi: dict[str, float] = {}
    for (first, second), count in bigram_counts.items():
        if count < min_bigram_count:
            continue
        numerator = count * tokens * tokens
        denominator = positions * unigram_counts[first] * unigram_counts[second]
        if numerator >= threshold * denominator:
            pmi[f"{first} {second}"] = numerator / denominator
    bigrams = sorted(pmi, key=lambda bigram: (-pmi[bigram], bigram))
    return NgramResult(
        unigrams=unigrams,
        bigrams=bigrams,
        tokens=tokens,
        texts=texts,
        skipped=skipped,
        bigram_positions=positions,
        bigram_pmi={bigram: pmi[bigram] for bigram in bigrams},
    )


@dataclass
class SourceCount:
    """What one source contributed to a merge."""

    name: str
    read: int
    added: int
    duplicates: int
    blank: int


def merge_sources(
    sources: Sequence[tuple[str, Sequence[str]]],
) -> tuple[list[str], list[SourceCount]]:
    """Concatenate named sources in order, dropping blank entries and repeats of earlier entries."""
    merged: list[str] = []
    seen: set[str] = set()
    counts: list[SourceCount] = []
    for name, entries in sources:
        added = duplicates = blank = 0
        for entry in entries:
            if not entry.strip():
                blank += 1
            elif entry in seen:
                duplicates += 1
            else:
                seen.add(entry)
                merged.append(entry)
                added += 1
        counts.append(SourceCount(name, len(entries), added, duplicates, blank))
    return merged, counts
