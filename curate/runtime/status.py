"""`curate status RUN`: what every map stage of an output folder has done, from its records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from curate.errors import InputError
from curate.runtime import records

__all__ = ["StageStatus", "run_status"]


@dataclass
class StageStatus:
    """Units of one stage by state (as of its last plan), samples and throughput."""

    stage: str
    units: int
    done: int = 0
    pending: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # unit source -> error
    samples: int = 0
    seconds: float = 0.0  # summed over done units (work time, not wall time)

    @property
    def samples_per_second(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_second": self.samples_per_second}


def run_status(folder: Path) -> list[StageStatus]:
    """Every stage recorded under FOLDER/.curate/, in name order."""
    root = Path(folder) / records.RUNTIME_DIR
    if not root.is_dir():
        raise InputError(f"{folder}: no stage has run here (no {records.RUNTIME_DIR}/ folder)")
    result = []
    for stage_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        plan = records.read_plan(stage_dir)
        if plan is None:
            continue
        status = StageStatus(stage=stage_dir.name, units=len(plan))
        for unit in plan:
            done = records.read_done(stage_dir, unit["name"])
            if done is not None and done.get("signature") == unit["signature"]:
                status.done += 1
                status.samples += int((done.get("stats") or {}).get("samples", 0))
                status.seconds += float(done.get("seconds") or 0.0)
                continue
            failed = records.read_failed(stage_dir, unit["name"])
            if failed is not None and failed.get("signature") == unit["signature"]:
                status.failed[unit["source"]] = str(failed.get("error"))
            else:
                status.pending += 1
        result.append(status)
    return result
