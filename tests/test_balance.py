"""The balance stage end to end: accounting, tasks vs one run, resume, tables, skewed pools, CLI.

The oracles here are small and explicit: per-text matches recomputed with a plain substring
loop, entry counts with a dict, and the published keep rule with math.prod.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from clikit import run_cli
from resharder_oracle import assert_resharder_accepts
from shardkit import make_image_bytes, make_shard, sample_members, write_tar

from curate.balancing.draws import DrawRule
from curate.balancing.matching import pad_text
from curate.balancing.metadata import load_metadata, save_metadata
from curate.balancing.stage import (
    DECISIONS_TABLE,
    ENTRY_COUNTS_TABLE,
    MATCHES_DIR,
    REPORT_JSON,
    SUBSET_NPY,
    SUBSET_TABLE,
    BalanceSpec,
    balance,
    match_units,
    sample_pool,
)
from curate.errors import InputError, RunFolderError
from curate.io.captions import read_unit, resolve_units
from curate.io.uid_files import read_uid_file
from curate.runtime.executors import ProcessExecutor, TaskSlice

CONCEPTS = [f"concept{i}" for i in range(40)]
OUTPUTS = (ENTRY_COUNTS_TABLE, DECISIONS_TABLE, SUBSET_TABLE, SUBSET_NPY)


def uid_of(i: int) -> str:
    return hashlib.blake2b(f"u{i}".encode(), digest_size=16).hexdigest()


def skewed_captions(n: int, seed: int) -> list[str]:
    """Captions naming one or two concepts drawn Zipf-like (concept0 is the head)."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.3 for k in range(len(CONCEPTS))]
    out = []
    for _ in range(n):
        picked = rng.choices(CONCEPTS, weights, k=rng.choice((1, 1, 2)))
        filler = rng.choice(["a photo of", "look at this", "my", "the best"])
        out.append(f"{filler} {' and '.join(picked)}{rng.choice(['', '.', '!'])}")
    return out


@pytest.fixture()
def metadata_file(tmp_path: Path) -> Path:
    path = tmp_path / "meta.json"
    save_metadata(path, [*CONCEPTS, "photo", "never,matches"])
    return path


def make_pool(folder: Path, shards: int = 3, per_shard: int = 40, seed: int = 0) -> list[str]:
    """Clean shards of skewed captions; returns all captions in pool order."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = skewed_captions(shards * per_shard, seed)
    for s in range(shards):
        make_shard(
            folder / f"{s:05d}.tar",
            per_shard,
            shard_index=s,
            caption_fn=lambda i, s=s: captions[s * per_shard + i],
        )
    return captions


def read_outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def oracle_matches(text: str, entries: list[str]) -> list[int]:
    padded = pad_text(text)
    return [i for i, e in enumerate(entries) if f" {e} " in padded]


# --- accounting and the published rule ------------------------------------------------------------


def test_balance_matches_counts_and_probabilities_follow_the_oracle(
    tmp_path: Path, metadata_file: Path
) -> None:
    captions = make_pool(tmp_path / "shards")
    meta = load_metadata(metadata_file)
    out = tmp_path / "out"
    report = balance(str(tmp_path / "shards"), meta, out, BalanceSpec(t=5.0, seed=3)).sample

    matches = [oracle_matches(c, meta.entries) for c in captions]
    counts: dict[int, int] = {}
    for ids in matches:
        for e in ids:
            counts[e] = counts.get(e, 0) + 1
    entry_table = pl.read_parquet(out / ENTRY_COUNTS_TABLE)
    assert entry_table["count"].to_list() == [counts.get(i, 0) for i in range(meta.size)]
    decisions = pl.read_parquet(out / DECISIONS_TABLE)
    assert decisions.height == len(captions) == report.rows
    expected = [
        1 - math.prod(1 - min(1.0, 5.0 / counts[e]) for e in ids) if ids else 0.0 for ids in matches
    ]
    assert np.allclose(decisions["keep_prob"].to_numpy(), expected, atol=1e-12)
    assert decisions["matches"].to_list() == [len(ids) for ids in matches]
    # Every text of an entry with count <= t is kept (its probability is 1).
    sure = {e for e, c in counts.items() if c <= 5}
    for ids, status in zip(matches, decisions["status"], strict=True):
        if sure.intersection(ids):
            assert status == "kept"
        if not ids:
            assert status == "dropped"
    after = entry_table.filter(pl.col("count") <= 5)
    assert after["count"].to_list() == after["count_after"].to_list()
    # The subset is exactly the kept rows, in both formats.
    kept = decisions.filter(pl.col("status") == "kept")["uid"].to_list()
    assert sorted(read_uid_file(out / SUBSET_NPY).uids) == sorted(kept)
    dropped = decisions.filter(pl.col("status") != "kept")["uid"].to_list()
    assert_resharder_accepts(out / SUBSET_NPY, kept, dropped)
    assert pl.read_parquet(out / SUBSET_TABLE)["uid"].to_list() == kept
    assert report.kept == len(kept)
    summary = json.loads((out / REPORT_JSON).read_text())
    assert summary["report"]["t"] == 5.0 and summary["spec"]["seed"] == 3


def test_head_entries_are_capped_near_t_and_the_tail_kept(
    tmp_path: Path, metadata_file: Path
) -> None:
    make_pool(tmp_path / "shards", shards=2, per_shard=300, seed=1)
    out = tmp_path / "out"
    report = balance(
        str(tmp_path / "shards"), load_metadata(metadata_file), out, BalanceSpec(seed=0)
    ).sample
    table = pl.read_parquet(out / ENTRY_COUNTS_TABLE).filter(pl.col("count") > 0)
    t = report.t
    assert report.t_rule == "tail_share" and report.head_entries > 0
    head = table.filter(pl.col("count") > 4 * t)
    assert head.height > 0
    # Expected count after balancing of a head entry: t from its own draw, plus texts kept
    # through another entry; far below its pool count.
    assert (head["expected_after"] < head["count"] / 2).all()
    assert (head["count_after"] < head["count"]).all()
    tail = table.filter(pl.col("count") <= t)
    assert tail["count_after"].to_list() == tail["count"].to_list()
    assert report.max_count_after < report.max_count_before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_draw_rules_keep_the_published_probabilities(
    tmp_path: Path, metadata_file: Path, seed: int
) -> None:
    """independent: MetaCLIP's coin per text (u < p, u the seeded uniform of the uid).
    systematic (default): texts matching the same entries keep ⌊Σp⌋ or ⌈Σp⌉ of themselves."""
    from curate.balancing.sampling import uniform_draws
    from curate.io.uid_files import uids_to_pairs

    captions = make_pool(tmp_path / "shards", shards=2, per_shard=300, seed=seed)
    meta = load_metadata(metadata_file)
    outcomes = {}
    for draw in ("systematic", "independent"):
        out = tmp_path / draw
        spec = BalanceSpec(t=12.0, seed=seed, draw=DrawRule(draw))
        report = balance(str(tmp_path / "shards"), meta, out, spec).sample
        assert report.draw == draw
        assert json.loads((out / REPORT_JSON).read_text())["spec"]["draw"] == draw
        decisions = pl.read_parquet(out / DECISIONS_TABLE)
        outcomes[draw] = decisions
    matches = [frozenset(oracle_matches(c, meta.entries)) for c in captions]

    independent = outcomes["independent"]
    coins = uniform_draws(uids_to_pairs(independent["uid"].to_list()), seed)
    expected = [
        bool(m and c < p)
        for m, c, p in zip(matches, coins, independent["keep_prob"].to_list(), strict=True)
    ]
    assert (independent["status"] == "kept").to_list() == expected

    systematic = outcomes["systematic"]
    assert systematic["keep_prob"].to_list() == independent["keep_prob"].to_list()
    total: dict[frozenset, float] = {}
    kept: dict[frozenset, int] = {}
    for m, p, status in zip(
        matches, systematic["keep_prob"].to_list(), systematic["status"].to_list(), strict=True
    ):
        total[m] = total.get(m, 0.0) + p
        kept[m] = kept.get(m, 0) + (status == "kept")
    assert kept.get(frozenset(), 0) == 0
    assert len(total) > 5 and any(t % 1 > 0 for t in total.values())  # real rounding happens
    for m in total:
        assert math.floor(total[m] + 1e-6) <= kept[m] <= math.ceil(total[m] - 1e-6), m


def test_every_sample_is_accounted_for(tmp_path: Path, metadata_file: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    image = make_image_bytes("jpg", "RGB", (16, 16), seed=1)
    members = []
    members += sample_members("000000000", image=image, caption="concept1 photo")
    members += sample_members("000000001", image=image, caption="   ")  # empty caption
    members += sample_members("000000002", image=image, caption=b"\xff\xfe concept1")  # not UTF-8
    members += sample_members("000000003", image=image, caption=None)  # no caption
    members += sample_members("000000004", image=None, caption="concept2")  # no image
    members += sample_members("000000005", image=image, caption="nothing here")
    same_uid = {"uid": uid_of(7)}
    members += sample_members("000000006", image=image, caption="concept3", meta=same_uid)
    write_tar(folder / "00000.tar", members)
    write_tar(
        folder / "00001.tar",
        sample_members("000010000", image=image, caption="concept3", meta=same_uid),
    )
    out = tmp_path / "out"
    report = balance(str(folder), load_metadata(metadata_file), out, BalanceSpec(t=100.0)).sample
    decisions = pl.read_parquet(out / DECISIONS_TABLE)
    assert decisions.height == 8
    by_key = {k: (s, r) for k, s, r in decisions.select("key", "status", "reason").iter_rows()}
    assert by_key["000000000"] == ("kept", None)
    assert by_key["000000005"] == ("dropped", "no_match")
    assert by_key["000000006"] == ("kept", None)
    for key, code in (
        ("000000001", "empty_caption"),
        ("000000002", "caption_not_utf8"),
        ("000000003", "missing_caption"),
        ("000000004", "missing_image"),
        ("000010000", "duplicate_uid"),
    ):
        status, reason = by_key[key]
        assert status == "failed" and reason.startswith(code), (key, reason)
    assert report.failed == 5 and report.kept == 2 and report.rows == 8
    assert sum(report.failures.values()) == report.failed


# --- tasks, workers, resume, seeds ---------------------------------------------------------------


def test_tasks_and_workers_give_identical_outputs(tmp_path: Path, metadata_file: Path) -> None:
    make_pool(tmp_path / "shards", shards=5, per_shard=20)
    source = str(tmp_path / "shards")
    meta = load_metadata(metadata_file)
    spec = BalanceSpec(seed=11)
    balance(source, meta, tmp_path / "one", spec)
    balance(source, meta, tmp_path / "workers", spec, executor=ProcessExecutor(2))
    units = resolve_units(source)
    for index in range(3):
        report = match_units(units, meta, tmp_path / "tasks", tasks=TaskSlice(index, 3))
        assert report.units == len(units[index::3])
    sample_pool(units, meta, tmp_path / "tasks", spec, source=source)
    reference = read_outputs(tmp_path / "one")
    assert read_outputs(tmp_path / "workers") == reference
    assert read_outputs(tmp_path / "tasks") == reference


def test_sample_phase_refuses_missing_matches(tmp_path: Path, metadata_file: Path) -> None:
    make_pool(tmp_path / "shards", shards=3, per_shard=5)
    units = resolve_units(str(tmp_path / "shards"))
    meta = load_metadata(metadata_file)
    match_units(units, meta, tmp_path / "out", tasks=TaskSlice(0, 2))
    with pytest.raises(RunFolderError, match="1 of 3 units have no current match file"):
        sample_pool(units, meta, tmp_path / "out", BalanceSpec())


def test_rerun_resumes_and_redoes_only_what_changed(tmp_path: Path, metadata_file: Path) -> None:
    make_pool(tmp_path / "shards", shards=3, per_shard=10)
    source = str(tmp_path / "shards")
    meta = load_metadata(metadata_file)
    out = tmp_path / "out"
    first = balance(source, meta, out, BalanceSpec()).match
    assert (first.done_now, first.skipped) == (3, 0)
    before = read_outputs(out)
    again = balance(source, meta, out, BalanceSpec()).match
    assert (again.done_now, again.skipped) == (0, 3)
    assert read_outputs(out) == before
    make_shard(tmp_path / "shards" / "00001.tar", 12, shard_index=1)  # rewritten shard
    changed = balance(source, meta, out, BalanceSpec()).match
    assert (changed.done_now, changed.skipped) == (1, 2)
    other = tmp_path / "other.txt"
    save_metadata(other, ["photo", "sample"])
    redo = balance(source, load_metadata(other), out, BalanceSpec()).match
    assert redo.done_now == 3
    # A half-written match file (killed mid-write never leaves one, but a foreign one) is redone.
    (out / MATCHES_DIR / "00000.parquet").write_bytes(b"not parquet")
    redo = balance(source, load_metadata(other), out, BalanceSpec()).match
    assert (redo.done_now, redo.skipped) == (1, 2)


def test_seed_changes_the_draws_only(tmp_path: Path, metadata_file: Path) -> None:
    make_pool(tmp_path / "shards", shards=2, per_shard=100)
    meta = load_metadata(metadata_file)
    source = str(tmp_path / "shards")
    a = balance(source, meta, tmp_path / "a", BalanceSpec(t=3.0, seed=1)).sample
    b = balance(source, meta, tmp_path / "b", BalanceSpec(t=3.0, seed=2)).sample
    da = pl.read_parquet(tmp_path / "a" / DECISIONS_TABLE)
    db = pl.read_parquet(tmp_path / "b" / DECISIONS_TABLE)
    assert da["keep_prob"].to_list() == db["keep_prob"].to_list()
    assert da["status"].to_list() != db["status"].to_list()
    assert a.expected_kept == pytest.approx(b.expected_kept)


def test_target_size_lands_near_the_target(tmp_path: Path, metadata_file: Path) -> None:
    make_pool(tmp_path / "shards", shards=2, per_shard=300, seed=5)
    report = balance(
        str(tmp_path / "shards"),
        load_metadata(metadata_file),
        tmp_path / "out",
        BalanceSpec(target_size=200),
    ).sample
    assert report.t_rule == "target_size"
    assert report.expected_kept == pytest.approx(200, abs=1e-3)
    assert abs(report.kept - 200) < 5 * math.sqrt(200)


# --- tables as input -----------------------------------------------------------------------------


def test_tables_with_bad_captions_record_failures(tmp_path: Path, metadata_file: Path) -> None:
    table = tmp_path / "pool.parquet"
    pl.DataFrame(
        {
            "uid": [uid_of(i) for i in range(5)] + [None, "not-a-uid"],
            "text": [b"concept1", b"\xff\xfe", None, b"  ", b"concept1 photo", b"concept2", b"x"],
        }
    ).write_parquet(table)
    out = tmp_path / "out"
    report = balance(str(table), load_metadata(metadata_file), out, BalanceSpec(t=10.0)).sample
    reasons = pl.read_parquet(out / DECISIONS_TABLE)["reason"].to_list()
    assert reasons[0] is None and reasons[4] is None
    assert [r.split(":")[0] for r in reasons[1:4]] == [
        "caption_not_utf8",
        "missing_caption",
        "empty_caption",
    ]
    assert reasons[5].startswith("bad_uid") and reasons[6].startswith("bad_uid")
    assert report.rows == 7 and report.failed == 5 and report.kept == 2


def test_tables_with_non_text_captions_are_refused(tmp_path: Path) -> None:
    table = tmp_path / "pool.parquet"
    pl.DataFrame({"uid": [uid_of(0)], "caption": [3]}).write_parquet(table)
    with pytest.raises(InputError, match="holds Int64, not text"):
        read_unit(resolve_units(str(table))[0])
    pl.DataFrame({"uid": [uid_of(0)], "title": ["x"]}).write_parquet(table)
    with pytest.raises(InputError, match="no caption column"):
        resolve_units(str(table))


# --- CLI: demo shards → metadata build → balance → write -----------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_cli_demo_shards_build_balance_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import webdataset as wds

    from curate.demo.synthetic import generate_shards

    generate_shards(tmp_path / "shards", num_samples=400, samples_per_shard=100, seed=0)
    meta = tmp_path / "meta.json"
    code, out, err = run_cli(
        [
            "metadata", "build", "--corpus", str(tmp_path / "shards"), "-o", str(meta),
            "--min-unigram-count", "10", "--min-bigram-count", "5", "--min-bigram-pmi", "2",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "unigrams" in out and "entries written" in out
    code, out, err = run_cli(
        [
            "balance", str(tmp_path / "shards"), "-m", str(meta), "-o", str(tmp_path / "bal"),
            "--t", "20", "--no-progress",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "head: most matched entries" in out and "balanced subset" in out
    summary = json.loads((tmp_path / "bal" / REPORT_JSON).read_text())["report"]
    assert summary["rows"] == 400 and summary["t"] == 20
    kept = summary["kept"]
    assert 0 < kept < 400 - summary["failed"]
    code, out, err = run_cli(
        [
            "write", str(tmp_path / "shards"), "--subset", str(tmp_path / "bal"),
            "-o", str(tmp_path / "curated"), "--no-progress",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    wanted = set(pl.read_parquet(tmp_path / "bal" / SUBSET_TABLE)["key"].to_list())
    written = tmp_path / "curated"
    keys = {s["__key__"] for s in wds.WebDataset(sorted(map(str, written.glob("*.tar"))))}
    assert len(keys) == kept and len(wanted) == kept
    # The balanced subset works as set algebra input to select, too.
    pool = tmp_path / "pool.parquet"
    pl.read_parquet(tmp_path / "bal" / DECISIONS_TABLE).select("uid", "matches").write_parquet(pool)
    code, out, err = run_cli(
        ["select", str(pool), "--intersect", str(tmp_path / "bal"), "-o", str(tmp_path / "sel")],
        capsys,
    )
    assert code == 0, err
    assert f"selected {kept} of" in " ".join(out.split())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "has no entries"),
        ('["a", "a"]', "duplicate"),
        ('["a", 3]', "int"),
        ('["a", " "]', "blank"),
    ],
)
def test_cli_bad_metadata_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    make_pool(tmp_path / "shards", shards=1, per_shard=3)
    meta = tmp_path / "meta.json"
    meta.write_text(content)
    code, _, err = run_cli(
        ["balance", str(tmp_path / "shards"), "-m", str(meta), "-o", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert message in err.lower() and len(err.strip().splitlines()) == 1


def test_cli_tasks_then_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], metadata_file: Path
) -> None:
    make_pool(tmp_path / "shards", shards=3, per_shard=10)
    base = ["balance", str(tmp_path / "shards"), "-m", str(metadata_file), "--no-progress"]
    code, _, err = run_cli([*base, "-o", str(tmp_path / "a"), "--num-tasks", "2"], capsys)
    assert code == 2 and "--phase match" in err
    for index in ("0", "1"):
        code, out, err = run_cli(
            [*base, "-o", str(tmp_path / "a"), "--phase", "match", "--num-tasks", "2",
             "--task-index", index],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        assert "matched" in out
    code, _, err = run_cli([*base, "-o", str(tmp_path / "a"), "--phase", "sample"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*base, "-o", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert read_outputs(tmp_path / "a") == read_outputs(tmp_path / "b")
