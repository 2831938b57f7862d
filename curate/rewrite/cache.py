"""The request cache: one row per finished request, so a rerun sends only what is missing.

A result is keyed by (uid, rewrite index, prompt version, backend identity, sampling
parameters); changing any of them makes new keys. Rows are committed as they finish (SQLite,
WAL journal), so a killed run loses at most the requests that were in flight.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CachedResult", "RequestCache", "request_key"]


def request_key(uid: str, index: int, setting: str) -> str:
    """`setting` is the prompt version, backend identity and sampling key joined."""
    return hashlib.blake2b(f"{setting}\x00{uid}\x00{index}".encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class CachedResult:
    """A finished request: `text` when valid, else `reason` (why it failed) and no text."""

    text: str | None
    reason: str | None
    attempts: int


class RequestCache:
    """SQLite file of finished requests."""

    def __init__(self, path: Path) -> None:
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
        self._db.execute(
            "INSERT OR REPLACE INTO results (key, text, reason, attempts) VALUES (?, ?, ?, ?)",
            (key, result.text, result.reason, result.attempts),
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()
