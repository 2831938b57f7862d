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
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from curate.io.tar_index import IndexedSample

if TYPE_CHECKING:
    from curate.writing.catalog import Catalog, MemberForm

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads a finished archive to whole records
TAR_END = 2 * TAR_BLOCK  # the end-of-archive marker
_GNU_NAME_LIMIT = 100  # longer names are preceded by a ././@LongLink member


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def member_tar_bytes(name: str, size: int) -> int:
    """Bytes one member takes in a GNU-format tar (long-name member, header, padded data)."""
    encoded = _utf8_length(name)
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


Placed = tuple[int, str, str, Any, int, str]  # see WritePlan._placed


class Extras(Protocol):
    """Members added to written samples (`curate.writing.extras.AddedMembers`)."""

    def batch(self, uids: Sequence[str]) -> list[list[tuple[str, bytes]]]:
        """The (extension, bytes) members added to each of `uids`."""
        ...


def order_copies(
    copies: np.ndarray, *, shuffle: bool, seed: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(source, copy) of every copy in output order (module docstring), as arrays; None stands
    for the identity order (sources) and for all-zero copy numbers, the common case that
    then takes no memory."""
    n = int(copies.size)
    rng = np.random.default_rng(seed)
    base = rng.random(n) if shuffle else None
    if n == 0 or bool((copies == 1).all()):
        if base is None:
            return None, None
        order = np.argsort(base, kind="stable")  # = lexsort((copy, src, position))
        del base
        return _narrow(order, n), None
    if base is None:
        base = np.arange(n, dtype=np.float64) / n
    counts = copies.astype(np.int64)
    src = np.repeat(np.arange(n), counts)
    starts = np.cumsum(counts) - counts
    copy = np.arange(src.size) - np.repeat(starts, counts)
    position = np.mod(base[src] + copy / counts[src], 1.0)
    del base, starts
    order = np.lexsort((copy, src, position))
    del position
    return _narrow(src[order], n), copy[order].astype(np.uint32)


@dataclass
class WritePlan:
    """Every copy's place: output shard i holds the copies at order positions
    ``bounds[i]..bounds[i+1]``, copy q being of source ``src[q]`` (q when None), copy number
    ``copy[q]`` (0 when None), under its key (``{key}_r{copy}``, or `renamed[q]`)."""

    catalog: Catalog
    src: np.ndarray | None
    copy: np.ndarray | None
    bounds: np.ndarray
    renamed: dict[int, str]
    max_copies_in_one_shard: int

    @property
    def shards(self) -> int:
        return int(self.bounds.size - 1)

    @property
    def copies(self) -> int:
        return int(self.bounds[-1])

    def _placed(self, index: int, members: MemberForm) -> list[Placed]:
        """Shard `index`'s copies: (input shard, input key, uid, members, copy, output key)."""
        start, stop = int(self.bounds[index]), int(self.bounds[index + 1])
        sources = np.arange(start, stop) if self.src is None else self.src[start:stop]
        copies = [0] * (stop - start) if self.copy is None else self.copy[start:stop].tolist()
        c = self.catalog.columns(sources, members)
        out_keys = [
            self.renamed.get(q) or _copy_key(key, copy)
            for q, key, copy in zip(range(start, stop), c.keys, copies, strict=True)
        ]
        return list(zip(c.shard, c.keys, c.uids, c.members, copies, out_keys, strict=True))

    def entries(self, index: int) -> list[Entry]:
        """Output shard `index`'s entries, in order (built now: objects only for one shard)."""
        return [
            Entry(Source(shard, IndexedSample(key, uid, members)), copy, out_key)
            for shard, key, uid, members, copy, out_key in self._placed(index, "objects")
        ]

    def fingerprint(
        self, index: int, urls: Sequence[str], settings: str, extras: Extras | None = None
    ) -> str:
        """Hash of everything that decides shard `index`'s bytes: per copy the JSON list
        [url, input key, uid, copy, output key, [[ext, offset, size], ...]], then the added
        members' bytes (`extras`, by uid); first `settings` (input signatures, member names)."""
        digest = hashlib.sha256(settings.encode())
        placed = self._placed(index, "json")
        url_json = {p[0]: json_string(urls[p[0]]) for p in placed}
        added = extras.batch([p[2] for p in placed]) if extras else [[]] * len(placed)
        for (shard, key, uid, members, copy, out_key), more in zip(placed, added, strict=True):
            key_json = json_string(key)
            out_json = key_json if out_key == key else json_string(out_key)
            line = f'[{url_json[shard]}, {key_json}, "{uid}", {copy}, {out_json}, {members}]'
            digest.update(line.encode())
            for ext, data in more:
                digest.update(ext.encode() + b"\x00" + data)
        return digest.hexdigest()


_PLAIN = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII but " and \: JSON as it is


def json_string(text: str) -> str:
    """`json.dumps(text)`, without its cost for plain text."""
    return f'"{text}"' if _PLAIN.fullmatch(text) else json.dumps(text)


def _copy_key(key: str, copy: int) -> str:
    return key if copy == 0 else f"{key}_r{copy}"


def cut_shards(
    catalog: Catalog,
    order: tuple[np.ndarray | None, np.ndarray | None],
    *,
    max_samples: int,
    max_bytes: int | None,
    extras: Extras | None = None,
) -> WritePlan:
    """Split the ordered copies into shards and give every copy its output key.

    `extras` (members added by uid) are added to each copy as ``{key}.{ext}``; they count
    towards `max_bytes`. One window of at most `max_samples` copies is looked at at a time:
    without a repeated key the shard is cut from the running byte total, else copy by copy as
    keys are given.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, not {max_samples}")
    src, copy = order
    total = len(catalog) if src is None else int(src.size)
    base = catalog.tar_bytes() if max_bytes is not None else np.zeros(0, np.int64)
    bounds = [0]
    renamed: dict[int, str] = {}
    most = 1
    start = 0
    while start < total:
        stop = min(total, start + max_samples)
        window = np.arange(start, stop) if src is None else src[start:stop]
        copies = [0] * (stop - start) if copy is None else copy[start:stop].tolist()
        columns = catalog.columns(window)
        keys = [_copy_key(k, c) for k, c in zip(columns.keys, copies, strict=True)]
        added = extras.batch(columns.uids) if extras and max_bytes is not None else [[]] * len(keys)
        grow = _WindowSizes(catalog, window, base, added)
        if len(set(keys)) == len(keys):
            end = stop
            if max_bytes is not None:
                sizes = grow.all(keys, [c == 0 for c in copies])
                fits = int((_archive_bytes(np.cumsum(sizes)) <= max_bytes).sum())
                end = start + max(1, fits)
        else:
            end = start + _place(keys, copies, start, max_bytes, grow, renamed)
        if copy is not None:
            _, counts = np.unique(window[: end - start], return_counts=True)
            most = max(most, int(counts.max()))
        bounds.append(end)
        start = end
    return WritePlan(
        catalog=catalog,
        src=src,
        copy=copy,
        bounds=np.array(bounds, dtype=np.int64),
        renamed=renamed,
        max_copies_in_one_shard=most,
    )


def _narrow(values: np.ndarray, limit: int) -> np.ndarray:
    return values.astype(np.uint32) if limit < 2**32 else values.astype(np.int64)


def _archive_bytes(members_bytes: np.ndarray) -> np.ndarray:
    """`archive_bytes`, vectorised."""
    return -(-(members_bytes + TAR_END) // TAR_RECORD) * TAR_RECORD


class _WindowSizes:
    """Bytes the copies of one window take in a tar under a given key: their members (the
    input key's size is known; another key's is computed from its length) and added members."""

    def __init__(
        self,
        catalog: Catalog,
        window: np.ndarray,
        base: np.ndarray,
        added: list[list[tuple[str, bytes]]],
    ) -> None:
        self.catalog, self.window, self.base, self.added = catalog, window, base, added

    def all(self, keys: list[str], own: list[bool]) -> np.ndarray:
        """Every copy of the window under `keys` (`own`: the copy's input key), at once."""
        sizes = self.base[self.window].astype(np.int64)
        other = np.flatnonzero(~np.asarray(own, dtype=bool))
        if other.size:
            lengths = np.array([_utf8_length(keys[i]) for i in other.tolist()], dtype=np.int64)
            sizes[other] = self.catalog.tar_bytes(self.window[other], lengths)
        for i, members in enumerate(self.added):
            sizes[i] += sum(member_tar_bytes(f"{keys[i]}.{ext}", len(d)) for ext, d in members)
        return sizes

    def __call__(self, i: int, key: str, own_key: bool) -> int:
        """Copy `i` of the window under `key` (`own_key`: its input key)."""
        if own_key:
            size = int(self.base[self.window[i]])
        else:
            lengths = np.array([_utf8_length(key)], dtype=np.int64)
            size = int(self.catalog.tar_bytes(self.window[i : i + 1], lengths)[0])
        for ext, data in self.added[i]:
            size += member_tar_bytes(f"{key}.{ext}", len(data))
        return size


def _utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _place(
    keys: list[str],
    copies: list[int],
    start: int,
    max_bytes: int | None,
    grow: Callable[[int, str, bool], int],
    renamed: dict[int, str],
) -> int:
    """One shard from a window whose keys repeat: a key already used in the shard gets
    ``_d{n}``; returns how many copies the shard takes."""
    used: set[str] = set()
    size = 0  # the shard's member bytes so far (counted only under a byte limit)
    for i, (key, copy) in enumerate(zip(keys, copies, strict=True)):
        if key in used:
            n = 1
            while f"{key}_d{n}" in used:
                n += 1
            key = f"{key}_d{n}"
        if max_bytes is not None:
            more = grow(i, key, copy == 0 and key == keys[i])
            if i and archive_bytes(size + more) > max_bytes:
                return i
            size += more
        if key != keys[i]:
            renamed[start + i] = key
        used.add(key)
    return len(keys)
