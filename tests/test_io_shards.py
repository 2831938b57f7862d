"""Shard spec resolution, output stems and opening."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from shardkit import make_shard, write_tar

from curate.errors import InputError, ShardOpenError
from curate.io.shards import open_shard, resolve_shards, shard_basename, shard_stems


def _shards(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.tar"
        write_tar(path, [(f"{i:05d}0000.txt", b"x")])
        paths.append(str(path))
    return paths


@pytest.fixture
def memfs() -> Iterator[str]:
    """A private folder on fsspec's in-memory filesystem, standing in for a remote store."""
    fs = fsspec.filesystem("memory")
    root = f"/curate-test-{uuid.uuid4().hex}"
    fs.mkdir(root)
    yield root
    fs.rm(root, recursive=True)


def test_directory_lists_tars_sorted(tmp_path: Path) -> None:
    paths = _shards(tmp_path, 3)
    (tmp_path / "00000.parquet").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.tar").mkdir()  # a folder named like a tar is not a shard
    assert resolve_shards(str(tmp_path)) == paths


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no \.tar files"):
        resolve_shards(str(tmp_path))


def test_glob(tmp_path: Path) -> None:
    paths = _shards(tmp_path, 3)
    assert resolve_shards(str(tmp_path / "*.tar")) == paths
    assert resolve_shards(str(tmp_path / "0000[02].tar")) == [paths[0], paths[2]]
    with pytest.raises(InputError, match="matched no files"):
        resolve_shards(str(tmp_path / "*.tgz"))


def test_brace_pattern(tmp_path: Path) -> None:
    paths = _shards(tmp_path, 4)
    assert resolve_shards(f"{tmp_path}/{{00000..00002}}.tar") == paths[:3]
    assert resolve_shards(f"{tmp_path}/{{00003,00001}}.tar") == [paths[3], paths[1]]


def test_brace_pattern_with_missing_shards(tmp_path: Path) -> None:
    _shards(tmp_path, 3)
    with pytest.raises(InputError) as info:
        resolve_shards(f"{tmp_path}/{{00000..00009}}.tar")
    msg = str(info.value)
    assert "\n" not in msg
    assert "expanded to 10 paths, 7 of them missing" in msg
    assert "00003.tar" in msg
    assert "quote" in msg


def test_unexpanded_brace_hint(tmp_path: Path) -> None:
    _shards(tmp_path, 2)
    # Three dots: not a range braceexpand knows, so the brace stays literal.
    spec = f"{tmp_path}/{{00000...00001}}.tar"
    with pytest.raises(InputError) as info:
        resolve_shards(spec)
    assert "quote" in str(info.value)
    assert "{00000...00001}" in str(info.value)
    with pytest.raises(InputError, match="literal brace"):
        resolve_shards(f"{tmp_path}/{{00000}}.tar")


def test_list_file(tmp_path: Path) -> None:
    paths = _shards(tmp_path / "data", 3)
    other = _shards(tmp_path / "elsewhere", 1)[0]
    listing = tmp_path / "shards.txt"
    listing.write_text(
        "# my shards\n\n"
        "data/00002.tar\n"
        f"  {other}  \n"
        "data/00000.tar\n"
        "   # indented comment\n"
        "s3://bucket/remote/00007.tar\n"
    )
    assert resolve_shards(str(listing)) == [
        paths[2],
        other,
        paths[0],
        "s3://bucket/remote/00007.tar",
    ]


def test_list_file_with_missing_entry(tmp_path: Path) -> None:
    _shards(tmp_path, 1)
    listing = tmp_path / "list"
    listing.write_text("00000.tar\n00001.tar\n00002.tar\n")
    with pytest.raises(InputError, match=r"2 listed shard\(s\) missing \(first: '00001.tar'\)"):
        resolve_shards(str(listing))


def test_empty_list_file(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="names no shards"):
        resolve_shards(str(listing))


def test_binary_non_tar_file_is_not_a_list(tmp_path: Path) -> None:
    path = tmp_path / "shard.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\0\0")
    with pytest.raises(InputError, match=r"not a \.tar file"):
        resolve_shards(str(path))


def test_compressed_tar_names_are_shards(tmp_path: Path) -> None:
    """A .tar.gz (or .tgz, .tar.bz2, .tar.xz) is a shard, alone or in a folder, not a list."""
    names = ["a.tar.gz", "b.TGZ", "c.tar.bz2", "d.tar.xz", "e.tar"]
    for name in names:
        (tmp_path / name).write_bytes(b"\x1f\x8b\x08\x00\0\0")
    paths = [str(tmp_path / n) for n in names]
    assert resolve_shards(paths[0]) == [paths[0]]
    assert resolve_shards(str(tmp_path)) == sorted(paths)
    assert shard_stems(paths) == dict(zip(paths, ["a", "b", "c", "d", "e"], strict=True))


def test_single_tar_and_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _shards(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    assert resolve_shards("00001.tar") == [paths[1]]
    assert resolve_shards(Path("00001.tar")) == [paths[1]]  # type: ignore[arg-type]


def test_missing_path_names_spec(tmp_path: Path) -> None:
    spec = str(tmp_path / "nope" / "00000.tar")
    with pytest.raises(InputError) as info:
        resolve_shards(spec)
    assert spec in str(info.value)
    assert "no such file" in str(info.value)


def test_several_specs_concatenate_without_duplicates(tmp_path: Path) -> None:
    paths = _shards(tmp_path, 3)
    got = resolve_shards([paths[2], str(tmp_path), f"{tmp_path}/{{00000..00001}}.tar"])
    assert got == [paths[2], paths[0], paths[1]]
    with pytest.raises(InputError):
        resolve_shards([])


def test_file_url(tmp_path: Path) -> None:
    paths = _shards(tmp_path, 3)
    url = f"file://{paths[1]}"
    assert resolve_shards(url) == [url]
    assert resolve_shards(f"file://{tmp_path}") == [f"file://{p}" for p in paths]
    assert resolve_shards(f"file://{tmp_path}/*.tar") == [f"file://{p}" for p in paths]
    assert resolve_shards(f"file://{tmp_path}/{{00000,00002}}.tar") == [
        f"file://{paths[0]}",
        f"file://{paths[2]}",
    ]
    with pytest.raises(InputError, match="no such file"):
        resolve_shards(f"file://{tmp_path}/00009.tar")
    with pytest.raises(InputError, match="1 of them missing"):
        resolve_shards(f"file://{tmp_path}/{{00001..00003}}.tar")


def test_remote_directory_glob_and_list(memfs: str) -> None:
    fs = fsspec.filesystem("memory")
    for name in ["00001.tar", "00000.tar", "00000.parquet"]:
        fs.pipe(f"{memfs}/shards/{name}", b"x")
    fs.pipe(f"{memfs}/list.txt", b"shards/00001.tar\n# c\nhttp://h/x.tar\n")
    expect = [f"memory://{memfs}/shards/00000.tar", f"memory://{memfs}/shards/00001.tar"]
    assert resolve_shards(f"memory://{memfs}/shards/") == expect
    assert resolve_shards(f"memory://{memfs}/shards/*.tar") == expect
    assert resolve_shards(f"memory://{memfs}/shards/{{00000..00001}}.tar") == expect
    assert resolve_shards(f"memory://{memfs}/list.txt") == [expect[1], "http://h/x.tar"]
    with pytest.raises(InputError, match="no such file"):
        resolve_shards(f"memory://{memfs}/shards/00005.tar")
    with pytest.raises(InputError, match="1 of them missing"):
        resolve_shards(f"memory://{memfs}/shards/{{00000..00002}}.tar")


def test_http_tar_url_is_taken_as_given() -> None:
    # No network access: a plain HTTP shard URL is not probed (opening reports problems).
    assert resolve_shards(["http://host/a/00000.tar", "https://host/a/00001.tar"]) == [
        "http://host/a/00000.tar",
        "https://host/a/00001.tar",
    ]


def test_unknown_protocol_is_input_error() -> None:
    with pytest.raises(InputError, match="nosuchproto://"):
        resolve_shards("nosuchproto://bucket/x/")


def test_shard_basename() -> None:
    assert shard_basename("/data/shards/00042.tar") == "00042.tar"
    assert shard_basename("s3://bucket/p/00042.tar") == "00042.tar"
    assert shard_basename("https://h/p/00042.tar?sig=abc") == "00042.tar"
    assert shard_basename("00042.tar") == "00042.tar"


def test_stems_unique_basenames() -> None:
    urls = ["/a/00000.tar", "/b/00001.tar", "s3://x/y/00002.tar"]
    assert shard_stems(urls) == {
        "/a/00000.tar": "00000",
        "/b/00001.tar": "00001",
        "s3://x/y/00002.tar": "00002",
    }


def test_stems_collisions_use_relative_path() -> None:
    urls = ["/data/cc12m/00000.tar", "/data/cc12m/00001.tar", "/data/laion/sub/00000.tar"]
    assert shard_stems(urls) == {
        "/data/cc12m/00000.tar": "cc12m__00000",
        "/data/cc12m/00001.tar": "cc12m__00001",
        "/data/laion/sub/00000.tar": "laion__sub__00000",
    }
    remote = ["s3://bucket/a/00000.tar", "s3://bucket/b/00000.tar"]
    assert shard_stems(remote) == {remote[0]: "a__00000", remote[1]: "b__00000"}


def test_stems_stay_unique_and_safe() -> None:
    urls = ["/d/a__b/x.tar", "/d/a/b__x.tar", "/e/weird name!.tar", "/f/weird name!.tar"]
    stems = shard_stems(urls)
    assert len(set(stems.values())) == len(urls)
    for stem in stems.values():
        assert stem and all(c.isalnum() or c in "._-" for c in stem)
        assert "/" not in stem


def test_open_shard(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    make_shard(path, 1)
    with open_shard(str(path)) as fh:
        assert len(fh.read(512)) == 512
    with open_shard(f"file://{path}") as fh:
        assert fh.read(1)
    missing = str(tmp_path / "00001.tar")
    with pytest.raises(ShardOpenError, match=re.escape(f"cannot open shard {missing}: ")):
        open_shard(missing)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_open_shard_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    make_shard(path, 1)
    path.chmod(0)
    try:
        with pytest.raises(ShardOpenError, match="cannot open shard"):
            open_shard(str(path))
    finally:
        path.chmod(0o644)
