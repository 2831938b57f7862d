"""Small map stages for the runtime's tests (importable by spawned workers and Ray workers)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from curate.runtime.atomic import write_atomic
from curate.runtime.stage import MapStage, Unit, UnitFailure


@dataclass
class SquareStage(MapStage):
    """Unit i writes OUT/units/<i>.txt holding i², after `sleep` seconds; names in `fail`
    raise UnitFailure; with `die_once`, the first try of that unit kills its own process."""

    name: ClassVar[str] = "squares"
    out: Path
    n: int
    fail: frozenset[str] = frozenset()
    sleep: float = 0.0
    die_once: str | None = None
    setups: list[int] = field(default_factory=list)

    def plan(self) -> list[Unit]:
        return [Unit(f"{i:05d}", f"source-{i}") for i in range(self.n)]

    def signature(self, unit: Unit) -> dict[str, Any]:
        return {"unit": unit.name, "source": unit.source}

    def setup(self) -> None:
        self.setups.append(os.getpid())
        marks = self.out / "setups"
        marks.mkdir(parents=True, exist_ok=True)
        (marks / f"{os.getpid()}-{time.monotonic_ns()}").touch()

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        if unit.name in self.fail:
            raise UnitFailure(f"cannot read {unit.source}: not a tar")
        if unit.name == self.die_once:
            marker = self.out / f"died-{unit.name}"
            if not marker.exists():
                marker.touch()
                os._exit(9)  # a worker dying mid-unit (OOM kill, lost node)
        pids = self.out / "pids"
        pids.mkdir(parents=True, exist_ok=True)
        (pids / str(os.getpid())).touch()
        time.sleep(self.sleep)
        i = int(unit.name)
        path = self.out / "units" / f"{unit.name}.txt"
        write_atomic(path, lambda tmp: tmp.write_text(f"{i * i}\n"))
        return {"samples": i}

    def output_present(self, unit: Unit) -> bool:
        return (self.out / "units" / f"{unit.name}.txt").is_file()


@dataclass
class ActorSquareStage(SquareStage):
    """SquareStage whose setup Ray runs once per actor (as embedding loads its model)."""

    actors: ClassVar[bool] = True
