"""Overhead of the stage runtime (`curate.runtime`) per unit, against a plain loop over the same
units in the same run.

Two workloads, both made here (seeded):
- `empty`: units that do nothing but write one small file atomically: the runtime's own cost
  per unit (plan, signature hash, skip check, completion record, log line);
- `match`: balance's match phase over synthetic caption shards (`--shards` x `--per-shard`
  samples, a 1,000-entry metadata list): the plain loop calls `MatchStage.run_unit` on each
  unit directly; the runtime runs the same stage through `run_map`.

Executors: inline (this process), a process pool (`--workers`), and Ray (a local instance,
when Ray is installed: tasks, and for the empty units also a pool of `--workers` actors).
Reported: seconds (median of `--repeats`, a fresh output folder each time), ms per unit, and
the ratio to the plain loop of the same workload.

    python benchmarks/bench_runtime.py --shards 64 --per-shard 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from curate.balancing.matching import MatchMode, Normalization
from curate.balancing.metadata import load_metadata
from curate.balancing.stage import MatchStage
from curate.io.captions import resolve_units
from curate.runtime.atomic import write_atomic
from curate.runtime.executors import InlineExecutor, ProcessExecutor, RayExecutor
from curate.runtime.stage import MapStage, Unit, run_map

WORDS = [f"word{i}" for i in range(1000)]


@dataclass
class EmptyStage(MapStage):
    """Units that only write a tiny file: what the runtime adds per unit."""

    name: ClassVar[str] = "empty"
    out: Path
    n: int

    def plan(self) -> list[Unit]:
        return [Unit(f"{i:06d}", f"unit-{i}") for i in range(self.n)]

    def signature(self, unit: Unit) -> dict[str, Any]:
        return {"unit": unit.name}

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        write_atomic(self.out / "units" / unit.name, lambda tmp: tmp.write_text(unit.name))
        return {"samples": 1}


@dataclass
class EmptyActorStage(EmptyStage):
    """The same units on Ray actors (as embedding runs there): the actor pool's cost per unit."""

    actors: ClassVar[bool] = True


def make_tables(folder: Path, shards: int, per_shard: int, seed: int) -> None:
    """Caption tables (uid, caption): `per_shard` captions of 8 random words each."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        picks = rng.integers(0, len(WORDS), size=(per_shard, 8))
        captions = [" ".join(WORDS[j] for j in row) for row in picks]
        uids = [f"{s:08x}{i:024x}" for i in range(per_shard)]
        pl.DataFrame({"uid": uids, "caption": captions}).write_parquet(folder / f"{s:05d}.parquet")


def timed(repeats: int, make: Callable[[Path], Callable[[], None]]) -> float:
    """Median seconds of `make(out)()` over fresh output folders."""
    times = []
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
        try:
            run = make(out)
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--empty-units", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    executors: dict[str, Callable[[], Any]] = {
        "inline": InlineExecutor,
        f"processes({args.workers})": lambda: ProcessExecutor(args.workers),
    }
    if not args.no_ray:
        try:
            import ray

            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            executors["ray"] = RayExecutor
        except ImportError:
            pass

    results: list[dict[str, Any]] = []
    n = args.empty_units

    def plain_empty(out: Path) -> Callable[[], None]:
        stage = EmptyStage(out, n)
        return lambda: [stage.run_unit(u) for u in stage.plan()]  # type: ignore[func-returns-value]

    base = timed(args.repeats, plain_empty)
    results.append({"workload": "empty", "executor": "plain loop", "seconds": base, "ratio": 1.0})
    for label, factory in executors.items():

        def on_runtime(out: Path, factory: Callable[[], Any] = factory) -> Callable[[], None]:
            return lambda: run_map(EmptyStage(out, n), out, executor=factory()) and None

        seconds = timed(args.repeats, on_runtime)
        results.append(
            {"workload": "empty", "executor": label, "seconds": seconds, "ratio": seconds / base}
        )
    if "ray" in executors:

        def on_actors(out: Path) -> Callable[[], None]:
            executor = RayExecutor(actors=args.workers)
            return lambda: run_map(EmptyActorStage(out, n), out, executor=executor) and None

        seconds = timed(args.repeats, on_actors)
        results.append(
            {"workload": "empty", "executor": "ray actors", "seconds": seconds}
            | {"ratio": seconds / base}
        )

    data = Path(tempfile.mkdtemp(prefix="bench-runtime-data-"))
    try:
        make_tables(data / "tables", args.shards, args.per_shard, seed=0)
        (data / "metadata.txt").write_text("\n".join(WORDS) + "\n")
        units = resolve_units(str(data / "tables"))
        meta = load_metadata(data / "metadata.txt")

        def stage_for(out: Path) -> MatchStage:
            return MatchStage(units, meta, MatchMode.metaclip, Normalization.none, out)

        def plain_match(out: Path) -> Callable[[], None]:
            stage = stage_for(out)

            def run() -> None:
                stage.setup()
                for unit in stage.plan():
                    stage.run_unit(unit)

            return run

        base = timed(args.repeats, plain_match)
        results.append(
            {"workload": "match", "executor": "plain loop", "seconds": base, "ratio": 1.0}
        )
        for label, factory in executors.items():

            def on_runtime(out: Path, factory: Callable[[], Any] = factory) -> Callable[[], None]:
                return lambda: run_map(stage_for(out), out, executor=factory()) and None

            seconds = timed(args.repeats, on_runtime)
            results.append(
                {
                    "workload": "match",
                    "executor": label,
                    "seconds": seconds,
                    "ratio": seconds / base,
                }
            )
    finally:
        shutil.rmtree(data, ignore_errors=True)

    units_of = {"empty": n, "match": args.shards}
    for row in results:
        row["ms_per_unit"] = 1000 * row["seconds"] / units_of[row["workload"]]
        print(
            f"{row['workload']:6s} {row['executor']:14s} {row['seconds']:8.3f} s "
            f"{row['ms_per_unit']:8.3f} ms/unit  x{row['ratio']:.2f} of the plain loop"
        )
    print(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
