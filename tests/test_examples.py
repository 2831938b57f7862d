"""The examples in examples/ run offline as users run them (a fresh interpreter each)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, workdir: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), str(workdir)],
        capture_output=True, text=True, timeout=600, cwd=workdir.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_score_with_library(tmp_path: Path) -> None:
    out = _run("score_with_library.py", tmp_path / "work")
    summary = json.loads((tmp_path / "work" / "run" / "scores.json").read_text())
    read, scored, failed = summary["read"], summary["scored"], summary["failed"]
    assert f"read {read}, scored {scored}, failed {failed}" in out
    assert read == 200 and scored + failed == read and scored > 150  # a few corrupt images
    scores = pl.read_parquet(tmp_path / "work" / "run" / "scores.parquet")
    assert scores.height == 200
    assert scores.filter(pl.col("status") == "scored")["negclip"].is_not_null().all()


def test_fairness_with_library(tmp_path: Path) -> None:
    out = _run("fairness_with_library.py", tmp_path / "work")
    match = re.search(r"association bias ([0-9.]+) -> ([0-9.]+) \(weights\)", out)
    assert match is not None, out
    before, after = float(match[1]), float(match[2])
    assert after < before, out
