"""curate write on awkward inputs: compressed shards (issue 13) and thousands of small shards."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from clikit import run_cli
from shardkit import make_shard, write_tar

from curate.io.tar_index import index_shard
from curate.io.tar_reader import ShardReader
from curate.writing import stage
from curate.writing.stage import WriteOptions, write_subset

COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "gz": gzip.compress,
    "bz2": bz2.compress,
    "xz": lzma.compress,
}


def _plain(folder: Path, n: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "00003.tar"
    make_shard(path, n, shard_index=3, image_size=(48, 48))
    return path


def _compressed(plain: Path, folder: Path, name: str, codec: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(COMPRESS[codec](plain.read_bytes()))
    return path


def _uids(url: Path) -> list[str]:
    """Uids as every other stage sees them (ShardReader, derived from the shard name)."""
    return [r.uid for r in ShardReader(str(url), sidecar=False) if r.ok]


def _keys_of(url: Path, uids: list[str]) -> dict[str, str]:
    return {r.uid: r.key for r in ShardReader(str(url), sidecar=False) if r.uid in uids}


def _members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as tf:
        out = []
        for m in tf.getmembers():
            fobj = tf.extractfile(m)
            assert fobj is not None
            out.append((m.name, fobj.read()))
    return out


def _subset(path: Path, uids: list[str]) -> Path:
    path.write_text("".join(f"{u}\n" for u in uids))
    return path


@pytest.mark.parametrize(
    ("name", "codec"),
    [("00003.tar.gz", "gz"), ("00003.tar", "gz"), ("00003.tar.bz2", "bz2"), ("00003.tar.xz", "xz")],
)
def test_compressed_shard_writes_the_same_bytes_as_the_plain_tar(
    tmp_path: Path, name: str, codec: str
) -> None:
    plain = _plain(tmp_path / "plain")
    packed = _compressed(plain, tmp_path / "packed", name, codec)
    plain_uids, packed_uids = _uids(plain), _uids(packed)
    assert len(packed_uids) == 12
    if name == plain.name:  # same shard name, same derived uids
        assert packed_uids == plain_uids
    picked = [3, 4, 7, 8, 11]

    ref = write_subset(
        str(plain),
        _subset(tmp_path / "ref.txt", [plain_uids[i] for i in picked]),
        out=tmp_path / "ref",
        options=WriteOptions(max_samples=3),
    )
    want = [packed_uids[i] for i in picked]
    out = tmp_path / "out"
    report = write_subset(
        str(tmp_path / "packed" / "*"),
        _subset(tmp_path / "sub.txt", want),
        out=out,
        options=WriteOptions(max_samples=3),
    )
    assert report.written_uids == 5 and report.missing_uids == 0 and not report.failed_uids
    assert report.truncated == {} and report.shard_errors == {}
    assert report.shards == ref.shards == 2
    for tar in ("00000.tar", "00001.tar"):
        assert (out / tar).read_bytes() == (tmp_path / "ref" / tar).read_bytes()
    rows = [r for p in ("00000", "00001") for r in pq.read_table(out / f"{p}.parquet").to_pylist()]
    assert [r["uid"] for r in rows] == want
    assert {r["source_shard"] for r in rows} == {name}
    assert not (out / ".scratch").exists()


def test_truncated_tar_gz_keeps_its_earlier_samples(tmp_path: Path) -> None:
    plain = _plain(tmp_path / "plain", n=16)
    whole = gzip.compress(plain.read_bytes())
    packed = tmp_path / "packed" / "00003.tar.gz"
    packed.parent.mkdir()
    packed.write_bytes(whole[: len(whole) * 4 // 5])

    # Written: every sample ShardReader read whole, byte for byte; the cut one fails.
    records = list(ShardReader(str(packed), sidecar=False))
    ok = [r.uid for r in records if r.ok]
    assert len(ok) >= 3 and not records[-1].ok
    out = tmp_path / "out"
    report = write_subset(
        str(packed.parent / "*.tar.gz"),
        _subset(tmp_path / "s.txt", [*ok, records[-1].uid]),
        out=out,
    )
    assert report.written_uids == len(ok)
    assert report.failed_uids == {"truncated_shard": 1}
    assert list(report.truncated) == [str(packed)]
    keys = _keys_of(packed, ok)
    expected = [(n, d) for n, d in _members(plain) if n.partition(".")[0] in keys.values()]
    assert _members(out / "00000.tar") == expected
    assert not (out / ".scratch").exists()

    # Cut anywhere: the same samples, uids and failures as ShardReader.
    scratch = tmp_path / "scratch"
    for cut in (len(whole) // 3, len(whole) // 2, len(whole) * 4 // 5):
        packed.write_bytes(whole[:cut])
        records = list(reader := ShardReader(str(packed), sidecar=False))
        assert reader.truncated is not None
        index = index_shard(str(packed), scratch=scratch)
        assert index.truncated is not None
        assert [(s.key, s.uid) for s in index.samples] == [(r.key, r.uid) for r in records]
        assert [s.error is None for s in index.samples] == [r.ok for r in records]
        assert index.samples[-1].error is not None
        assert index.samples[-1].error.startswith("truncated_shard")
        assert index.data_path is not None and Path(index.data_path).parent == scratch
        Path(index.data_path).unlink()


def test_corrupt_gzip_keeps_the_samples_before_the_damage(tmp_path: Path) -> None:
    plain = _plain(tmp_path / "plain", n=16)
    whole = bytearray(gzip.compress(plain.read_bytes(), compresslevel=1))
    at = len(whole) * 3 // 4
    whole[at : at + 64] = bytes(range(64))
    packed = tmp_path / "packed" / "00003.tar"
    packed.parent.mkdir()
    packed.write_bytes(bytes(whole))
    records = list(ShardReader(str(packed), sidecar=False))
    ok = [r.uid for r in records if r.ok]
    assert 3 <= len(ok) < 16
    report = write_subset(
        str(packed), _subset(tmp_path / "s.txt", _uids(plain)), out=tmp_path / "out"
    )
    assert list(report.truncated) == [str(packed)]
    assert report.failed_uids.get("truncated_shard") == 1
    written = pq.read_table(tmp_path / "out" / "00000.parquet").column("uid").to_pylist()
    assert written[: len(ok)] == ok  # everything ShardReader got, and perhaps a little more
    keys = set(_keys_of(plain, written).values())
    assert _members(tmp_path / "out" / "00000.tar") == [
        (n, d) for n, d in _members(plain) if n.partition(".")[0] in keys
    ]


def test_scratch_copies_are_dropped_and_cleaned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = _plain(tmp_path / "plain")
    packed = _compressed(plain, tmp_path / "packed", "00003.tar.gz", "gz")
    scratch = tmp_path / "scratch"
    # A shard holding no wanted sample keeps no scratch copy.
    index = index_shard(str(packed), lambda uid: False, scratch=scratch)
    assert index.count == 12 and index.samples == [] and index.data_path is None
    assert list(scratch.iterdir()) == []
    # A plain tar is read where it is.
    assert index_shard(str(plain)).data_path is None

    # A killed run's leftovers go at the start; an error still removes the scratch folder.
    out = tmp_path / "out"
    (out / ".scratch").mkdir(parents=True)
    (out / ".scratch" / "old.tar").write_bytes(b"left over")
    subset = _subset(tmp_path / "s.txt", _uids(packed))

    def dying(*args: object, **kwargs: object) -> object:
        assert not (out / ".scratch" / "old.tar").exists()
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(stage, "_copy_sample", dying)
        with pytest.raises(RuntimeError, match="killed"):
            write_subset(str(packed.parent / "*"), subset, out=out)
    assert not (out / ".scratch").exists()


def test_write_cli_reads_tar_gz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = _plain(tmp_path / "plain")
    packed = _compressed(plain, tmp_path / "packed", "00003.tar.gz", "gz")
    uids = _uids(packed)
    args = ["write", str(tmp_path / "packed" / "*.tar.gz"), "--subset"]
    args += [str(_subset(tmp_path / "s.txt", uids[::2])), "--out", str(tmp_path / "out")]
    code, out, err = run_cli([*args, "--json", "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["written_uids"] == 6 and report["missing_uids"] == 0
    assert not (tmp_path / "out" / ".scratch").exists()
    assert [n for n, _ in _members(tmp_path / "out" / "00000.tar")] == [
        n for n, _ in _members(plain) if n.startswith(tuple(_keys_of(packed, uids[::2]).values()))
    ]


def test_many_small_shards_stay_under_the_open_file_limit(tmp_path: Path) -> None:
    """300 input shards feeding one output shard, with the open-file limit below 300."""
    resource = pytest.importorskip("resource")
    if not os.path.isdir("/dev/fd"):
        pytest.skip("needs /dev/fd to count open files")
    folder = tmp_path / "many"
    folder.mkdir()
    expected: dict[str, list[tuple[str, bytes]]] = {}
    for s in range(300):
        members = []
        for i in range(2):
            key = f"{s:05d}{i:04d}"
            members += [
                (f"{key}.jpg", f"image {key}".encode() * 3),
                (f"{key}.txt", f"caption {key}".encode()),
            ]
        write_tar(folder / f"{s:05d}.tar", members)
    uids = [s.uid for p in sorted(folder.glob("*.tar")) for s in index_shard(str(p)).samples]
    subset = _subset(tmp_path / "s.txt", uids)
    for name, data in (m for p in sorted(folder.glob("*.tar")) for m in _members(p)):
        expected.setdefault(name.partition(".")[0], []).append((name, data))

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir("/dev/fd") if fd.isdigit()}
    limit, free = 0, 0
    while free < 120:  # 120 free descriptors: far below the 300 shards, room for the rest
        free += limit not in used
        limit += 1
    if soft != resource.RLIM_INFINITY and soft < limit:
        pytest.skip(f"open-file limit {soft} already below {limit}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        report = write_subset(
            str(folder), subset, out=tmp_path / "out", options=WriteOptions(shuffle=True, seed=1)
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert report.shards == 1 and report.written_uids == 600
    written = _members(tmp_path / "out" / "00000.tar")
    keys = list(dict.fromkeys(n.partition(".")[0] for n, _ in written))
    assert sorted(keys) == sorted(expected)
    assert written == [m for k in keys for m in expected[k]]


def test_open_input_limit_is_bounded_in_all() -> None:
    for workers in (1, 4, 16, 1000):
        each = stage._open_limit(workers)
        assert 1 <= each <= stage.MAX_OPEN_INPUTS
        assert each * workers <= max(workers, stage.MAX_OPEN_TOTAL)
