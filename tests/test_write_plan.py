"""The columnar write plan (subset, catalog, order, cut, keys, fingerprints) against slow oracles.

Each oracle is the obvious per-object form of the rule the module docstrings state: a Counter of
the subset file, a dict walk over the input samples in order, a greedy copy-by-copy cut with a set
of used keys, and ``json.dumps`` of every copy for the fingerprint. Inputs are random: keys shared
between shards, non-ASCII and quoted keys, names past tar's 100-byte limit, failed samples,
duplicate uids, copies from 0 to 4.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import InputError
from curate.io.tar_index import IndexedSample, Member, ShardIndex
from curate.writing import catalog as catalog_module
from curate.writing.catalog import match, shard_samples
from curate.writing.extras import added_members
from curate.writing.plan import archive_bytes, cut_shards, member_tar_bytes, order_copies
from curate.writing.subset import read_write_subset

_ODD_KEYS = ['a"b', "back\\slash", "ключ", "tab\tkey", "é" * 60, "long" * 40]


def _uid(rng: np.random.Generator) -> str:
    return rng.bytes(16).hex()


@dataclass
class World:
    """Random input shards (as header indexes) and a subset file naming some of their uids."""

    indexes: list[ShardIndex]
    urls: list[str]
    subset_rows: list[str]  # the subset file's rows, repeats included


def _world(seed: int, tmp_path: Path) -> World:
    rng = np.random.default_rng(seed)
    pool = [_uid(rng) for _ in range(int(rng.integers(20, 60)))]
    indexes: list[ShardIndex] = []
    for s in range(int(rng.integers(1, 5))):
        samples: list[IndexedSample] = []
        for i in range(int(rng.integers(0, 30))):
            uid = pool[int(rng.integers(len(pool)))]  # uids repeat across and within shards
            roll = rng.random()
            if roll < 0.5:
                key = f"k{i % 9:03d}"  # shared by the shards: renamed where they meet
            elif roll < 0.7:
                key = "m" * int(rng.integers(90, 100))  # names either side of tar's 100 bytes
            else:
                key = _ODD_KEYS[int(rng.integers(len(_ODD_KEYS)))] + str(i)
            if rng.random() < 0.1:
                uid = "not-a-uid"
            exts = ["jpg", "txt", "json"][: int(rng.integers(1, 4))]
            members = [
                Member(ext, int(rng.integers(0, 10**6)), int(rng.integers(0, 3000))) for ext in exts
            ]
            error = "truncated: member cut short" if rng.random() < 0.1 else None
            samples.append(IndexedSample(key, uid, members, error))
        indexes.append(ShardIndex(f"in/{s:05d}.tar", f"{s:05d}", samples, size=2 * 10**6))
    chosen = [u for u in pool if rng.random() < 0.7] + [_uid(rng) for _ in range(3)]
    rows = chosen + [
        chosen[int(rng.integers(len(chosen)))] for _ in range(int(rng.integers(0, 12)))
    ]
    rng.shuffle(rows)
    return World(indexes, [ix.url for ix in indexes], rows)


def _subset_file(tmp_path: Path, rows: list[str], weights: list[float] | None = None) -> Path:
    if weights is None:
        path = tmp_path / "subset.txt"
        path.write_text("".join(f"{u}\n" for u in rows))
    else:
        path = tmp_path / "subset.parquet"
        pq.write_table(pa.table({"uid": rows, "w": weights}), path)
    return path


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("duplicates", ["once", "repeat"])
def test_subset_copies_match_a_counter(tmp_path: Path, seed: int, duplicates: str) -> None:
    rng = np.random.default_rng(seed)
    rows = _world(seed, tmp_path).subset_rows
    weights = [float(w) for w in rng.random(len(rows)) * 3] if seed % 2 else None
    path = _subset_file(tmp_path, rows, weights)
    subset = read_write_subset(
        path, duplicates=duplicates, repeats_column="w" if weights else None, seed=seed
    )
    if weights is None:
        expected = Counter(rows) if duplicates == "repeat" else Counter(set(rows))
    else:  # floor(w) + (draw < frac(w)), one seeded draw per row in file order
        draws = np.random.default_rng([seed, 1]).random(len(rows)).tolist()
        expected = Counter()
        seen: set[str] = set()
        for uid, w, d in zip(rows, weights, draws, strict=True):
            per_row = int(np.floor(w)) + (d < w - np.floor(w))
            if duplicates == "repeat" or uid not in seen:
                expected[uid] += per_row
            seen.add(uid)
        for uid in rows:
            expected.setdefault(uid, 0)
    got = {subset.uid(p): int(subset.copies[p]) for p in range(len(subset))}
    assert got == {u: expected[u] for u in set(rows)}
    assert [subset.uid(p) for p in range(len(subset))] == sorted(set(rows))
    assert subset.rows == len(rows)
    assert all(subset.find(u) == sorted(set(rows)).index(u) for u in rows)
    assert subset.find("f" * 32) == -1 or "f" * 32 in rows


def test_repeated_subset_uids_are_an_error_unless_asked(tmp_path: Path) -> None:
    a, b = "0" * 31 + "1", "ab" * 16
    path = _subset_file(tmp_path, [b, a, b, a, b])
    with pytest.raises(InputError, match=rf"lists 2 uids more than once \(e.g. {b} x3\)"):
        read_write_subset(path, duplicates="error", repeats_column=None, seed=0)


def _oracle_match(world: World, wanted: set[str]) -> tuple[list, Counter, int, set, set]:
    """Chosen (shard, sample) in input order, failed uids by first failure, duplicates."""
    chosen: dict[str, tuple[int, IndexedSample]] = {}
    first_failure: dict[str, str] = {}
    found: set[str] = set()
    duplicates = 0
    for s, index in enumerate(world.indexes):
        for sample in index.samples:
            if sample.uid not in wanted:
                continue
            found.add(sample.uid)
            if sample.uid in chosen:
                duplicates += 1
            elif sample.error is None:
                chosen[sample.uid] = (s, sample)
            else:
                first_failure.setdefault(sample.uid, sample.error.split(":")[0])
    failed = {u: c for u, c in first_failure.items() if u not in chosen}
    return list(chosen.values()), Counter(failed.values()), duplicates, found, set(failed)


@pytest.mark.parametrize("seed", range(8))
def test_match_keeps_each_uids_first_copyable_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    world = _world(seed, tmp_path)
    subset = read_write_subset(
        _subset_file(tmp_path, world.subset_rows), duplicates="once", repeats_column=None, seed=0
    )
    shards = [shard_samples(ix, s, subset) for s, ix in enumerate(world.indexes)]
    matched = match(shards, subset)
    chosen, codes, duplicates, found, failed = _oracle_match(world, set(world.subset_rows))
    catalog = matched.catalog
    assert len(catalog) == len(chosen)
    for source, (shard, sample) in enumerate(chosen):
        got_shard, got = catalog.sample(source)
        assert (got_shard, got.key, got.uid) == (shard, sample.key, sample.uid)
        assert got.members == [Member(m.ext, m.offset, m.size) for m in sample.members]
    for few in (0, 10**9):  # read by shard in groups, and one by one
        monkeypatch.setattr(catalog_module, "_FEW_ROWS", few)
        backwards = np.arange(len(chosen))[::-1]  # any order
        columns = catalog.columns(backwards, "json")
        assert columns.keys == [s.key for _, s in chosen][::-1]
        assert columns.uids == [s.uid for _, s in chosen][::-1]
        assert columns.shard == [shard for shard, _ in chosen][::-1]
        assert (
            columns.members
            == [json.dumps([[m.ext, m.offset, m.size] for m in s.members]) for _, s in chosen][::-1]
        )
        objects = catalog.columns(backwards, "objects").members
        assert (
            objects
            == [[Member(m.ext, m.offset, m.size) for m in s.members] for _, s in chosen][::-1]
        )
    assert matched.duplicate_samples == duplicates
    assert matched.failed_codes == dict(codes)
    assert {subset.uid(p) for p in np.flatnonzero(matched.found)} == found
    assert {subset.uid(p) for p in np.flatnonzero(matched.failed)} == failed


def _oracle_plan(
    chosen: list[tuple[int, IndexedSample]],
    copies: list[int],
    *,
    shuffle: bool,
    seed: int,
    max_samples: int,
    max_bytes: int | None,
    extras: dict[str, list[tuple[str, bytes]]],
) -> list[list[tuple[int, int, str]]]:
    """(source, copy, output key) per shard: the module docstring's rule, one copy at a time."""
    n = len(chosen)
    base = np.random.default_rng(seed).random(n).tolist() if shuffle else [i / n for i in range(n)]
    placed = [((base[i] + j / copies[i]) % 1.0, i, j) for i in range(n) for j in range(copies[i])]
    shards: list[list[tuple[int, int, str]]] = []
    current: list[tuple[int, int, str]] = []
    used: set[str] = set()
    size = 0

    def place(i: int, j: int) -> tuple[str, int]:
        key = chosen[i][1].key if j == 0 else f"{chosen[i][1].key}_r{j}"
        if key in used:
            d = 1
            while f"{key}_d{d}" in used:
                d += 1
            key = f"{key}_d{d}"
        grow = sum(member_tar_bytes(f"{key}.{m.ext}", m.size) for m in chosen[i][1].members)
        grow += sum(
            member_tar_bytes(f"{key}.{e}", len(b)) for e, b in extras.get(chosen[i][1].uid, [])
        )
        return key, grow

    for _, i, j in sorted(placed):
        key, grow = place(i, j)
        if current and (
            len(current) >= max_samples
            or (max_bytes is not None and archive_bytes(size + grow) > max_bytes)
        ):
            shards.append(current)
            current, used, size = [], set(), 0
            key, grow = place(i, j)
        used.add(key)
        current.append((i, j, key))
        size += grow
    if current:
        shards.append(current)
    return shards


def _oracle_fingerprint(
    entries: list[tuple[int, IndexedSample, int, str]],
    urls: list[str],
    settings: str,
    extras: dict[str, list[tuple[str, bytes]]],
) -> str:
    digest = hashlib.sha256(settings.encode())
    for shard, sample, copy, key in entries:
        members = [(m.ext, m.offset, m.size) for m in sample.members]
        digest.update(
            json.dumps([urls[shard], sample.key, sample.uid, copy, key, members]).encode()
        )
        for ext, data in extras.get(sample.uid, []):
            digest.update(ext.encode() + b"\x00" + data)
    return digest.hexdigest()


@dataclass
class _ByUid:
    """Added members from a plain dict (the plan asks for them a batch of uids at a time)."""

    members: dict[str, list[tuple[str, bytes]]]

    def batch(self, uids: list[str]) -> list[list[tuple[str, bytes]]]:
        return [self.members.get(u, []) for u in uids]


@pytest.mark.parametrize("seed", range(12))
def test_plan_and_fingerprints_match_the_greedy_oracle(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    world = _world(seed, tmp_path)
    repeat = seed % 3 != 0
    subset = read_write_subset(
        _subset_file(tmp_path, world.subset_rows),
        duplicates="repeat" if repeat else "once",
        repeats_column=None,
        seed=0,
    )
    shards = [shard_samples(ix, s, subset) for s, ix in enumerate(world.indexes)]
    catalog = match(shards, subset).catalog
    shuffle = bool(seed % 2)
    max_samples = int(rng.integers(1, 15))
    max_bytes = [None, 12 * 1024, 30 * 1024][seed % 3]
    uids = sorted(set(world.subset_rows))
    extras = {u: [("note.txt", rng.bytes(int(rng.integers(0, 900))))] for u in uids[::3]}
    order = order_copies(catalog.copies(), shuffle=shuffle, seed=seed)
    added = _ByUid(extras)
    plan = cut_shards(catalog, order, max_samples=max_samples, max_bytes=max_bytes, extras=added)

    chosen, *_ = _oracle_match(world, set(world.subset_rows))
    copies = [int(subset.copies[subset.find(s.uid)]) for _, s in chosen]
    expected = _oracle_plan(
        chosen,
        copies,
        shuffle=shuffle,
        seed=seed,
        max_samples=max_samples,
        max_bytes=max_bytes,
        extras=extras,
    )
    assert plan.shards == len(expected)
    assert plan.copies == sum(copies)
    most = 0
    for index, shard in enumerate(expected):
        entries = plan.entries(index)
        assert [(e.source.sample.key, e.copy, e.key) for e in entries] == [
            (chosen[i][1].key, j, key) for i, j, key in shard
        ]
        assert [(e.source.shard, e.source.sample.uid) for e in entries] == [
            (chosen[i][0], chosen[i][1].uid) for i, _, _ in shard
        ]
        settings = f"settings {seed}"
        oracle = [(chosen[i][0], chosen[i][1], j, key) for i, j, key in shard]
        assert plan.fingerprint(index, world.urls, settings, added) == _oracle_fingerprint(
            oracle, world.urls, settings, extras
        )
        most = max([most, *Counter(i for i, _, _ in shard).values()])
    assert plan.max_copies_in_one_shard == max(most, 1)


def test_member_bytes_of_a_sample_match_member_tar_bytes(tmp_path: Path) -> None:
    world = _world(3, tmp_path)
    subset = read_write_subset(
        _subset_file(tmp_path, world.subset_rows), duplicates="once", repeats_column=None, seed=0
    )
    for s, index in enumerate(world.indexes):
        samples = shard_samples(index, s, subset)
        expected = [
            0 if x.error else sum(member_tar_bytes(f"{x.key}.{m.ext}", m.size) for m in x.members)
            for x in index.samples
            if x.uid in world.subset_rows
        ]
        assert samples.tar_bytes().tolist() == expected


def test_added_members_match_a_row_by_row_dict(tmp_path: Path) -> None:
    """scores.json from the first subset row of a uid, rewrites.json from its first row with
    rewrites (tables in name order), built in batches: the same bytes as a dict built row by
    row with json.dumps."""
    rng = np.random.default_rng(7)
    uids = [_uid(rng) for _ in range(40)]
    rows = uids + [uids[int(rng.integers(40))] for _ in range(15)]
    score = [float(x) for x in rng.normal(size=len(rows))]
    score[3], score[8] = float("nan"), float("inf")
    note = [None if i % 6 == 0 else f"n{i} ✓" for i in range(len(rows))]
    path = tmp_path / "subset.parquet"
    shown = [u.upper() if i % 4 == 0 else u for i, u in enumerate(rows)]
    pq.write_table(pa.table({"uid": shown, "score": score, "note": note}), path)
    folder = tmp_path / "rw"
    (folder / "rewrites").mkdir(parents=True)
    tables = []
    for t in range(3):
        chosen = [uids[int(rng.integers(40))] for _ in range(20)] + [_uid(rng)]
        lists = [None if i % 7 == 0 else [f"r{t}.{i}"] * (i % 3) for i in range(len(chosen))]
        tables.append((chosen, lists, f"model-{t}"))
        pq.write_table(
            pa.table(
                {
                    "uid": chosen,
                    "rewrites": lists,
                    "model": [f"model-{t}"] * len(chosen),
                    "prompt_version": ["p1"] * len(chosen),
                }
            ),
            folder / "rewrites" / f"{t:05d}.parquet",
        )
    (folder / "rewrite.json").write_text("{}")

    expected: dict[str, list[tuple[str, bytes]]] = {}
    for uid, s, n in zip(rows, score, note, strict=True):
        if uid not in expected:
            clean = {"score": s if np.isfinite(s) else None, "note": n}
            expected[uid] = [("scores.json", json.dumps(clean, sort_keys=True).encode())]
    with_rewrites: set[str] = set()
    for chosen, lists, model in tables:
        for uid, rewrites in zip(chosen, lists, strict=True):
            if uid in expected and rewrites and uid not in with_rewrites:
                with_rewrites.add(uid)
                payload = {"rewrites": rewrites, "model": model, "prompt_version": "p1"}
                expected[uid].append(
                    ("rewrites.json", json.dumps(payload, sort_keys=True).encode())
                )

    subset = read_write_subset(path, duplicates="once", repeats_column=None, seed=0)
    added = added_members(subset, path, ["score", "note"], folder)
    asked = [uids[int(i)] for i in rng.permutation(40)] + uids[:5]
    assert added.batch(asked) == [expected[u] for u in asked]
    assert added.count("rewrites.json") == len(with_rewrites) > 0
    assert added.count("scores.json") == 40
    assert not added_members(subset, path, [], None)


def test_copies_past_uint32_are_an_input_error(tmp_path: Path) -> None:
    a, b = "0" * 31 + "1", "ab" * 16
    path = _subset_file(tmp_path, [a, b], [1.0, 5e9])
    with pytest.raises(InputError, match=r"row 1 has 5000000000.0; a uid is written at most"):
        read_write_subset(path, duplicates="once", repeats_column="w", seed=0)
    path = _subset_file(tmp_path, [b, a, b, b], [3e9, 1.0, 1e9, 2e9])
    with pytest.raises(InputError, match=rf"uid {b} would be written 6000000000 times"):
        read_write_subset(path, duplicates="repeat", repeats_column="w", seed=0)
    once = read_write_subset(path, duplicates="once", repeats_column="w", seed=0)
    assert int(once.copies[once.find(b)]) == 3 * 10**9
