"""The runtime's files in a stage's output folder: OUT/.curate/<stage>/.

- ``plan.json``: the units in order, each with the hash of its signature (written by whoever
  plans; every task of an array plans the same list, and the file is replaced atomically, so
  concurrent tasks never leave it torn);
- ``done/<unit>.json``: the completion record, written after the unit's outputs: signature hash,
  stats, seconds. A unit whose record carries its current signature is skipped;
- ``failed/<unit>.json``: a unit that could not succeed (its error); tried again on the next run;
- ``logs/<task>.log``: the log of each task (and ``logs/worker-<host>-<pid>.log`` of workers).

Only the unit's own task writes its records, so no two tasks write the same file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from curate.runtime.atomic import write_atomic, write_json_atomic
from curate.runtime.stage import Unit

__all__ = [
    "RUNTIME_DIR",
    "is_done",
    "read_done",
    "read_failed",
    "read_plan",
    "remove_temporaries",
    "save_plan",
    "signature_hash",
    "stage_folder",
    "task_log",
    "worker_log",
    "write_done",
    "write_failed",
]

RUNTIME_DIR = ".curate"
PLAN = "plan.json"
FORMAT = 1
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def stage_folder(out: Path, stage: str) -> Path:
    """OUT/.curate/<stage>/ (created)."""
    folder = Path(out) / RUNTIME_DIR / stage
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def signature_hash(signature: dict[str, Any]) -> str:
    """sha256 of the signature's canonical JSON."""
    text = json.dumps(signature, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_plan(folder: Path, units: Sequence[Unit], signatures: dict[str, str]) -> None:
    """Write plan.json unless it already holds exactly this plan."""
    payload = {
        "format": FORMAT,
        "units": [
            {"name": u.name, "source": u.source, "signature": signatures[u.name]} for u in units
        ],
    }
    text = json.dumps(payload, indent=1, sort_keys=True) + "\n"
    path = folder / PLAN
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_temporaries(folder: Path) -> None:
    """Delete half-written records (``atomic_path``'s temporaries) a killed run left behind."""
    for kind in ("done", "failed"):
        for path in (folder / kind).glob(".*.json.*.tmp"):
            path.unlink(missing_ok=True)


def read_plan(folder: Path) -> list[dict[str, str]] | None:
    """The saved units (name, source, signature), or None without a readable plan."""
    try:
        data = json.loads((folder / PLAN).read_text(encoding="utf-8"))
        return list(data["units"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _record_path(folder: Path, kind: str, unit: Unit | str) -> Path:
    name = unit if isinstance(unit, str) else unit.name
    return folder / kind / f"{name}.json"


def read_done(folder: Path, unit: Unit | str) -> dict[str, Any] | None:
    return _read(_record_path(folder, "done", unit))


def read_failed(folder: Path, unit: Unit | str) -> dict[str, Any] | None:
    return _read(_record_path(folder, "failed", unit))


def is_done(folder: Path, unit: Unit, signature: str) -> bool:
    record = read_done(folder, unit)
    return record is not None and record.get("signature") == signature


def write_done(
    folder: Path, unit: Unit, signature: str, stats: dict[str, Any], seconds: float
) -> None:
    """The completion record, last; a failure record of an earlier try goes."""
    record = {
        "format": FORMAT,
        "unit": unit.name,
        "source": unit.source,
        "signature": signature,
        "stats": stats,
        "seconds": round(seconds, 6),
    }
    write_json_atomic(_record_path(folder, "done", unit), record)
    _record_path(folder, "failed", unit).unlink(missing_ok=True)


def write_failed(folder: Path, unit: Unit, signature: str, error: str) -> None:
    """Record why the unit failed; any completion record of an older signature goes."""
    _record_path(folder, "done", unit).unlink(missing_ok=True)
    record = {
        "format": FORMAT,
        "unit": unit.name,
        "source": unit.source,
        "signature": signature,
        "error": error,
    }
    write_json_atomic(_record_path(folder, "failed", unit), record)


def _attach(path: Path) -> tuple[logging.Handler, int, bool]:
    """Send the `curate` logger's INFO and above to `path` (the console keeps its own level:
    records reach the root's handlers only when the root wants INFO, as with --debug)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logger = logging.getLogger("curate")
    before = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = logging.getLogger().getEffectiveLevel() <= logging.INFO
    return handler, *before


@contextmanager
def task_log(folder: Path, task: str) -> Iterator[None]:
    """Log the `curate` logger to OUT/.curate/<stage>/logs/<task>.log while the task runs."""
    handler, level, propagate = _attach(folder / "logs" / f"{task}.log")
    try:
        yield
    finally:
        logger = logging.getLogger("curate")
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        handler.close()


def worker_log(folder: Path) -> None:
    """In a worker process: log to logs/worker-<host>-<pid>.log for the process's lifetime."""
    _attach(folder / "logs" / f"worker-{socket.gethostname()}-{os.getpid()}.log")
