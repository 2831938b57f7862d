"""The request cache: one row per finished request, so a rerun sends only what is missing.

A result is keyed by (uid, caption text, rewrite index, prompt version, backend identity,
sampling parameters, seed); changing any of them makes new keys, so a caption that changed
under the same uid is asked again, never given the old caption's rewrite. Rows are committed as
they finish (SQLite, WAL journal), so a killed run loses at most the requests that were in
flight.

The rewrite stage keeps one file per unit (``OUT/cache/<unit>.sqlite``): each file has one
writer, the unit's own worker, so processes and Ray workers on many nodes never share a SQLite
file. A cache opened with ``read_only`` (the single ``OUT/cache.sqlite`` of earlier versions,
consulted for keys a unit's own file lacks) is never written, locked for writing or created.

Keys made before the caption was part of them (uid, index and setting only) are never looked
up again: a rerun over such a cache sends those requests anew (their rows stay in the file,
unused; delete the cache files to reclaim the space), because nothing recorded says which caption
an old row was made for.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CachedResult", "RequestCache", "request_key"]


KEY_FORMAT = 2  # 1: setting, uid and index only (no caption)


def request_key(uid: str, caption: str, index: int, setting: str) -> str:
    """`setting` is the prompt version, backend identity, sampling key and seed joined."""
    caption_hash = hashlib.blake2b(caption.encode("utf-8"), digest_size=16).hexdigest()
    material = json.dumps([KEY_FORMAT, setting, uid, index, caption_hash])
    return hashlib.blake2b(material.encode("utf-8"), digest_size=16).hexdigest()


@dataclass(frozen=True)
class CachedResult:
    """A finished request: `text` when valid, else `reason` (why it failed) and no text."""

    text: str | None
    reason: str | None
    attempts: int


class RequestCache:
    """SQLite file of finished requests; `read_only`: an existing file, only looked up (raises
    `sqlite3.Error` when it cannot be opened so)."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.read_only = read_only
        if read_only:
            self._db = _open_read_only(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, text TEXT, reason TEXT, "
            "attempts INTEGER NOT NULL)"
        )
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, CachedResult]:
        found: dict[str, CachedResult] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, text, reason, attempts in self._db.execute(
                f"SELECT key, text, reason, attempts FROM results WHERE key IN ({marks})", chunk
            ):
                found[key] = CachedResult(text, reason, attempts)
        return found

    def put(self, key: str, result: CachedResult) -> None:
        self.put_many([(key, result)])

    def put_many(self, items: Iterable[tuple[str, CachedResult]]) -> None:
        """Store results in one transaction (committed before returning)."""
        if self.read_only:
            raise ValueError("this request cache is open read-only")
        self._db.executemany(
            "INSERT OR REPLACE INTO results (key, text, reason, attempts) VALUES (?, ?, ?, ?)",
            ((key, r.text, r.reason, r.attempts) for key, r in items),
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()


def _open_read_only(path: Path) -> sqlite3.Connection:
    """`path` for reading only; ``immutable`` (no locks, no -shm file) where read-only mode
    cannot open it (a WAL file in a folder this process may not write)."""
    uri = path.resolve().as_uri()
    error: sqlite3.Error | None = None
    for mode in ("mode=ro", "immutable=1"):
        db = sqlite3.connect(f"{uri}?{mode}", uri=True)
        try:
            db.execute("SELECT 1 FROM results LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            db.close()
            error = exc
            continue
        return db
    assert error is not None
    raise error
