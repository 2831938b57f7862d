"""User-supplied text and config files, read whole with one-line errors.

Only regular files are read (a FIFO, `/dev/zero` or a socket is refused before it is opened),
and each kind of file has a size limit, `MAX_BYTES`, checked before reading: far above real
files (MetaCLIP's 500k-entry metadata.json is about 10 MB), far below what exhausts memory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from curate.errors import InputError, brief

__all__ = ["MAX_BYTES", "read_file_bytes", "read_text_file"]

MiB = 1 << 20
# The largest file read, per kind (the `what` the readers are given; documented in the README).
MAX_BYTES: dict[str, int] = {
    "attribute spec": 4 * MiB,
    "prompt file": 4 * MiB,
    "swap table": 4 * MiB,
    "metadata": 256 * MiB,  # metadata and concept lists (`--metadata`, `audit --concepts`)
    "model config": 1 * MiB,
}

_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_file_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of a regular file of kind `what` (a key of `MAX_BYTES`), or an `InputError`
    naming `what` and the path: missing, a folder, not a regular file, too large, unreadable."""
    name = os.fspath(path)
    limit = MAX_BYTES[what]
    file = Path(name).expanduser()
    try:
        info = file.stat()
    except FileNotFoundError:
        raise InputError(f"cannot read {what} {name}: does not exist") from None
    except ValueError:  # a NUL byte in the path
        raise InputError(f"cannot read {what} {brief(name)}: not a valid path") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {name}: {exc.strerror or exc}") from None
    mode, size = info.st_mode, info.st_size
    if stat.S_ISDIR(mode):
        raise InputError(f"cannot read {what} {name}: it is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = next((label for test, label in _SPECIAL if test(mode)), "a special file")
        raise InputError(f"cannot read {what} {name}: it is {kind}, not a regular file")
    if size > limit:
        raise _too_large(what, name, size, limit)
    try:
        # O_NONBLOCK: should the path become a FIFO after the check, opening it cannot block.
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {name}: {exc.strerror or exc}") from None
    if len(data) > limit:  # it grew after the check
        raise _too_large(what, name, len(data), limit)
    return data


def _too_large(what: str, name: str, size: int, limit: int) -> InputError:
    return InputError(
        f"{what} {name} is {size:,} bytes, over the limit of {limit:,} bytes ({limit // MiB} MiB)"
    )


def read_text_file(path: str | os.PathLike[str], what: str, encoding: str = "utf-8") -> str:
    """The text of a regular file of kind `what` ("prompt file", "swap table"); every problem
    is an `InputError` naming `what` and the path (see `read_file_bytes`)."""
    data = read_file_bytes(path, what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {os.fspath(path)} is not UTF-8 text: {exc.reason}") from exc
