"""Atomic file writes: a crashed run never leaves a half-written file under its final name."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:  # on disk before it gets its final name
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except OSError as error:
        if error.filename in (None, tmp, str(tmp)):
            error.filename = str(final)  # name the file being written (ENOSPC has no name)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(final: Path, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and move the result onto `final` atomically."""
    with atomic_path(final) as tmp:
        writer(tmp)


def strict_json(payload: Any) -> Any:
    """`payload` with NaN and ±inf floats as None, so the JSON is strict (jq, browsers)."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {k: strict_json(v) for k, v in payload.items()}
    if isinstance(payload, list | tuple):
        return [strict_json(v) for v in payload]
    return payload


def write_json_atomic(final: Path, payload: Any) -> None:
    """Write `payload` as pretty, key-sorted, strict JSON (stable bytes for the same content)."""
    text = json.dumps(strict_json(payload), indent=2, sort_keys=True) + "\n"
    write_atomic(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))
