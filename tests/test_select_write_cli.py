"""`curate select` and `curate write` through the CLI: summaries, resume, one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from clikit import run_cli

from curate.cli.write import parse_size
from curate.demo.synthetic import generate_shards
from curate.errors import InputError
from curate.io.shards import resolve_shards
from curate.io.tar_reader import ShardReader


def _pool_table(path: Path, n: int = 50, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pl.DataFrame(
        {
            "uid": [hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest() for i in range(n)],
            "caption": [" ".join(["word"] * int(k)) for k in rng.integers(1, 6, n)],
            "score": rng.normal(size=n),
        }
    )
    frame.write_parquet(path)
    return frame


def test_select_cli_prints_counts_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = _pool_table(tmp_path / "pool.parquet")
    code, out, _ = run_cli(
        [
            "select",
            str(tmp_path / "pool.parquet"),
            "--where",
            "caption_words > 2",
            "--top",
            "score:0.2:remainder",
            "--out",
            str(tmp_path / "sub"),
            "--json",
        ],
        capsys,
    )
    assert code == 0
    report = json.loads(out)
    words = frame.filter(pl.col("caption").str.split(" ").list.len() > 2)
    assert report["steps"][0]["after"] == words.height
    n = int(words.height * 0.2)
    assert report["selected"] == report["steps"][1]["after"] == n + 1
    assert len(np.load(tmp_path / "sub" / "subset.npy")) == n + 1

    code, out, _ = run_cli(
        [
            "select",
            str(tmp_path / "pool.parquet"),
            "--top",
            "score:0.5",
            "--out",
            str(tmp_path / "sub2"),
        ],
        capsys,
    )
    assert code == 0 and "selected 26 of 50" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--top", "score"], "COLUMN:FRACTION"),
        (["--top", "score:1.5"], "fraction must be in (0, 1]"),
        (["--top", "nope:0.5"], "no column 'nope'"),
        (["--where", "score >> 1"], "COLUMN OP NUMBER"),
        (["--where", "caption_words > 1", "--top", "score:0.5"], "pool or of the remainder"),
    ],
)
def test_select_cli_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    _pool_table(tmp_path / "pool.parquet")
    code, _, err = run_cli(
        ["select", str(tmp_path / "pool.parquet"), *args, "--out", str(tmp_path / "s")], capsys
    )
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_write_cli_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_shards(tmp_path / "shards", num_samples=60, samples_per_shard=20, seed=3)
    uids = [s.uid for u in resolve_shards(str(tmp_path / "shards")) for s in ShardReader(u)]
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join([*uids[::3], "f" * 32]) + "\n")
    args = [
        "write",
        str(tmp_path / "shards"),
        "--subset",
        str(subset),
        "--out",
        str(tmp_path / "out"),
        "--shard-samples",
        "7",
        "--json",
        "--no-progress",
    ]
    code, out, _ = run_cli(args, capsys)
    first = json.loads(out)
    assert code == 0
    assert first["subset_uids"] == 21 and first["missing_uids"] == 1
    assert first["written_uids"] + sum(first["failed_uids"].values()) == 20
    assert first["shards_written"] == first["shards"] and first["shards_skipped"] == 0
    assert (tmp_path / "out" / "missing_uids.txt").read_text().split() == ["f" * 32]
    code, out, _ = run_cli(args, capsys)
    second = json.loads(out)
    assert second["shards_skipped"] == first["shards"] and second["shards_written"] == 0

    code, out, _ = run_cli([a for a in args if a != "--json"], capsys)  # human summary
    assert "missing from shards" in out and "--train-num-samples" in out

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_cli(
        ["write", str(tmp_path / "shards"), "--subset", str(empty), "--out", str(tmp_path / "e")],
        capsys,
    )
    assert code == 2 and "empty" in err and not (tmp_path / "e").exists()


def test_parse_size() -> None:
    assert parse_size("1GB") == 1 << 30
    assert parse_size("512mb") == 512 << 20
    assert parse_size("1.5k") == 1536
    assert parse_size("1000") == 1000
    for bad in ("", "GB", "-1", "1TB"):
        with pytest.raises(InputError):
            parse_size(bad)


def test_write_help_says_derived_uids_are_unknown_to_the_resharder(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(["write", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.replace("│", " ").split())
    assert "resharder reads uids from the json only" in flat
    assert "derived uids" in flat
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert "resharder reads uids from each sample's json only" in " ".join(readme.split())
