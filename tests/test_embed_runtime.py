"""Embedding on the stage runtime: one unit per shard, the same bytes on the streaming local path,
array tasks and Ray; unreadable shards fail alone; finished runs cost no model load; kill -9 at
random moments then a rerun gives the same bytes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest
from clikit import run_cli
from shardkit import make_shard

from curate.runtime import records
from curate.runtime.stage import MapStage, Resources, Unit, UnitFailure, run_map

TINY = ["--model", "curate-tiny", "--pretrained", "none", "--no-progress"]
SPEED = ["--workers", "1", "--batch-size", "4"]  # one decoding worker: model threads = cores - 1


def _shards(folder: Path, count: int, per_shard: int, *, bad: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        if i == bad:
            (folder / f"{i:05d}.tar").write_bytes(b"this is not a tar file" * 40)
        else:
            make_shard(folder / f"{i:05d}.tar", per_shard + i, shard_index=i)
    return folder


def _embed(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["embed", str(shards), "--out", str(run), *TINY, *SPEED, *extra]


def _tables(run: Path) -> dict[str, bytes]:
    """The embeddings folder byte for byte (tables and their records) and run.json."""
    files = {p.name: p.read_bytes() for p in sorted((run / "embeddings").iterdir())}
    return {**files, "run.json": (run / "run.json").read_bytes()}


def _status(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run_cli(["status", str(run), "--json"], capsys)
    (embed,) = [s for s in json.loads(out)["stages"] if s["stage"] == "embed"]
    assert code == (1 if embed["failed"] else 0), err
    return embed


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five shards (10..14 samples), the fourth unreadable."""
    return _shards(tmp_path_factory.mktemp("embed-pool") / "shards", 5, 10, bad=3)


@pytest.fixture(scope="module")
def reference(pool: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pool embedded by the streaming local path (one DataLoader for every shard)."""
    from curate.cli.app import main

    run = tmp_path_factory.mktemp("embed-reference") / "run"
    with pytest.raises(SystemExit) as exc:
        main(_embed(pool, run))
    assert exc.value.code == 1  # the unreadable shard
    return run


def test_local_run_streams_every_shard_through_one_loader(
    pool: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import curate.embedding.stage as stage

    loaders: list[int] = []
    real = stage.make_loader

    def counted(dataset: Any, workers: int, pin_memory: bool) -> Any:
        loaders.append(len({unit.shard_index for unit in dataset.units}))
        return real(dataset, workers, pin_memory)

    monkeypatch.setattr(stage, "make_loader", counted)
    code, out, err = run_cli(_embed(pool, tmp_path / "run", "--json"), capsys)
    assert code == 1 and "00003.tar" in err
    assert loaders == [5]  # not one loader (and one start of its workers) per shard
    report = json.loads(out)
    assert (report["shards_total"], report["shards_embedded"], report["shards_skipped"]) == (
        5,
        4,
        0,
    )
    assert list(report["shard_errors"]) == [str(pool / "00003.tar")]
    assert report["samples_read"] == 10 + 11 + 12 + 14
    assert _tables(tmp_path / "run") == _tables(reference)
    status = _status(tmp_path / "run", capsys)
    assert (status["units"], status["done"], status["pending"]) == (5, 4, 0)
    assert list(status["failed"]) == [str(pool / "00003.tar")]
    assert status["samples"] == 10 + 11 + 12 + 14
    failed = records.read_failed(tmp_path / "run" / ".curate" / "embed", "00003")
    assert failed is not None and "00003.tar" in json.dumps(failed)


def test_three_array_tasks_give_the_same_bytes(
    pool: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    for index in range(3):
        extra = ("--executor", "array", "--num-tasks", "3", "--task-index", str(index), "--json")
        code, out, err = run_cli(_embed(pool, run, *extra), capsys)
        report = json.loads(out)
        assert report["task"] == f"task-{index:05d}-of-00003"
        assert report["shards_total"] == len(range(index, 5, 3))
        assert code == (1 if index == 0 else 0), err  # units 0 and 3 (the unreadable one)
        # every task writes the whole run.json: the same model record and map of all shards
        assert (run / "run.json").read_bytes() == (reference / "run.json").read_bytes()
    assert _tables(run) == _tables(reference)
    logs = sorted(p.name for p in (run / ".curate/embed/logs").glob("task-*.log"))
    assert logs == [f"task-{i:05d}-of-00003.log" for i in range(3)]


def test_ray_gives_the_same_bytes(
    pool: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        code, _, err = run_cli(_embed(pool, tmp_path / "run", "--executor", "ray"), capsys)
    finally:
        ray.shutdown()
    assert code == 1 and "00003.tar" in err, err  # the unreadable shard, recorded by its task
    assert _tables(tmp_path / "run") == _tables(reference)
    assert list((tmp_path / "run" / ".curate/embed/logs").glob("worker-*.log"))
    status = _status(tmp_path / "run", capsys)
    assert (status["done"], len(status["failed"])) == (4, 1)


def test_rerun_skips_everything_without_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import curate.embedding.stage as stage

    shards = _shards(tmp_path / "shards", 3, 6)
    run = tmp_path / "run"
    code, _, err = run_cli(_embed(shards, run), capsys)
    assert code == 0, err
    done = run / ".curate" / "embed" / "done"
    before = {p: p.stat().st_mtime_ns for p in [*done.iterdir(), *(run / "embeddings").iterdir()]}

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for a finished run")

    leftovers = [run / "embeddings" / ".00001.parquet.0123abcd.tmp", run / ".run.json.89abcdef.tmp"]
    for path in leftovers:  # what a kill in the middle of an atomic write leaves
        path.write_bytes(b"partial")
    monkeypatch.setattr(stage.ModelSpec, "load", no_load)
    monkeypatch.setattr(stage, "load_model", no_load)
    for command in (_embed(shards, run, "--json"), ["score", str(run), "--json", "--no-progress"]):
        code, _, err = run_cli(command, capsys)
        assert code == 0, err
    report = json.loads(run_cli(_embed(shards, run, "--json"), capsys)[1])
    assert (report["shards_skipped"], report["shards_embedded"]) == (3, 0)
    assert report["samples_read"] == 6 + 7 + 8
    assert before == {p: p.stat().st_mtime_ns for p in before}
    assert not any(path.exists() for path in leftovers)
    # A run folder without the runtime's records (made before embedding ran on it): its
    # complete tables are adopted, not embedded again, still without a model load.
    for path in sorted(done.iterdir()):
        path.unlink()
    report = json.loads(run_cli(_embed(shards, run, "--json"), capsys)[1])
    assert (report["shards_skipped"], report["shards_embedded"]) == (3, 0)
    assert _status(run, capsys)["done"] == 3
    # Another --max-pixels is another table (images over it fail): redone, so the model loads.
    code, _, err = run_cli(_embed(shards, run, "--max-pixels", "100"), capsys)
    assert code == 1 and "the model was loaded" in err


def test_score_as_array_tasks_embeds_each_share_then_scores_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = _shards(tmp_path / "shards", 4, 5)
    run = tmp_path / "run"
    base = ["score", str(shards), "--out", str(run), "-m", "clipscore", *TINY, *SPEED]
    for index in range(2):
        code, out, err = run_cli([*base, "--num-tasks", "2", "--task-index", str(index)], capsys)
        assert code == 0, err
        assert f"curate score {run} -m clipscore" in " ".join(err.split())
        assert not (run / "scores.parquet").exists()
    done = run / ".curate" / "embed" / "done"
    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    assert len(before) == 4
    code, out, err = run_cli(["score", str(run), "--json", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(out)["scored"] == 5 + 6 + 7 + 8
    assert before == {p.name: p.stat().st_mtime_ns for p in done.iterdir()}  # nothing redone
    code, _, err = run_cli([*base, "--executor", "ray", "--num-tasks", "2"], capsys)
    assert code == 2 and "--num-tasks" in err


def test_unit_resources_ask_ray_for_a_gpu_on_cuda_only() -> None:
    from curate.embedding.stage import ModelSpec, unit_resources

    assert unit_resources(ModelSpec(device="cpu"), 0) == Resources(cpus=1.0, gpus=0.0)
    assert unit_resources(ModelSpec(device="cuda:1"), 6) == Resources(cpus=6.0, gpus=1.0)


def test_ray_executor_schedules_with_the_stage_instance_resources(tmp_path: Path) -> None:
    """RayExecutor reads `stage.resources` of the instance (embed sets it per run)."""
    from curate.runtime.executors import RayExecutor

    seen: dict[str, Any] = {}

    class FakeRef:
        def __init__(self, value: Any) -> None:
            self.value = value

    class FakeRemote:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def options(self, **options: Any) -> FakeRemote:
            seen.update(options)
            return self

        def remote(self, *args: Any) -> FakeRef:
            return FakeRef(self.fn(*[a.value if isinstance(a, FakeRef) else a for a in args]))

    class FakeRay:
        class exceptions:  # mirrors ray.exceptions
            RayTaskError = RuntimeError

        remote = FakeRemote

        @staticmethod
        def put(value: Any) -> FakeRef:
            return FakeRef(value)

        @staticmethod
        def wait(refs: list[FakeRef], num_returns: int) -> tuple[list, list]:
            return refs[:num_returns], refs[num_returns:]

        @staticmethod
        def get(ref: FakeRef) -> Any:
            return ref.value

    executor = RayExecutor()
    executor._connect = lambda: FakeRay  # type: ignore[method-assign]
    stage = _Toy(out=tmp_path, names=["a", "b"], resources=Resources(cpus=3.0, gpus=1.0))
    report = run_map(stage, tmp_path, executor=executor)
    assert report.done_now == 2
    assert (seen["num_cpus"], seen["num_gpus"]) == (3.0, 1.0)


# --- the runtime's streaming hook --------------------------------------------------------------


@dataclass
class _Toy(MapStage):
    """Units that write OUT/<name>.txt; `streamed` units finish in reverse order from one
    `run_units` call; names starting with "bad" cannot succeed."""

    name: ClassVar[str] = "toy"
    out: Path
    names: list[str]
    streamed: bool = False
    resources: Resources = Resources()  # noqa: RUF009 - frozen

    def plan(self) -> list[Unit]:
        return [Unit(n, f"src/{n}") for n in self.names]

    def signature(self, unit: Unit) -> dict[str, Any]:
        return {"name": unit.name}

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        if unit.name.startswith("bad"):
            raise UnitFailure(f"{unit.name} is unreadable")
        (self.out / f"{unit.name}.txt").write_text(unit.name)
        return {"samples": len(unit.name)}

    def run_units(
        self, units: Sequence[Unit]
    ) -> Iterator[tuple[Unit, dict[str, Any] | UnitFailure]]:
        if not self.streamed:
            yield from super().run_units(units)
            return
        calls.append([u.name for u in units])
        folder = self.out / ".curate" / "toy"
        for i, unit in enumerate(reversed(units)):
            # the units yielded before are recorded by now, while this stream is still open
            for earlier in list(reversed(units))[:i]:
                assert records.read_done(folder, earlier) or records.read_failed(folder, earlier)
            try:
                yield unit, self.run_unit(unit)
            except UnitFailure as exc:
                yield unit, exc


calls: list[list[str]] = []


@pytest.mark.parametrize("streamed", [False, True])
def test_inline_executor_records_each_unit_of_a_stream_as_it_completes(
    tmp_path: Path, streamed: bool
) -> None:
    calls.clear()
    stage = _Toy(out=tmp_path, names=["aa", "bad1", "ccc", "d"], streamed=streamed)
    report = run_map(stage, tmp_path)
    assert (report.done_now, report.samples) == (3, 2 + 3 + 1)
    assert list(report.failed) == ["src/bad1"]
    assert calls == ([["aa", "bad1", "ccc", "d"]] if streamed else [])
    folder = tmp_path / ".curate" / "toy"
    assert records.read_failed(folder, "bad1")["error"] == "bad1 is unreadable"
    assert sorted(p.stem for p in (folder / "done").iterdir()) == ["aa", "ccc", "d"]
    calls.clear()
    again = run_map(stage, tmp_path)  # only the failed unit is tried again, alone
    assert (again.skipped, again.done_now, list(again.failed)) == (3, 0, ["src/bad1"])
    assert calls == ([["bad1"]] if streamed else [])


def test_a_stream_that_loses_a_unit_is_an_error(tmp_path: Path) -> None:
    class Lossy(_Toy):
        def run_units(self, units: Sequence[Unit]) -> Iterator[tuple[Unit, Any]]:
            yield units[0], self.run_unit(units[0])

    with pytest.raises(Exception, match="never finished units"):
        run_map(Lossy(out=tmp_path, names=["a", "b"]), tmp_path)


# --- kill -9 -----------------------------------------------------------------------------------


def _whole(run: Path) -> None:
    """No partial file under a final name: every table reads, every record parses."""
    for path in (run / "embeddings").glob("*.parquet"):
        pq.read_table(path)
    for path in [*(run / "embeddings").glob("*.json"), *(run / ".curate").rglob("*.json")]:
        json.loads(path.read_text())


def test_embed_survives_kill_9_at_random_moments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = _shards(tmp_path / "shards", 6, 14)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def command(run: Path) -> list[str]:
        return [sys.executable, "-m", "curate", *_embed(shards, run)]

    def started(process: subprocess.Popen[bytes], run: Path) -> float:
        """Wait until run.json is there (the model is loaded, units are next); its moment."""
        while not (run / "run.json").exists() and process.poll() is None:
            time.sleep(0.01)
        return time.monotonic()

    reference = tmp_path / "reference"
    process = subprocess.Popen(command(reference), env=env, stderr=subprocess.PIPE)
    begun = started(process, reference)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    window = time.monotonic() - begun  # from run.json to the last table
    rng = random.Random(4321)
    kills = 0
    for trial in range(20):  # until 10 kills landed inside a run
        if kills == 10:
            break
        run = tmp_path / f"killed-{trial}"
        process = subprocess.Popen(
            command(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        started(process, run)
        time.sleep(rng.uniform(0.0, window))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the CLI and its decoding worker
            kills += 1
        process.wait()
        _whole(run)
        done = run / ".curate" / "embed" / "done"
        before = (
            {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")} if done.is_dir() else {}
        )
        code, _, err = run_cli(_embed(shards, run), capsys)
        assert code == 0, err
        after = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
        assert len(after) == 6 and all(after[name] == t for name, t in before.items())
        assert _tables(run) == _tables(reference), f"trial {trial}"
        assert not [*run.glob("*.tmp"), *(run / "embeddings").glob("*.tmp")]
    assert kills == 10  # the moments fell inside the runs


def test_slurm_runs_embed_as_an_array_and_score_with_its_reduce() -> None:
    from curate.runtime.slurm import SlurmOptions, plan_jobs

    options = SlurmOptions(array="0-3", gpus_per_task=1)
    embed = plan_jobs(["embed", "shards/", "--out", "run/"], options, python="python3")
    assert embed.commands == [
        ["python3", "-m", "curate", "embed", "shards/", "--out", "run/", "--executor", "array",
         "--num-tasks", "4", "--no-progress"],
    ]  # fmt: skip
    assert embed.reduce_script is None and "#SBATCH --gpus-per-task=1" in embed.map_script
    score = plan_jobs(["score", "shards/", "--out", "run/", "-m", "negclip"], options)
    assert score.commands[0][-5:] == ["--executor", "array", "--num-tasks", "4", "--no-progress"]
    assert score.commands[1][3:] == ["score", "shards/", "--out", "run/", "-m", "negclip",
                                     "--no-progress"]  # fmt: skip
