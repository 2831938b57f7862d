"""Atomic file writes: a crashed run never leaves a half-written file under its final name."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


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


class ParquetStream:
    """Tables appended as row groups to one parquet file (the first table fixes the schema)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@contextmanager
def parquet_streams(*finals: Path) -> Iterator[tuple[ParquetStream, ...]]:
    """One `ParquetStream` per final path, each written to a temporary file that gets its final
    name only if the block succeeds (`atomic_path`); every stream must be written at least once
    (an empty table gives an empty file with its schema)."""
    with ExitStack() as paths:
        streams = tuple(ParquetStream(paths.enter_context(atomic_path(f))) for f in finals)
        try:
            yield streams
        finally:  # closed before the renames, or on error before the temporaries go
            for stream in streams:
                stream.close()


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
