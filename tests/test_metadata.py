"""Metadata files (load, check, save) and building (word lists, WordNet, n-grams, merge)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest

from curate.balancing.build import (
    NUMBER_ENTRIES,
    NgramResult,
    SourceCount,
    find_wordnet,
    merge_sources,
    mine_ngrams,
    read_word_list,
    read_wordnet,
)
from curate.balancing.metadata import (
    Metadata,
    load_metadata,
    metadata_sha256,
    save_metadata,
    unmatchable,
)
from curate.errors import InputError

UNICODE_ENTRIES = [
    "café",
    "東京",
    "hot dog",
    "Straße",
    "cat 🐈",
    " leading space",
    "trailing tab\t",
    "line\u2028separator",
    'quote " and \\ backslash',
    "Cat",
]


def input_error(call, *args, **kwargs) -> str:
    """Run `call`, expect an InputError with a one-line message, and return that message."""
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message and "\r" not in message
    return message


# --- loading, checking and saving ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".txt"])
def test_round_trip_keeps_unicode_entries_exactly(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"meta{suffix}"
    digest = save_metadata(path, UNICODE_ENTRIES)
    meta = load_metadata(path)
    assert isinstance(meta, Metadata)
    assert meta.entries == UNICODE_ENTRIES
    assert meta.size == len(UNICODE_ENTRIES)
    assert meta.path == str(path)
    assert meta.sha256 == digest == metadata_sha256(UNICODE_ENTRIES)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_hash_is_the_same_across_formats_and_depends_on_order(tmp_path: Path) -> None:
    as_json = save_metadata(tmp_path / "m.json", UNICODE_ENTRIES)
    as_text = save_metadata(tmp_path / "m.txt", UNICODE_ENTRIES)
    assert as_json == as_text
    assert load_metadata(tmp_path / "m.json").sha256 == load_metadata(tmp_path / "m.txt").sha256
    canonical = json.dumps(UNICODE_ENTRIES, ensure_ascii=False).encode("utf-8")
    assert as_json == hashlib.sha256(canonical).hexdigest()
    assert metadata_sha256(list(reversed(UNICODE_ENTRIES))) != as_json


def test_saved_bytes_are_deterministic_and_plain(tmp_path: Path) -> None:
    save_metadata(tmp_path / "a.json", UNICODE_ENTRIES)
    save_metadata(tmp_path / "b.json", UNICODE_ENTRIES)
    raw = (tmp_path / "a.json").read_bytes()
    assert raw == (tmp_path / "b.json").read_bytes()
    assert "東京".encode() in raw  # ensure_ascii=False
    assert json.loads(raw) == UNICODE_ENTRIES
    save_metadata(tmp_path / "c.txt", ["a", "b c"])
    assert (tmp_path / "c.txt").read_bytes() == b"a\nb c\n"


def test_save_overwrites_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.json"
    save_metadata(path, ["old", "entries"])
    save_metadata(path, ["new"])
    assert load_metadata(path).entries == ["new"]


def test_text_format_line_endings_bom_and_other_extensions(tmp_path: Path) -> None:
    cases = {
        "lf.txt": b"cat\ndog\n",
        "no_final_newline.txt": b"cat\ndog",
        "crlf.txt": b"cat\r\ndog\r\n",
        "bom.txt": b"\xef\xbb\xbfcat\ndog\n",
        "words.list": b"cat\ndog\n",
        "noext": b"cat\ndog\n",
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        assert load_metadata(tmp_path / name).entries == ["cat", "dog"], name
    (tmp_path / "spaces.txt").write_bytes(b" cat \n\tdog\n")  # only the line ending is removed
    assert load_metadata(tmp_path / "spaces.txt").entries == [" cat ", "\tdog"]


def test_json_entries_are_kept_as_given(tmp_path: Path) -> None:
    path = tmp_path / "m.JSON"
    path.write_text('\ufeff[" Cat ", "cat", "U.S."]', encoding="utf-8")
    assert load_metadata(str(path)).entries == [" Cat ", "cat", "U.S."]


def test_load_missing_file_and_folder(tmp_path: Path) -> None:
    message = input_error(load_metadata, tmp_path / "nope.json")
    assert "nope.json" in message and "does not exist" in message
    message = input_error(load_metadata, tmp_path)
    assert str(tmp_path) in message and "folder" in message


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("bad.json", b'["cat", "dog"', "not valid JSON"),
        ("bad.json", b"", "not valid JSON"),
        ("latin1.json", '["café"]'.encode("latin-1"), "not UTF-8"),
        ("latin1.txt", "café\n".encode("latin-1"), "not UTF-8"),
        ("object.json", b'{"cat": 1}', "holds a JSON object, not a JSON list of strings"),
        ("string.json", b'"cat"', "holds a JSON string, not a JSON list"),
        ("number.json", b"12", "holds a JSON number, not a JSON list"),
        ("int.json", b'["a", "b", 3]', "entry 2 is int, not a string"),
        ("null.json", b'["a", null]', "entry 1 is null, not a string"),
        ("nested.json", b'[["a"]]', "entry 0 is list, not a string"),
        ("float.json", b'["a", 1.5]', "entry 1 is float, not a string"),
        ("empty.json", b"[]", "has no entries"),
        ("empty.txt", b"", "has no entries"),
        ("blank.json", b'["a", "  "]', "entry 1 is blank"),
        ("empty_str.json", b'["", "a"]', "entry 0 is blank"),
        ("blank.txt", b"a\n\nb\n", "entry 1 (line 2) is blank"),
        ("spaces.txt", b"a\nb\n \t\n", "entry 2 (line 3) is blank"),
        ("only_newline.txt", b"\n", "entry 0 (line 1) is blank"),
        ("newline.json", b'["a", "b\\nc"]', "entry 1 'b\\nc' contains a line break"),
        ("cr.json", b'["a\\rb"]', "entry 0 'a\\rb' contains a line break"),
        ("cr.txt", b"a\rb\n", "entry 0 (line 1) 'a\\rb' contains a line break"),
        ("surrogate.json", b'["\\ud800"]', "lone surrogate"),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, name: str, raw: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(raw)
    message = input_error(load_metadata, path)
    assert expected in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("name", "raw", "where"),
    [
        ("dup.json", b'["cat", "dog", "Cat", "dog"]', "entry 3 duplicates entry 1: 'dog'"),
        ("dup.txt", b"cat\ndog\ncat\n", "entry 2 (line 3) duplicates entry 0 (line 1): 'cat'"),
    ],
)
def test_load_rejects_duplicates_and_suggests_build(
    tmp_path: Path, name: str, raw: bytes, where: str
) -> None:
    path = tmp_path / name
    path.write_bytes(raw)
    message = input_error(load_metadata, path)
    assert where in message
    assert "curate metadata build --words FILE" in message
    assert str(path) in message


def test_long_entries_are_shortened_in_messages(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(["x" * 500, "x" * 500]), encoding="utf-8")
    message = input_error(load_metadata, path)
    assert "x" * 57 + "..." in message and "x" * 61 not in message


@pytest.mark.parametrize("suffix", [".json", ".txt"])
@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (["a", "b\nc"], "entry 1 'b\\nc' contains a line break"),
        (["a\r"], "contains a line break"),
        (["a", " "], "entry 1 is blank"),
        ([], "has no entries"),
        (["a", "a"], "entry 1 duplicates entry 0: 'a'"),
        (["a", 3], "entry 1 is int, not a string"),
    ],
)
def test_save_refuses_entries_that_would_not_load_back(
    tmp_path: Path, suffix: str, entries: list, expected: str
) -> None:
    path = tmp_path / f"m{suffix}"
    message = input_error(save_metadata, path, entries)
    assert expected in message and str(path) in message
    assert not list(tmp_path.iterdir())


def test_unmatchable_lists_entries_that_can_never_match() -> None:
    entries = ["cat", "U.S.", "hot dog", "e.g.", "New York .", "a\tb", "dog-friendly", "3.5"]
    assert unmatchable(entries) == [1, 3, 5, 7]
    assert unmatchable(entries, "metaclip") == [1, 3, 5, 7]
    assert unmatchable(entries, "words") == []


# --- word lists and WordNet ------------------------------------------------------------------


def test_read_word_list_strips_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_bytes("\ufeff cat \r\n\r\n\tdog\n  \nhot dog\ncat\n東京".encode())
    assert read_word_list(path) == ["cat", "dog", "hot dog", "cat", "東京"]
    assert read_word_list(str(path)) == ["cat", "dog", "hot dog", "cat", "東京"]
    (tmp_path / "empty.txt").write_bytes(b"\n\n")
    assert read_word_list(tmp_path / "empty.txt") == []


def test_read_word_list_errors(tmp_path: Path) -> None:
    message = input_error(read_word_list, tmp_path / "missing.txt")
    assert "missing.txt" in message and "does not exist" in message
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    message = input_error(read_word_list, tmp_path / "bad.txt")
    assert "bad.txt" in message and "not UTF-8" in message
    assert "folder" in input_error(read_word_list, tmp_path)


LICENSE = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "  2 Princeton University under the following license.  By obtaining, using  ",
    "  3 and/or copying this software and database, you agree that you have  ",
    "  29 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.  ",
]
DATA_NOUN = [
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 "
    "| that which is perceived or known or inferred to have its own distinct existence  ",
    "07697537 13 n 02 hot_dog 0 red_hot 0 002 @ 07697100 n 0000 ~ 07697825 n 0000 "
    "| a frankfurter served hot on a bun  ",
    "08765890 15 n 01 Aalborg 0 001 @i 08524735 n 0000 | a city and port in northern Jutland  ",
    "02084071 05 n 0a dog 0 domestic_dog 0 Canis_familiaris 0 pooch 0 doggie 0 doggy 0 "
    "barker 0 bow-wow 0 hound 0 mutt 0 001 @ 02083346 n 0000 | a member of the genus Canis  ",
]
DATA_VERB = [
    "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 002 * 00005041 v 0000 "
    "+ 03110669 n 0303 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs  ",
    "02001858 38 v 02 dog 0 go_after 0 001 @ 02000868 v 0000 01 + 09 00 | go after with the "
    'intent to catch; "The policeman chased the mugger down the alley"  ',
]
DATA_ADJ = [
    "00001740 00 a 01 able 0 001 ! 00002098 a 0101 | (usually followed by `to') having the "
    "necessary means or skill  ",
    "01285136 00 s 02 ill(p) 0 sick(p) 0 001 & 01284800 a 0000 | affected by an impairment "
    'of normal physical or mental health; "was sick of the flu"  ',
    "01677433 00 s 01 former(a) 0 001 & 01676517 a 0000 | referring to the first of two  ",
    "01532912 00 s 01 galore(ip) 0 001 & 01532587 a 0000 | in great numbers  ",
]


def write_wordnet(folder: Path, files: dict[str, list[str]]) -> Path:
    """A fake WordNet ``dict`` folder: each file is the license header then the data lines."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (folder / name).write_text("\n".join([*LICENSE, *lines]) + "\n", encoding="utf-8")
    return folder


def test_read_wordnet_takes_head_lemmas_in_order(tmp_path: Path) -> None:
    # Written in adj, verb, noun order to check the reading order does not follow the disk.
    folder = write_wordnet(
        tmp_path / "dict", {"data.adj": DATA_ADJ, "data.verb": DATA_VERB, "data.noun": DATA_NOUN}
    )
    (folder / "index.noun").write_text("entity n 1 1 ~ 1 0 00001740\n", encoding="utf-8")
    assert read_wordnet(folder) == [
        "entity",
        "hot dog",
        "aalborg",
        "dog",
        "breathe",
        "dog",
        "able",
        "ill",
        "former",
        "galore",
    ]


def nltk_style_name(line: str) -> str:
    """MetaCLIP's WordNet entry for one data line, spelled out the way nltk builds it: the first
    lemma without a trailing ``(...)`` marker, lowercased, + ``.pos.NN``; then cut at the first
    dot and underscores turned into spaces."""
    lemma = line.split()[4]
    if lemma.endswith(")") and "(" in lemma:
        lemma = lemma[: lemma.rindex("(")]
    name = lemma.lower() + ".n.01"
    return name[: name.find(".")].replace("_", " ")


WORDNET_NAME_LINES = [
    "09145083 15 n 02 St._Louis 0 Saint_Louis 0 001 @i 08524735 n 0000 | a city in Missouri  ",
    "15154774 28 n 02 A.D. 0 AD 0 001 ;c 15154601 n 0000 | in the Christian era  ",
    "09044862 15 n 03 United_States 0 United_States_of_America 0 U.S. 0 000 | a country  ",
    "04583212 06 n 01 Wi-Fi 0 000 | a wireless local area network  ",
    "03484809 06 n 01 .22 0 000 | a .22 caliber firearm  ",
    "02691156 06 n 01 ALGOL_60 0 000 | a language  ",
    "01285136 00 s 01 Straße(a) 0 000 | a street  ",
]


def test_read_wordnet_follows_nltk_synset_names(tmp_path: Path) -> None:
    # MetaCLIP's build_metadata.py: ss.name() cut at the first dot, underscores as spaces.
    # nltk lowercases the first lemma to make the name, so case goes and a lemma with a dot in
    # it is cut there (St._Louis → "st", A.D. → "a", .22 → "").
    folder = write_wordnet(tmp_path / "dict", {"data.noun": WORDNET_NAME_LINES})
    expected = ["st", "a", "united states", "wi-fi", "", "algol 60", "straße"]
    assert [nltk_style_name(line) for line in WORDNET_NAME_LINES] == expected
    assert read_wordnet(folder) == expected


def test_read_wordnet_with_some_files_and_errors(tmp_path: Path) -> None:
    folder = write_wordnet(
        tmp_path / "adv_only",
        {"data.adv": ["00001740 02 r 01 a_cappella 0 000 | without accompaniment  "]},
    )
    assert read_wordnet(folder) == ["a cappella"]

    message = input_error(read_wordnet, tmp_path / "missing")
    assert "missing" in message and "does not exist" in message
    (tmp_path / "empty").mkdir()
    message = input_error(read_wordnet, tmp_path / "empty")
    assert "data.noun" in message and "empty" in message

    # A word count of 0a is ten words in hex; with nine words the line is malformed.
    short = DATA_NOUN[3].replace(" mutt 0", "")
    folder = write_wordnet(tmp_path / "bad", {"data.noun": [DATA_NOUN[0], short]})
    message = input_error(read_wordnet, folder)
    assert "data.noun line 6" in message and "not a WordNet data line" in message
    folder = write_wordnet(tmp_path / "garbage", {"data.noun": ["hello world"]})
    assert "data.noun line 5" in input_error(read_wordnet, folder)


def test_find_wordnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_wordnet(tmp_path / "wn" / "dict", {"data.noun": DATA_NOUN})
    not_wordnet = tmp_path / "other"
    not_wordnet.mkdir()
    assert find_wordnet([tmp_path / "absent", not_wordnet, str(good)]) == good
    assert find_wordnet([not_wordnet]) is None
    assert find_wordnet([]) is None
    monkeypatch.setenv("WNHOME", str(tmp_path / "wn"))
    assert find_wordnet() == good
    monkeypatch.delenv("WNHOME")
    monkeypatch.setenv("WNSEARCHDIR", str(good))
    assert find_wordnet() == good


# --- n-gram mining ---------------------------------------------------------------------------

MARKS = ",.;:?!`"


def oracle_runs(caption: str) -> list[list[str]]:
    """Hand tokeniser: spaces/tab/newline/CR split tokens; marks and blank tokens split runs."""
    runs: list[list[str]] = [[]]
    word = ""

    def end_word() -> None:
        nonlocal word
        if word and word.strip() == "":
            runs.append([])
        elif word:
            runs[-1].append(word)
        word = ""

    for ch in caption:
        if ch in MARKS:
            end_word()
            runs.append([])
        elif ch in " \t\n\r":
            end_word()
        else:
            word += ch
    end_word()
    return [run for run in runs if run]


def oracle_mine(
    captions: list, min_uni: int, min_bi: int, min_pmi: float, unit: str = "bits"
) -> dict:
    """Slow, plain n-gram mining with dicts, PMI as nltk's BigramAssocMeasures.pmi:
    log2(count(ab) * N) - log2(count(a) * count(b)), N the number of tokens."""
    uni: dict[str, int] = {}
    bi: dict[tuple[str, str], int] = {}
    texts = skipped = 0
    for caption in captions:
        if not isinstance(caption, str) or caption.strip() == "":
            skipped += 1
            continue
        texts += 1
        for run in oracle_runs(caption):
            for token in run:
                uni[token] = uni.get(token, 0) + 1
            for i in range(len(run) - 1):
                pair = (run[i], run[i + 1])
                bi[pair] = bi.get(pair, 0) + 1
    n_tokens = sum(uni.values())
    n_pairs = sum(bi.values())
    unigrams = [w for w in uni if uni[w] >= min_uni]
    unigrams.sort(key=lambda w: (-uni[w], w))
    pmi: dict[str, float] = {}
    exact: dict[str, Fraction] = {}
    for (a, b), count in bi.items():
        bits = math.log2(count * n_tokens) - math.log2(uni[a] * uni[b])
        if unit == "bits":
            # Floats can land a hair off an exact power of two; that one is kept (≥).
            exact_power = min_pmi == int(min_pmi) and count * n_tokens == (
                Fraction(2) ** int(min_pmi) * uni[a] * uni[b]
            )
            keep = bits >= min_pmi or exact_power
        else:
            keep = Fraction(count * n_tokens, uni[a] * uni[b]) >= Fraction(min_pmi)
        if count >= min_bi and keep:
            pmi[a + " " + b] = bits
            exact[a + " " + b] = Fraction(count * n_tokens, uni[a] * uni[b])
    # Ordered by the exact PMI (equal ratios can differ in the last bit of their float PMI).
    bigrams = sorted(pmi, key=lambda s: (-exact[s], s))
    return {
        "unigrams": unigrams,
        "bigrams": bigrams,
        "pmi": pmi,
        "tokens": n_tokens,
        "texts": texts,
        "skipped": skipped,
        "positions": n_pairs,
    }


VOCAB = [
    "cat",
    "Cat",
    "dog",
    "the",
    "a",
    "hot",
    "on",
    "Zürich",
    "東京",
    "naïve",
    "ß",
    "x-ray",
    "U.S.",
    "it's",
    "dog,cat",
    "\xa0",
    "a\xa0b",
    "(red)",
]
GLUE = [" ", " ", " ", "  ", "", ", ", ". ", ";", ":", " ? ", "!", "`", "\t", "\n", "\r\n", " - "]
PHRASES = ["New York", "hot dog", "Hong Kong", "ice cream"]


def random_captions(seed: int, count: int) -> list:
    rng = random.Random(seed)
    captions: list = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.02:
            captions.append(rng.choice([None, 7, b"bytes", "", "   ", "\n\t"]))
            continue
        parts = []
        for _ in range(rng.randint(1, 12)):
            parts.append(rng.choice(PHRASES) if rng.random() < 0.15 else rng.choice(VOCAB))
            parts.append(rng.choice(GLUE))
        if rng.random() < 0.2:  # repeated words
            parts += [parts[0], " ", parts[0]]
        captions.append("".join(parts))
    return captions


@pytest.mark.parametrize(
    ("seed", "min_uni", "min_bi", "min_pmi", "unit"),
    [
        (0, 1, 1, 0.0, "bits"),
        (1, 30, 3, 2.0, "bits"),
        (2, 100, 5, 30.0, "bits"),
        (3, 50, 2, 5.5, "bits"),
        (4, 10, 10, 1.0, "bits"),
        (5, 1, 1, 3.0, "bits"),
        (6, 1, 2, 7.0, "bits"),
        (7, 1, 1, 2.0, "ratio"),
        (8, 30, 3, 30.0, "ratio"),
        (9, 1, 1, 5.5, "ratio"),
    ],
)
def test_mine_ngrams_matches_slow_oracle(
    seed: int, min_uni: int, min_bi: int, min_pmi: float, unit: str
) -> None:
    captions = random_captions(seed, 1500)
    result = mine_ngrams(
        iter(captions),
        min_unigram_count=min_uni,
        min_bigram_count=min_bi,
        min_bigram_pmi=min_pmi,
        pmi_unit=unit,
    )
    expected = oracle_mine(captions, min_uni, min_bi, min_pmi, unit)
    assert isinstance(result, NgramResult)
    assert result.unigrams == expected["unigrams"]
    assert result.bigrams == expected["bigrams"]
    assert result.bigram_pmi == expected["pmi"]
    assert list(result.bigram_pmi) == result.bigrams
    assert result.tokens == expected["tokens"]
    assert result.texts == expected["texts"]
    assert result.skipped == expected["skipped"]
    assert result.bigram_positions == expected["positions"]
    assert result.skipped > 0 and result.unigrams  # the random corpus exercises both
    if min_pmi <= 3.0 or unit == "ratio":
        assert result.bigrams


def test_pmi_is_in_bits_by_default_and_30_bits_is_2_to_the_30() -> None:
    # One bigram "a b" in a corpus of N tokens where a and b occur once each:
    # PMI = log2(1 * N) - log2(1 * 1) = log2(N) bits, i.e. a ratio of N.
    def corpus(n_tokens: int) -> list[str]:
        return ["a b", *(["x"] * (n_tokens - 2))]

    def kept(n_tokens: int, threshold: float, **unit: str) -> bool:
        result = mine_ngrams(
            corpus(n_tokens),
            min_unigram_count=1,
            min_bigram_count=1,
            min_bigram_pmi=threshold,
            **unit,
        )
        assert result.tokens == n_tokens
        return result.bigrams == ["a b"]

    assert not kept(8, 30.0)  # log2(8) = 3 bits: far below 30 bits, though 8 ≥ 3
    assert kept(8, 3.0) and not kept(7, 3.0) and kept(9, 3.0)
    assert kept(8, 8.0, pmi_unit="ratio") and not kept(7, 8.0, pmi_unit="ratio")
    assert kept(8, 2.5) and not kept(5, 2.5)  # log2(5) = 2.32, log2(8) = 3
    assert mine_ngrams(corpus(16), min_unigram_count=1, min_bigram_count=1).bigram_pmi == {}
    assert mine_ngrams(
        corpus(16), min_unigram_count=1, min_bigram_count=1, min_bigram_pmi=4.0
    ).bigram_pmi == {"a b": 4.0}


def test_mine_ngrams_by_hand() -> None:
    captions = ["New York, New York.", "new york is big!", "York`New", "A b c", 3, ""]
    result = mine_ngrams(captions, min_unigram_count=2, min_bigram_count=1, min_bigram_pmi=0.0)
    # Tokens: New York | New York || new york is big || York | New || A b c  (13 tokens)
    assert result.tokens == 13
    assert result.texts == 4
    assert result.skipped == 2
    assert result.bigram_positions == 2 + 3 + 2  # no bigram spans a mark
    assert result.unigrams == ["New", "York"]  # case kept: "new" and "york" occur once
    assert "York New" not in result.bigrams
    # nltk's PMI: log2(count(New York) * N) - log2(count(New) * count(York)) = log2(26 / 9).
    assert result.bigram_pmi["New York"] == pytest.approx(math.log2(26 / 9), abs=1e-12)
    assert result.bigrams[-1] == "New York"  # every other bigram occurs once: log2(13) each
    assert result.bigram_pmi["is big"] == pytest.approx(math.log2(13), abs=1e-12)
    assert result.bigrams[:-1] == sorted(result.bigrams[:-1])


def test_mine_ngrams_thresholds_are_inclusive() -> None:
    # 2 tokens: the PMI of "a b" is log2(1 * 2) - log2(1 * 1) = 1 bit, a ratio of 2, exactly.
    assert mine_ngrams(
        ["a b"], min_unigram_count=1, min_bigram_count=1, min_bigram_pmi=1.0
    ).bigrams == ["a b"]
    assert mine_ngrams(
        ["a b"], min_unigram_count=1, min_bigram_count=1, min_bigram_pmi=2.0, pmi_unit="ratio"
    ).bigrams == ["a b"]
    assert mine_ngrams(
        ["a b"], min_unigram_count=2, min_bigram_count=2, min_bigram_pmi=1.0
    ) == NgramResult([], [], tokens=2, texts=1, skipped=0, bigram_positions=1, bigram_pmi={})
    assert not mine_ngrams(["a b"], min_bigram_count=1, min_bigram_pmi=1.000001).bigrams
    assert not mine_ngrams(
        ["a b"], min_bigram_count=1, min_bigram_pmi=2.000001, pmi_unit="ratio"
    ).bigrams
    empty = mine_ngrams([])
    assert (empty.tokens, empty.texts, empty.unigrams, empty.bigrams) == (0, 0, [], [])


# --- merging ---------------------------------------------------------------------------------


def test_merge_sources_counts() -> None:
    merged, counts = merge_sources(
        [
            ("wordnet", ["dog", "hot dog", "dog", "Dog", ""]),
            ("words", ["cat", "  ", "dog", "cat", "東京"]),
            ("empty", []),
            ("unigrams", ["東京", "the", "hot dog", " the"]),
        ]
    )
    assert merged == ["dog", "hot dog", "Dog", "cat", "東京", "the", " the"]
    assert counts == [
        SourceCount("wordnet", read=5, added=3, duplicates=1, blank=1),
        SourceCount("words", read=5, added=2, duplicates=2, blank=1),
        SourceCount("empty", read=0, added=0, duplicates=0, blank=0),
        SourceCount("unigrams", read=4, added=2, duplicates=2, blank=0),
    ]
    assert merge_sources([]) == ([], [])


def test_merge_sources_drops_single_punctuation_entries() -> None:
    # MetaCLIP's build_metadata.py skips `entry in set(string.punctuation)`: one ASCII mark.
    merged, counts = merge_sources(
        [("words", ["!", "dog", "--", "#", "-", "U.S.", "？", "dog", "", "%", "a!"])]
    )
    assert merged == ["dog", "--", "U.S.", "？", "a!"]
    assert counts == [SourceCount("words", read=11, added=5, duplicates=1, blank=1, punctuation=4)]


def test_number_entries_are_the_references() -> None:
    assert tuple(str(i) for i in range(100)) == NUMBER_ENTRIES


def test_built_metadata_saves_and_loads(tmp_path: Path) -> None:
    folder = write_wordnet(tmp_path / "dict", {"data.noun": DATA_NOUN, "data.adj": DATA_ADJ})
    mined = mine_ngrams(random_captions(9, 500), min_unigram_count=20, min_bigram_pmi=2.0)
    merged, _ = merge_sources(
        [
            ("wordnet", read_wordnet(folder)),
            ("unigrams", mined.unigrams),
            ("bigrams", mined.bigrams),
        ]
    )
    digest = save_metadata(tmp_path / "m.json", merged)
    assert load_metadata(tmp_path / "m.json") == Metadata(merged, str(tmp_path / "m.json"), digest)


# --- the CLI: the reference merge ------------------------------------------------------------


def test_cli_build_adds_numbers_and_drops_punctuation_like_the_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clikit import run_cli

    words = tmp_path / "words.txt"
    words.write_text("dog\n!\n7\nhot dog\n#\n42\n", encoding="utf-8")
    folder = write_wordnet(tmp_path / "dict", {"data.noun": DATA_NOUN})
    out = tmp_path / "m.json"
    code, printed, err = run_cli(
        ["metadata", "build", "--wordnet", str(folder), "--words", str(words), "-o", str(out),
         "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    entries = json.loads(out.read_text(encoding="utf-8"))
    # The reference: set(str(i) for i in range(100)), then every source's non-empty entries
    # that are not one punctuation character.
    reference = {str(i) for i in range(100)}
    for entry in [*read_wordnet(folder), *read_word_list(words)]:
        if len(entry) > 0 and entry not in set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"):
            reference.add(entry)
    assert set(entries) == reference and len(entries) == len(reference)
    assert entries[:100] == [str(i) for i in range(100)]
    assert entries[100:] == ["entity", "hot dog", "aalborg", "dog"]
    report = json.loads(printed)
    assert report["sources"][0]["name"] == "numbers 0-99"
    assert report["sources"][-1]["punctuation"] == 2
    assert report["sources"][-1]["duplicates"] == 4  # dog, 7, hot dog, 42

    code, printed, err = run_cli(
        ["metadata", "build", "--words", str(words), "--no-numbers", "-o", str(out)], capsys
    )
    assert code == 0, err
    assert json.loads(out.read_text(encoding="utf-8")) == ["dog", "7", "hot dog", "42"]
    assert "punctuation" in printed
    # The numbers alone are not metadata: a build whose sources gave nothing still fails.
    text = tmp_path / "tiny.txt"
    text.write_text("a b\n", encoding="utf-8")
    code, _, err = run_cli(
        ["metadata", "build", "--corpus-text", str(text), "-o", str(tmp_path / "x.json")], capsys
    )
    assert code == 2 and "gave no entries" in err and not (tmp_path / "x.json").exists()


def _wordnet_30() -> Path | None:
    """The installed WordNet dict folder when it is WordNet 3.0 (Debian's wordnet-base)."""
    folder = find_wordnet()
    if folder is None:
        return None
    head = (folder / "data.noun").read_text(encoding="utf-8", errors="replace")[:3000]
    return folder if "WordNet 3.0 Copyright" in head else None


@pytest.mark.skipif(
    _wordnet_30() is None, reason="WordNet 3.0 is not installed (apt-get install wordnet-base)"
)
def test_real_wordnet_30_gives_the_papers_count() -> None:
    # 117,659 synsets; nltk names cut at the first dot give 86,555 distinct strings, one of them
    # empty (.22 and friends); with "0".."99" that is the paper's 86,654 WordNet entries.
    names = read_wordnet(_wordnet_30())
    assert len(names) == 117_659 and len(set(names)) == 86_555 and "" in names
    merged, _ = merge_sources([("numbers 0-99", list(NUMBER_ENTRIES)), ("wordnet", names)])
    assert len(merged) == 86_654
