"""Executors: where the units of a map stage run. All of them give the same outputs.

- `InlineExecutor`: one after another in this process (``--workers`` 0 or 1);
- `ThreadExecutor`: threads of this process, for I/O-bound stages (write copies bytes);
- `ProcessExecutor`: a pool of spawned worker processes on this machine, each set up once;
  workers exit soon after their parent dies, even by SIGKILL;
- `RayExecutor`: one Ray task per unit with the stage's resources (CPUs, GPUs), retried by Ray
  when a worker dies (``max_retries``); each worker process sets the stage up once. Stages
  whose setup is heavy (`MapStage.actors`: a model) run on a pool of Ray actors instead
  (`ray.util.ActorPool`), each holding the stage's resources and set up once; an actor that
  dies is restarted by Ray and its unit retried (``max_restarts``/``max_task_retries``). A
  local Ray instance is started unless ``--ray-address`` names a cluster (``auto``,
  ``ray://...``).
- `TaskSlice` is not an executor but a share of the units: task ``i`` of ``k`` of an array job
  (Slurm or any scheduler) takes ``units[i::k]`` and runs them on one of the above.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from curate.errors import InputError
from curate.runtime.stage import MapStage, Unit, execute_unit, execute_units

__all__ = [
    "ExecutorKind",
    "InlineExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "TaskSlice",
    "ThreadExecutor",
    "make_executor",
]

ExecutorKind = Literal["local", "ray", "array"]
Finished = Callable[[dict[str, Any]], None]
log = logging.getLogger("curate.runtime")


@dataclass(frozen=True)
class TaskSlice:
    """Task `index` of `count`: it takes `units[index::count]`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(f"--task-index must be in [0, {self.count}), got {self.index}")

    @property
    def label(self) -> str:
        return "local" if self.count == 1 else f"task-{self.index:05d}-of-{self.count:05d}"

    def select(self, units: Sequence[Unit]) -> list[Unit]:
        return list(units)[self.index :: self.count]

    @classmethod
    def from_env(cls, index: int | None = None, count: int | None = None) -> TaskSlice:
        """From the arguments, else Slurm's array variables (ids may start above 0)."""
        env = os.environ
        if count is None and env.get("SLURM_ARRAY_TASK_COUNT"):
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        if index is None and env.get("SLURM_ARRAY_TASK_ID"):
            index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return cls(index or 0, count or 1)


class InlineExecutor:
    """Units in this process, through the stage's `run_units` (one after another unless the
    stage streams them through one pipeline), each recorded as it completes."""

    label = "inline"

    def run(
        self,
        stage: MapStage,
        units: Sequence[Unit],
        folder: Path,
        signatures: dict[str, str],
        finished: Finished,
    ) -> None:
        stage.setup()
        for result in execute_units(stage, units, folder, signatures):
            finished(result)


class ThreadExecutor:
    """Units on `workers` threads of this process, for I/O-bound stages (copying bytes): the
    stage is set up once and shared, nothing is pickled."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.label = f"{self.workers} threads"

    def run(
        self,
        stage: MapStage,
        units: Sequence[Unit],
        folder: Path,
        signatures: dict[str, str],
        finished: Finished,
    ) -> None:
        stage.setup()
        with ThreadPoolExecutor(max_workers=min(self.workers, len(units))) as pool:
            pending = {
                pool.submit(execute_unit, stage, u, folder, signatures[u.name]) for u in units
            }
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    finished(future.result())


# --- processes ----------------------------------------------------------------------------------

_WORKER: tuple[MapStage, Path] | None = None


def _exit_with_parent(parent: int) -> None:
    """Exit this worker soon after the process that started it is gone (even by SIGKILL)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def watch_parent(parent: int) -> None:
    """Start the watch thread of a worker process whose parent has pid `parent`."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _process_init(stage: MapStage, folder: str, parent: int) -> None:
    global _WORKER
    watch_parent(parent)
    from curate.runtime.records import worker_log

    worker_log(Path(folder))
    stage.setup()
    _WORKER = (stage, Path(folder))


def _process_unit(unit: Unit, signature: str) -> dict[str, Any]:
    assert _WORKER is not None
    stage, folder = _WORKER
    return execute_unit(stage, unit, folder, signature)


class ProcessExecutor:
    """A pool of `workers` spawned processes (spawn: polars' and torch's threads do not survive
    a fork); units are handed out in order, results come back as they finish."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.label = f"{self.workers} processes"

    def run(
        self,
        stage: MapStage,
        units: Sequence[Unit],
        folder: Path,
        signatures: dict[str, str],
        finished: Finished,
    ) -> None:
        if self.workers == 1 or len(units) == 1:
            InlineExecutor().run(stage, units, folder, signatures, finished)
            return
        with ProcessPoolExecutor(
            max_workers=min(self.workers, len(units)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_process_init,
            initargs=(stage, str(folder), os.getpid()),
        ) as pool:
            pending = {pool.submit(_process_unit, u, signatures[u.name]) for u in units}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    finished(future.result())


# --- Ray ----------------------------------------------------------------------------------------

_RAY_READY: dict[str, MapStage] = {}  # per worker process: stages already set up, by run key


def _ray_unit(stage: MapStage, key: str, unit: Unit, folder: str, signature: str) -> dict:
    ready = _RAY_READY.get(key)
    if ready is None:
        from curate.runtime.records import worker_log

        worker_log(Path(folder))
        stage.setup()
        _RAY_READY.clear()  # one stage per worker at a time: free an earlier one's model
        ready = _RAY_READY[key] = stage
    return execute_unit(ready, unit, Path(folder), signature)


class _UnitActor:
    """A Ray actor holding one set-up stage (its model loaded once); `run` is `execute_unit`."""

    def __init__(self, stage: MapStage, folder: str) -> None:
        from curate.runtime.records import worker_log

        worker_log(Path(folder))
        stage.setup()
        self.stage, self.folder = stage, Path(folder)

    def run(self, unit: Unit, signature: str) -> dict[str, Any]:
        return execute_unit(self.stage, unit, self.folder, signature)


class RayExecutor:
    """Ray tasks per unit, or a pool of Ray actors for `MapStage.actors` stages (module doc).
    `actors`: the pool's size; None: as many as the cluster's CPUs (or GPUs, for a stage that
    needs them) hold at the stage's resources, at most one per unit."""

    def __init__(
        self, address: str | None = None, *, max_retries: int = 3, actors: int | None = None
    ) -> None:
        self.address = address
        self.max_retries = max_retries
        self.actors = actors
        self.label = f"ray ({address or 'local instance'})"

    def _connect(self) -> Any:
        try:
            import ray
        except ImportError as exc:
            raise InputError(
                "--executor ray needs Ray: pip install 'ray>=2.40' (or curate[ray])"
            ) from exc
        if not ray.is_initialized():
            options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
            if self.address:
                options["address"] = self.address
            else:
                options["include_dashboard"] = False
            ray.init(**options)
        return ray

    def run(
        self,
        stage: MapStage,
        units: Sequence[Unit],
        folder: Path,
        signatures: dict[str, str],
        finished: Finished,
    ) -> None:
        ray = self._connect()
        if stage.actors:
            self._run_on_actors(ray, stage, units, folder, signatures, finished)
            return
        remote = ray.remote(_ray_unit).options(
            num_cpus=stage.resources.cpus,
            num_gpus=stage.resources.gpus,
            max_retries=self.max_retries,
            retry_exceptions=False,  # a unit's own error is not transient; a dead worker is
        )
        stage_ref = ray.put(stage)
        key = uuid.uuid4().hex
        pending = [remote.remote(stage_ref, key, u, str(folder), signatures[u.name]) for u in units]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                finished(_ray_result(ray, ref))

    def pool_size(self, ray: Any, stage: MapStage, units: int) -> int:
        if self.actors is not None:
            return max(1, min(self.actors, units))
        total = ray.cluster_resources()
        need, have = (
            (stage.resources.gpus, total.get("GPU", 0.0))
            if stage.resources.gpus > 0
            else (stage.resources.cpus, total.get("CPU", 1.0))
        )
        fits = int(have // need) if need > 0 else units
        if fits == 0:
            log.warning(
                "%s asks %s GPU per actor and the Ray cluster has %s now: one actor waits for "
                "a node that has one (an autoscaler's); run with --device cpu to use CPUs",
                stage.name, stage.resources.gpus, have,
            )  # fmt: skip
        return max(1, min(fits, units))

    def _run_on_actors(
        self,
        ray: Any,
        stage: MapStage,
        units: Sequence[Unit],
        folder: Path,
        signatures: dict[str, str],
        finished: Finished,
    ) -> None:
        from ray.util import ActorPool

        actor_class = ray.remote(_UnitActor).options(
            num_cpus=stage.resources.cpus,
            num_gpus=stage.resources.gpus,
            max_restarts=self.max_retries,  # a dead actor comes back, set up again,
            max_task_retries=self.max_retries,  # and the unit it held is run again
        )
        actors = [  # the stage by value: a restarted actor must not need a freed object
            actor_class.remote(stage, str(folder))
            for _ in range(self.pool_size(ray, stage, len(units)))
        ]
        log.info("%s: %d units on %d Ray actors", stage.name, len(units), len(actors))
        try:
            pool = ActorPool(actors)
            for unit in units:
                pool.submit(lambda actor, u: actor.run.remote(u, signatures[u.name]), unit)
            while pool.has_next():
                finished(_ray_result(ray, None, pool))
        finally:
            for actor in actors:
                ray.kill(actor)  # free their GPUs for the next stage


def _ray_result(ray: Any, ref: Any, pool: Any = None) -> dict[str, Any]:
    """A unit's result from `ref` (or the pool's next), raising a unit's own error as itself."""
    try:
        return pool.get_next_unordered() if pool is not None else ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise exc.as_instanceof_cause() from None


def make_executor(
    kind: ExecutorKind = "local",
    *,
    workers: int = 1,
    ray_address: str | None = None,
    num_tasks: int | None = None,
    task_index: int | None = None,
    threads: bool = False,
) -> tuple[InlineExecutor | ThreadExecutor | ProcessExecutor | RayExecutor, TaskSlice]:
    """The executor and this task's share for the CLI's ``--executor`` options; `threads`: run
    local units on threads (I/O-bound stages) rather than processes."""
    if kind not in ("local", "ray", "array"):
        raise InputError(f"--executor must be local, ray or array, not {kind!r}")
    if kind == "local" and (num_tasks or 1) > 1:
        kind = "array"  # --num-tasks alone says as much
    if kind == "ray" and (num_tasks or 1) > 1:
        raise InputError("--num-tasks is for --executor array; Ray schedules the units itself")
    if kind != "ray" and ray_address:
        raise InputError("--ray-address needs --executor ray")
    tasks = TaskSlice.from_env(task_index, num_tasks) if kind == "array" else TaskSlice()
    if kind == "array" and tasks.count == 1 and "SLURM_ARRAY_TASK_ID" not in os.environ:
        log.info("--executor array with one task: the whole map runs here")
    if kind == "ray":
        return RayExecutor(ray_address), tasks
    if workers <= 1:
        return InlineExecutor(), tasks
    return (ThreadExecutor(workers) if threads else ProcessExecutor(workers)), tasks
