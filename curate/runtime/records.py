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

import functools
import hashlib
import inspect
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from curate.runtime.atomic import write_atomic, write_json_atomic
from curate.runtime.stage import Unit

__all__ = [
    "RUNTIME_DIR",
    "is_done",
    "logged_stage",
    "read_done",
    "read_failed",
    "read_plan",
    "remove_temporaries",
    "save_plan",
    "signature_hash",
    "stage_folder",
    "stage_log",
    "task_log",
    "worker_log",
    "write_done",
    "write_failed",
]

RUNTIME_DIR = ".curate"
PLAN = "plan.json"
FORMAT = 1
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
_log = logging.getLogger("curate.stage")
P = ParamSpec("P")
R = TypeVar("R")


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


def _file_handler(path: Path) -> logging.FileHandler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.setLevel(logging.INFO)
    return handler


def _attach(handler: logging.Handler) -> tuple[int, bool]:
    """Send the `curate` logger's INFO and above to `handler` (the console keeps its own level:
    records reach the root's handlers only when the root wants INFO, as with --debug); returns
    the logger's level and propagation before, for `_detach`."""
    logger = logging.getLogger("curate")
    before = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))
    logger.propagate = logger.propagate and logging.getLogger().getEffectiveLevel() <= logging.INFO
    return before


def _detach(handler: logging.Handler, before: tuple[int, bool]) -> None:
    logger = logging.getLogger("curate")
    logger.removeHandler(handler)
    logger.setLevel(before[0])
    logger.propagate = before[1]


@contextmanager
def task_log(folder: Path, task: str) -> Iterator[None]:
    """Log the `curate` logger to OUT/.curate/<stage>/logs/<task>.log while the task runs."""
    handler = _file_handler(folder / "logs" / f"{task}.log")
    before = _attach(handler)
    try:
        yield
    finally:
        _detach(handler, before)
        handler.close()


class _DeferredLog(logging.Handler):
    """A log file under `folder` that exists only once the stage does: records wait in memory
    until `folder` has been made by the stage itself (its inputs checked, its plan saved), so
    a stage that refuses its arguments leaves nothing behind."""

    def __init__(self, folder: Path, name: str) -> None:
        super().__init__(logging.INFO)
        self.folder, self.name = folder, name
        self.waiting: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.setFormatter(logging.Formatter(_LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None and not self.folder.is_dir():
            self.waiting.append(record)
            return
        self.open().emit(record)

    def open(self) -> logging.FileHandler:
        if self.file is None:
            self.file = _file_handler(self.folder / "logs" / self.name)
            for record in self.waiting:
                self.file.emit(record)
            self.waiting.clear()
        return self.file

    def finish(self, *, keep: bool) -> None:
        """Write what waits when `keep` (the stage succeeded) or the folder exists by now."""
        if self.waiting and (keep or self.folder.is_dir()):
            self.open()
        if self.file is not None:
            self.file.close()
        self.close()


@contextmanager
def stage_log(out: Path, stage: str) -> Iterator[None]:
    """Log a stage's own work (a reduce, or a stage without units) to
    OUT/.curate/<stage>/logs/reduce.log, appended run after run; map tasks inside it keep
    their own task logs too. Nothing is written for a run that fails before the stage made its
    folder (bad arguments): its error goes to the terminal."""
    handler = _DeferredLog(Path(out) / RUNTIME_DIR / stage, "reduce.log")
    before = _attach(handler)
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        _detach(handler, before)
        with suppress(OSError):  # an OUT that cannot be a folder: the stage said what is wrong
            handler.finish(keep=succeeded)


def logged_stage(
    stage: str, folder: Callable[[dict[str, Any]], Path] = lambda args: Path(args["out"])
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a stage's library entry point: its run is logged to `stage_log` of the folder
    `folder(arguments)` gives, with a start line, and an end line holding the returned report's
    ``to_json()`` (counts, thresholds, what was written) or the error it raised."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = folder(bound.arguments)
            with stage_log(out, stage):
                _log.info("%s: started, output in %s", stage, out)
                start = time.perf_counter()
                try:
                    result = function(*args, **kwargs)
                except Exception as exc:
                    _log.error("%s: stopped after %.2fs: %s", stage, _since(start), exc)
                    raise
                summary = result.to_json() if hasattr(result, "to_json") else None
                _log.info(
                    "%s: finished in %.2fs: %s",
                    stage, _since(start), json.dumps(summary, sort_keys=True, default=str),
                )  # fmt: skip
            return result

        return run

    return decorate


def _since(start: float) -> float:
    return time.perf_counter() - start


def worker_log(folder: Path) -> None:
    """In a worker process: log to logs/worker-<host>-<pid>.log for the process's lifetime."""
    _attach(_file_handler(folder / "logs" / f"worker-{socket.gethostname()}-{os.getpid()}.log"))
