"""OS errors (a file where a folder goes, disk full, permission denied) as one clear line."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from clikit import run_cli
from shardkit import make_shard


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A small shard, a pool table of its uids and a metadata file."""
    (tmp_path / "shards").mkdir()
    keys = make_shard(tmp_path / "shards" / "00000.tar", 6, caption_fn=lambda i: f"a cat {i}")
    uids = [hashlib.blake2b(f"00000.tar/{k}".encode(), digest_size=16).hexdigest() for k in keys]
    pl.DataFrame({"uid": uids, "score": np.arange(len(uids), dtype=float)}).write_parquet(
        tmp_path / "pool.parquet"
    )
    (tmp_path / "subset.txt").write_text("\n".join(uids) + "\n")
    (tmp_path / "meta.json").write_text('["cat", "dog"]')
    return tmp_path


def _command(name: str, root: Path, out: Path) -> list[str]:
    commands = {
        "select": ["select", str(root / "pool.parquet"), "--top", "score:0.5"],
        "balance": ["balance", str(root / "shards"), "-m", str(root / "meta.json")],
        "write": ["write", str(root / "shards"), "--subset", str(root / "subset.txt")],
    }
    return [*commands[name], "--out", str(out), *([] if name == "select" else ["--no-progress"])]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert "internal error" not in err and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["select", "balance", "write"])
def test_out_is_an_existing_file(
    inputs: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    target = inputs / "taken"
    target.write_text("not a folder")
    code, _, err = run_cli(_command(command, inputs, target), capsys)
    assert code == 2, err
    line = _error_line(err)
    assert f"{target} is a file, not a folder" in line
    assert target.read_text() == "not a folder"


def test_out_below_a_file(inputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (inputs / "taken").write_text("x")
    code, _, err = run_cli(_command("select", inputs, inputs / "taken" / "sub"), capsys)
    assert code == 2
    assert f"{inputs / 'taken'} is a file, not a folder" in _error_line(err)


def _fail_writes(monkeypatch: pytest.MonkeyPatch, number: int, message: str) -> None:
    """Make every parquet write fail with OSError `number` (no file name, as write(2) gives),
    through polars and through pyarrow's streaming writer (select writes a chunk at a time)."""
    import pyarrow.parquet as pq

    def failing(self: object, file: object, *args: object, **kwargs: object) -> None:
        raise OSError(number, message)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", failing)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)


@pytest.mark.parametrize("command", ["select", "balance"])
def test_disk_full_names_the_file(
    inputs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    _fail_writes(monkeypatch, errno.ENOSPC, os.strerror(errno.ENOSPC))
    out = inputs / "out"
    code, _, err = run_cli(_command(command, inputs, out), capsys)
    assert code == 2, err
    line = _error_line(err)
    assert "no space left on device at" in line and str(out) in line and ".parquet" in line
    assert ".tmp" not in line  # the final name, not the temporary one


def test_permission_denied_and_other_os_errors(
    inputs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_writes(monkeypatch, errno.EACCES, os.strerror(errno.EACCES))
    code, _, err = run_cli(_command("select", inputs, inputs / "out"), capsys)
    assert code == 2 and "permission denied at" in _error_line(err)
    _fail_writes(monkeypatch, errno.EIO, os.strerror(errno.EIO))
    code, _, err = run_cli(_command("select", inputs, inputs / "out"), capsys)
    line = _error_line(err)
    assert code == 2 and os.strerror(errno.EIO).lower() in line.lower()
    assert str(inputs / "out") in line
