"""User-supplied text files (prompts, swap tables): read whole, with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

from curate.errors import InputError

__all__ = ["read_text_file"]


def read_text_file(path: str | os.PathLike[str], what: str, encoding: str = "utf-8") -> str:
    """The file's text; a missing file, a folder, bad UTF-8 or an OS error is an `InputError`
    naming `what` ("prompt file", "swap table") and the path."""
    name = os.fspath(path)
    file = Path(name).expanduser()
    if not file.is_file():
        state = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise InputError(f"{what} {name} {state}")
    try:
        return file.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {name} is not UTF-8 text: {exc.reason}") from exc
    except OSError as exc:
        raise InputError(f"cannot read {what} {name}: {exc.strerror or exc}") from exc
