"""ShardReader: every sample written comes back exactly once, OK or with a failure code."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest
from shardkit import make_image_bytes, make_shard, sample_members, write_sidecar, write_tar

from curate.errors import ShardOpenError
from curate.io.images import SampleError, decode_image
from curate.io.tar_reader import FAILURE_CODES, RawSample, ShardReader
from curate.io.uids import derive_uid, pair_to_uid, uid_from_meta, uid_to_pair

JPG = make_image_bytes("jpg", "RGB", seed=7)
VALID_UID = "0123456789abcdef0123456789ABCDEF"


def _read(path: Path | str, **kw: bool) -> list[RawSample]:
    return list(ShardReader(str(path), **kw))


def _codes(samples: list[RawSample]) -> dict[str, str | None]:
    return {s.key: s.error_code for s in samples}


def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size), to cut a tar at a precise place."""
    with tarfile.open(path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers()}


def _cut(path: Path, at: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:at])


# --- clean shards and uids -------------------------------------------------------------------


def test_clean_shard(tmp_path: Path) -> None:
    path = tmp_path / "00003.tar"
    keys = make_shard(path, 5, shard_index=3)
    samples = _read(path)
    assert [s.key for s in samples] == keys == [f"0000300{i:02d}" for i in range(5)]
    for i, s in enumerate(samples):
        assert s.ok and s.error is None and s.error_code is None
        assert s.shard == "00003.tar"
        assert s.image_ext == "jpg"
        assert s.caption == f"a photo of sample {i}"
        assert s.meta is not None and s.meta["key"] == s.key
        assert s.uid == derive_uid("00003.tar", s.key)
        assert decode_image(s.image or b"").size == (32, 32)
    assert len({s.uid for s in samples}) == 5


def test_derived_uid_is_stable() -> None:
    expect = hashlib.blake2b(b"00000.tar/000000000", digest_size=16).hexdigest()
    assert expect == "65b2d53028a77c63fd73dd13803fc7af"
    assert derive_uid("00000.tar", "000000000") == expect


def test_uid_from_json_when_valid(tmp_path: Path) -> None:
    uids = {0: VALID_UID, 1: "0123", 2: "g" * 32, 3: None}
    path = tmp_path / "00000.tar"
    keys = make_shard(path, 4, uid_fn=uids.get)
    samples = _read(path)
    assert samples[0].uid == VALID_UID.lower()
    for s in samples[1:]:
        assert s.uid == derive_uid("00000.tar", s.key)
    assert [s.key for s in samples] == keys


def test_uid_from_meta_and_pairs() -> None:
    assert uid_from_meta({"uid": VALID_UID}) == VALID_UID.lower()
    assert uid_from_meta({"uid": 12}) is None
    assert uid_from_meta({"uid": VALID_UID + "0"}) is None
    assert uid_from_meta({}) is None
    assert uid_from_meta(None) is None
    uid = VALID_UID.lower()
    pair = uid_to_pair(uid)
    assert pair == (int(uid[:16], 16), int(uid[16:], 16))
    assert pair_to_uid(*pair) == uid
    assert pair_to_uid(0, 1) == "0" * 31 + "1"
    with pytest.raises(ValueError):
        uid_to_pair("xyz")
    with pytest.raises(ValueError):
        pair_to_uid(-1, 0)


def test_no_json_derives_uid(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    make_shard(path, 2, with_json=False)
    samples = _read(path)
    assert all(s.ok and s.meta is None for s in samples)
    assert samples[1].uid == derive_uid("00000.tar", samples[1].key)


def test_bad_json_is_noted_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    write_tar(
        path,
        [
            *sample_members("a", image=JPG),
            ("a.json", b"{not json"),
            *sample_members("b", image=JPG),
            ("b.json", b"[1, 2]"),
            *sample_members("c", image=JPG),
            ("c.json", b'{"uid": "\xff"}'),
        ],
    )
    samples = _read(path)
    assert [s.ok for s in samples] == [True, True, True]
    assert all(s.meta is None for s in samples)
    assert all((s.note or "").startswith("bad_json: ") for s in samples)
    assert samples[0].uid == derive_uid("00000.tar", "a")


# --- bad samples -----------------------------------------------------------------------------


def test_bad_samples(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    write_tar(
        path,
        [
            *sample_members("ok", image=JPG, meta={"uid": VALID_UID}),
            *sample_members("noimg", image=None),
            *sample_members("nocap", image=JPG, caption=None),
            *sample_members("latin1", image=JPG, caption="caf\xe9".encode("latin-1")),
            *sample_members("empty", image=JPG, caption=""),
            *sample_members("blank", image=JPG, caption=" \n\t "),
            *sample_members("zero", image=b""),
            *sample_members("junk", image=b"not an image"),
        ],
    )
    samples = _read(path)
    assert _codes(samples) == {
        "ok": None,
        "noimg": "missing_image",
        "nocap": "missing_caption",
        "latin1": "caption_not_utf8",
        "empty": "empty_caption",
        "blank": "empty_caption",
        "zero": None,
        "junk": None,
    }
    by_key = {s.key: s for s in samples}
    for s in samples:
        if not s.ok:
            assert s.error is not None and s.error.startswith(f"{s.error_code}: ")
            assert s.error_code in FAILURE_CODES
            assert s.image is None
    # Image bytes are decoded later, in workers; the reader passes them through.
    assert by_key["zero"].image == b""
    with pytest.raises(SampleError, match="empty_image"):
        decode_image(by_key["zero"].image or b"")
    with pytest.raises(SampleError, match="image_decode"):
        decode_image(by_key["junk"].image or b"")


def test_duplicate_key_later_occurrence_fails(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    write_tar(
        path,
        [
            *sample_members("k1", image=JPG, caption="first", meta={"uid": VALID_UID}),
            *sample_members("k2", image=JPG),
            *sample_members("k1", image=JPG, caption="second", meta={"uid": VALID_UID}),
            *sample_members("k1", image=JPG, caption="third"),
        ],
    )
    samples = _read(path)
    assert [(s.key, s.error_code) for s in samples] == [
        ("k1", None),
        ("k2", None),
        ("k1", "duplicate_key"),
        ("k1", "duplicate_key"),
    ]
    assert samples[0].caption == "first" and samples[0].uid == VALID_UID.lower()
    assert len({s.uid for s in samples}) == 4  # every record keeps a distinct uid


def test_member_selection_and_ignored_members(tmp_path: Path) -> None:
    png = make_image_bytes("png", "RGB", seed=1)
    webp = make_image_bytes("webp", "RGB", seed=2)
    path = tmp_path / "00000.tar"
    write_tar(
        path,
        [
            ("__meta__.json", b"{}"),
            ("a.txt", b"caption a"),
            ("a.PNG", png),
            ("a.jpg", JPG),
            ("a.npy", b"\x93NUMPY"),
            ("./b.webp", webp),
            ("b.txt", b"caption b"),
            ("noext", b"x"),
            ("c.JPEG", JPG),
            ("c.txt", b"  padded caption \n"),
        ],
    )
    samples = _read(path)
    assert [(s.key, s.image_ext, s.caption) for s in samples] == [
        ("a", "png", "caption a"),
        ("b", "webp", "caption b"),
        ("c", "jpeg", "  padded caption \n"),  # as written: matching decides what to strip
    ]
    assert samples[0].image == png
    assert all(s.ok for s in samples)


def test_caption_is_kept_as_written_bom_included(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    write_tar(path, sample_members("a", image=JPG, caption="\ufeffhello \xa0".encode()))
    sample = _read(path)[0]
    assert sample.ok and sample.caption == "\ufeffhello \xa0"


def test_gzipped_tar(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tar"
    make_shard(plain, 3)
    path = tmp_path / "00000.tar"
    path.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
    assert [s.ok for s in _read(path)] == [True] * 3


# --- shards that cannot be opened ------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"this is not a tar file at all\n" * 50, b"", b"\x1f\x8b\x08garbage", b"short"],
    ids=["text", "empty", "bad-gzip", "short"],
)
def test_not_a_tar(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "00000.tar"
    path.write_bytes(content)
    with pytest.raises(ShardOpenError, match=r"cannot open shard .*00000\.tar"):
        _read(path)


def test_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(ShardOpenError, match=r"00009\.tar"):
        _read(tmp_path / "00009.tar")


# --- truncation and the sidecar --------------------------------------------------------------


def test_truncated_inside_member_data(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    keys = make_shard(path, 6)
    offset, size = _member_offsets(path)[f"{keys[3]}.jpg"]
    _cut(path, offset + size // 2)
    reader = ShardReader(str(path))
    samples = list(reader)
    assert [(s.key, s.error_code) for s in samples] == [
        (keys[0], None),
        (keys[1], None),
        (keys[2], None),
        (keys[3], "truncated_shard"),
    ]
    assert reader.truncated is not None and "00000.tar" in reader.truncated
    assert reader.sidecar_note is not None  # no sidecar here


def test_truncated_shard_with_sidecar_accounts_for_all(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    keys = make_shard(path, 6)
    lost = ["000000098", "000000099"]
    write_sidecar(
        tmp_path / "00000.parquet",
        [*keys, *lost],
        ["success"] * 6 + ["failed_to_download", "failed_to_resize"],
    )
    offset, size = _member_offsets(path)[f"{keys[2]}.txt"]
    _cut(path, offset + size // 2)
    reader = ShardReader(str(path))
    samples = list(reader)
    assert _codes(samples) == {
        keys[0]: None,
        keys[1]: None,
        keys[2]: "truncated_shard",
        keys[3]: "missing_from_tar",
        keys[4]: "missing_from_tar",
        keys[5]: "missing_from_tar",
    }
    assert len(samples) == len(keys)
    missing = samples[-1]
    assert missing.uid == derive_uid("00000.tar", keys[5])
    assert missing.caption == f"caption {keys[5]}"
    assert "truncated" in (missing.error or "")
    assert [s.key for s in _read(path, sidecar=False)] == keys[:3]


def test_cut_between_samples(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    keys = make_shard(path, 4)
    offset, size = _member_offsets(path)[f"{keys[1]}.json"]
    end = offset + (size + 511) // 512 * 512
    # Exactly at a member boundary, and half-way through the next header.
    for at in (end, end + 100):
        _cut(path, at)
        samples = _read(path)
        assert [s.error_code for s in samples] == [None, "truncated_shard"]
        make_shard(path, 4)


def test_corrupt_header_mid_stream(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    keys = make_shard(path, 4)
    offset, _ = _member_offsets(path)[f"{keys[2]}.jpg"]
    data = bytearray(path.read_bytes())
    data[offset - 512 : offset - 400] = b"\xab" * 112  # garble the header of key 2's image
    path.write_bytes(bytes(data))
    reader = ShardReader(str(path))
    samples = list(reader)
    assert [s.error_code for s in samples] == [None, "truncated_shard"]
    assert "header" in (reader.truncated or "")


def test_sidecar_accounting_on_clean_shard(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    keys = make_shard(path, 3)
    write_sidecar(
        tmp_path / "00000.parquet",
        [keys[0], "000000050", keys[1], "000000051", keys[2], "000000050"],
        ["success", "success", "success", "failed_to_download", "success", "success"],
    )
    samples = _read(path)
    assert [(s.key, s.error_code) for s in samples] == [
        (keys[0], None),
        (keys[1], None),
        (keys[2], None),
        ("000000050", "missing_from_tar"),
    ]


def test_unreadable_sidecar_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    make_shard(path, 2)
    (tmp_path / "00000.parquet").write_bytes(b"not parquet")
    reader = ShardReader(str(path))
    assert [s.ok for s in reader] == [True, True]
    assert "00000.parquet" in (reader.sidecar_note or "")


def test_remote_shard_and_sidecar(tmp_path: Path) -> None:
    local = tmp_path / "00000.tar"
    keys = make_shard(local, 3)
    write_sidecar(tmp_path / "00000.parquet", [*keys, "000000077"])
    fs = fsspec.filesystem("memory")
    root = f"/reader-{uuid.uuid4().hex}"
    try:
        fs.pipe(f"{root}/00000.tar", local.read_bytes())
        fs.pipe(f"{root}/00000.parquet", (tmp_path / "00000.parquet").read_bytes())
        samples = _read(f"memory://{root}/00000.tar")
    finally:
        fs.rm(root, recursive=True)
    assert [s.error_code for s in samples] == [None, None, None, "missing_from_tar"]
    assert samples[0].shard == "00000.tar"
    assert samples[0].uid == derive_uid("00000.tar", keys[0])


def test_iterating_twice_and_stopping_early(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    make_shard(path, 4)
    reader = ShardReader(str(path))
    first = [s.uid for s in reader]
    assert [s.uid for s in reader] == first
    for s in reader:  # breaking off must close the file (no ResourceWarning)
        assert s.ok
        break


# --- invariant: OK + failed == samples written -----------------------------------------------


def _fx_clean(d: Path) -> tuple[Path, int]:
    return d / "00000.tar", len(make_shard(d / "00000.tar", 7))


def _fx_bad(d: Path) -> tuple[Path, int]:
    path = d / "00000.tar"
    write_tar(
        path,
        [
            *sample_members("a", image=JPG),
            *sample_members("b", image=None),
            *sample_members("c", image=JPG, caption=None),
            *sample_members("d", image=JPG, caption=b"\xff\xfe"),
            *sample_members("e", image=JPG, caption="   "),
            *sample_members("a", image=JPG),
            *sample_members("f", image=b""),
            *sample_members("g", image=JPG),
            ("g.json", b"{oops"),
        ],
    )
    return path, 8


def _fx_truncated(d: Path) -> tuple[Path, int]:
    path = d / "00000.tar"
    keys = make_shard(path, 9)
    write_sidecar(d / "00000.parquet", [*keys, "000000090"], ["success"] * 9 + ["failed_to_resize"])
    offset, size = _member_offsets(path)[f"{keys[4]}.jpg"]
    _cut(path, offset + size - 1)
    return path, 9


def _fx_duplicates(d: Path) -> tuple[Path, int]:
    path = d / "00000.tar"
    members = []
    for key in ["x", "y", "x", "z", "y", "x"]:
        members += sample_members(key, image=JPG)
    write_tar(path, members)
    return path, 6


@pytest.mark.parametrize(
    "fixture",
    [_fx_clean, _fx_bad, _fx_truncated, _fx_duplicates],
    ids=["clean", "bad", "truncated", "duplicates"],
)
def test_every_sample_accounted_for(
    tmp_path: Path, fixture: Callable[[Path], tuple[Path, int]]
) -> None:
    path, written = fixture(tmp_path)
    samples = _read(path)
    ok = [s for s in samples if s.ok]
    failed = [s for s in samples if not s.ok]
    assert len(ok) + len(failed) == written
    assert all(s.error_code in FAILURE_CODES for s in failed)
    assert all(len(s.uid) == 32 for s in samples)
    assert len({s.uid for s in samples}) == written
    counts = Counter(s.error_code for s in samples)
    assert sum(counts.values()) == written
    json.dumps([s.error for s in samples])  # errors are plain strings
