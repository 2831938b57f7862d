"""Deterministic tar writing: the same members in the same order give byte-identical archives.

Every header carries fixed metadata (mtime 0, mode 0644, uid/gid 0, empty user and group names)
in GNU format (long names via ``././@LongLink``, readable by GNU tar, Python and WebDataset).
The writer hashes and counts the bytes as they go out, so the caller gets the archive's SHA-256
and size without reading it back.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import BinaryIO

__all__ = ["DeterministicTarWriter"]

FIXED_MTIME = 0
FIXED_MODE = 0o644


class _HashingWriter(io.RawIOBase):
    """A write-only stream that forwards to `target` and keeps a running SHA-256 and size."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.discard = False  # after an abort: swallow what tarfile still flushes

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data)
        if self.discard:
            return view.nbytes
        self._target.write(view)
        self.sha256.update(view)
        self.size += view.nbytes
        return view.nbytes


class DeterministicTarWriter:
    """Append members to a tar stream with fixed header metadata; use as a context manager."""

    def __init__(self, target: BinaryIO) -> None:
        self._out = _HashingWriter(target)
        self._tar = tarfile.open(  # noqa: SIM115 (closed by close())
            fileobj=self._out, mode="w|", format=tarfile.GNU_FORMAT
        )

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = FIXED_MTIME
        info.mode = FIXED_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> tuple[int, str]:
        """Finish the archive; returns (bytes written, SHA-256 hex)."""
        self._tar.close()
        return self._out.size, self._out.sha256.hexdigest()

    def abort(self) -> None:
        """Give up on the archive (after an error): nothing more reaches the target, now or when
        tarfile's stream would otherwise flush its buffer into it at garbage collection."""
        self._out.discard = True
        self._tar.close()

    def __enter__(self) -> DeterministicTarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.abort()
