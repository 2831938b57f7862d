"""The stage runtime (issue 14): one plan, one record format, the same outputs on every executor.

Ray tests start a real local Ray instance on 127.0.0.1 (no mock); they skip only where Ray is
not installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from runtime_kit import ActorSquareStage, SquareStage

from curate.errors import InputError
from curate.runtime import records
from curate.runtime.executors import (
    InlineExecutor,
    ProcessExecutor,
    RayExecutor,
    TaskSlice,
    make_executor,
)
from curate.runtime.slurm import SlurmOptions, parse_array, plan_jobs
from curate.runtime.stage import run_map
from curate.runtime.status import run_status


def _outputs(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / "units").glob("*.txt"))}


def _expected(n: int, fail: set[str] = frozenset()) -> dict[str, str]:  # type: ignore[assignment]
    return {f"{i:05d}.txt": f"{i * i}\n" for i in range(n) if f"{i:05d}" not in fail}


def test_run_map_records_skips_and_redoes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run_map(SquareStage(out, 6), out)
    assert (report.units, report.done_now, report.skipped) == (6, 6, 0)
    assert report.samples == sum(range(6)) and report.failed == {}
    assert _outputs(out) == _expected(6)
    folder = out / ".curate" / "squares"
    plan = records.read_plan(folder)
    assert [u["name"] for u in plan or []] == [f"{i:05d}" for i in range(6)]
    done = records.read_done(folder, "00003")
    assert done is not None and done["stats"] == {"samples": 3} and done["source"] == "source-3"
    # A rerun skips every unit; a unit whose output is gone is redone, alone.
    again = run_map(SquareStage(out, 6), out)
    assert (again.done_now, again.skipped) == (0, 6)
    (out / "units" / "00002.txt").unlink()
    redo = run_map(SquareStage(out, 6), out)
    assert (redo.done_now, redo.skipped) == (1, 5) and _outputs(out) == _expected(6)
    # A record half-written when a run was killed is cleaned up by the next (single) run.
    leftover = folder / "done" / ".00001.json.deadbeef.tmp"
    leftover.write_text("{")
    run_map(SquareStage(out, 6), out, tasks=TaskSlice(0, 2))
    assert leftover.exists()  # one task of an array leaves its neighbours' files alone
    run_map(SquareStage(out, 6), out)
    assert not leftover.exists()
    # More units: only the new ones run.
    more = run_map(SquareStage(out, 8), out)
    assert (more.done_now, more.skipped) == (2, 6) and _outputs(out) == _expected(8)
    assert (folder / "logs" / "local.log").read_text().count("done in") >= 9


def test_a_failed_unit_is_recorded_and_retried(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run_map(SquareStage(out, 5, fail=frozenset({"00001", "00003"})), out)
    assert report.done_now == 3
    assert report.failed == {
        "source-1": "cannot read source-1: not a tar",
        "source-3": "cannot read source-3: not a tar",
    }
    assert _outputs(out) == _expected(5, {"00001", "00003"})
    (status,) = run_status(out)
    assert (status.stage, status.units, status.done, status.pending) == ("squares", 5, 3, 0)
    assert list(status.failed) == ["source-1", "source-3"]
    fixed = run_map(SquareStage(out, 5, fail=frozenset({"00003"})), out)
    assert (fixed.done_now, fixed.skipped, list(fixed.failed)) == (1, 3, ["source-3"])
    (status,) = run_status(out)
    assert (status.done, list(status.failed)) == (4, ["source-3"])
    assert status.samples == 0 + 1 + 2 + 4 and status.samples_per_second is not None


def test_array_tasks_split_the_units_and_give_the_same_outputs(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    run_map(SquareStage(whole, 10), whole)
    split = tmp_path / "split"
    shares = []
    for index in range(3):
        report = run_map(SquareStage(split, 10), split, tasks=TaskSlice(index, 3))
        shares.append(report.units)
        assert report.task == f"task-{index:05d}-of-00003"
        if index < 2:  # not all done yet
            (status,) = run_status(split)
            assert status.pending == 10 - sum(shares)
    assert shares == [4, 3, 3]
    assert _outputs(split) == _outputs(whole) == _expected(10)
    logs = sorted(p.name for p in (split / ".curate" / "squares" / "logs").glob("task-*.log"))
    assert logs == [f"task-{i:05d}-of-00003.log" for i in range(3)]
    plan = (split / ".curate/squares/plan.json").read_bytes()
    assert plan == (whole / ".curate/squares/plan.json").read_bytes()


def test_process_pool_sets_each_worker_up_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run_map(SquareStage(out, 8), out, executor=ProcessExecutor(2))
    assert report.done_now == 8 and _outputs(out) == _expected(8)
    pids = {p.name.split("-")[0] for p in (out / "setups").iterdir()}
    assert len(list((out / "setups").iterdir())) == len(pids) <= 2
    assert len(list((out / ".curate/squares/logs").glob("worker-*.log"))) == len(pids)


def test_task_slice_from_slurm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")  # --array=3-6
    assert TaskSlice.from_env() == TaskSlice(2, 4)
    assert TaskSlice.from_env(index=0) == TaskSlice(0, 4)
    executor, tasks = make_executor("array")
    assert isinstance(executor, InlineExecutor) and tasks == TaskSlice(2, 4)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert make_executor("local")[1] == TaskSlice()
    assert make_executor("local", num_tasks=3, task_index=1)[1] == TaskSlice(1, 3)  # implied
    with pytest.raises(InputError, match="task-index must be in"):
        TaskSlice(3, 3)
    with pytest.raises(InputError, match="needs --executor ray"):
        make_executor("local", ray_address="auto")
    with pytest.raises(InputError, match="local, ray or array"):
        make_executor("dask")  # type: ignore[arg-type]


def test_slurm_scripts(tmp_path: Path) -> None:
    assert parse_array("0-63") == (0, 64) and parse_array("0-63%8") == (0, 64)
    assert parse_array("16") == (0, 16) and parse_array("4-5") == (4, 2)
    for bad in ("x", "5-2", "0"):
        with pytest.raises(InputError, match="--array"):
            parse_array(bad)
    options = SlurmOptions(array="0-3", partition="gpu", gpus_per_task=1, chdir=str(tmp_path))
    plan = plan_jobs(["balance", "shards dir/", "-m", "meta.json"], options, python="python3")
    assert plan.tasks == 4
    assert "#SBATCH --array=0-3" in plan.map_script and "#SBATCH --requeue" in plan.map_script
    assert "#SBATCH --gpus-per-task=1" in plan.map_script
    assert "#SBATCH --partition=gpu" in plan.map_script
    assert f"#SBATCH --chdir={tmp_path}" in plan.map_script
    assert plan.commands[0] == [
        "python3", "-m", "curate", "balance", "shards dir/", "-m", "meta.json",
        "--phase", "match", "--executor", "array", "--num-tasks", "4", "--no-progress",
    ]  # fmt: skip
    assert "'shards dir/'" in plan.map_script  # quoted for the shell
    assert plan.reduce_script is not None and "--array" not in plan.reduce_script
    assert "gpus" not in plan.reduce_script
    assert plan.commands[1][-3:] == ["--phase", "sample", "--no-progress"]
    with pytest.raises(InputError, match="leave --phase out"):
        plan_jobs(["balance", "s/", "--phase", "match"], options)
    with pytest.raises(InputError, match="no map split"):
        plan_jobs(["select", "run/"], options)


# --- Ray --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> object:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent)])}},
    )
    yield ray
    ray.shutdown()


def test_ray_gives_the_local_outputs(ray_local: object, tmp_path: Path) -> None:
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    run_map(SquareStage(local, 7, fail=frozenset({"00004"})), local)
    report = run_map(
        SquareStage(on_ray, 7, fail=frozenset({"00004"})), on_ray, executor=RayExecutor()
    )
    assert report.done_now == 6 and list(report.failed) == ["source-4"]
    assert _outputs(on_ray) == _outputs(local) == _expected(7, {"00004"})
    for name in (f"{i:05d}" for i in range(7) if i != 4):
        ray_done = records.read_done(on_ray / ".curate/squares", name)
        local_done = records.read_done(local / ".curate/squares", name)
        assert ray_done and local_done and ray_done["signature"] == local_done["signature"]
    assert list((on_ray / ".curate/squares/logs").glob("worker-*.log"))


def test_a_ray_worker_killed_mid_unit_is_retried(ray_local: object, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run_map(SquareStage(out, 5, die_once="00002"), out, executor=RayExecutor())
    assert (out / "died-00002").exists()  # the first try really died
    assert report.done_now == 5 and report.failed == {}
    assert _outputs(out) == _expected(5)
    done = json.loads((out / ".curate/squares/done/00002.json").read_text())
    assert done["stats"] == {"samples": 2}


def _setups(out: Path) -> set[str]:
    return {p.name.split("-")[0] for p in (out / "setups").iterdir()}


def test_actor_stages_set_up_once_per_actor(ray_local: object, tmp_path: Path) -> None:
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    run_map(ActorSquareStage(local, 8, fail=frozenset({"00003"})), local)
    report = run_map(
        ActorSquareStage(on_ray, 8, fail=frozenset({"00003"})),
        on_ray,
        executor=RayExecutor(actors=2),
    )
    assert report.done_now == 7 and list(report.failed) == ["source-3"]
    assert _outputs(on_ray) == _outputs(local) == _expected(8, {"00003"})
    setups = list((on_ray / "setups").iterdir())
    assert len(setups) == 2  # two actors, each set up once for eight units
    workers = {p.name for p in (on_ray / "pids").iterdir()}
    assert workers <= _setups(on_ray) and len(workers) == 2  # units ran on those two only
    assert list((on_ray / ".curate/squares/logs").glob("worker-*.log"))


def test_an_actor_killed_mid_unit_is_restarted_and_the_unit_retried(
    ray_local: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stage = ActorSquareStage(out, 6, die_once="00002")
    report = run_map(stage, out, executor=RayExecutor(actors=2))
    assert (out / "died-00002").exists()  # the first try really died
    assert report.done_now == 6 and report.failed == {}
    assert _outputs(out) == _expected(6)
    assert len(list((out / "setups").iterdir())) == 3  # the dead actor came back, set up again
    assert RayExecutor().pool_size(ray_local, stage, 6) == 2  # the cluster's 2 CPUs, 1 each
    assert RayExecutor().pool_size(ray_local, stage, 1) == 1  # never more than the units


def test_cpu_stages_do_not_import_torch() -> None:
    """select, write and balance (and the runtime) load without torch (issue 14)."""
    import subprocess
    import sys

    code = (
        "import sys; import curate.cli.app, curate.selection.stage, curate.writing.stage, "
        "curate.balancing.stage, curate.runtime.executors, curate.runtime.status; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    from dataclasses import fields

    from curate.selection.normsim_d import DEFAULT_ROUNDS
    from curate.selection.stage import SelectSpec

    rounds = next(f.default for f in fields(SelectSpec) if f.name == "normsim2d_rounds")
    assert rounds == DEFAULT_ROUNDS
