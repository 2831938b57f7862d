"""Deterministic tar writing: the same members in the same order give byte-identical archives.

Every header carries fixed metadata (mtime 0, mode 0644, uid/gid 0, empty user and group names)
in GNU format (long names via ``././@LongLink``, readable by GNU tar, Python and WebDataset).
Headers come from ``tarfile.TarInfo.tobuf``; data and padding are written straight to the
target (no stream buffer copies), and the archive ends like ``tarfile``'s: two zero blocks, then
zeros up to a whole 10 KiB record. The writer hashes and counts the bytes as they go out, so the
caller gets the archive's SHA-256 and size without reading it back.
"""

from __future__ import annotations

import hashlib
import tarfile
from typing import BinaryIO

__all__ = ["DeterministicTarWriter"]

FIXED_MTIME = 0
FIXED_MODE = 0o644
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_ZEROS = bytes(_RECORD)


def member_header(name: str, size: int) -> bytes:
    """The GNU header block(s) of a regular file `name` of `size` bytes, fixed metadata."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = FIXED_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


class DeterministicTarWriter:
    """Append members to a tar stream with fixed header metadata; use as a context manager."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._closed = False

    def _emit(self, data: bytes | memoryview) -> None:
        self._target.write(data)
        self._sha256.update(data)
        self._size += len(data)

    def add(self, name: str, data: bytes) -> None:
        if self._closed:
            raise ValueError("tar writer is closed")
        self._emit(member_header(name, len(data)))
        self._emit(data)
        pad = -len(data) % _BLOCK
        if pad:
            self._emit(_ZEROS[:pad])

    def close(self) -> tuple[int, str]:
        """Finish the archive; returns (bytes written, SHA-256 hex)."""
        if not self._closed:
            self._closed = True
            self._emit(_ZEROS[: 2 * _BLOCK])
            tail = -self._size % _RECORD
            if tail:
                self._emit(_ZEROS[:tail])
        return self._size, self._sha256.hexdigest()

    def abort(self) -> None:
        """Give up on the archive (after an error): nothing more is written."""
        self._closed = True

    def __enter__(self) -> DeterministicTarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.abort()
