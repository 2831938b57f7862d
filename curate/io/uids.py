"""Sample uids: DataComp-style 128-bit ids written as 32 lowercase hex characters.

A sample keeps the ``uid`` from its ``.json`` metadata when that is a valid 32-hex string
(DataComp shards carry one). Otherwise the uid is derived, with this exact recipe::

    hashlib.blake2b(f"{shard_name}/{key}".encode("utf-8"), digest_size=16).hexdigest()

where ``shard_name`` is the shard file's basename (``"00000.tar"``, never a full path or URL, so
the uid is the same on every machine and mount point) and ``key`` is the WebDataset key
(``"000000042"``). For example shard ``00000.tar``, key ``000000000`` hashes the UTF-8 bytes of
``"00000.tar/000000000"``.

DataComp subset files store a uid as a pair of unsigned 64-bit ints:
``(int(uid[:16], 16), int(uid[16:], 16))``; ``uid_to_pair`` / ``pair_to_uid`` convert.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

__all__ = ["derive_uid", "is_uid", "pair_to_uid", "uid_from_meta", "uid_to_pair"]

_UID = re.compile(r"[0-9a-fA-F]{32}")
_U64 = 1 << 64


def is_uid(value: object) -> bool:
    """True when ``value`` is a 32-character hex string (either case)."""
    return isinstance(value, str) and _UID.fullmatch(value) is not None


def uid_from_meta(meta: dict[str, Any] | None) -> str | None:
    """The metadata's ``uid`` lowercased when it is valid 32-hex, else None."""
    if not isinstance(meta, dict):
        return None
    uid = meta.get("uid")
    return uid.lower() if is_uid(uid) else None


def derive_uid(shard_name: str, key: str) -> str:
    """Deterministic uid for a sample without one (recipe in the module docstring)."""
    return hashlib.blake2b(f"{shard_name}/{key}".encode(), digest_size=16).hexdigest()


def uid_to_pair(uid: str) -> tuple[int, int]:
    """DataComp's two-uint64 form of a uid."""
    if not is_uid(uid):
        raise ValueError(f"not a 32-hex-character uid: {uid!r}")
    return int(uid[:16], 16), int(uid[16:], 16)


def pair_to_uid(u0: int, u1: int) -> str:
    """Inverse of ``uid_to_pair`` (accepts numpy integers)."""
    a, b = int(u0), int(u1)
    if not (0 <= a < _U64 and 0 <= b < _U64):
        raise ValueError(f"uid halves must be unsigned 64-bit ints, got ({a}, {b})")
    return f"{a:016x}{b:016x}"
