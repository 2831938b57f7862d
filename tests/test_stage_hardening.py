"""Every stage survives an unreadable neighbour and its own outputs (issue 13).

- One unreadable shard (zero bytes, not a tar) among good ones: balance (both phases), audit and
  rewrite finish the others, name it and exit 1, like score; a rerun with the shard repaired
  picks it up.
- `--out` that is, or is inside, an input (or is the folder of an input file) is refused by
  select, balance, audit and rewrite, so a rerun never reads its own outputs back.
- balance removes the temporary match files a killed run left; its worker processes exit when
  their parent is killed; `--t inf` is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest
from clikit import run_cli
from shardkit import make_shard

from curate.io.captions import read_unit, resolve_units

WORDS = ["dog", "cat", "car", "tree", "house", "woman", "man", "nurse", "engineer", "child"]


def _caption(i: int) -> str:
    return f"a photo of a {WORDS[i % len(WORDS)]} and a {WORDS[(i * 7 + 3) % len(WORDS)]}"


def _pool(folder: Path, shards: int = 3, per_shard: int = 20) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        make_shard(path, per_shard, shard_index=s, caption_fn=_caption)
        paths.append(path)
    return paths


def _metadata(tmp_path: Path) -> Path:
    path = tmp_path / "metadata.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


@pytest.fixture(params=["empty", "not_a_tar"])
def broken_pool(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """Shards 00000 and 00002 good, 00001 unreadable; returns (folder, the bad shard)."""
    paths = _pool(tmp_path / "shards")
    bad = paths[1]
    bad.write_bytes(b"" if request.param == "empty" else b"this is not a tar file\n" * 50)
    return tmp_path / "shards", bad


def _repair(bad: Path) -> None:
    make_shard(bad, 20, shard_index=1, caption_fn=_caption)


def _good_rows(folder: Path, bad: Path) -> int:
    return sum(read_unit(u).height for u in resolve_units(str(folder)) if u.url != str(bad))


def _balance_args(folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "balance", str(folder), "--metadata", str(_metadata(tmp_path)), "--out",
        str(tmp_path / "bal"), "--t", "5", "--no-progress", *extra,
    ]  # fmt: skip


def test_balance_finishes_the_other_shards_and_exits_1(
    broken_pool: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, bad = broken_pool
    code, out, err = run_cli(_balance_args(folder, tmp_path, "--json"), capsys)
    assert code == 1, err
    assert f"shard failed: {bad}" in " ".join(err.split())
    report = json.loads(out)
    assert list(report["shard_errors"]) == [str(bad)]
    decisions = pl.read_parquet(tmp_path / "bal" / "decisions.parquet")
    assert decisions.height == report["rows"] == _good_rows(folder, bad) == 40
    assert json.loads((tmp_path / "bal" / "balance.json").read_text())["report"]["shard_errors"]
    # Repaired, the shard is matched on the rerun (the others are skipped) and all is well.
    _repair(bad)
    code, out, err = run_cli(_balance_args(folder, tmp_path, "--json"), capsys)
    assert code == 0, err
    assert json.loads(out)["rows"] == 60 and json.loads(out)["shard_errors"] == {}


def test_balance_match_phase_names_the_shard_and_exits_1(
    broken_pool: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, bad = broken_pool
    code, _, err = run_cli(_balance_args(folder, tmp_path, "--phase", "match"), capsys)
    assert code == 1 and str(bad) in " ".join(err.split())
    assert len(list((tmp_path / "bal" / "matches").glob("*.parquet"))) == 2
    failed = json.loads((tmp_path / "bal" / ".curate/match/failed/00001.json").read_text())
    assert failed["source"] == str(bad) and "cannot open shard" in failed["error"]
    code, out, err = run_cli(_balance_args(folder, tmp_path, "--phase", "sample"), capsys)
    assert code == 1 and str(bad) in " ".join(err.split())
    assert (tmp_path / "bal" / "subset.npy").is_file()
    code, out, err = run_cli(_balance_args(folder, tmp_path, "--phase", "match", "--json"), capsys)
    assert code == 1 and json.loads(out)["done_now"] == 0  # only the failed unit is retried
    assert json.loads(out)["skipped"] == 2 and list(json.loads(out)["failed"]) == [str(bad)]


def test_a_pool_of_only_unreadable_shards_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "00000.tar").write_bytes(b"")
    code, _, err = run_cli(_balance_args(folder, tmp_path), capsys)
    assert code == 2 and "no unit could be read" in err and "Traceback" not in err


def test_audit_finishes_the_other_shards_and_exits_1(
    broken_pool: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, bad = broken_pool
    args = [
        "audit", str(folder), "--concepts", str(_metadata(tmp_path)), "--attribute", "gender",
        "--out", str(tmp_path / "audit"), "--no-progress", "--json",
    ]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 1, err
    assert str(bad) in " ".join(err.split())
    assert list(json.loads(out)["shard_errors"]) == [str(bad)]
    labels = pl.read_parquet(tmp_path / "audit" / "labels.parquet")
    assert labels.height == _good_rows(folder, bad)


def test_rewrite_finishes_the_other_shards_and_exits_1(
    broken_pool: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, bad = broken_pool
    args = [
        "rewrite", str(folder), "--backend", "rules", "--out", str(tmp_path / "rw"),
        "--no-progress", "--json",
    ]  # fmt: skip
    code, out, err = run_cli(args, capsys)
    assert code == 1, err
    assert str(bad) in " ".join(err.split())
    report = json.loads(out)
    assert list(report["shard_errors"]) == [str(bad)] and report["samples"] == 40
    tables = sorted(p.name for p in (tmp_path / "rw" / "rewrites").glob("*.parquet"))
    assert tables == ["00000.parquet", "00002.parquet"]
    _repair(bad)
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert json.loads(out)["samples"] == 60


# --- --out among the inputs -------------------------------------------------------------------


def _score_tables(folder: Path, n: int = 50) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = {
        "uid": [f"{i:032x}" for i in range(n)],
        "status": ["scored"] * n,
        "clipscore": [i / n for i in range(n)],
    }
    pl.DataFrame(rows).write_parquet(folder / "scores.parquet")
    return folder


def test_select_refuses_out_among_its_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: select DIR --out DIR read its outputs back (rows 2000 -> 4981)."""
    folder = _score_tables(tmp_path / "tables")
    args = ["select", str(folder), "--top", "clipscore:0.5", "--out", str(folder)]
    for _ in range(2):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "folder of the input" in err and "Traceback" not in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["scores.parquet"]  # nothing written
    code, out, err = run_cli([*args[:-1], str(folder / "sub"), "--json"], capsys)
    assert code == 0 and json.loads(out)["rows"] == 50, err  # a subfolder is never read
    code, out, err = run_cli([*args[:-1], str(folder / "sub"), "--json"], capsys)
    assert code == 0 and json.loads(out)["rows"] == 50, err


def test_select_refuses_out_holding_a_globbed_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _score_tables(tmp_path / "tables")
    args = ["select", str(folder / "*.parquet"), "--top", "clipscore:0.5", "--out", str(folder)]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "folder of the input" in err, err
    code, _, err = run_cli([*args[:-1], str(tmp_path / "elsewhere")], capsys)
    assert code == 0, err
    code, out, err = run_cli([*args[:-1], str(tmp_path / "elsewhere"), "--json"], capsys)
    assert code == 0 and json.loads(out)["rows"] == 50  # a rerun reads the same pool


@pytest.mark.parametrize("command", ["balance", "audit", "rewrite"])
def test_caption_stages_refuse_out_among_their_inputs(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "shards"
    _pool(folder, shards=2)
    extra = {
        "balance": ["--metadata", str(_metadata(tmp_path)), "--t", "5"],
        "audit": ["--concepts", str(_metadata(tmp_path)), "--attribute", "gender"],
        "rewrite": ["--backend", "rules"],
    }[command]
    before = sorted(p.name for p in folder.iterdir())
    for out in (folder, folder / "00000.tar"):
        args = [command, str(folder), *extra, "--out", str(out), "--no-progress"]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "input" in err and "Traceback" not in err, err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_balance_rerun_into_a_table_folder_is_refused_not_compounded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: balance DIR --out DIR used to fail on its second run."""
    folder = tmp_path / "captions"
    folder.mkdir()
    n = 30
    pl.DataFrame(
        {"uid": [f"{i:032x}" for i in range(n)], "caption": [_caption(i) for i in range(n)]}
    ).write_parquet(folder / "captions.parquet")
    args = _balance_args(folder, tmp_path)
    args[args.index("--out") + 1] = str(folder)
    for _ in range(2):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "input" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["captions.parquet"]


# --- balance: temporaries, orphan workers, --t ------------------------------------------------


def test_balance_removes_temporary_match_files_of_a_killed_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "shards"
    _pool(folder, shards=2)
    matches = tmp_path / "bal" / "matches"
    matches.mkdir(parents=True)
    left = [matches / ".00000.parquet.0badc0de.tmp", matches / ".00007.parquet.12345678.tmp"]
    for path in left:
        path.write_bytes(b"PAR1 half a file")
    foreign = matches / "notes.txt"
    foreign.write_text("mine")
    code, _, err = run_cli(_balance_args(folder, tmp_path), capsys)
    assert code == 0, err
    assert not any(p.exists() for p in left)
    assert foreign.read_text() == "mine"
    assert sorted(p.name for p in matches.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]


_PARENT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from runtime_kit import SquareStage
    from curate.runtime.executors import ProcessExecutor
    from curate.runtime.stage import run_map

    out = Path(sys.argv[1])
    run_map(SquareStage(out, 2, sleep=600), out, executor=ProcessExecutor(2))
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to watch processes")
def test_runtime_workers_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    """balance's (and every local map's) worker processes: a SIGKILLed parent takes them down,
    although their units would run for 600 s more."""
    tests = str(Path(__file__).parent)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path), tests])
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
            workers = (
                [int(p.name) for p in (tmp_path / "pids").glob("*")]
                if (tmp_path / "pids").is_dir()
                else []
            )
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60  # a hang bound, not a speed check
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers)
    finally:
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1"])
def test_balance_refuses_a_non_finite_or_non_positive_t(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "shards"
    _pool(folder, shards=1)
    args = _balance_args(folder, tmp_path)
    args[args.index("--t") + 1] = value
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--t must be a positive, finite number" in " ".join(err.split()), err
    assert not (tmp_path / "bal").exists()
