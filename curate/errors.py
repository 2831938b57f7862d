"""Exception hierarchy. The CLI turns any CurateError into one clear line (exit code 2).

`brief` shows a user's value in a message without repeating it whole; `describe_os_error` says
what an `OSError` (disk full, a file where a folder goes, ...) means, in one line.
"""

from __future__ import annotations

import errno
import os
import reprlib
from pathlib import Path


def failure_code(error: str) -> str:
    """The code of a per-sample failure recorded as ``"code: detail"``."""
    return error.split(":", 1)[0].strip() or "unknown"


class CurateError(Exception):
    """Base class for errors a user can act on; the message is shown as one line."""


class InputError(CurateError):
    """A path, shard spec or file given by the user is missing or malformed."""


class ModelLoadError(CurateError):
    """A model, its weights or its config could not be loaded."""


class RunFolderError(CurateError):
    """A run folder is inconsistent with the current request (other model, corrupt files)."""


class ShardOpenError(CurateError):
    """A shard could not be opened at all (missing, unreadable, not a tar)."""


def brief(value: object, limit: int = 80) -> str:
    """`repr(value)` for an error message: one line of at most `limit` characters, safe for huge,
    deep or self-referencing structures (only the first items and levels are shown)."""
    shower = reprlib.Repr()
    shower.maxlevel, shower.maxlist, shower.maxtuple, shower.maxdict = 3, 6, 6, 4
    shower.maxset = shower.maxfrozenset = 6
    shower.maxlong, shower.maxstring, shower.maxother = 40, limit, limit
    try:
        shown = shower.repr(value)
    except (ValueError, RecursionError):  # e.g. an int past Python's digit limit
        shown = f"<{type(value).__name__}>"
    shown = " ".join(shown.split())
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


_OS_PROBLEMS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files (raise `ulimit -n`)",
    errno.ENFILE: "too many open files in the system",
}


def describe_os_error(error: OSError) -> str:
    """One line saying what an OS error means and where: "no space left on device at PATH",
    "PATH is a file, not a folder", "permission denied at PATH", ..."""
    name = error.filename
    path = os.fspath(name) if isinstance(name, str | os.PathLike) else None
    if path is not None and error.errno in (errno.EEXIST, errno.ENOTDIR):
        # mkdir of an existing file, or a path through one: name the file in the way.
        for candidate in (Path(path), *Path(path).parents):
            if os.path.lexists(candidate) and not candidate.is_dir():
                return f"{candidate} is a file, not a folder"
    problem = _OS_PROBLEMS.get(error.errno or -1) or (error.strerror or str(error)).lower()
    if path is None:
        return problem
    if error.errno == errno.EISDIR:
        return f"{path} {problem}"
    return f"{problem} at {path}"
