"""Header-only index of a WebDataset shard: where each sample's members lie, without reading images.

``index_shard(url)`` walks the tar's headers with seeks (``tarfile`` mode ``r:``), reading only
the ``.json`` members (for DataComp uids), and returns one ``IndexedSample`` per sample with
the byte offset and size of every member. Samples are grouped exactly as ``ShardReader`` groups
them (adjacent image/txt/json members sharing a key; a repeated image/txt/json extension starts a
new, duplicate sample; other members neither start nor end a sample) and get the same uid and
the same structural failure (truncated, duplicate, no image, no caption), so a uid from a scores
table finds its bytes here. Members whose key starts with ``__`` are not samples and are skipped;
every other member of a sample is indexed, whatever its extension, so copies carry all of them.

Compressed shards (gzip, bzip2, xz, sniffed from the first bytes as ``tarfile``'s ``r|*`` does,
whatever the name) cannot be seeked into: with a ``scratch`` folder they are decompressed once,
streaming, into a file there, and indexed from it (``ShardIndex.data_path``); uids still come
from the original shard name. A decompression error keeps the bytes before it: the shard is
``truncated`` and the sample it cut fails, as in ``ShardReader``."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from curate.errors import ShardOpenError
from curate.io.shards import open_shard, shard_basename
from curate.io.tar_reader import (
    IMAGE_EXTS,
    EndAwareTarInfo,
    is_unsafe_key,
    max_member_bytes,
    member_problem,
    parse_meta,
    sample_uid,
    split_member_name,
)

__all__ = ["IndexedSample", "Member", "ShardIndex", "index_shard"]

_WANTED = frozenset((*IMAGE_EXTS, "txt", "json"))  # the members ShardReader groups by
_CHUNK = 1 << 20  # most decompressed bytes read at once from a compressed shard


@dataclass(frozen=True)
class Member:
    """One tar member of a sample: the name after the key (``"jpg"``, ``"scores.json"``)."""

    ext: str
    offset: int  # of the data, not the header
    size: int
    problem: str | None = None  # sparse or over the member limit: never copied


@dataclass
class IndexedSample:
    """A sample's key, uid and members; ``error`` says why it cannot be copied as is."""

    key: str
    uid: str
    members: list[Member] = field(default_factory=list)
    error: str | None = None

    @property
    def data_bytes(self) -> int:
        return sum(m.size for m in self.members)


@dataclass
class ShardIndex:
    """The samples of one shard in tar order: all of them, or only those whose uid is `wanted`
    (the others are only counted, so memory follows the subset, not the pool)."""

    url: str
    shard: str
    samples: list[IndexedSample]
    size: int  # of the tar the offsets point into (decompressed, for a compressed shard)
    truncated: str | None = None
    count: int = 0  # every sample of the shard, wanted or not
    data_path: str | None = None  # decompressed copy of a compressed shard; None: read `url`


_Opener = Callable[[BinaryIO], io.BufferedIOBase]


def _decompressor(head: bytes) -> _Opener | None:
    """The decompressing reader for a shard starting with `head`, None for a plain tar: the
    signatures ``tarfile``'s ``r|*`` knows (a name is no guide: gzip data is often named .tar)."""
    if head.startswith(b"\x1f\x8b\x08"):
        return lambda fh: gzip.GzipFile(fileobj=fh, mode="rb")
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return bz2.BZ2File
    if head.startswith((b"\xfd7zXZ\x00", b"\x5d\x00\x00\x80")):
        return lzma.LZMAFile
    return None


def index_shard(
    url: str, wanted: Callable[[str], bool] | None = None, *, scratch: Path | None = None
) -> ShardIndex:
    """Index `url`; samples whose uid fails `wanted` are kept without their member list.

    A compressed shard is decompressed into a new file in `scratch` (module doc), deleted again
    when no sample is wanted; without `scratch` it raises ``ShardOpenError``.
    """
    shard = shard_basename(url)
    with open_shard(url) as fh:
        head = fh.read(10)
        fh.seek(0)
        opener = _decompressor(head)
        if opener is None:
            return _index_tar(fh, url, shard, wanted)
        if scratch is None:
            raise ShardOpenError(f"cannot open shard {url}: compressed, and no scratch folder")
        copy, broken = _decompress(opener, fh, Path(scratch), shard)
    keep = False
    try:
        with open(copy, "rb") as data:
            try:
                index = _index_tar(data, url, shard, wanted)
            except ShardOpenError as exc:
                if broken is None:
                    raise
                raise ShardOpenError(f"cannot open shard {url}: {broken}") from exc
        if broken is not None:  # the root cause, wherever the tar walk noticed the cut
            index.truncated = f"{shard}: {broken}"
        keep = wanted is None or bool(index.samples)
        index.data_path = str(copy) if keep else None
        return index
    finally:
        if not keep:
            copy.unlink(missing_ok=True)


def _decompress(
    opener: _Opener, fh: BinaryIO, scratch: Path, shard: str
) -> tuple[Path, str | None]:
    """Stream the decompressed shard into a new scratch file: its path, and the error when
    decompression broke off (the bytes before it are kept)."""
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{shard}.", suffix=".tar", dir=scratch)
    broken: str | None = None
    try:
        with os.fdopen(fd, "wb") as out, opener(fh) as stream:
            while True:
                try:  # read1: one decompression step, so an error loses little output
                    chunk = stream.read1(_CHUNK)
                except Exception as exc:  # EOFError, zlib/bz2/lzma errors, I/O errors
                    broken = f"{type(exc).__name__}: {exc}"
                    break
                if not chunk:
                    break
                out.write(chunk)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name), broken


def _index_tar(
    fh: BinaryIO, url: str, shard: str, wanted: Callable[[str], bool] | None
) -> ShardIndex:
    size = _size_of(fh)
    try:
        tf = tarfile.open(fileobj=fh, mode="r:", tarinfo=EndAwareTarInfo)  # noqa: SIM115
    except Exception as exc:
        raise ShardOpenError(f"cannot open shard {url}: not a readable tar ({exc})") from exc
    return _walk(tf, fh, url, shard, size, wanted)


def _size_of(fh: BinaryIO) -> int:
    fh.seek(0, 2)
    size = fh.tell()
    fh.seek(0)
    return size


class _Group:
    def __init__(self, key: str, members: list[Member] | None = None) -> None:
        self.key = key
        self.members: list[Member] = members or []
        self.names: set[str] = {m.ext for m in self.members}  # every member name (after the key)
        self.wanted: set[str] = set()  # lowercased image/txt/json extensions, as ShardReader's
        self.meta_raw: bytes | None = None
        self.cut = False


def _walk(
    tf: tarfile.TarFile,
    fh: BinaryIO,
    url: str,
    shard: str,
    size: int,
    wanted: Callable[[str], bool] | None,
) -> ShardIndex:
    """Group like ``ShardReader``: only image/txt/json members decide where samples start and
    end; other members ride along with the sample of their key that they sit in (or, just
    before it, start), and are dropped where ShardReader would see no sample for them."""
    samples: list[IndexedSample] = []
    total = 0
    seen: dict[str, int] = {}
    truncated: str | None = None
    group: _Group | None = None
    pending: list[tuple[str, Member]] = []  # (key, other member) waiting for its sample to start
    last_key: str | None = None  # key of the last regular member header (ShardReader's marker)
    limit = max_member_bytes()

    def finish(g: _Group) -> None:
        count = seen.get(g.key, 0) + 1
        seen[g.key] = count
        meta, _ = parse_meta(g.meta_raw)
        uid = sample_uid(shard, g.key, meta, count)
        error = None
        if g.cut:
            error = "truncated_shard: member data cut short"
        elif count > 1:
            error = f"duplicate_key: key {g.key!r} already appeared earlier in {shard}"
        elif is_unsafe_key(g.key):
            error = f"unsafe_member_name: key {g.key!r} is absolute or has a '..' component"
        elif any(m.problem for m in g.members):
            error = next(m.problem for m in g.members if m.problem)
        elif not g.wanted & set(IMAGE_EXTS):
            error = f"missing_image: no image member for key {g.key!r}"
        elif "txt" not in g.wanted:
            error = f"missing_caption: no .txt member for key {g.key!r}"
        nonlocal total
        total += 1
        if wanted is None or wanted(uid):
            samples.append(IndexedSample(g.key, uid, g.members, error))

    def start(key: str) -> _Group:
        nonlocal pending
        mine: dict[str, Member] = {}
        for k, m in pending:  # a repeated name keeps its last copy, the one nearest the sample
            if k == key:
                mine.pop(m.ext, None)
                mine[m.ext] = m
        pending = []
        return _Group(key, list(mine.values()))

    while True:
        try:
            member = tf.next()
            tf.members = []  # keep memory O(1) in members
        except Exception as exc:
            truncated = f"{shard}: {type(exc).__name__}: {exc}"
            break
        if member is None:
            bad_end = getattr(tf, "_curate_bad_end", None)
            if bad_end:
                truncated = f"{shard}: {bad_end}"
            break
        if not member.isreg():
            continue
        parsed = split_member_name(member.name)
        last_key = parsed[0] if parsed is not None else None
        problem = member_problem(member, limit)
        if not member.issparse() and member.offset_data + member.size > size:
            truncated = f"{shard}: member {member.name} cut short"
            break
        if parsed is None:
            continue
        key, lower = parsed
        ext = member.name.rpartition("/")[2].partition(".")[2]
        item = Member(ext, member.offset_data, member.size, problem)
        if lower not in _WANTED:
            if (
                group is not None
                and key == group.key
                and ext not in group.names
                and all(k != key for k, _ in pending)
            ):
                group.names.add(ext)
                group.members.append(item)
            else:
                pending.append((key, item))
            continue
        if group is not None and (key != group.key or lower in group.wanted):
            finish(group)
            group = None
        if group is None:
            group = start(key)
        else:  # extras of this key held back mid-sample repeat a name: no place for them
            pending = [(k, m) for k, m in pending if k != key]
        group.names.add(ext)
        group.wanted.add(lower)
        group.members.append(item)
        if lower == "json" and group.meta_raw is None and problem is None:
            fh.seek(member.offset_data)
            group.meta_raw = fh.read(member.size)
    if truncated is not None and last_key is not None and (group is None or last_key != group.key):
        # ShardReader: the sample whose member was being read when the tar broke is the cut one.
        if group is not None:
            finish(group)
        group = start(last_key)
    if group is not None:
        group.cut = truncated is not None
        finish(group)
    return ShardIndex(url, shard, samples, size, truncated, total)
