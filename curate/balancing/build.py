"""Building metadata from offline sources: word lists, WordNet, and n-grams mined from captions.

MetaCLIP's 500k entries are WordNet synset names, Wikipedia unigrams seen at least 100 times,
Wikipedia bigrams with a PMI of at least 30 bits, and Wikipedia article titles. Here the n-grams
are mined from any text corpus (captions, an article dump turned into lines) and `merge_sources`
concatenates the sources, keeping the first occurrence of each entry. The reference build
(MetaCLIP's ``build_metadata.py``) also starts from the strings ``"0"`` .. ``"99"``
(`NUMBER_ENTRIES`) and skips entries that are one punctuation character; `merge_sources` does
the latter for every source.
"""

from __future__ import annotations

import math
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from fractions import Fraction
from itertools import pairwise
from pathlib import Path
from string import hexdigits

from curate.balancing.matching import PADDED_MARKS, pad_text
from curate.errors import InputError

__all__ = [
    "NUMBER_ENTRIES",
    "PUNCTUATION_ENTRIES",
    "NgramResult",
    "PmiUnit",
    "SourceCount",
    "default_wordnet_dirs",
    "find_wordnet",
    "merge_sources",
    "mine_ngrams",
    "read_word_list",
    "read_wordnet",
]

WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
NUMBER_ENTRIES = tuple(str(i) for i in range(100))  # MetaCLIP's build starts from these
PUNCTUATION_ENTRIES = frozenset(string.punctuation)  # one ASCII mark: never an entry
# A syntactic marker such as (a), (p), (ip) ending a lemma, as nltk's WordNet reader strips it.
_SYNTACTIC_MARKER = re.compile(r"\([^()]*\)$")


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


def _synset_entry(line: str, where: str) -> str:
    """MetaCLIP's entry for one WordNet data line: nltk's synset name cut at the first dot.

    nltk names a synset ``lemma.pos.NN`` after its first lemma, without the syntactic marker and
    lowercased; MetaCLIP keeps the name up to its first dot, underscores as spaces. A lemma with a
    dot in it is therefore cut there (``St._Louis`` gives ``st``, ``.22`` gives nothing).
    """
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
    name = _SYNTACTIC_MARKER.sub("", word).lower()
    return name.split(".", 1)[0].replace("_", " ")


def read_wordnet(folder: Path | str) -> list[str]:
    """MetaCLIP's WordNet entries: every synset of a WordNet 3.x ``dict`` folder as nltk names
    it, cut at the first dot (`_synset_entry`: ``dog.n.01`` gives ``dog``, so lowercase), in
    noun, verb, adj, adv order.

    Lines starting with two spaces (the license header) are skipped. Repeats and empty names
    are kept (`merge_sources` drops them).
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
            lemmas.append(_synset_entry(line, f"{path} line {number}"))
    return lemmas


class PmiUnit(str, Enum):
    """The scale `mine_ngrams` reads its PMI threshold on."""

    bits = "bits"  # log2 P(ab) / (P(a) P(b)), as nltk's BigramAssocMeasures.pmi and MetaCLIP
    ratio = "ratio"  # P(ab) / (P(a) P(b)) itself, 2 to the power of the PMI in bits


@dataclass
class NgramResult:
    """Unigrams and bigrams mined by `mine_ngrams`, with the corpus counts behind them.

    `bigram_pmi` holds each kept bigram's PMI in bits, whatever unit the threshold was read on.
    """

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
    pmi_unit: PmiUnit | str = PmiUnit.bits,
) -> NgramResult:
    """Frequent unigrams and high-PMI bigrams of a text corpus, tokenised as matching sees it.

    Tokens are ``pad_text(caption).split(" ")`` without empty tokens. The marks
    ``, . ; : ? !`` and backtick separate tokens and are not tokens (no bigram spans one); a token
    that is only whitespace (a no-break space, say) is treated the same way. Case is kept.

    A unigram is kept when it occurs at least `min_unigram_count` times. A bigram ``"a b"`` (two
    adjacent tokens) is kept when it occurs at least `min_bigram_count` times and its PMI is at
    least `min_bigram_pmi`. The PMI is nltk's ``BigramAssocMeasures.pmi`` as MetaCLIP computes
    it (``BigramCollocationFinder(word_fd, bigram_fd)``):
    ``log2(count(ab) * N) - log2(count(a) * count(b))`` bits, where N is the total of the
    unigram counts (``word_fd.N()``, the number of tokens), not the number of bigram positions;
    that is ``log2 P(ab) / (P(a) P(b))`` with every probability over N. With `pmi_unit`
    ``bits`` (the default, MetaCLIP's 30) the threshold is read in bits; with ``ratio`` it is
    read on ``P(ab) / (P(a) P(b))`` itself (30 bits is a ratio of 2**30).

    The ratio is a fraction of integers and is compared exactly: with a ratio threshold, and
    with a whole number of bits k (ratio ≥ 2**k), so results do not hinge on rounding. A
    fractional threshold in bits is compared with the float PMI, as nltk computes it.

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
    keep = _pmi_test(min_bigram_pmi, PmiUnit(pmi_unit))
    terms: dict[str, tuple[int, int]] = {}  # bigram: (count(ab) * N, count(a) * count(b))
    for (first, second), count in bigram_counts.items():
        if count < min_bigram_count:
            continue
        numerator = count * tokens
        denominator = unigram_counts[first] * unigram_counts[second]
        if keep(numerator, denominator):
            terms[f"{first} {second}"] = (numerator, denominator)
    ratio = {bigram: Fraction(*pair) for bigram, pair in terms.items()}
    bigrams = sorted(ratio, key=lambda bigram: (-ratio[bigram], bigram))
    pmi = {b: math.log2(terms[b][0]) - math.log2(terms[b][1]) for b in bigrams}
    return NgramResult(
        unigrams=unigrams,
        bigrams=bigrams,
        tokens=tokens,
        texts=texts,
        skipped=skipped,
        bigram_positions=positions,
        bigram_pmi=pmi,
    )


def _pmi_test(threshold: float, unit: PmiUnit) -> Callable[[int, int], bool]:
    """``keep(numerator, denominator)``: is the PMI of that ratio at least `threshold`?"""
    if unit is PmiUnit.ratio:
        exact = Fraction(threshold)
        return lambda num, den: num * exact.denominator >= exact.numerator * den
    if math.isfinite(threshold) and threshold.is_integer():
        k = int(threshold)  # ratio ≥ 2**k, in integers
        if k >= 0:
            return lambda num, den: num >= den << k
        return lambda num, den: num << -k >= den
    return lambda num, den: math.log2(num) - math.log2(den) >= threshold


@dataclass
class SourceCount:
    """What one source contributed to a merge."""

    name: str
    read: int
    added: int
    duplicates: int
    blank: int
    punctuation: int = 0  # entries that are one ASCII punctuation character


def merge_sources(
    sources: Sequence[tuple[str, Sequence[str]]],
) -> tuple[list[str], list[SourceCount]]:
    """Concatenate named sources in order, dropping blank entries, entries that are one ASCII
    punctuation character (MetaCLIP's ``entry not in set(string.punctuation)``) and repeats of
    earlier entries."""
    merged: list[str] = []
    seen: set[str] = set()
    counts: list[SourceCount] = []
    for name, entries in sources:
        added = duplicates = blank = punctuation = 0
        for entry in entries:
            if not entry.strip():
                blank += 1
            elif entry in PUNCTUATION_ENTRIES:
                punctuation += 1
            elif entry in seen:
                duplicates += 1
            else:
                seen.add(entry)
                merged.append(entry)
                added += 1
        counts.append(SourceCount(name, len(entries), added, duplicates, blank, punctuation))
    return merged, counts
