"""Stages on the runtime (issue 14): balance gives byte-identical outputs on local, process,
array and Ray executors, and survives kill -9 at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from clikit import run_cli
from shardkit import make_shard

WORDS = ["dog", "cat", "car", "tree", "house", "woman", "man", "nurse", "engineer", "child"]
OUTPUTS = ("entry_counts.parquet", "decisions.parquet", "subset.parquet", "subset.npy")


def _caption(i: int) -> str:
    return f"a {WORDS[i % 10]} near a {WORDS[(i * 7 + 3) % 10]} and a {WORDS[(i * 3) % 10]}"


def _pool(folder: Path, shards: int, per_shard: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        make_shard(folder / f"{s:05d}.tar", per_shard, shard_index=s, caption_fn=_caption)
    return folder


def _metadata(tmp_path: Path) -> Path:
    path = tmp_path / "metadata.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


def _files(out: Path) -> dict[str, bytes]:
    """Every output byte of a balance folder (matches and the reduce), not the records."""
    names = [*OUTPUTS, *(f"matches/{p.name}" for p in sorted((out / "matches").glob("*")))]
    return {name: (out / name).read_bytes() for name in names}


def _write_files(out: Path) -> dict[str, bytes]:
    """Every output byte of a write folder (tars, sidecars, stats, manifest), not the records."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _subset(shards: Path, path: Path) -> Path:
    """Every other uid of the pool, as a text uid file."""
    from curate.io.captions import read_unit, resolve_units

    uids = [u for unit in resolve_units(str(shards)) for u in read_unit(unit)["uid"].to_list()]
    path.write_text("\n".join(uids[::2]) + "\n")
    return path


def _write_args(shards: Path, subset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "write", str(shards), "--subset", str(subset), "--out", str(out), "--shard-samples",
        "9", "--shuffle", "--seed", "5", "--no-progress", *extra,
    ]  # fmt: skip


def _args(shards: Path, meta: Path, out: Path, *extra: str) -> list[str]:
    return [
        "balance", str(shards), "-m", str(meta), "-o", str(out), "--t", "7", "--seed", "3",
        "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pool")
    return _pool(root / "shards", shards=7, per_shard=30), _metadata(root)


def test_balance_is_byte_identical_on_every_executor(
    pool: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards, meta = pool
    code, _, err = run_cli(_args(shards, meta, tmp_path / "inline", "--workers", "1"), capsys)
    assert code == 0, err
    reference = _files(tmp_path / "inline")
    code, _, err = run_cli(_args(shards, meta, tmp_path / "procs", "--workers", "2"), capsys)
    assert code == 0, err
    assert _files(tmp_path / "procs") == reference
    array = tmp_path / "array"
    for index in range(3):
        extra = ("--executor", "array", "--num-tasks", "3", "--task-index", str(index))
        code, _, err = run_cli(_args(shards, meta, array, "--phase", "match", *extra), capsys)
        assert code == 0, err
    code, out, err = run_cli(_args(shards, meta, array, "--phase", "sample"), capsys)
    assert code == 0, err
    assert _files(array) == reference
    code, out, err = run_cli(["status", str(array), "--json"], capsys)
    assert code == 0, err
    (match,) = json.loads(out)["stages"]
    assert (match["stage"], match["units"], match["done"], match["pending"]) == ("match", 7, 7, 0)
    assert match["samples"] == 7 * 30


def test_balance_on_ray_is_byte_identical(
    pool: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    shards, meta = pool
    code, _, err = run_cli(_args(shards, meta, tmp_path / "local"), capsys)
    assert code == 0, err
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        code, _, err = run_cli(_args(shards, meta, tmp_path / "ray", "--executor", "ray"), capsys)
    finally:
        ray.shutdown()
    assert code == 0, err
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert list((tmp_path / "ray" / ".curate/match/logs").glob("worker-*.log"))


def _visible_outputs_are_whole(out: Path) -> None:
    """No partial file under an output name: every parquet there opens and reads."""
    for path in [*(out / "matches").glob("*.parquet"), *(out / n for n in OUTPUTS[:3])]:
        if path.exists():
            pq.read_table(path)


def test_balance_survives_kill_9_at_random_moments(tmp_path: Path) -> None:
    shards = _pool(tmp_path / "shards", shards=12, per_shard=40)
    meta = _metadata(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "curate", *_args(shards, meta, out, *extra)]

    reference = tmp_path / "reference"
    start = time.monotonic()
    subprocess.run(command(reference, "--workers", "2"), env=env, check=True, capture_output=True)
    duration = time.monotonic() - start
    rng = random.Random(1234)
    kills = 0
    for trial in range(20):  # until 10 kills landed inside a run
        if kills == 10:
            break
        out = tmp_path / f"killed-{trial}"
        process = subprocess.Popen(
            command(out, "--workers", "2"), env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        time.sleep(rng.uniform(0.1, 0.9 * duration))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the CLI and its workers, mid-flight
            kills += 1
        process.wait()
        _visible_outputs_are_whole(out)
        done = out / ".curate" / "match" / "done"
        before = (
            {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")} if done.is_dir() else {}
        )
        rerun = subprocess.run(command(out), env=env, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        after = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
        assert len(after) == 12 and all(after[name] == t for name, t in before.items())
        assert _files(out) == _files(reference), f"trial {trial}"
        assert not list((out / "matches").glob(".*.tmp"))
    assert kills == 10  # the moments fell inside the runs


def test_balance_as_a_real_slurm_array_equals_local(
    pool: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`curate slurm --submit` on a single-node Slurm cluster: the array of match tasks, then
    the afterok sample job; the outputs are the local run's, byte for byte."""
    import re

    import slurm_kit

    reason = slurm_kit.missing()
    if reason:
        pytest.skip(reason)
    shards, meta = pool
    code, _, err = run_cli(_args(shards, meta, tmp_path / "local"), capsys)
    assert code == 0, err
    out = tmp_path / "slurm-out"
    with slurm_kit.slurm_cluster(tmp_path / "cluster") as env:
        submitted = subprocess.run(
            [
                sys.executable, "-m", "curate", "slurm", "--array", "0-2", "--submit", "--",
                *_args(shards, meta, out)[:-1],  # curate slurm adds --no-progress itself
            ],
            env=env, cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        ids = re.findall(r"job (\d+)", submitted.stdout)
        assert len(ids) == 2, submitted.stdout
        slurm_kit.wait_for_jobs(env, ids)
        # then write the balanced subset as an array too (its reduce writes the manifest)
        written = tmp_path / "slurm-written"
        args = _write_args(shards, out / "subset.npy", written)[:-1]
        submitted = subprocess.run(
            [sys.executable, "-m", "curate", "slurm", "--array", "0-2", "--submit", "--", *args],
            env=env, cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        write_ids = re.findall(r"job (\d+)", submitted.stdout)
        assert len(write_ids) == 2, submitted.stdout
        slurm_kit.wait_for_jobs(env, write_ids)
    logs = sorted(p.name for p in (out / ".curate/match/logs").glob("task-*.log"))
    assert logs == [f"task-{i:05d}-of-00003.log" for i in range(3)], list(tmp_path.glob("*.out"))
    assert (out / "balance.json").is_file(), [p.read_text() for p in tmp_path.glob("*.out")]
    assert _files(out) == _files(tmp_path / "local")
    local_args = _write_args(shards, tmp_path / "local" / "subset.npy", tmp_path / "local-written")
    code, _, err = run_cli(local_args, capsys)
    assert code == 0, err
    assert (written / "manifest.json").is_file(), [p.read_text() for p in tmp_path.glob("*.out")]
    assert _write_files(written) == _write_files(tmp_path / "local-written")


def test_write_is_byte_identical_on_every_executor(
    pool: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards, _ = pool
    subset = _subset(shards, tmp_path / "subset.txt")
    code, _, err = run_cli(_write_args(shards, subset, tmp_path / "one", "--workers", "1"), capsys)
    assert code == 0, err
    reference = _write_files(tmp_path / "one")
    assert len([n for n in reference if n.endswith(".tar")]) == 12  # 105 samples, 9 per shard
    code, _, err = run_cli(_write_args(shards, subset, tmp_path / "four", "--workers", "4"), capsys)
    assert code == 0, err
    assert _write_files(tmp_path / "four") == reference
    array = tmp_path / "array"
    for index in range(3):
        extra = ("--executor", "array", "--num-tasks", "3", "--task-index", str(index))
        code, _out, err = run_cli(_write_args(shards, subset, array, *extra), capsys)
        assert code == 0, err
        assert ("manifest.json" in {p.name for p in array.iterdir()}) == (index == 2)
    assert _write_files(array) == reference
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        args = _write_args(shards, subset, tmp_path / "ray", "--executor", "ray")
        code, _, err = run_cli(args, capsys)
    finally:
        ray.shutdown()
    assert code == 0, err
    assert _write_files(tmp_path / "ray") == reference


def test_write_survives_kill_9_at_random_moments(tmp_path: Path) -> None:
    shards = _pool(tmp_path / "shards", shards=6, per_shard=40)
    subset = _subset(shards, tmp_path / "subset.txt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def command(out: Path) -> list[str]:
        args = _write_args(shards, subset, out, "--workers", "2")
        args[args.index("--shard-samples") + 1] = "4"  # 30 output shards
        return [sys.executable, "-m", "curate", *args]

    reference = tmp_path / "reference"
    start = time.monotonic()
    subprocess.run(command(reference), env=env, check=True, capture_output=True)
    duration = time.monotonic() - start
    rng = random.Random(99)
    kills = 0
    for trial in range(20):  # until 10 kills landed inside a run
        if kills == 10:
            break
        out = tmp_path / f"killed-{trial}"
        process = subprocess.Popen(
            command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        time.sleep(rng.uniform(0.1, 0.9 * duration))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
        if out.is_dir():  # a visible tar is always whole: webdataset reads it to the end
            for tar in out.glob("*.tar"):
                assert tar.stat().st_size % 512 == 0 and tarfile.is_tarfile(tar)
        done = out / ".curate" / "write" / "done"
        before = (
            {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")} if done.is_dir() else {}
        )
        rerun = subprocess.run(command(out), env=env, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        after = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
        assert len(after) == 30 and all(after[name] == t for name, t in before.items())
        assert _write_files(out) == _write_files(reference), f"trial {trial}"
    assert kills == 10


def test_concurrent_array_tasks_share_a_folder_safely(
    pool: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three match tasks started at the same moment on one output folder (as a Slurm array
    does), then the sample phase: the shared plan is whole and the outputs are the local run's."""
    shards, meta = pool
    code, _, err = run_cli(_args(shards, meta, tmp_path / "local"), capsys)
    assert code == 0, err
    out = tmp_path / "array"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    tasks = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "curate",
                *_args(shards, meta, out, "--phase", "match", "--executor", "array"),
            ],
            env={**env, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "3"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for task in tasks:
        _, err = task.communicate(timeout=300)
        assert task.returncode == 0, err
    plan = json.loads((out / ".curate/match/plan.json").read_text())
    assert len(plan["units"]) == 7
    code, _, err = run_cli(_args(shards, meta, out, "--phase", "sample"), capsys)
    assert code == 0, err
    assert _files(out) == _files(tmp_path / "local")
    logs = sorted(p.name for p in (out / ".curate/match/logs").glob("task-*.log"))
    assert logs == [f"task-{i:05d}-of-00003.log" for i in range(3)]
