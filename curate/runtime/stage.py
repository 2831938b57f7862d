"""The one stage runtime: a map stage is a fixed list of units and a function of one unit.

A map stage (`MapStage`) says

- `plan()`: its units (`Unit`: a file-safe name and the source it reads), in a fixed order;
- `signature(unit)`: what the unit's output depends on (inputs and config), as JSON;
- `run_unit(unit)`: compute the unit and write its outputs atomically (`runtime.atomic`),
  returning small JSON stats (``samples`` counts toward progress); raise `UnitFailure` for a
  unit that can never succeed as it is (an unreadable shard): it is recorded, the others go on;
- `setup()`: once per worker process before its first unit (load a model, build an automaton);
- `resources`: what one unit needs where units are scheduled (Ray): CPUs, GPUs;
- `actors`: whether Ray runs the units on a pool of long-lived actors, each set up once (a
  stage that loads a model), rather than one task per unit;
- `run_units(units)` (optional): run several units in one stream in this process, yielding each
  unit's outcome as it completes; the in-process executor uses it, so a stage can keep one
  pipeline (decode workers, a model) across units. The default runs `run_unit` one by one.

`run_map(stage, folder, executor=...)` plans, saves the plan, skips units whose completion
record matches their signature, runs the rest on the executor (in-process, a process pool, or
Ray tasks; `TaskSlice` picks one task's share of an array job), writes one completion record per
unit (`runtime.records`) after its outputs, and returns a `MapReport`. A reduce is a plain
function that reads the outputs of the units the report says are done.

The result never depends on the executor, the worker count or the task split: units are
independent and each one's output is a function of its signature.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from curate.errors import CurateError

__all__ = [
    "MapReport",
    "MapStage",
    "Resources",
    "Unit",
    "UnitFailure",
    "execute_unit",
    "execute_units",
    "record_outcome",
    "run_map",
]

log = logging.getLogger("curate.runtime")


class UnitFailure(CurateError):
    """A unit that cannot succeed as it is (unreadable input): recorded, never retried in-run."""


@dataclass(frozen=True)
class Unit:
    """One unit of a map stage: a file-safe `name` (unique in the stage) and its `source`."""

    name: str
    source: str


@dataclass(frozen=True)
class Resources:
    """What one unit needs from a scheduler (Ray): CPUs and GPUs, fractions allowed."""

    cpus: float = 1.0
    gpus: float = 0.0


class MapStage(ABC):
    """A stage whose work splits into independent units (module doc). Subclasses are plain,
    picklable data: a process pool or Ray ships them to workers once."""

    name: ClassVar[str]  # folder name of its records: OUT/.curate/<name>/
    resources: ClassVar[Resources] = Resources()
    actors: ClassVar[bool] = False  # on Ray: a pool of actors set up once, not a task per unit

    @abstractmethod
    def plan(self) -> list[Unit]:
        """The units, in the order every task and executor sees them."""

    @abstractmethod
    def signature(self, unit: Unit) -> dict[str, Any]:
        """JSON-able description of everything the unit's output depends on."""

    @abstractmethod
    def run_unit(self, unit: Unit) -> dict[str, Any]:
        """Compute one unit, write its outputs atomically, return JSON-able stats."""

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Once per worker process, before its first unit."""

    def run_units(
        self, units: Sequence[Unit]
    ) -> Iterator[tuple[Unit, dict[str, Any] | UnitFailure]]:
        """Run `units` in this process, yielding ``(unit, stats or UnitFailure)`` for each one as
        it completes (any order, each unit exactly once); its outputs are written by then. The
        runtime records every outcome as it arrives. Override to stream units through one
        pipeline; the default calls `run_unit` for one unit after another."""
        for unit in units:
            try:
                yield unit, self.run_unit(unit)
            except UnitFailure as exc:
                yield unit, exc

    def output_present(self, unit: Unit) -> bool:
        """Whether a done unit's outputs are still there (a rerun redoes it when not)."""
        return True


@dataclass
class MapReport:
    """What one `run_map` call did with the units of its task."""

    stage: str
    units: int  # in this task's share
    done_now: int = 0
    skipped: int = 0
    samples: int = 0  # over the units run now
    failed: dict[str, str] = field(default_factory=dict)  # unit source -> error
    seconds: float = 0.0
    task: str = "local"
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # unit name -> stats

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("stats")
        return data


def record_outcome(
    stage: MapStage,
    unit: Unit,
    folder: Path,
    signature: str,
    outcome: dict[str, Any] | UnitFailure,
    seconds: float,
) -> dict[str, Any]:
    """Write the completion (or failure) record of a unit whose outputs are written, and return
    ``{"unit", "status", "stats" | "error", "seconds"}`` for the caller's report."""
    from curate.runtime import records

    if isinstance(outcome, UnitFailure):
        error = str(outcome)
        log.warning("%s unit %s failed: %s", stage.name, unit.name, error)
        records.write_failed(folder, unit, signature, error)
        return {"unit": unit.name, "status": "failed", "error": error}
    records.write_done(folder, unit, signature, outcome, seconds)
    log.info("%s unit %s done in %.2fs: %s", stage.name, unit.name, seconds, outcome)
    return {"unit": unit.name, "status": "done", "stats": outcome, "seconds": seconds}


def execute_unit(stage: MapStage, unit: Unit, folder: Path, signature: str) -> dict[str, Any]:
    """Run one unit where it is scheduled and record the outcome (done or failed) last.

    Returns what `record_outcome` returns. Errors other than `UnitFailure` propagate: they are
    bugs or infrastructure faults, retried by Ray.
    """
    start = time.perf_counter()
    try:
        outcome: dict[str, Any] | UnitFailure = stage.run_unit(unit)
    except UnitFailure as exc:
        outcome = exc
    return record_outcome(stage, unit, folder, signature, outcome, time.perf_counter() - start)


def execute_units(
    stage: MapStage, units: Sequence[Unit], folder: Path, signatures: dict[str, str]
) -> Iterator[dict[str, Any]]:
    """Run `units` in this process through `stage.run_units`, recording each unit as it
    completes (its seconds: since the previous one completed); yields `record_outcome`'s dicts."""
    by_name = {u.name: u for u in units}
    start = time.perf_counter()
    for unit, outcome in stage.run_units(units):
        if by_name.pop(unit.name, None) is None:
            raise CurateError(f"internal: {stage.name} unit {unit.name} finished twice or unasked")
        seconds = time.perf_counter() - start
        yield record_outcome(stage, unit, folder, signatures[unit.name], outcome, seconds)
        start = time.perf_counter()
    if by_name:
        raise CurateError(f"internal: {stage.name} never finished units {sorted(by_name)}")


def run_map(
    stage: MapStage,
    out: Path,
    *,
    executor: Any = None,
    tasks: Any = None,
    on_unit: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> MapReport:
    """Run `stage`'s pending units of this task (`tasks`, a `TaskSlice`) on `executor`
    (default: in this process) and record each; see the module doc. `on_plan(units, skipped)`
    is called once the done units are known, `on_unit(samples)` after each unit run now."""
    from curate.runtime import records
    from curate.runtime.executors import InlineExecutor, TaskSlice

    start = time.perf_counter()
    executor = executor or InlineExecutor()
    tasks = tasks or TaskSlice()
    folder = records.stage_folder(out, stage.name)
    units = stage.plan()
    signatures = {u.name: records.signature_hash(stage.signature(u)) for u in units}
    records.save_plan(folder, units, signatures)
    if tasks.count == 1:  # alone, every temporary record is a killed run's
        records.remove_temporaries(folder)
    mine = tasks.select(units)
    report = MapReport(stage=stage.name, units=len(mine), task=tasks.label)
    with records.task_log(folder, tasks.label):
        todo = []
        for unit in mine:
            if records.is_done(folder, unit, signatures[unit.name]) and stage.output_present(unit):
                report.skipped += 1
                report.stats[unit.name] = records.read_done(folder, unit)["stats"]
            else:
                todo.append(unit)
        log.info(
            "%s: %d units in %s, %d done before, %d to run on %s",
            stage.name, len(mine), tasks.label, report.skipped, len(todo), executor.label,
        )  # fmt: skip
        by_name = {u.name: u for u in todo}
        if on_plan:
            on_plan(len(mine), report.skipped)

        def finished(result: dict[str, Any]) -> None:
            unit = by_name[result["unit"]]
            if result["status"] == "failed":
                report.failed[unit.source] = result["error"]
                samples = 0
            else:
                report.done_now += 1
                report.stats[unit.name] = result["stats"]
                samples = int(result["stats"].get("samples", 0))
                report.samples += samples
            if on_unit:
                on_unit(samples)

        if todo:
            executor.run(stage, todo, folder, signatures, finished)
    order = {u.source: i for i, u in enumerate(mine)}  # failures in plan order, any executor
    report.failed = dict(sorted(report.failed.items(), key=lambda item: order[item[0]]))
    report.seconds = time.perf_counter() - start
    return report
