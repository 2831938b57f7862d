"""Hostile tar members (issue 13): sparse files, oversized members and unsafe names fail their own
sample and never cost the shard's good samples, in ShardReader, the write index and write."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from curate.io.tar_index import index_shard
from curate.io.tar_reader import ShardReader
from curate.writing.stage import write_subset

CLAIMED = 2 << 30  # what the sparse member says it holds
SPARSE_IN_THE_MIDDLE: list[tuple[str, bytes | None]] = [
    ("000.jpg", b"a"),
    ("000.txt", b"zero"),
    ("001.jpg", None),  # sparse
    ("001.txt", b"one"),
    ("002.jpg", b"c"),
    ("002.txt", b"two"),
]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _add_sparse(tf: tarfile.TarFile, name: str, claimed: int) -> None:
    """A PAX (GNU 1.0) sparse member: one hole of `claimed` bytes, no data stored."""
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(claimed),
    }
    sparse_map = f"1\n{claimed}\n0\n".encode().ljust(512, b"\0")
    info.size = len(sparse_map)
    tf.addfile(info, io.BytesIO(sparse_map))


def _shard(path: Path, members: list[tuple[str, bytes | None]]) -> str:
    """`None` data makes a sparse member claiming CLAIMED bytes."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            if data is None:
                _add_sparse(tf, name, CLAIMED)
            else:
                _add(tf, name, data)
    return str(path)


def _errors(url: str) -> dict[str, str | None]:
    return {s.key: s.error_code for s in ShardReader(url, sidecar=False)}


def _index_errors(url: str) -> dict[str, str | None]:
    index = index_shard(url)
    assert index.truncated is None
    return {s.key: (s.error or "").partition(":")[0] or None for s in index.samples}


def test_sparse_member_fails_its_sample_only(tmp_path: Path) -> None:
    url = _shard(
        tmp_path / "00000.tar",
        SPARSE_IN_THE_MIDDLE,
    )
    want = {"000": None, "001": "sparse_member", "002": None}
    assert _errors(url) == want
    assert _index_errors(url) == want


def test_oversized_member_fails_its_sample_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CURATE_MAX_MEMBER_BYTES", "100")
    url = _shard(
        tmp_path / "00000.tar",
        [
            ("000.jpg", b"a" * 101),
            ("000.txt", b"zero"),
            ("001.jpg", b"b"),
            ("001.txt", b"one"),
            ("002.jpg", b"c"),
            ("002.cls", b"x" * 500),
            ("002.txt", b"two"),
        ],
    )
    want = {"000": "member_too_large", "001": None, "002": "member_too_large"}
    assert _index_errors(url) == want  # write copies every member, so .cls counts there
    assert _errors(url) == {**want, "002": None}  # the reader never reads .cls


def test_unsafe_member_names_fail(tmp_path: Path) -> None:
    members: list[tuple[str, bytes | None]] = []
    for key in ("../x", "/abs/y", "a/../../z", "ok", "sub/ok"):
        members += [(f"{key}.jpg", b"i"), (f"{key}.txt", key.encode())]
    url = _shard(tmp_path / "00000.tar", members)
    want = {k: "unsafe_member_name" for k in ("../x", "/abs/y", "a/../../z")}
    want |= {"ok": None, "sub/ok": None}
    assert _errors(url) == want
    assert _index_errors(url) == want


def test_write_keeps_the_samples_after_a_sparse_member(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    url = _shard(
        tmp_path / "in" / "00000.tar",
        SPARSE_IN_THE_MIDDLE,
    )
    uids = {s.key: s.uid for s in ShardReader(url, sidecar=False)}
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(uids.values()) + "\n")
    report = write_subset(url, subset, out=tmp_path / "out")
    assert report.failed_uids == {"sparse_member": 1}
    assert report.truncated == {}
    with tarfile.open(tmp_path / "out" / "00000.tar") as tf:
        names = sorted(tf.getnames())
    assert names == ["000.jpg", "000.txt", "002.jpg", "002.txt"]
