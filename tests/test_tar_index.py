"""index_shard: the header-only index groups samples and derives uids exactly like ShardReader."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from shardkit import make_shard, write_tar

from curate.errors import ShardOpenError
from curate.io.tar_index import ShardIndex, index_shard
from curate.io.tar_reader import RawSample, ShardReader, split_member_name

STRUCTURAL = ("truncated_shard", "duplicate_key", "missing_image", "missing_caption")
WANTED_EXTS = frozenset(("jpg", "jpeg", "png", "webp", "txt", "json"))
IMAGE_EXTS = ("jpg", "png", "jpeg", "webp", "JPG", "Png")


@dataclass
class Generated:
    members: list[tuple[str, bytes]]
    indexed: list[bool]  # whether the member must end up in some sample's member list


def _blob(rng: np.random.Generator, tag: str) -> bytes:
    size = int(rng.choice([0, 1, 17, 511, 512, 513, int(rng.integers(0, 3000))]))
    return (tag.encode() + rng.bytes(size))[: max(size, 1)] if size else b""


def _json_member(rng: np.random.Generator, key: str) -> bytes:
    r = rng.random()
    if r < 0.1:
        return b"{not json"
    if r < 0.15:
        return b"[1, 2, 3]"
    if r < 0.2:
        return b"\xff\xfe bad bytes"
    meta: dict[str, object] = {"key": key, "url": f"http://example.com/{key}.jpg"}
    if r < 0.6:
        uid = rng.bytes(16).hex()
        meta["uid"] = uid.upper() if rng.random() < 0.2 else uid
    elif r < 0.65:
        meta["uid"] = "not-a-uid"
    return json.dumps(meta).encode()


def _caption(rng: np.random.Generator) -> bytes:
    r = rng.random()
    if r < 0.05:
        return b""
    if r < 0.1:
        return b"   \n"
    if r < 0.15:
        return b"\xff\xfe caption"
    return f"a caption {int(rng.integers(0, 10**6))}".encode()


def _random_shard(rng: np.random.Generator, n: int) -> Generated:
    """Members of `n` messy samples: shuffled member orders, duplicates, extras, `__` members."""
    members: list[tuple[str, bytes]] = []
    indexed: list[bool] = []
    used: list[str] = []
    previous: str | None = None
    for i in range(n):
        if used and rng.random() < 0.15:
            key = used[int(rng.integers(0, len(used)))]  # duplicate key, sometimes adjacent
        else:
            folder = str(rng.choice(["", "", "", "sub/", "a/b/", "./"]))
            key = f"{folder}{i:06d}"
            used.append(key)
        parts: list[tuple[str, bytes]] = []
        if rng.random() > 0.12:
            parts.append((str(rng.choice(IMAGE_EXTS)), _blob(rng, "img")))
        if rng.random() > 0.12:
            parts.append(("txt", _caption(rng)))
        if rng.random() > 0.2:
            parts.append(("json", _json_member(rng, key)))
        if rng.random() < 0.3:
            parts.append(("cls", str(int(rng.integers(0, 10))).encode()))
        if rng.random() < 0.15:
            parts.append(("scores.json", b'{"s": 1}'))
        if rng.random() < 0.05:
            parts.append(("second.jpg", _blob(rng, "second")))
        order = rng.permutation(len(parts))
        parts = [parts[j] for j in order]
        has_wanted = any(ext.lower() in WANTED_EXTS for ext, _ in parts)
        sample = [(f"{key}.{ext}", data) for ext, data in parts]
        # Right after a sample of the same key, ShardReader may merge the two; then the other
        # members of the second have no well-defined home (a repeated .cls cannot be copied).
        adjacent = previous == key
        flags = [has_wanted and (not adjacent or ext.lower() in WANTED_EXTS) for ext, _ in parts]
        previous = key
        wanted_parts = [ext for ext, _ in parts if ext.lower() in WANTED_EXTS]
        if wanted_parts and rng.random() < 0.08:
            # The same member name again inside the run: ShardReader starts a duplicate sample.
            ext = wanted_parts[int(rng.integers(0, len(wanted_parts)))]
            sample.append((f"{key}.{ext}", _blob(rng, "again")))
            flags.append(True)
        if len(sample) > 1 and rng.random() < 0.05:
            # A foreign key's non-sample member inside the run (ShardReader ignores it).
            at = int(rng.integers(1, len(sample)))
            sample.insert(at, (f"zz{i:06d}.cls", b"7"))
            flags.insert(at, False)
        members += sample
        indexed += flags
        r = rng.random()
        if r < 0.08:
            members.append(("__meta__.json", b'{"a": 1}'))
            indexed.append(False)
        elif r < 0.1:
            members.append(("README", b"no dot"))
            indexed.append(False)
        elif r < 0.12:
            members.append((f"x/__{i}.txt", b"hidden"))
            indexed.append(False)
    return Generated(members, indexed)


def _reader(path: Path) -> tuple[list[RawSample] | None, ShardReader]:
    reader = ShardReader(str(path), sidecar=False)
    try:
        return list(reader), reader
    except ShardOpenError:
        return None, reader


def _index(path: Path) -> ShardIndex | None:
    try:
        return index_shard(str(path))
    except ShardOpenError:
        return None


def _offsets(path: Path) -> dict[int, tuple[str, bytes]]:
    """Data offset -> (member name, data) for every regular member of a whole tar."""
    out: dict[int, tuple[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.isreg():
                fobj = tf.extractfile(m)
                assert fobj is not None
                out[m.offset_data] = (m.name, fobj.read())
    return out


def _compare(path: Path, whole: dict[int, tuple[str, bytes]]) -> ShardIndex | None:
    records, reader = _reader(path)
    index = _index(path)
    assert (records is None) == (index is None), "only one of reader and index opened the tar"
    if records is None or index is None:
        return None
    assert [(s.key, s.uid) for s in index.samples] == [(r.key, r.uid) for r in records]
    assert (index.truncated is None) == (reader.truncated is None)
    data = path.read_bytes()
    assert index.size == len(data)
    for s, r in zip(index.samples, records, strict=True):
        code = None if s.error is None else s.error.split(":", 1)[0]
        if r.error_code is None or r.error_code in STRUCTURAL:
            assert code == r.error_code, (s, r.error)
        else:  # content checks (caption_not_utf8, empty_caption) are the reader's alone
            assert code is None, (s, r.error)
        if code == "truncated_shard":
            continue
        for m in s.members:
            assert m.offset + m.size <= len(data)
            name, content = whole[m.offset]
            parsed = split_member_name(name)
            assert parsed is not None and parsed[0] == s.key
            assert name.rpartition("/")[2].partition(".")[2] == m.ext
            assert data[m.offset : m.offset + m.size] == content
        if r.ok:
            images = [m for m in s.members if m.ext.lower() in ("jpg", "jpeg", "png", "webp")]
            first = images[0]
            assert data[first.offset : first.offset + first.size] == r.image
            assert first.ext.lower() == r.image_ext
    return index


@pytest.mark.parametrize("seed", range(40))
def test_index_matches_reader_on_messy_shards(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    generated = _random_shard(rng, int(rng.integers(1, 40)))
    path = Path(write_tar(tmp_path / "00007.tar", generated.members))
    whole = _offsets(path)
    index = _compare(path, whole)
    assert index is not None and index.truncated is None

    # Every member of a sample that ShardReader sees is indexed exactly once.
    indexed = [m.offset for s in index.samples for m in s.members]
    assert len(indexed) == len(set(indexed))
    data_offsets = sorted(whole)
    assert len(data_offsets) == len(generated.members)
    members = zip(data_offsets, generated.members, generated.indexed, strict=True)
    for offset, (name, _), must in members:
        assert whole[offset][0] == name
        if must:
            assert offset in indexed, name

    # The same tar cut at random places: same samples, uids and structural errors as the reader.
    full = path.read_bytes()
    cuts = {int(c) for c in rng.integers(1, len(full), size=12)}
    cuts |= {len(full) - 1, len(full) - 1024, len(full) - 10240 + 512}
    cuts |= {o for o in list(whole)[-3:]}  # at a member's data start (just after its header)
    for cut in sorted(c for c in cuts if 0 < c < len(full)):
        cut_path = tmp_path / "cut" / f"{cut}" / "00007.tar"
        cut_path.parent.mkdir(parents=True)
        cut_path.write_bytes(full[:cut])
        _compare(cut_path, whole)


def test_truncated_sample_is_marked(tmp_path: Path) -> None:
    path = tmp_path / "00001.tar"
    make_shard(path, 4, shard_index=1)
    whole = _offsets(path)
    full = path.read_bytes()
    last = max(whole)  # the last member's data (a .json)
    path.write_bytes(full[: last + 5])
    index = index_shard(str(path))
    assert index.truncated is not None
    assert [s.error is None for s in index.samples] == [True, True, True, False]
    assert index.samples[-1].error is not None
    assert index.samples[-1].error.startswith("truncated_shard")


def test_wanted_filter_keeps_only_wanted_samples_and_counts_all(tmp_path: Path) -> None:
    path = tmp_path / "00002.tar"
    make_shard(path, 6, shard_index=2)
    everything = index_shard(str(path))
    keep = {s.uid for s in everything.samples[::2]}
    filtered = index_shard(str(path), keep.__contains__)
    assert everything.count == filtered.count == 6 == len(everything.samples)
    assert [(s.key, s.uid, s.error, s.members) for s in filtered.samples] == [
        (s.key, s.uid, s.error, s.members) for s in everything.samples[::2]
    ]
    assert all(len(s.members) == 3 for s in everything.samples)


def test_unopenable_shard_raises(tmp_path: Path) -> None:
    path = tmp_path / "00003.tar"
    path.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardOpenError):
        index_shard(str(path))
    with pytest.raises(ShardOpenError):
        index_shard(str(tmp_path / "absent.tar"))


def test_large_json_uid_is_read(tmp_path: Path) -> None:
    """A big .json still gives its uid, as ShardReader reads it whole."""
    uid = "ab" * 16
    meta = json.dumps({"uid": uid, "pad": "x" * (1 << 21)}).encode()
    path = Path(
        write_tar(tmp_path / "00004.tar", [("k.jpg", b"img"), ("k.txt", b"c"), ("k.json", meta)])
    )
    (record,) = list(ShardReader(str(path), sidecar=False))
    (sample,) = index_shard(str(path)).samples
    assert record.uid == sample.uid == uid
