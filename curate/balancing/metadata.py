"""Loading, checking and saving metadata: the list of strings whose index is the entry id.

Two file formats, chosen by extension: ``.json`` is MetaCLIP's published format (a JSON list of
strings); anything else is UTF-8 text with one entry per line. The same entries get the same
`metadata_sha256` whatever the format, so a run can tell whether its metadata changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from curate.balancing.matching import MatchMode, never_matches
from curate.errors import InputError, brief
from curate.io.text_files import read_file_bytes
from curate.runtime.atomic import write_atomic

__all__ = [
    "Metadata",
    "load_metadata",
    "metadata_sha256",
    "save_metadata",
    "unmatchable",
]

_LINE_BREAKS = ("\n", "\r")
_JSON_TYPES = {
    dict: "a JSON object",
    list: "a JSON list",
    str: "a JSON string",
    int: "a JSON number",
    float: "a JSON number",
    bool: "a JSON boolean",
    type(None): "JSON null",
}


@dataclass
class Metadata:
    """Metadata entries (the index is the entry id), where they came from and their hash."""

    entries: list[str]
    path: str | None
    sha256: str

    @property
    def size(self) -> int:
        """Number of entries."""
        return len(self.entries)


def metadata_sha256(entries: Sequence[str]) -> str:
    """SHA-256 of ``json.dumps(entries, ensure_ascii=False)`` in UTF-8 (format independent)."""
    return hashlib.sha256(json.dumps(list(entries), ensure_ascii=False).encode("utf-8")).hexdigest()


def _show(entry: str, limit: int = 60) -> str:
    """A short, one-line rendering of an entry for error messages."""
    return repr(entry if len(entry) <= limit else entry[: limit - 3] + "...")


def _check_entries(entries: Sequence[object], source: str, *, lines: bool) -> list[str]:
    """Return `entries` as a list of strings, or raise InputError on the first problem.

    `lines` says entries came one per line of a text file, so errors also give the line number.
    """

    def where(i: int) -> str:
        return f"entry {i} (line {i + 1})" if lines else f"entry {i}"

    if not entries:
        raise InputError(f"{source} has no entries")
    first_seen: dict[str, int] = {}
    checked: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            kind = "null" if entry is None else type(entry).__name__
            raise InputError(f"{source}: {where(i)} is {kind}, not a string")
        if not entry.strip():
            raise InputError(f"{source}: {where(i)} is blank")
        if any(ch in entry for ch in _LINE_BREAKS):
            raise InputError(f"{source}: {where(i)} {_show(entry)} contains a line break")
        try:
            entry.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(
                f"{source}: {where(i)} {_show(entry)} is not valid Unicode (lone surrogate)"
            ) from None
        first = first_seen.setdefault(entry, i)
        if first != i:
            raise InputError(
                f"{source}: {where(i)} duplicates {where(first)}: {_show(entry)}; "
                "`curate metadata build --words FILE` builds a deduplicated file"
            )
        checked.append(entry)
    return checked


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def load_metadata(path: Path | str) -> Metadata:
    """Read and check a metadata file (``.json`` list of strings, otherwise one entry a line)."""
    path = Path(path)
    source = f"metadata {path}"
    if not path.exists():
        raise InputError(f"{source} does not exist")
    if path.is_dir():
        raise InputError(f"{source} is a folder; give a .json or .txt file")
    raw = read_file_bytes(path, "metadata")  # regular files only, at most 256 MiB
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{source} is not UTF-8 text (bad byte at offset {error.start})") from None
    text = text.removeprefix("\ufeff")
    if _is_json(path):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(
                f"{source} is not valid JSON: {error.msg} (line {error.lineno}, "
                f"column {error.colno})"
            ) from None
        except RecursionError:
            raise InputError(f"{source} is nested too deeply") from None
        except ValueError as error:  # a number past Python's digit limit
            raise InputError(f"{source} is not valid JSON: {brief(str(error), 120)}") from None
        if not isinstance(data, list):
            kind = _JSON_TYPES.get(type(data), type(data).__name__)
            raise InputError(f"{source} holds {kind}, not a JSON list of strings")
        entries = _check_entries(data, source, lines=False)
    else:
        rows = text.split("\n")
        if rows[-1] == "":  # a final newline ends the last line, it does not start a new one
            rows.pop()
        entries = _check_entries([row.removesuffix("\r") for row in rows], source, lines=True)
    return Metadata(entries=entries, path=str(path), sha256=metadata_sha256(entries))


def save_metadata(path: Path | str, entries: Sequence[str]) -> str:
    """Write `entries` atomically as ``.json`` or one-per-line text; return their sha256.

    The entries must pass the same checks as `load_metadata`, so every saved file loads back.
    """
    path = Path(path)
    checked = _check_entries(list(entries), f"metadata to save as {path}", lines=False)
    if _is_json(path):
        body = ",\n".join(f"  {json.dumps(entry, ensure_ascii=False)}" for entry in checked)
        text = f"[\n{body}\n]\n"
    else:
        text = "".join(f"{entry}\n" for entry in checked)
    data = text.encode("utf-8")
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return metadata_sha256(checked)


def unmatchable(entries: Sequence[str], mode: MatchMode | str = MatchMode.metaclip) -> list[int]:
    """Ids of the entries that no caption can ever match under `mode`."""
    return [i for i, entry in enumerate(entries) if never_matches(entry, mode)]
