"""The write plan: which copy of which sample goes into which output shard, under which key.

Order. Sample i (of N, in input order) gets a base position p_i: i/N, or with `shuffle` a seeded
uniform draw in [0, 1). Its r_i copies sit at positions (p_i + j/r_i) mod 1 for j = 0..r_i-1, and
all copies are sorted by position (ties by sample, then copy). With r_i = 1 everywhere this is the
input order (or a seeded permutation with `shuffle`). Copies of one sample are spread evenly over
the whole output, about total/r_i samples apart, so they land in different shards whenever r_i is
at most the number of shards (repeats in one batch are a known failure of uid duplication).

Shards are then cut greedily in that order: a new shard starts when the current one holds
`max_samples` samples or adding the next one would make the finished tar pass `max_bytes` (a
single larger sample gets a shard of its own). Sizes are exact for ``DeterministicTarWriter``:
per member a header, the data padded to 512 bytes and, for names over 100 bytes, a GNU long-name
member; per archive the end-of-archive blocks and the padding to whole 10 KiB records.

Keys. Copy 0 keeps its input key, copy j > 0 becomes ``{key}_r{j}``; a key already used in the
same output shard (two inputs sharing keys) gets ``_d{n}`` appended.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from curate.io.tar_index import IndexedSample

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads a finished archive to whole records
TAR_END = 2 * TAR_BLOCK  # the end-of-archive marker
_GNU_NAME_LIMIT = 100  # longer names are preceded by a ././@LongLink member


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def member_tar_bytes(name: str, size: int) -> int:
    """Bytes one member takes in a GNU-format tar (long-name member, header, padded data)."""
    encoded = len(name.encode("utf-8", "surrogateescape"))
    long_name = TAR_BLOCK + _padded(encoded + 1) if encoded > _GNU_NAME_LIMIT else 0
    return long_name + TAR_BLOCK + _padded(size)


def archive_bytes(members_bytes: int) -> int:
    """Size of a finished tar whose members take `members_bytes`."""
    return -(-(members_bytes + TAR_END) // TAR_RECORD) * TAR_RECORD


@dataclass(frozen=True)
class Source:
    """A sample chosen for writing, with where its bytes are."""

    shard: int  # index into the input shard list
    sample: IndexedSample
    copies: int = 1


@dataclass(frozen=True)
class Entry:
    """One sample copy placed in an output shard."""

    source: Source
    copy: int
    key: str

    @property
    def tar_bytes(self) -> int:
        """Bytes this copy's input members take in the output tar, under its output key."""
        return sum(
            member_tar_bytes(f"{self.key}.{m.ext}", m.size) for m in self.source.sample.members
        )


def order_copies(sources: Sequence[Source], *, shuffle: bool, seed: int) -> list[tuple[int, int]]:
    """(source index, copy index) pairs in output order (module docstring)."""
    n = len(sources)
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    base = rng.random(n) if shuffle else np.arange(n, dtype=np.float64) / n
    counts = np.array([s.copies for s in sources], dtype=np.int64)
    src = np.repeat(np.arange(n), counts)
    starts = np.cumsum(counts) - counts
    copy = np.arange(src.size) - np.repeat(starts, counts)
    position = np.mod(base[src] + copy / counts[src], 1.0)
    order = np.lexsort((copy, src, position))
    return list(zip(src[order].tolist(), copy[order].tolist(), strict=True))


def cut_shards(
    sources: Sequence[Source],
    order: Sequence[tuple[int, int]],
    *,
    max_samples: int,
    max_bytes: int | None,
    extras: Mapping[str, Sequence[tuple[str, bytes]]] | None = None,
) -> list[list[Entry]]:
    """Split the ordered copies into shards and give every copy its output key.

    `extras` ((extension, bytes) members by uid) are added to each copy as ``{key}.{ext}``;
    they count towards `max_bytes`.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, not {max_samples}")
    shards: list[list[Entry]] = []
    current: list[Entry] = []
    used: set[str] = set()
    size = 0

    def place(source: Source, copy: int) -> tuple[Entry, int]:
        key = source.sample.key if copy == 0 else f"{source.sample.key}_r{copy}"
        if key in used:
            n = 1
            while f"{key}_d{n}" in used:
                n += 1
            key = f"{key}_d{n}"
        entry = Entry(source, copy, key)
        grow = entry.tar_bytes
        for ext, data in () if extras is None else extras.get(source.sample.uid, ()):
            grow += member_tar_bytes(f"{key}.{ext}", len(data))
        return entry, grow

    for index, copy in order:
        source = sources[index]
        entry, grow = place(source, copy)
        full = current and (
            len(current) >= max_samples
            or (max_bytes is not None and archive_bytes(size + grow) > max_bytes)
        )
        if full:
            shards.append(current)
            current, used, size = [], set(), 0
            entry, grow = place(source, copy)
        used.add(entry.key)
        current.append(entry)
        size += grow
    if current:
        shards.append(current)
    return shards


def shard_fingerprint(
    entries: Sequence[Entry],
    urls: Sequence[str],
    settings: str,
    extras: Mapping[str, Sequence[tuple[str, bytes]]] | None = None,
) -> str:
    """Hash of everything that decides a shard's bytes: sources, offsets, keys, the added
    members' bytes (`extras`, by uid) and `settings` (input signatures, member names)."""
    digest = hashlib.sha256(settings.encode())
    for e in entries:
        s = e.source.sample
        members = [(m.ext, m.offset, m.size) for m in s.members]
        digest.update(
            json.dumps([urls[e.source.shard], s.key, s.uid, e.copy, e.key, members]).encode()
        )
        for ext, data in () if extras is None else extras.get(s.uid, ()):
            digest.update(ext.encode() + b"\x00" + data)
    return digest.hexdigest()
