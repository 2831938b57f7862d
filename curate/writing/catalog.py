"""The input samples a write copies, held columnar: no Python object per sample.

Each input shard's header index (`curate.io.tar_index`) becomes a `ShardSamples` as soon as it
is read: per wanted sample its key (UTF-8 bytes in one buffer), its uid's position in the
subset (`curate.writing.subset`), whether it can be copied (else its failure code), and its
members as three flat arrays (extension id, data offset, size). About 60 bytes a sample with
the usual three members; the `IndexedSample` objects of one shard live only while it is read.

`match` then keeps, for each subset uid, its first copyable sample in input order (the others
are duplicates or failures, counted) and gives the `Catalog`: the chosen samples of every
shard, numbered 0..n-1 in input order (the plan's "sources").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from curate.errors import failure_code
from curate.io.tar_index import IndexedSample, Member, ShardIndex
from curate.writing.plan import TAR_BLOCK, json_string
from curate.writing.subset import WriteSubset

MemberForm = Literal["objects", "json"]
_FEW_ROWS = 16  # rows per input shard, on average, below which `Catalog.columns` reads singly
_LONG_NAME = 100  # GNU tar: longer member names get a ././@LongLink member first


def _smallest(values: np.ndarray, limit: int) -> np.ndarray:
    """`values` as uint32 when every value (and `limit`) fits, else int64."""
    return values.astype(np.uint32 if limit < 2**32 else np.int64)


@dataclass
class ShardSamples:
    """The wanted samples of one input shard, in tar order, columnar."""

    shard: int  # index into the input shard list
    key_ends: np.ndarray  # [n + 1]: sample i's key is key_bytes[key_ends[i]:key_ends[i+1]]
    key_bytes: np.ndarray  # uint8
    positions: np.ndarray  # the uid's position in the subset
    failures: dict[int, str]  # failure code by row, for the samples that cannot be copied
    member_ends: np.ndarray  # [n + 1]: sample i's members are [member_ends[i], ...[i+1])
    ext_names: list[str]
    exts: np.ndarray  # uint8 (uint32 past 256 names) ids into ext_names
    offsets: np.ndarray  # data offsets, uint32 when the tar is under 4 GiB
    sizes: np.ndarray  # data sizes
    data_path: str | None = None  # a compressed shard's decompressed copy, read instead
    _quoted: list[str] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.positions.size)

    def keys(self, rows: np.ndarray) -> list[str]:
        """The keys of `rows` (any order): one decode for ASCII keys, which are the rule."""
        ends, items = _gather(self.key_ends, rows)
        data = self.key_bytes[items].tobytes()
        text = data.decode("utf-8", "surrogateescape")
        bounds = ends.tolist()
        if len(text) != len(data):  # some key is not ASCII: byte bounds are not char bounds
            return [data[a:b].decode("utf-8", "surrogateescape") for a, b in pairwise(bounds)]
        return [text[a:b] for a, b in pairwise(bounds)]

    def key(self, row: int) -> str:
        """The key of one row (`keys` for many)."""
        start, stop = int(self.key_ends[row]), int(self.key_ends[row + 1])
        return self.key_bytes[start:stop].tobytes().decode("utf-8", "surrogateescape")

    def member_value(self, row: int, form: MemberForm) -> list[Member] | str:
        """The members of one row, as `members_of` gives them for many."""
        start, stop = int(self.member_ends[row]), int(self.member_ends[row + 1])
        triples = zip(
            self.exts[start:stop].tolist(),
            self.offsets[start:stop].tolist(),
            self.sizes[start:stop].tolist(),
            strict=True,
        )
        if form == "objects":
            return [Member(self.ext_names[e], o, z) for e, o, z in triples]
        quoted = self.quoted_names()
        return "[" + ", ".join(f"[{quoted[e]}, {o}, {z}]" for e, o, z in triples) + "]"

    def quoted_names(self) -> list[str]:
        """The extension names as JSON strings (made once)."""
        if self._quoted is None:
            self._quoted = [json_string(name) for name in self.ext_names]
        return self._quoted

    def members_of(self, rows: np.ndarray, form: MemberForm) -> list[list[Member]] | list[str]:
        """The members of `rows` (any order): as `Member` lists, or each sample's JSON list
        ``[[ext, offset, size], ...]`` (as `json.dumps` writes it, for fingerprints)."""
        ends, items = _gather(self.member_ends, rows)
        triples = zip(
            self.exts[items].tolist(),
            self.offsets[items].tolist(),
            self.sizes[items].tolist(),
            strict=True,
        )
        bounds = ends.tolist()
        if form == "objects":
            names = self.ext_names
            members = [Member(names[e], o, z) for e, o, z in triples]
            return [members[a:b] for a, b in pairwise(bounds)]
        quoted = self.quoted_names()
        parts = [f"[{quoted[e]}, {o}, {z}]" for e, o, z in triples]
        return ["[" + ", ".join(parts[a:b]) + "]" for a, b in pairwise(bounds)]

    def tar_bytes(
        self, rows: np.ndarray | None = None, key_lengths: np.ndarray | None = None
    ) -> np.ndarray:
        """Bytes the members of `rows` (default: all) take in a tar under keys of
        `key_lengths` UTF-8 bytes (default: their own keys), as int64."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        if key_lengths is None:
            key_lengths = np.diff(self.key_ends)[rows]
        ext_lengths = np.array(
            [len(e.encode("utf-8", "surrogateescape")) for e in self.ext_names], dtype=np.int64
        )
        ends, items = _gather(self.member_ends, rows)
        ends = ends.astype(np.int64)
        names = np.repeat(np.asarray(key_lengths, dtype=np.int64), np.diff(ends))
        names += 1 + ext_lengths[self.exts[items]]
        padded = -(-self.sizes[items].astype(np.int64) // TAR_BLOCK) * TAR_BLOCK
        long_names = np.where(names > _LONG_NAME, TAR_BLOCK + -(-(names + 1) // TAR_BLOCK) * 512, 0)
        running = np.concatenate([[0], np.cumsum(TAR_BLOCK + padded + long_names)])
        return running[ends[1:]] - running[ends[:-1]]

    def taking(self, rows: np.ndarray) -> ShardSamples:
        """Only `rows` (ascending), all copyable."""
        if rows.size == len(self) and not self.failures:
            return self
        key_ends, key_items = _gather(self.key_ends, rows)
        member_ends, members = _gather(self.member_ends, rows)
        return ShardSamples(
            shard=self.shard,
            key_ends=key_ends,
            key_bytes=self.key_bytes[key_items],
            positions=self.positions[rows],
            failures={},
            member_ends=member_ends,
            ext_names=self.ext_names,
            exts=self.exts[members],
            offsets=self.offsets[members],
            sizes=self.sizes[members],
            data_path=self.data_path,
        )


def _gather(ends: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ragged items (row i owns [ends[i], ends[i+1])): the new ends and the item indices
    of `rows`, in order."""
    counts = np.diff(ends)[rows]
    counts = counts.astype(np.int64)
    new_ends = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shift = ends[:-1][rows].astype(np.int64) - new_ends[:-1]
    items = np.arange(new_ends[-1], dtype=np.int64) + np.repeat(shift, counts)
    return _smallest(new_ends, int(new_ends[-1])), items


def _ends(lengths: Sequence[int]) -> np.ndarray:
    """Ragged ends [0, l0, l0 + l1, ...], as uint32 when they fit."""
    ends = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)
    return _smallest(ends, int(ends[-1]))


def shard_samples(index: ShardIndex, shard: int, subset: WriteSubset) -> ShardSamples:
    """A shard index's samples whose uid is in `subset`, columnar (module doc)."""
    positions = subset.positions(pa.array([s.uid for s in index.samples], pa.string()))
    samples = index.samples
    if bool((positions < 0).any()):  # an index of every sample: keep the subset's
        samples = [s for s, p in zip(samples, positions.tolist(), strict=True) if p >= 0]
        positions = positions[positions >= 0]
    keys = [s.key.encode("utf-8", "surrogateescape") for s in samples]
    ext_ids: dict[str, int] = {}
    exts: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    counts: list[int] = []
    for s in samples:
        members = [] if s.error is not None else s.members  # an uncopyable sample is never read
        counts.append(len(members))
        for m in members:
            exts.append(ext_ids.setdefault(m.ext, len(ext_ids)))
            offsets.append(m.offset)
            sizes.append(m.size)
    return ShardSamples(
        shard=shard,
        key_ends=_ends([len(k) for k in keys]),
        key_bytes=np.frombuffer(b"".join(keys), dtype=np.uint8).copy(),
        positions=_smallest(positions, len(subset)),
        failures={i: failure_code(s.error) for i, s in enumerate(samples) if s.error is not None},
        member_ends=_ends(counts),
        ext_names=list(ext_ids),
        exts=np.array(exts, dtype=np.uint8 if len(ext_ids) <= 256 else np.uint32),
        offsets=_smallest(np.array(offsets, dtype=np.int64), index.size),
        sizes=_smallest(np.array(sizes, dtype=np.int64), max(sizes, default=0) + 1),
        data_path=index.data_path,
    )


@dataclass
class Matched:
    """What `match` found: the catalog and the accounting of the subset's uids."""

    catalog: Catalog
    found: np.ndarray  # bool per subset position: some sample carries the uid
    failed: np.ndarray  # bool per subset position: only uncopyable samples carry it
    failed_codes: dict[str, int]  # failed uids by their first sample's failure code
    duplicate_samples: int  # samples after the chosen one of their uid


@dataclass
class Columns:
    """Some sources' fields as lists (`Catalog.columns`): built per output shard, not per pool."""

    shard: list[int]  # input shard index
    keys: list[str]
    uids: list[str]
    members: list[Any]  # per source: list[Member] or its JSON (`ShardSamples.members_of`)


@dataclass
class Catalog:
    """The chosen samples (one per written uid) of every input shard, numbered in input order."""

    subset: WriteSubset
    shards: list[ShardSamples]  # only those with a chosen sample, input order
    starts: np.ndarray = field(init=False)  # int64: first source number of each

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])]).astype(
            np.int64
        )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def sample(self, source: int) -> tuple[int, IndexedSample]:
        """The input shard and the indexed sample of source number `source`."""
        one = self.columns(np.array([source]), "objects")
        return one.shard[0], IndexedSample(one.keys[0], one.uids[0], one.members[0])

    def _groups(self, sources: np.ndarray) -> Iterator[tuple[ShardSamples, np.ndarray, list[int]]]:
        """Per input shard among `sources`: its samples, the rows it holds and their indices
        in `sources` (one argsort of the batch instead of a search per source)."""
        sources = np.asarray(sources, dtype=np.int64)
        at = np.searchsorted(self.starts, sources, side="right") - 1
        order = np.argsort(at, kind="stable")
        cuts = np.flatnonzero(np.diff(at[order])) + 1
        for piece in np.split(order, cuts):
            if piece.size:
                shard = int(at[piece[0]])
                yield self.shards[shard], sources[piece] - self.starts[shard], piece.tolist()

    def columns(self, sources: np.ndarray, members: MemberForm | None = None) -> Columns:
        """Input shard, key and uid of each of `sources`, and their members when asked.
        Sources spread over many shards (a shuffled order) are read one by one: a group of a
        few rows costs more in array calls than it saves."""
        sources = np.asarray(sources, dtype=np.int64)
        n = int(sources.size)
        shard, keys, positions = [0] * n, [""] * n, np.zeros(n, dtype=np.int64)
        values: list[Any] = [None] * n if members else []
        at = np.searchsorted(self.starts, sources, side="right") - 1
        if n and np.unique(at).size * _FEW_ROWS > n:
            rows = (sources - self.starts[at]).tolist()
            for i, (s, row) in enumerate(zip(at.tolist(), rows, strict=True)):
                samples = self.shards[s]
                shard[i], keys[i] = samples.shard, samples.key(row)
                positions[i] = samples.positions[row]
                if members:
                    values[i] = samples.member_value(row, members)
            return Columns(shard, keys, self.subset.hexes(positions), values)
        for samples, rows, where in self._groups(sources):
            positions[where] = samples.positions[rows]
            for i, key in zip(where, samples.keys(rows), strict=True):
                shard[i], keys[i] = samples.shard, key
            if members:
                for i, value in zip(where, samples.members_of(rows, members), strict=True):
                    values[i] = value
        return Columns(shard, keys, self.subset.hexes(positions), values)

    def copies(self) -> np.ndarray:
        """Copies to write of each source (uint32; a view of 1 when the subset is `single`)."""
        if self.subset.single:
            return np.broadcast_to(np.uint32(1), (len(self),))
        return np.concatenate(
            [np.zeros(0, np.uint32)] + [self.subset.copies[s.positions] for s in self.shards]
        )

    def tar_bytes(
        self, sources: np.ndarray | None = None, key_lengths: np.ndarray | None = None
    ) -> np.ndarray:
        """Bytes the members of `sources` (default: all) take in a tar under keys of
        `key_lengths` UTF-8 bytes (default: their own keys), as int64."""
        if sources is None:
            return np.concatenate([np.zeros(0, np.int64)] + [s.tar_bytes() for s in self.shards])
        totals = np.zeros(np.asarray(sources).size, dtype=np.int64)
        for samples, rows, where in self._groups(sources):
            lengths = None if key_lengths is None else np.asarray(key_lengths)[where]
            totals[where] = samples.tar_bytes(rows, lengths)
        return totals


def match(shards: Sequence[ShardSamples | None], subset: WriteSubset) -> Matched:
    """Each subset uid's first copyable sample in input order, and the accounting. A shard at
    a time: beside the shards, 6 bytes per subset uid (10 past 2^32 samples)."""
    present = [s for s in shards if s is not None]
    total = sum(len(s) for s in present)
    kind = np.uint32 if total < np.iinfo(np.uint32).max else np.int64
    none = np.iinfo(kind).max
    first_ok = np.full(len(subset), none, dtype=kind)  # first copyable row of each uid
    start = 0
    for s in present:
        ok = np.ones(len(s), dtype=bool)
        ok[list(s.failures)] = False
        rows = np.flatnonzero(ok)
        np.minimum.at(first_ok, s.positions[rows], (rows + start).astype(kind))
        start += len(s)
    found = np.zeros(len(subset), dtype=bool)
    duplicates = 0
    taken: list[ShardSamples] = []
    failures: list[tuple[np.ndarray, list[str]]] = []  # positions and codes of failed samples
    start = 0
    for s in present:
        rows = np.arange(start, start + len(s), dtype=np.int64)
        first = first_ok[s.positions]
        duplicates += int((first < rows).sum())
        found[s.positions] = True
        mine = np.flatnonzero(first == rows)
        del rows, first
        if s.failures:
            failed_rows = sorted(s.failures)
            failures.append((s.positions[failed_rows], [s.failures[r] for r in failed_rows]))
        if mine.size:
            taken.append(s.taking(mine))
        start += len(s)
    failed = found & (first_ok == none)
    del first_ok
    # A failed uid counts under the failure of its first sample (all of its samples failed).
    codes: Counter[str] = Counter()
    counted = np.zeros(len(subset), dtype=bool) if failures else found
    for positions, reasons in failures:
        for position, reason in zip(positions.tolist(), reasons, strict=True):
            if failed[position] and not counted[position]:
                counted[position] = True
                codes[reason] += 1
    return Matched(
        catalog=Catalog(subset, taken),
        found=found,
        failed=failed,
        failed_codes=dict(sorted(codes.items())),
        duplicate_samples=duplicates,
    )
