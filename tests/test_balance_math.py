"""Independent checks of `curate.balancing.matching` and `curate.balancing.sampling`.

Every oracle here is written from the published rules (MetaCLIP, Xu et al. 2023) and the
documented rules of `curate balance`, never from the fast-path code: matching is a loop of
``in`` (metaclip) or a per-entry regular expression (words) over all entries, keep
probabilities are exact `Fraction` products, thresholds are found by trying every integer t,
and the sampling distribution is checked against a literal simulation of MetaCLIP's reference
procedure.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from curate.balancing.matching import Matcher, MatchMode, never_matches, pad_text
from curate.balancing.sampling import (
    DEFAULT_TAIL_SHARE,
    count_entries,
    entry_probabilities,
    expected_kept,
    keep_probabilities,
    tail_share,
    threshold_for_size,
    threshold_from_tail_share,
    uniform_draws,
)
from curate.io.uid_files import uids_to_pairs

# --------------------------------------------------------------------------------------------
# Oracles for matching, from the published rules
# --------------------------------------------------------------------------------------------

MARKS = (",", ".", ";", ":", "?", "!", "`")
CONTROLS = ("\t", "\n", "\r")


def oracle_pad(text: str) -> str:
    """MetaCLIP: outer spaces, each of the seven marks gets a space on each side, controls → ' '."""
    padded = " " + text + " "
    for mark in MARKS:
        padded = padded.replace(mark, " " + mark + " ")
    for control in CONTROLS:
        padded = padded.replace(control, " ")
    return padded


def oracle_metaclip(entries: list[str], text: str) -> list[int]:
    padded = oracle_pad(text)
    return [i for i, entry in enumerate(entries) if " " + entry + " " in padded]


def words_patterns(entries: list[str]) -> list[re.Pattern[str] | None]:
    return [
        re.compile(r"(?<!\w)" + re.escape(e.casefold()) + r"(?!\w)") if e.casefold() else None
        for e in entries
    ]


def oracle_words(patterns: list[re.Pattern[str] | None], text: str) -> list[int]:
    folded = text.casefold()
    return [i for i, p in enumerate(patterns) if p is not None and p.search(folded)]


def metaclip_witness(entry: str) -> str | None:
    """A text whose padded form contains ``" " + entry + " "``, or None when the rules allow none.

    In a padded text every mark carries its own space on each side and there is no tab, newline
    or carriage return. So ``S = " " + entry + " "`` can occur only when it has no control, every
    mark in S has a space on both sides, and no space is claimed by two marks (``". ."``). Then
    deleting the spaces the marks claim gives a text whose padding re-creates S.
    """
    s = " " + entry + " "
    if any(c in s for c in CONTROLS):
        return None
    claimed: set[int] = set()
    for i, ch in enumerate(s):
        if ch in MARKS:
            if s[i - 1] != " " or s[i + 1] != " ":
                return None
            if i - 1 in claimed:
                return None
            claimed.update((i - 1, i + 1))
    return "".join(ch for i, ch in enumerate(s) if i not in claimed)


# --------------------------------------------------------------------------------------------
# Random vocabularies
# --------------------------------------------------------------------------------------------

VOCAB = [
    "new", "york", "city", "New", "NEW", "York", "City", "dog", "dogs", "Dog", "dog-friendly",
    "hot", "hotdog", "cat", "Cat", "CAT", "café", "Café", "CAFÉ", "cafe", "straße", "Straße",
    "STRASSE", "strasse", "ß", "ss", "λόγος", "Λόγος", "ΛΌΓΟΣ", "σ", "ς", "Σ", "東京", "東",
    "京都", "日本", "🐶", "🐱", "🐶🐱", "x", "y", "a", "b", "U", "S", "U.S.", "u.s.", "x_y",
    "_", "3", "42", "3.14", "ﬁsh", "fish", "İstanbul", "istanbul", "e\u0301", "é", "(dog)",
    "rock'n'roll", "don't",
]  # fmt: skip

SEPARATORS = [" "] * 14 + [
    "", ",", ", ", " , ", ".", ". ", "!", "?", ";", ":", "`", "-", "/", "(", ")", "'", '"',
    "\t", "\n", "\r", "  ", "\u00a0", " - ", "...", "?!", " ( ", ") ",
]  # fmt: skip

FIXED_ENTRIES = [
    "new", "new york", "york city", "new york city", "New York", "U.S.", "a,b", "x\ty", "a , b",
    " dog", "dog ", "  dog", "x y", ". .", ",", ".", "`", "dog .", "dog!", "3 . 14", "", " ",
    "-", "dog-friendly", "dog , cat", "cat ?", "Cat", "CAT", "ss", "ß", "σ", "a\nb", "x\ry",
]  # fmt: skip


def random_text(rng: random.Random, vocab: list[str], max_tokens: int = 12) -> str:
    tokens = [rng.choice(vocab) for _ in range(rng.randint(0, max_tokens))]
    if tokens and rng.random() < 0.5:
        tokens.append(rng.choice(tokens))  # repeated words
    parts: list[str] = []
    if rng.random() < 0.2:
        parts.append(rng.choice(SEPARATORS))
    for i, token in enumerate(tokens):
        if i:
            parts.append(rng.choice(SEPARATORS))
        parts.append(token)
    if rng.random() < 0.3:
        parts.append(rng.choice(SEPARATORS))
    return "".join(parts)


def random_entries(rng: random.Random, texts: list[str], n_random: int) -> list[str]:
    entries = list(VOCAB) + list(FIXED_ENTRIES)
    for _ in range(n_random):
        kind = rng.random()
        if kind < 0.4:
            words = [rng.choice(VOCAB) for _ in range(rng.randint(1, 3))]
            entry = " ".join(words)
        elif kind < 0.6:
            words = [rng.choice(VOCAB) for _ in range(rng.randint(1, 3))]
            entry = "".join(w + rng.choice(SEPARATORS) for w in words)
        else:  # a slice of a text, so that matches are frequent
            text = rng.choice(texts)
            if not text:
                continue
            a = rng.randrange(len(text))
            entry = text[a : a + rng.randint(1, 15)]
            if rng.random() < 0.5:
                entry = entry.strip()
        if rng.random() < 0.1:
            entry = rng.choice([" ", "  "]) + entry
        if rng.random() < 0.1:
            entry = entry + " "
        if rng.random() < 0.1:
            entry = entry.upper() if rng.random() < 0.5 else entry.lower()
        entries.append(entry)
    return list(dict.fromkeys(entries))  # distinct, first order kept


# --------------------------------------------------------------------------------------------
# Matching: hand-written examples
# --------------------------------------------------------------------------------------------


def one(entry: str, text: str, mode: str) -> bool:
    return Matcher([entry], mode).match(text) == [0]


@pytest.mark.parametrize(
    ("entry", "text", "metaclip", "words"),
    [
        ("dog", "a dog-friendly park", False, True),  # '-' is no boundary for metaclip
        ("dog", "my dog, a cat", True, True),  # ',' is padded
        ("dog", "dog.", True, True),
        ("dog", '"dog"', False, True),  # quotes are no boundary for metaclip
        ("dog", "(dog)", False, True),
        ("dog", "dog's bowl", False, True),
        ("dog", "dogs", False, False),
        ("dog", "hotdog", False, False),
        ("dog", "dog_1", False, False),  # '_' is a word character
        ("dog", "DOG", False, True),  # metaclip is case-sensitive, words case-folds
        ("U.S.", "the U.S. army", False, True),  # never matches in metaclip
        ("U.S.", "the u.s. army", False, True),
        ("U.S.", "the U.S.A. army", False, False),  # followed by 'a', a word character
        ("a,b", "a,b", False, True),
        ("a , b", "a,b", True, False),
        ("a , b", "a , b", False, True),  # padding gives " a  ,  b ": two spaces each side
        ("x\ty", "x\ty", False, True),
        ("x y", "x\ty", True, False),
        ("x y", "x\ny", True, False),
        ("straße", "STRASSE", False, True),
        ("STRASSE", "die Straße", False, True),
        ("λόγος", "ΛΌΓΟΣ!", False, True),
        ("東京", "東京タワー", False, False),  # 'タ' is a word character
        ("東京", "in 東京.", True, True),
        ("🐶", "I love 🐶🐱", False, True),  # emoji are not word characters
        ("🐶", "I love 🐶 !", True, True),
        (" dog", "a  dog", True, True),  # leading space: needs two spaces in metaclip
        (" dog", "a dog", False, False),  # words: the space before "dog" follows "a"
        ("dog ", "dog  cat", True, True),
        ("new york", "I love new york city", True, True),
        ("dog", "", False, False),
        ("dog .", "a dog.", True, False),
        ("3 . 14", "pi is 3.14", True, False),
        ("3.14", "pi is 3.14", False, True),
    ],
)
def test_hand_examples(entry: str, text: str, metaclip: bool, words: bool) -> None:
    assert one(entry, text, "metaclip") is metaclip
    assert one(entry, text, "words") is words
    # and the oracles agree with the hand-written answers
    assert (oracle_metaclip([entry], text) == [0]) is metaclip
    assert (oracle_words(words_patterns([entry]), text) == [0]) is words


def test_overlapping_entries_and_case() -> None:
    entries = ["new", "new york", "york city", "new york city", "york", "city", "New York", "NEW"]
    text = "I love New York and new york city!"
    # metaclip: every overlapping occurrence counts, case matters
    assert Matcher(entries, MatchMode.metaclip).match(text) == [0, 1, 2, 3, 4, 5, 6]
    # words: case-folded, so "NEW" and "New York" match too
    assert Matcher(entries, MatchMode.words).match(text) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert Matcher(entries, "metaclip").match("newyork city") == [5]
    assert Matcher(["Cat", "cat", "CAT"], "words").match("a cAt") == [0, 1, 2]
    assert Matcher(["Cat", "cat", "CAT"], "metaclip").match("a cat") == [1]


def test_pad_text() -> None:
    assert pad_text("a,b\tc") == " a , b c "
    assert pad_text("") == "  "
    assert pad_text("x.y;z:w?v!u`t\nq\rr") == " x . y ; z : w ? v ! u ` t q r "
    assert pad_text("a-b/(c)'d\"") == " a-b/(c)'d\" "
    rng = random.Random(7)
    for _ in range(500):
        text = random_text(rng, VOCAB)
        assert pad_text(text) == oracle_pad(text)


def test_empty_and_never_matching_entry_lists() -> None:
    assert Matcher([], "metaclip").match("anything") == []
    assert Matcher([], "words").match("anything") == []
    matcher = Matcher(["U.S.", "a,b", "x\ty"], "metaclip")
    assert matcher.match("the U.S. a,b x\ty") == []
    assert Matcher(["", "U.S."], "words").match("U.S.") == [1]


# --------------------------------------------------------------------------------------------
# Matching: random comparisons with the oracles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_match_sets_equal_oracle(seed: int) -> None:
    rng = random.Random(seed)
    texts = [random_text(rng, VOCAB) for _ in range(400)]
    entries = random_entries(rng, texts, 300)
    assert len(entries) > 300
    metaclip = Matcher(entries, "metaclip")
    words = Matcher(entries, "words")
    patterns = words_patterns(entries)
    hits_m = hits_w = 0
    for text in texts:
        expected_m = oracle_metaclip(entries, text)
        expected_w = oracle_words(patterns, text)
        assert metaclip.match(text) == expected_m, text
        assert words.match(text) == expected_w, text
        hits_m += len(expected_m)
        hits_w += len(expected_w)
    assert metaclip.match_many(texts[:20]) == [oracle_metaclip(entries, t) for t in texts[:20]]
    # the instance is not trivial: many matches in both modes
    assert hits_m > 1000
    assert hits_w > 1000


def syllable_words(rng: random.Random, n: int) -> list[str]:
    syllables = ["ka", "to", "mi", "ré", "su", "ße", "λο", "γο", "東", "京", "an", "el", "ño"]
    words = {"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n * 2)}
    return sorted(words)[:n]


def test_large_metaclip_20k_entries() -> None:
    rng = random.Random(20_000)
    vocab = [*syllable_words(rng, 1500), "U.S.", "a,b"]
    texts = [random_text(rng, vocab, max_tokens=25) for _ in range(300)]
    entries: list[str] = []
    seen: set[str] = set()
    while len(entries) < 20_000:
        if rng.random() < 0.3:
            text = rng.choice(texts)
            a = rng.randrange(max(1, len(text)))
            entry = text[a : a + rng.randint(1, 20)]
        else:
            entry = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3)))
        if entry not in seen:
            seen.add(entry)
            entries.append(entry)
    matcher = Matcher(entries, "metaclip")
    total = 0
    for text in texts:
        expected = oracle_metaclip(entries, text)
        assert matcher.match(text) == expected
        total += len(expected)
    assert total > 3000


def test_large_words_5k_entries() -> None:
    rng = random.Random(5_000)
    vocab = syllable_words(rng, 800) + [w.upper() for w in VOCAB]
    texts = [random_text(rng, vocab, max_tokens=25) for _ in range(100)]
    entries = list(
        dict.fromkeys(
            " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 2))) for _ in range(5_000)
        )
    )
    matcher = Matcher(entries, "words")
    patterns = words_patterns(entries)
    total = 0
    for text in texts:
        expected = oracle_words(patterns, text)
        assert matcher.match(text) == expected
        total += len(expected)
    assert total > 500


# --------------------------------------------------------------------------------------------
# never_matches
# --------------------------------------------------------------------------------------------


def reachable_patterns(alphabet: str, max_text: int, max_pattern: int) -> set[str]:
    """Every ``" " + e + " "`` with len(e) <= max_pattern - 2 found in the padding of some text of
    length <= max_text over `alphabet` (brute force over all texts)."""
    found: set[str] = set()
    for n in range(max_text + 1):
        for chars in itertools.product(alphabet, repeat=n):
            padded = oracle_pad("".join(chars))
            for i, ch in enumerate(padded):
                if ch != " ":
                    continue
                for j in range(i + 1, min(len(padded), i + max_pattern)):
                    if padded[j] == " ":
                        found.add(padded[i : j + 1])
    return found


SMALL_ALPHABET = "a .,\t"
# A witness text is never longer than the entry + 2 (see metaclip_witness), so texts of length 6
# decide every entry of length <= 4.
REACHABLE = reachable_patterns(SMALL_ALPHABET, max_text=6, max_pattern=6)
SMALL_ENTRIES = [
    "".join(chars) for n in range(5) for chars in itertools.product(SMALL_ALPHABET, repeat=n)
]


def test_witness_oracle_agrees_with_brute_force() -> None:
    """Sanity check of the analytic oracle against exhaustive enumeration."""
    for entry in SMALL_ENTRIES:
        witness = metaclip_witness(entry)
        assert (witness is not None) == (" " + entry + " " in REACHABLE), repr(entry)
        if witness is not None:
            assert " " + entry + " " in oracle_pad(witness)


def test_never_matches_is_sound_exhaustive() -> None:
    """never_matches True ⇒ no text over the alphabet matches (brute force)."""
    for entry in SMALL_ENTRIES:
        if never_matches(entry, "metaclip"):
            assert " " + entry + " " not in REACHABLE, repr(entry)


def test_never_matches_is_complete_exhaustive() -> None:
    """No text over the alphabet matches ⇒ never_matches True (brute force)."""
    missed = [
        e
        for e in SMALL_ENTRIES
        if " " + e + " " not in REACHABLE and not never_matches(e, "metaclip")
    ]
    assert missed == []


SHARED_SPACE_ENTRIES = [". .", "a , . b", "? !", "wow ! !"]


@pytest.mark.parametrize("entry", SHARED_SPACE_ENTRIES)
def test_marks_sharing_a_space_cannot_match(entry: str) -> None:
    assert metaclip_witness(entry) is None
    squeezed = entry.replace(" ", "")
    for probe in (entry, squeezed, "x " + squeezed + " y", entry.replace(" ", "  ")):
        assert oracle_metaclip([entry], probe) == []
        assert Matcher([entry], "metaclip").match(probe) == []


@pytest.mark.parametrize("entry", SHARED_SPACE_ENTRIES)
def test_never_matches_marks_sharing_a_space(entry: str) -> None:
    assert never_matches(entry, "metaclip")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("U.S.", True),
        ("a,b", True),
        ("x\ty", True),
        ("a\nb", True),
        ("x\ry", True),
        ("dog!", True),
        (",dog", True),
        ("dog", False),
        ("a , b", False),
        ("dog .", False),
        (".", False),
        (" . ", False),
        ("", False),  # " " + "" + " " = two spaces: "a  b" matches it
        (" ", False),
        ("dog-friendly", False),
        ("x\u00a0y", False),  # only tab, newline and carriage return are turned into spaces
    ],
)
def test_never_matches_hand(entry: str, expected: bool) -> None:
    assert never_matches(entry, "metaclip") is expected
    assert (metaclip_witness(entry) is None) is expected


def test_never_matches_words_mode() -> None:
    assert never_matches("", "words")
    assert not never_matches(" ", "words")
    assert not never_matches("U.S.", "words")
    assert not never_matches("x\ty", "words")
    assert Matcher([" "], "words").match("a - - b") == [0]  # the space between the dashes


def test_never_matches_random_entries() -> None:
    rng = random.Random(99)
    texts = [random_text(rng, VOCAB) for _ in range(200)]
    entries = random_entries(rng, texts, 600)
    n_never = n_can = 0
    for entry in entries:
        never = never_matches(entry, "metaclip")
        witness = metaclip_witness(entry)
        if never:
            n_never += 1
            assert witness is None, repr(entry)
            probes = [entry, "foo " + entry + " bar", entry.replace(" ", ""), *texts[:50]]
            for probe in probes:
                assert oracle_metaclip([entry], probe) == []
                assert Matcher([entry], "metaclip").match(probe) == []
        elif witness is not None:
            n_can += 1
            for probe in (witness, "foo " + witness + " bar", "x" + witness + "\ty"):
                assert oracle_metaclip([entry], probe) == [0], repr(entry)
                assert Matcher([entry], "metaclip").match(probe) == [0], repr(entry)
            if not any(c in entry for c in MARKS):
                # without marks the entry itself is a witness, alone or between spaces
                assert Matcher([entry], "metaclip").match(entry) == [0]
                assert Matcher([entry], "metaclip").match("foo " + entry + " bar") == [0]
        else:
            raise AssertionError(f"never_matches is False but no text matches {entry!r}")
    assert n_never > 50
    assert n_can > 300


# --------------------------------------------------------------------------------------------
# Sampling: oracles
# --------------------------------------------------------------------------------------------


def oracle_keep(entry_lists: list[list[int]], counts: list[int], t: float) -> list[Fraction]:
    """P(keep) = 1 − Π_e (1 − min(1, t/count_e)); 0 without matches. Exact."""
    tt = Fraction(t)
    out = []
    for entries in entry_lists:
        if not entries:
            out.append(Fraction(0))
            continue
        miss = math.prod((1 - min(Fraction(1), tt / counts[e]) for e in entries), start=Fraction(1))
        out.append(1 - miss)
    return out


def to_csr(entry_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(entry_lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in entry_lists])
    flat = [e for entries in entry_lists for e in entries]
    return offsets, np.array(flat, dtype=np.int32)


def random_instance(
    rng: random.Random, n_texts: int, n_entries: int, max_count: int
) -> tuple[list[list[int]], list[int]]:
    sizes = [0, 0, 1, 1, 1, 2, 2, 3, 5, 8]
    entry_lists = [rng.sample(range(n_entries), rng.choice(sizes)) for _ in range(n_texts)]
    counts = [
        rng.choice([1, 2, 3, rng.randint(1, 50), rng.randint(1, max_count)])
        for _ in range(n_entries)
    ]
    return entry_lists, counts


def oracle_tail_share(counts: list[int], t: float) -> Fraction:
    total = sum(c for c in counts if c > 0)
    if total == 0:
        return Fraction(0)
    return Fraction(sum(c for c in counts if 0 < c < t), total)


def oracle_threshold(counts: list[int], share: float) -> int:
    """Smallest integer t with Σ_{c<t} c ≥ share · Σ c (share read as the decimal it prints as)."""
    s = Fraction(repr(share))
    total = sum(c for c in counts if c > 0)
    for t in range(1, max(counts) + 2):
        if sum(c for c in counts if 0 < c < t) >= s * total:
            return t
    raise AssertionError("unreachable: t = max + 1 holds every match")


def random_uids(rng: random.Random, n: int) -> list[str]:
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Sampling: probabilities
# --------------------------------------------------------------------------------------------


def test_count_entries() -> None:
    rng = random.Random(3)
    ids = [rng.randrange(40) for _ in range(1000)]
    counts = count_entries(np.array(ids, dtype=np.int32), 50)
    assert counts.dtype == np.int64
    assert counts.tolist() == [Counter(ids)[i] for i in range(50)]
    assert count_entries(np.array([], dtype=np.int32), 3).tolist() == [0, 0, 0]


def test_entry_probabilities() -> None:
    counts = [0, 1, 2, 5, 10, 20, 10**9]
    for t in (0.0, 0.5, 1.0, 7.0, 10.0, 1e6):
        got = entry_probabilities(np.array(counts), t).tolist()
        expected = [1.0 if c == 0 else min(1.0, t / c) for c in counts]
        assert got == pytest.approx(expected, rel=1e-15, abs=0)


@pytest.mark.parametrize("seed", range(6))
def test_keep_probabilities_against_exact_oracle(seed: int) -> None:
    rng = random.Random(seed)
    entry_lists, counts = random_instance(rng, 300, 120, max_count=10**7)
    offsets, entry_ids = to_csr(entry_lists)
    for t in (0.0, 0.3, 1.0, 2.5, 20.0, 1000.0, 5e6, 1e8):
        got = keep_probabilities(offsets, entry_ids, np.array(counts), t)
        assert got.dtype == np.float64
        assert got.shape == (len(entry_lists),)
        expected = oracle_keep(entry_lists, counts, t)
        for i, (g, e) in enumerate(zip(got.tolist(), expected, strict=True)):
            assert math.isclose(g, float(e), rel_tol=1e-12, abs_tol=0.0), (i, t, g, float(e))
            if not entry_lists[i]:
                assert g == 0.0
                assert not math.copysign(1.0, g) < 0  # no -0.0
            if any(counts[x] <= t for x in entry_lists[i]):
                assert g == 1.0  # some entry has p = 1
        assert math.isclose(
            expected_kept(offsets, entry_ids, np.array(counts), t),
            float(sum(expected)),
            rel_tol=1e-12,
            abs_tol=1e-12,
        )


def test_keep_probabilities_small_hand_case() -> None:
    # text 0: entries 0 (count 4) and 1 (count 10), t = 2: 1 − (1 − 1/2)(1 − 1/5) = 0.6
    # text 1: no matches → 0; text 2: entry 2 (count 1 < t) → 1; text 3: entry 1 → 0.2
    entry_lists = [[0, 1], [], [2], [1]]
    offsets, entry_ids = to_csr(entry_lists)
    got = keep_probabilities(offsets, entry_ids, np.array([4, 10, 1]), 2.0)
    assert got.tolist() == pytest.approx([0.6, 0.0, 1.0, 0.2], rel=1e-14)
    empty = keep_probabilities(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32), [], 1.0)
    assert empty.shape == (0,)


def test_keep_probabilities_tiny_probabilities_keep_precision() -> None:
    # 1 − (1 − 1e-9)^3 ≈ 3e-9 must not be lost to cancellation
    offsets, entry_ids = to_csr([[0, 1, 2]])
    counts = np.array([10**9, 10**9, 10**9])
    got = keep_probabilities(offsets, entry_ids, counts, 1.0)[0]
    expected = float(oracle_keep([[0, 1, 2]], [10**9] * 3, 1.0)[0])
    assert math.isclose(got, expected, rel_tol=1e-12)


# --------------------------------------------------------------------------------------------
# Sampling: the draw distribution
# --------------------------------------------------------------------------------------------


def binomial_ok(rate: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    # 5 sd for each of ~120 checks: P(any false alarm) < 1e-4 (Bonferroni); slack for p ≈ 0 or 1
    return abs(rate - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 2.0 / n


@pytest.fixture(scope="module")
def stat_instance() -> tuple[list[list[int]], list[int], float, list[float]]:
    rng = random.Random(2024)
    t = 10.0
    n_entries = 40
    counts = [rng.choice([3, 8, 12, 15, 20, 30, 50, 80, 150, 400]) for _ in range(n_entries)]
    entry_lists = [rng.sample(range(n_entries), rng.randint(1, 4)) for _ in range(60)]
    entry_lists += [[], []]  # texts without matches
    probs = [float(p) for p in oracle_keep(entry_lists, counts, t)]
    return entry_lists, counts, t, probs


def test_keep_rate_with_uniform_draws_matches_formula(
    stat_instance: tuple[list[list[int]], list[int], float, list[float]],
) -> None:
    entry_lists, counts, t, probs = stat_instance
    offsets, entry_ids = to_csr(entry_lists)
    p = keep_probabilities(offsets, entry_ids, np.array(counts), t)
    pairs = uids_to_pairs(random_uids(random.Random(11), len(entry_lists)))
    n_seeds = 2000
    kept = np.zeros(len(entry_lists), dtype=np.int64)
    for seed in range(n_seeds):
        kept += uniform_draws(pairs, seed) < p
    rates = kept / n_seeds
    assert min(x for x in probs if x > 0) > 0.04 and max(probs) == 1.0  # spread of the instance
    for i, (rate, prob) in enumerate(zip(rates.tolist(), probs, strict=True)):
        assert binomial_ok(rate, prob, n_seeds), (i, rate, prob)
    assert rates[-2:].tolist() == [0.0, 0.0]


def test_reference_procedure_matches_formula(
    stat_instance: tuple[list[list[int]], list[int], float, list[float]],
) -> None:
    """MetaCLIP's procedure, literally: for each matched entry, random() < min(1, t/count)."""
    entry_lists, counts, t, probs = stat_instance
    rng = random.Random(77)
    reps = 2000
    kept = [0] * len(entry_lists)
    for _ in range(reps):
        for i, entries in enumerate(entry_lists):
            for e in entries:
                if rng.random() < min(1.0, t / counts[e]):
                    kept[i] += 1
                    break
    for i, (k, prob) in enumerate(zip(kept, probs, strict=True)):
        assert binomial_ok(k / reps, prob, reps), (i, k / reps, prob)


def chi_square_uniform(x: np.ndarray, bins: int = 100) -> float:
    observed = np.bincount(np.minimum((x * bins).astype(np.int64), bins - 1), minlength=bins)
    expected = len(x) / bins
    return float(((observed - expected) ** 2 / expected).sum())


def ks_uniform(x: np.ndarray) -> float:
    s = np.sort(x)
    n = len(s)
    i = np.arange(1, n + 1)
    return float(max((i / n - s).max(), (s - (i - 1) / n).max()) * math.sqrt(n))


@pytest.fixture(scope="module")
def many_pairs() -> np.ndarray:
    return uids_to_pairs(random_uids(random.Random(5), 100_000))


def test_uniform_draws_are_uniform(many_pairs: np.ndarray) -> None:
    # chi-square with 99 degrees of freedom: mean 99, sd 14; 200 is > 7 sd. KS: sqrt(n)·D < 2.
    sequential = uids_to_pairs([f"{i:032x}" for i in range(100_000)])
    high_bits = uids_to_pairs([f"{i:016x}{0:016x}" for i in range(100_000)])
    for pairs in (many_pairs, sequential, high_bits):
        for seed in (0, 1, 12345):
            x = uniform_draws(pairs, seed)
            assert x.dtype == np.float64
            assert x.min() >= 0.0
            assert x.max() < 1.0
            assert chi_square_uniform(x) < 200.0
            assert ks_uniform(x) < 2.0
            assert len(np.unique(x)) > 99_990


def test_uniform_draws_seed_changes_draws(many_pairs: np.ndarray) -> None:
    a = uniform_draws(many_pairs, 0)
    b = uniform_draws(many_pairs, 1)
    c = uniform_draws(many_pairs, 2**40 + 3)
    assert np.array_equal(a, uniform_draws(many_pairs, 0))  # deterministic
    for other in (b, c):
        assert np.mean(a == other) < 1e-3
        assert abs(np.corrcoef(a, other)[0, 1]) < 0.02  # sd of r ≈ 0.003
        # joint keep rate at p = 0.5 is ≈ 0.25 when draws of two seeds are independent
        assert abs(np.mean((a < 0.5) & (other < 0.5)) - 0.25) < 0.01


def test_uniform_draws_do_not_depend_on_other_uids(many_pairs: np.ndarray) -> None:
    full = uniform_draws(many_pairs, 42)
    perm = np.random.default_rng(0).permutation(len(many_pairs))
    assert np.array_equal(uniform_draws(many_pairs[perm], 42), full[perm])
    subset = np.sort(np.random.default_rng(1).choice(len(many_pairs), 1000, replace=False))
    assert np.array_equal(uniform_draws(many_pairs[subset], 42), full[subset])
    for i in (0, 17, 99_999):
        assert uniform_draws(many_pairs[i : i + 1], 42)[0] == full[i]
    # same uids in an array with other field names: the same draws
    renamed = many_pairs[:100].astype(np.dtype([("a", "<u8"), ("b", "<u8")]))
    assert np.array_equal(uniform_draws(renamed, 42), full[:100])


# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "share", "t"),
    [
        # a single entry of 5: tail is empty for t <= 5, everything at t = 6
        ([5], 0.5, 6),
        ([5], 1e-9, 6),
        ([5], 0.999, 6),
        # ties: [1, 1, 2, 2, 2, 10], total 18. t=2: 2; t=3: 8; t=11: 18
        ([1, 1, 2, 2, 2, 10], 0.1, 2),  # 2 >= 1.8
        ([2, 1, 10, 2, 1, 2], 0.4, 3),  # 8 >= 7.2, order does not matter
        ([1, 1, 2, 2, 2, 10], 0.5, 11),  # 8 < 9
        # binary-exact boundaries: [1, 1, 2, 4, 8], total 16. t=2: 2; t=3: 4; t=5: 8; t=9: 16
        ([1, 1, 2, 4, 8], 0.125, 2),  # 2 >= 2 exactly
        ([1, 1, 2, 4, 8], 0.25, 3),  # 4 >= 4 exactly
        ([1, 1, 2, 4, 8], 0.5, 5),  # 8 >= 8 exactly
        ([1, 1, 2, 4, 8], 0.5000001, 9),
        ([0, 8, 0, 1, 4, 2, 1, 0], 0.25, 3),  # zeros ignored
        # share close to 1: [1, 1000], total 1001, 0.999·1001 = 999.999 > 1 → all
        ([1, 1000], 0.999, 1001),
        ([1, 1000], 0.0009, 2),  # 1 >= 0.9009
        # MetaCLIP default share 6 %: [3, 47] total 50, 0.06·50 = 3 → t = 4
        ([3, 47], DEFAULT_TAIL_SHARE, 4),
        ([3, 3, 94], DEFAULT_TAIL_SHARE, 4),  # 6 >= 6
    ],
)
def test_threshold_from_tail_share_hand(counts: list[int], share: float, t: int) -> None:
    assert oracle_threshold(counts, share) == t  # the hand answer agrees with the oracle
    choice = threshold_from_tail_share(np.array(counts), share)
    assert choice.t == t
    assert choice.rule == "tail_share"
    assert choice.tail_share == pytest.approx(float(oracle_tail_share(counts, t)), rel=1e-12)


@pytest.mark.parametrize(
    ("counts", "share", "t"),
    [
        ([7, 93], 0.07, 8),  # 7 / 100 is exactly 7 %
        ([14, 186], 0.07, 15),  # 14 / 200
    ],
)
def test_threshold_from_tail_share_decimal_boundary(
    counts: list[int], share: float, t: int
) -> None:
    assert oracle_threshold(counts, share) == t
    assert threshold_from_tail_share(np.array(counts), share).t == t


def test_threshold_no_matches_and_bad_share() -> None:
    choice = threshold_from_tail_share(np.array([0, 0, 0]), 0.5)
    assert choice.t == 1.0
    assert choice.note
    for share in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            threshold_from_tail_share(np.array([1, 2, 3]), share)


@pytest.mark.parametrize("seed", range(8))
def test_threshold_from_tail_share_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        n = rng.randint(1, 30)
        high = rng.choice([3, 10, 100, 5000])
        counts = [rng.choice([0, rng.randint(1, high), rng.randint(1, 3)]) for _ in range(n)]
        if not any(counts):
            counts.append(rng.randint(1, high))
        for share in [rng.random() for _ in range(5)] + [1e-6, 0.999999, DEFAULT_TAIL_SHARE]:
            expected = oracle_threshold(counts, share)
            choice = threshold_from_tail_share(np.array(counts), share)
            assert choice.t == expected, (counts, share)
            assert oracle_tail_share(counts, expected) >= Fraction(repr(share))
            assert oracle_tail_share(counts, expected - 1) < Fraction(repr(share))
            assert choice.tail_share == pytest.approx(
                float(oracle_tail_share(counts, expected)), rel=1e-12
            )


def test_threshold_binary_exact_boundaries_random() -> None:
    """Shares k/2^m that hit a cumulative tail exactly (exact in binary floating point)."""
    rng = random.Random(8)
    for _ in range(200):
        counts = [rng.randint(1, 8) for _ in range(rng.randint(1, 10))]
        counts.append(2 ** (math.ceil(math.log2(sum(counts) + 1))) - sum(counts))  # total 2^m
        total = sum(counts)
        for v in sorted(set(counts))[:-1]:
            boundary = sum(c for c in counts if c <= v)
            share = boundary / total
            assert Fraction(share) == Fraction(boundary, total)
            assert threshold_from_tail_share(np.array(counts), share).t == v + 1
            assert oracle_threshold(counts, share) == v + 1


@pytest.mark.parametrize("seed", range(4))
def test_tail_share_against_oracle(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        counts = [rng.choice([0, rng.randint(1, 20), rng.randint(1, 10**6)]) for _ in range(25)]
        for t in [0, 1, 1.5, 2, 10, 10.5, 1000, 10**6, 10**7, *counts[:3]]:
            assert tail_share(np.array(counts), t) == pytest.approx(
                float(oracle_tail_share(counts, t)), rel=1e-12, abs=1e-300
            )
    assert tail_share(np.array([0, 0]), 5) == 0.0


def oracle_expected(entry_lists: list[list[int]], counts: list[int], t: float) -> float:
    total = 0.0
    for entries in entry_lists:
        if entries:
            total += 1.0 - math.prod(1.0 - min(1.0, t / counts[e]) for e in entries)
    return total


@pytest.mark.parametrize("seed", range(3))
def test_threshold_for_size(seed: int) -> None:
    rng = random.Random(seed)
    n_entries = 80
    entry_lists = [
        rng.sample(range(n_entries), rng.choice([0, 1, 1, 2, 3, 5])) for _ in range(1500)
    ]
    offsets, entry_ids = to_csr(entry_lists)
    counts = count_entries(entry_ids, n_entries)
    counts_list = counts.tolist()
    matched = sum(1 for e in entry_lists if e)
    previous_t = 0.0
    for fraction in (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 0.95, 0.999):
        target = max(1, round(fraction * matched))
        choice = threshold_for_size(offsets, entry_ids, counts, target)
        assert choice.rule == "target_size"
        value = oracle_expected(entry_lists, counts_list, choice.t)
        assert abs(value - target) <= 1e-3 * target, (target, choice.t, value)
        assert choice.expected_kept == pytest.approx(value, rel=1e-9)
        assert choice.tail_share == pytest.approx(
            float(oracle_tail_share(counts_list, choice.t)), rel=1e-12
        )
        assert choice.t >= previous_t  # larger targets need larger thresholds
        previous_t = choice.t
    # a target above the matched texts: t = max count, everything matched is kept, with a note
    for target in (matched + 1, 10 * matched):
        choice = threshold_for_size(offsets, entry_ids, counts, target)
        assert choice.t == max(counts_list)
        assert choice.note
        assert choice.expected_kept == pytest.approx(matched)
        assert oracle_expected(entry_lists, counts_list, choice.t) == pytest.approx(matched)
    with pytest.raises(ValueError):
        threshold_for_size(offsets, entry_ids, counts, 0)


def test_expected_kept_is_monotone_in_t() -> None:
    rng = random.Random(4)
    entry_lists, counts = random_instance(rng, 400, 60, max_count=1000)
    offsets, entry_ids = to_csr(entry_lists)
    ts = [0.0, 0.1, 0.5, 1, 2, 3, 5, 8, 13, 50, 100, 500, 1000, 2000]
    values = [expected_kept(offsets, entry_ids, np.array(counts), t) for t in ts]
    assert values == sorted(values)
    for t, value in zip(ts, values, strict=True):
        assert value == pytest.approx(oracle_expected(entry_lists, counts, t), rel=1e-12)
