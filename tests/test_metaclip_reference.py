"""MetaCLIP reference behaviour of `curate balance`: raw caption text whatever the source, the
named caption normalisation, and MetaCLIP 2's rule for t from a tail share (`p_to_t`).

The oracles are plain transcriptions of the reference code's published steps (MetaCLIP's
``substr_matching.spacing`` and MetaCLIP 2's ``p_to_t`` / ``t_to_p``), not of curate's code.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from clikit import run_cli
from shardkit import make_shard

from curate.balancing.matching import Matcher, MatchMode, pad_text
from curate.balancing.metadata import load_metadata, save_metadata
from curate.balancing.sampling import DEFAULT_TAIL_SHARE, TailRule, threshold_from_tail_share
from curate.balancing.stage import (
    MATCHES_DIR,
    REPORT_JSON,
    BalanceSpec,
    balance,
    match_units,
    read_matches,
)
from curate.errors import InputError
from curate.io.captions import read_unit, resolve_units

# --- captions: the same text, the same matches, whatever the source --------------------------

# "dog" behind or before a no-break space, an ideographic space, a BOM, an information
# separator (str.isspace() is true for it), and plain.
CAPTIONS = ["\xa0dog", "dog\u3000", "\ufeffdog", "\x1cdog", "dog"]


def reference_spacing(text: str) -> str:
    """MetaCLIP's ``spacing``, step by step as published."""
    spaced_text = f" {text} "
    for punct_to_wrap in [",", ".", ";", ":", "?", "!", "`"]:
        spaced_text = spaced_text.replace(punct_to_wrap, f" {punct_to_wrap} ")
    for char_to_space in ["\t", "\n", "\r"]:
        spaced_text = spaced_text.replace(char_to_space, " ")
    return spaced_text


def reference_matches(text: str, entries: list[str]) -> list[int]:
    """MetaCLIP's ``substr_matching``: the ids of entries with ``" " + entry + " "`` in it."""
    spaced = reference_spacing(text)
    return [i for i, entry in enumerate(entries) if " " + entry + " " in spaced]


def write_both_sources(folder: Path, captions: list[str]) -> tuple[str, str]:
    """The captions as a tar shard and as a parquet table with the same uids."""
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    make_shard(folder / "shards" / "00000.tar", len(captions), caption_fn=lambda i: captions[i])
    uids = read_unit(resolve_units(str(folder / "shards"))[0])["uid"].to_list()
    table = folder / "table.parquet"
    pl.DataFrame({"uid": uids, "caption": captions}).write_parquet(table)
    return str(folder / "shards"), str(table)


def matched_ids(source: str, meta_path: Path, out: Path, **normalize: str) -> list[list[int]]:
    meta = load_metadata(meta_path)
    units = resolve_units(source)
    match_units(units, meta, out, **normalize)
    frame, _ = read_matches(units, meta, out, MatchMode.metaclip, **normalize)
    assert frame["error"].is_null().all()
    return [sorted(ids) for ids in frame["entry_ids"].to_list()]


def test_captions_are_read_as_written_from_shards_and_tables(tmp_path: Path) -> None:
    shards, table = write_both_sources(tmp_path, CAPTIONS)
    for source in (shards, table):
        frame = read_unit(resolve_units(source)[0])
        assert frame["caption"].to_list() == CAPTIONS, source
        assert frame["error"].is_null().all()


def test_shards_and_tables_match_exactly_like_the_reference(tmp_path: Path) -> None:
    entries = ["dog"]
    meta = tmp_path / "meta.json"
    save_metadata(meta, entries)
    shards, table = write_both_sources(tmp_path / "in", CAPTIONS)
    expected = [reference_matches(text, entries) for text in CAPTIONS]
    assert expected == [[], [], [], [], [0]]  # the reference matches only the plain "dog"
    assert matched_ids(shards, meta, tmp_path / "a") == expected
    assert matched_ids(table, meta, tmp_path / "b") == expected


def test_strip_normalisation_is_applied_the_same_to_every_source(tmp_path: Path) -> None:
    entries = ["dog"]
    meta = tmp_path / "meta.json"
    save_metadata(meta, entries)
    shards, table = write_both_sources(tmp_path / "in", CAPTIONS)
    # --normalize strip: Python's str.strip() before matching, as MetaCLIP 2's curate.py does.
    expected = [reference_matches(text.strip(), entries) for text in CAPTIONS]
    assert expected == [[0], [0], [], [0], [0]]  # a BOM is not whitespace
    from_shards = matched_ids(shards, meta, tmp_path / "a", normalize="strip")
    from_table = matched_ids(table, meta, tmp_path / "b", normalize="strip")
    assert from_shards == from_table == expected
    # The setting is part of a match file's signature: changing it redoes the units.
    again = match_units(resolve_units(shards), load_metadata(meta), tmp_path / "a")
    assert again.done_now == 1


def test_blank_captions_fail_the_same_from_shards_and_tables(tmp_path: Path) -> None:
    captions = ["\x1c", " \u3000\t", "\ufeff", "\xa0", "ok dog"]
    shards, table = write_both_sources(tmp_path, captions)
    errors = {}
    for source in (shards, table):
        frame = read_unit(resolve_units(source)[0])
        errors[source] = [(e or "").split(":")[0] for e in frame["error"].to_list()]
        # A failed row carries no caption; a usable one is the text as written.
        assert frame["caption"].to_list() == [None, None, "\ufeff", None, "ok dog"]
    # Blank means str.isspace() for every character, from either source; U+FEFF is not a space.
    blank = ["empty_caption", "empty_caption", "", "empty_caption", ""]
    assert errors[shards] == errors[table] == blank


def test_pad_text_is_the_reference_spacing() -> None:
    rng = random.Random(5)
    alphabet = [*",.;:?!`", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2028",
                "\u3000", "\ufeff", " ", "a", "b", "-", "'", "(", "/"]  # fmt: skip
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert pad_text(text) == reference_spacing(text), repr(text)


def test_matcher_normalisation_by_name() -> None:
    assert Matcher(["dog"]).match(" dog ") == [0]  # outer spaces are boundaries already
    assert Matcher(["dog"]).match("\xa0dog") == []
    assert Matcher(["dog"], normalize="strip").match("\xa0dog") == [0]
    assert Matcher(["dog"], "words", normalize="strip").match("\ufeffdog") == [0]
    with pytest.raises(ValueError):
        Matcher(["dog"], normalize="nfc")


def test_cli_normalize_option_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = tmp_path / "meta.json"
    save_metadata(meta, ["dog"])
    shards, _ = write_both_sources(tmp_path / "in", CAPTIONS)
    out = tmp_path / "out"
    base = ["balance", shards, "-m", str(meta), "-o", str(out), "--t", "10", "--no-progress"]
    code, _, err = run_cli([*base, "--json"], capsys)
    assert code == 0, err
    report = json.loads((out / REPORT_JSON).read_text())["report"]
    assert (report["normalize"], report["matched"]) == ("none", 1)
    code, printed, err = run_cli([*base, "--normalize", "strip", "--json"], capsys)
    assert code == 0, err
    assert json.loads(printed)["matched"] == 4
    report = json.loads((out / REPORT_JSON).read_text())["report"]
    assert (report["normalize"], report["matched"]) == ("strip", 4)
    assert sorted(p.name for p in (out / MATCHES_DIR).iterdir()) == ["00000.parquet"]


# --- t from a tail share: MetaCLIP 2's p_to_t ---------------------------------------------------


def reference_p_to_t(entry_counts: list[int], p: float) -> int:
    """MetaCLIP 2's ``p_to_t``, its published steps in plain Python: sort the counts (zeros
    included), cumulative sums over the total, the first index whose share is nearest p, the
    count there."""
    counts = sorted(entry_counts)
    total = sum(counts)
    portion = []
    running = 0
    for count in counts:
        running += count
        portion.append(running / total if total else float("nan"))
    best_index = 0
    best_distance = abs(portion[0] - p)
    for index, share in enumerate(portion):
        distance = abs(share - p)
        if distance < best_distance:
            best_index, best_distance = index, distance
    return counts[best_index]


def reference_t_to_p(entry_counts: list[int], t: float) -> float:
    """MetaCLIP's ``t_to_p``: the share of all counts held by entries with count < t."""
    return sum(c for c in entry_counts if c < t) / sum(entry_counts)


@pytest.mark.parametrize("seed", range(6))
def test_metaclip2_rule_matches_the_reference_steps(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        n = rng.randint(1, 25)
        high = rng.choice([2, 5, 50, 3000])
        # zeros (entries nobody matched) and many ties
        counts = [rng.choice([0, 0, rng.randint(1, high), rng.randint(1, 3)]) for _ in range(n)]
        if not any(counts):
            counts.append(rng.randint(1, high))
        shares = [rng.random() for _ in range(4)]
        shares += [1e-6, 0.999999, DEFAULT_TAIL_SHARE, 0.5]
        # shares sitting exactly between two cumulative shares: the first index wins the tie
        total = sum(counts)
        running = np.cumsum(sorted(counts))
        middles = [(a + b) / (2 * total) for a, b in itertools.pairwise(running)]
        shares += [m for m in middles if 0 < m < 1][:3]
        for share in shares:
            choice = threshold_from_tail_share(np.array(counts), share, TailRule.metaclip2)
            assert choice.t == reference_p_to_t(counts, share), (counts, share)
            assert choice.rule == "tail_share_metaclip2"
            assert choice.tail_share == pytest.approx(
                sum(c for c in counts if c < choice.t) / total, rel=1e-12
            )


def test_metaclip2_rule_by_hand_zeros_and_ties() -> None:
    def t_of(counts: list[int], share: float) -> float:
        return threshold_from_tail_share(np.array(counts), share, TailRule.metaclip2).t

    # sorted [1, 2, 3, 4], shares [.1, .3, .6, 1]: nearest to 0.3 is index 1, t = 2
    assert t_of([4, 2, 3, 1], 0.3) == 2
    # ties: sorted [1, 1, 2, 4] has shares .125, .25, .5, 1 (exact in binary, so the float
    # distances tie too); 0.375 is as near to .25 as to .5 and the first index wins
    assert t_of([4, 1, 2, 1], 0.375) == 1
    assert t_of([4, 1, 2, 1], 0.3751) == 2
    # zeros sort first with a share of 0: a share nearer 0 than the first count's gives t = 0
    assert t_of([0, 0, 10, 90], 0.04) == 0
    assert t_of([0, 0, 10, 90], 0.06) == 10
    # no matches at all: the reference's shares are NaN and argmin picks index 0, t = 0
    choice = threshold_from_tail_share(np.array([0, 0, 0]), 0.5, TailRule.metaclip2)
    assert choice.t == 0 and choice.note


def test_curate_rule_round_trips_with_t_to_p_and_metaclip2_does_not() -> None:
    """MetaCLIP 2 sets each language's t by p_to_t(counts, t_to_p(english_counts, t_en)).
    curate's rule gives back a t with exactly the share t_to_p measured; p_to_t does not."""
    rng = random.Random(11)
    misses = 0
    for _ in range(300):
        counts = [rng.randint(1, 60) for _ in range(rng.randint(2, 15))]
        t0 = rng.randint(min(counts) + 1, max(counts))  # a tail that is neither empty nor all
        p = reference_t_to_p(counts, t0)
        ours = threshold_from_tail_share(np.array(counts), p).t
        assert reference_t_to_p(counts, ours) == p
        theirs = threshold_from_tail_share(np.array(counts), p, TailRule.metaclip2).t
        misses += reference_t_to_p(counts, theirs) != p
    assert misses > 100
    # By hand: counts [1, 2, 3, 4] and t = 3 hold 0.3 of the matches.
    assert reference_t_to_p([1, 2, 3, 4], 3) == 0.3
    assert threshold_from_tail_share(np.array([1, 2, 3, 4]), 0.3).t == 3
    assert reference_p_to_t([1, 2, 3, 4], 0.3) == 2 and reference_t_to_p([1, 2, 3, 4], 2) == 0.1


def test_tail_rule_in_the_stage_report_and_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = [f"e{i}" for i in range(8)]
    meta = tmp_path / "meta.json"
    save_metadata(meta, [*entries, "never"])
    # entry e_i is in 1 + 3i captions: counts 1, 4, 7, ..., 22 (and one entry never matched)
    captions = [f"photo {e}" for i, e in enumerate(entries) for _ in range(1 + 3 * i)]
    shards, _ = write_both_sources(tmp_path / "in", captions)
    counts = [1 + 3 * i for i in range(8)] + [0]
    rules = ((TailRule.curate, "tail_share"), (TailRule.metaclip2, "tail_share_metaclip2"))
    for rule, name in rules:
        out = tmp_path / rule.value
        spec = BalanceSpec(tail_share=0.3, tail_rule=rule)
        report = balance(shards, load_metadata(meta), out, spec).sample
        expected = threshold_from_tail_share(np.array(counts), 0.3, rule).t
        assert (report.t, report.t_rule, report.tail_share_target) == (expected, name, 0.3)
        recorded = json.loads((out / REPORT_JSON).read_text())
        assert recorded["report"]["t_rule"] == name
        assert recorded["spec"]["tail_rule"] == rule.value
    # shares of the sorted counts 0, 1, 4, ..., 22 (total 92): ..., 22/92 = 0.239, 35/92 = 0.380
    assert reference_p_to_t(counts, 0.3) == 10  # 0.239 is the nearest share
    assert threshold_from_tail_share(np.array(counts), 0.3).t == 14  # below 14: 35 ≥ 0.3 · 92

    base = ["balance", shards, "-m", str(meta), "--no-progress", "--json"]
    code, printed, err = run_cli(
        [*base, "-o", str(tmp_path / "cli"), "--tail-share", "0.3", "--tail-rule", "metaclip2"],
        capsys,
    )
    assert code == 0, err
    assert (json.loads(printed)["t"], json.loads(printed)["t_rule"]) == (10, "tail_share_metaclip2")
    code, _, err = run_cli(
        [*base, "-o", str(tmp_path / "x"), "--t", "5", "--tail-rule", "metaclip2"], capsys
    )
    assert code == 2 and "--tail-rule" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(InputError):
        BalanceSpec(target_size=3, tail_rule=TailRule.metaclip2).validate()


def test_written_sidecar_keeps_captions_as_written_and_matches_like_the_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`curate write`'s img2dataset-style sidecar is a caption table too: balancing it must
    see the same text, and so the same matches, as balancing the shards it came from."""
    captions = [*CAPTIONS, " dog \n", "hot\xa0dog"]
    shards, _ = write_both_sources(tmp_path / "in", captions)
    uids = read_unit(resolve_units(shards)[0])["uid"].to_list()
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(uids) + "\n", encoding="utf-8")
    code, _, err = run_cli(
        ["write", shards, "--subset", str(subset), "-o", str(tmp_path / "w"), "--no-progress"],
        capsys,
    )
    assert code == 0, err
    (sidecar,) = sorted((tmp_path / "w").glob("*.parquet"))
    table = pl.read_parquet(sidecar)
    assert dict(zip(table["uid"], table["caption"], strict=True)) == dict(
        zip(uids, captions, strict=True)
    )
    meta = tmp_path / "meta.json"
    save_metadata(meta, ["dog", "hot dog"])
    by_uid = {}
    for name, source in (("shards", shards), ("sidecar", str(sidecar))):
        units = resolve_units(source)
        match_units(units, load_metadata(meta), tmp_path / name)
        frame, _ = read_matches(units, load_metadata(meta), tmp_path / name, MatchMode.metaclip)
        by_uid[name] = dict(zip(frame["uid"], frame["entry_ids"].to_list(), strict=True))
    assert by_uid["shards"] == by_uid["sidecar"]
    expected = [reference_matches(c, ["dog", "hot dog"]) for c in captions]
    assert [by_uid["shards"][u] for u in uids] == expected
