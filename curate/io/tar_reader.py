"""Streaming reader for img2dataset/WebDataset shards that accounts for every sample.

``ShardReader(url)`` yields one ``RawSample`` per sample, in tar order, reading the tar as a
stream (``tarfile`` mode ``r|*``; only the current sample is held in memory). A sample is the
run of adjacent members sharing a key (the member name up to the first dot of its last path
component); members whose key starts with ``__`` and members with other extensions are ignored.
Per sample: the image is the first ``.jpg/.jpeg/.png/.webp`` member in tar order (extension
case-insensitive), the caption the ``.txt`` member, the metadata the ``.json`` member. Image bytes
are not decoded here (workers call ``curate.io.images.decode_image``), so a zero-length image is
passed through and reported later as ``empty_image``.

Failure records (``RawSample.error == "code: detail"``), in order of precedence:

- ``duplicate_key``: the key already appeared earlier in this shard; the first occurrence stays,
  the later one fails. A member name repeated inside a run of adjacent same-key members (e.g.
  ``k.jpg k.txt k.jpg k.txt``) starts a new, duplicate sample. A duplicate's uid is derived from
  ``f"{key}#{n}"`` (n = 2, 3, ...) so that every record of a shard has a distinct uid even when
  the repeat carries the same json uid.
- ``unsafe_member_name``: the key is an absolute path or has a ``..`` component (``../x.jpg``,
  ``/abs/x.jpg``, ``a/../../x.jpg``); such samples are never copied anywhere.
- ``sparse_member``, ``member_too_large``: an image/txt/json member is a sparse file (GNU or PAX;
  its claimed size is never materialised) or larger than ``max_member_bytes()`` (64 MiB,
  ``CURATE_MAX_MEMBER_BYTES`` overrides); its data is skipped, not read, and the shard goes on.
- ``missing_image``, ``missing_caption``, ``caption_not_utf8``, ``empty_caption`` (empty or
  only whitespace, `is_blank_caption`). OK captions are returned exactly as decoded: not
  stripped, a BOM kept (matching and any normalisation are the consumer's business, the same
  for every source).
- ``truncated_shard``: the stream ended abruptly or was corrupt (short member data, a cut or
  garbled header, no end-of-archive marker). The sample being assembled when that happened fails
  with this code (its remaining members may have been lost), reading stops, and
  ``reader.truncated`` holds the error text.
- ``missing_from_tar``: with ``sidecar=True`` and an img2dataset sidecar ``NNNNN.parquet`` beside
  the tar, one record per sidecar row with status ``success`` whose key never appeared in the tar
  (emitted after the tar, in sidecar order). Rows with other statuses never became samples and are
  not reported. A missing or unreadable sidecar is silently skipped (``reader.sidecar_note`` says
  why); shards given by URLs with a query string have no sidecar lookup.

Decision on unparsable ``.json``: not a failure. The sample stays OK with ``meta=None`` (its uid
is then derived) and ``RawSample.note`` reads ``"bad_json: ..."``. Metadata is optional in
WebDataset and the image/caption pair is still usable.

If the shard cannot be opened at all (missing, unreadable, not a tar) iteration raises
``ShardOpenError`` naming the shard before yielding anything.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import fsspec

from curate.errors import InputError, ShardOpenError, failure_code
from curate.io.shards import open_shard, shard_basename
from curate.io.uids import derive_uid, uid_from_meta

__all__ = [
    "CAPTION_WHITESPACE",
    "FAILURE_CODES",
    "IMAGE_EXTS",
    "EndAwareTarInfo",
    "RawSample",
    "ShardReader",
    "is_blank_caption",
    "is_unsafe_key",
    "max_member_bytes",
    "member_problem",
    "parse_meta",
    "sample_uid",
    "split_member_name",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FAILURE_CODES = (
    "duplicate_key",
    "unsafe_member_name",
    "sparse_member",
    "member_too_large",
    "missing_image",
    "missing_caption",
    "caption_not_utf8",
    "empty_caption",
    "truncated_shard",
    "missing_from_tar",
)
_WANTED = frozenset((*IMAGE_EXTS, "txt", "json"))
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024


def max_member_bytes() -> int:
    """The largest member read or copied: ``CURATE_MAX_MEMBER_BYTES`` (bytes), else 64 MiB."""
    raw = os.environ.get("CURATE_MAX_MEMBER_BYTES")
    if raw is None:
        return DEFAULT_MAX_MEMBER_BYTES
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"CURATE_MAX_MEMBER_BYTES must be a positive byte count, got {raw!r}")
    return value


def member_problem(member: tarfile.TarInfo, limit: int) -> str | None:
    """``"code: detail"`` when a member must not be read: sparse, or over `limit` bytes."""
    if member.issparse():
        return f"sparse_member: {member.name} is a sparse file claiming {member.size} bytes"
    if member.size > limit:
        return f"member_too_large: {member.name} has {member.size} bytes (limit {limit})"
    return None


def is_unsafe_key(key: str) -> bool:
    """True for a key that would escape a folder: absolute, or with a ``..`` component."""
    return key.startswith("/") or ".." in key.split("/")


# Every character with str.isspace(): what str.strip() removes, spelled out for polars'
# strip_chars (whose default, Unicode White_Space, leaves out U+001C..U+001F).
CAPTION_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


@dataclass
class RawSample:
    """One input sample as read from a shard; ``error`` is ``"code: detail"`` or None when OK."""

    key: str
    uid: str
    shard: str
    image: bytes | None
    image_ext: str | None
    caption: str | None
    meta: dict[str, Any] | None
    error: str | None
    note: str | None = None  # non-fatal remark, e.g. "bad_json: ..."

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def error_code(self) -> str | None:
        return None if self.error is None else failure_code(self.error)


@dataclass
class _Group:
    """Members of the sample being assembled."""

    key: str
    image: bytes | None = None
    image_ext: str | None = None
    caption: bytes | None = None
    meta: bytes | None = None
    exts: set[str] = field(default_factory=set)
    problem: str | None = None  # the first refused member (sparse, too large)

    def add(self, ext: str, data: bytes | str) -> None:
        self.exts.add(ext)
        if isinstance(data, str):  # a refused member: its problem, never its data
            self.problem = self.problem or data
            return
        # The first member of each role wins; later ones of the same role are ignored.
        if ext in IMAGE_EXTS:
            if self.image is None:
                self.image, self.image_ext = data, ext
        elif ext == "txt":
            if self.caption is None:
                self.caption = data
        elif ext == "json" and self.meta is None:
            self.meta = data


class EndAwareTarInfo(tarfile.TarInfo):
    """Records why the stream ended: tarfile treats a cut or garbled header as a clean end."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EmptyHeaderError:
            tarfile_._curate_bad_end = "tar ended without an end-of-archive marker"  # type: ignore[attr-defined]
            raise
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            tarfile_._curate_bad_end = f"corrupt or cut member header ({exc})"  # type: ignore[attr-defined]
            raise


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, lowercased extension) of a member name, or None for members that are not samples."""
    name = name.removeprefix("./")
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or stem.startswith("__"):
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _norm_key(key: object) -> str:
    """Compare digit keys by value so a sidecar storing ints still matches '000000042'."""
    text = str(key)
    return str(int(text)) if text.isascii() and text.isdigit() else text


def _sidecar_url(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        return None
    if not url.lower().endswith(".tar"):
        return None
    return url[:-4] + ".parquet"


class ShardReader:
    """Iterate the samples of one shard (see the module docstring for the failure codes).

    Each ``iter()`` re-reads the shard; one iteration at a time per reader.
    """

    def __init__(self, url: str, *, sidecar: bool = True) -> None:
        self.url = url
        self.shard = shard_basename(url)
        self.sidecar = sidecar
        self.truncated: str | None = None
        self.sidecar_note: str | None = None

    def __repr__(self) -> str:
        return f"ShardReader({self.url!r}, sidecar={self.sidecar})"

    def __iter__(self) -> Iterator[RawSample]:
        return self._iterate()

    def _iterate(self) -> Iterator[RawSample]:
        self.truncated = None
        self.sidecar_note = None
        seen: dict[str, int] = {}
        fh = open_shard(self.url)
        try:
            tf = self._open_tar(fh)
            group: _Group | None = None
            for key, ext, data in self._members(tf):
                if data is None:
                    # Truncation marker: ``key`` is the sample whose member was cut, if known.
                    if key is not None and (group is None or key != group.key):
                        if group is not None:
                            yield self._finish(group, seen)
                        group = _Group(key)
                    break
                # A repeated member name means the same key started over: a new (duplicate) sample.
                if group is not None and (key != group.key or ext in group.exts):
                    yield self._finish(group, seen)
                    group = None
                if group is None:
                    group = _Group(key)
                group.add(ext, data)
            if group is not None:
                yield self._finish(group, seen, truncated=self.truncated)
        finally:
            fh.close()
        if self.sidecar:
            yield from self._missing_from_tar(seen)

    def _open_tar(self, fh: BinaryIO) -> tarfile.TarFile:
        try:
            return tarfile.open(fileobj=fh, mode="r|*", tarinfo=EndAwareTarInfo)
        except Exception as exc:  # ReadError, gzip/zlib/lzma errors, I/O errors
            reason = str(exc) or type(exc).__name__
            raise ShardOpenError(
                f"cannot open shard {self.url}: not a readable tar ({reason})"
            ) from exc

    def _members(self, tf: tarfile.TarFile) -> Iterator[tuple[str | None, str, bytes | str | None]]:
        """(key, ext, data) for the wanted members; data is the problem text of a refused one.

        On a stream error it sets ``self.truncated`` and ends with the marker
        ``(key, "", None)``, key being that of the last member header read (None when unknown).
        """
        last_key: str | None = None
        limit = max_member_bytes()
        while True:
            try:
                member = tf.next()
                tf.members = []  # tarfile keeps every header otherwise; stay O(1) in memory
                if member is None:
                    bad_end = getattr(tf, "_curate_bad_end", None)
                    if bad_end:
                        self.truncated = f"{self.shard}: {bad_end}"
                        yield last_key, "", None
                    return
                if not member.isreg():
                    continue
                parsed = split_member_name(member.name)
                last_key = parsed[0] if parsed is not None else None
                if parsed is None or parsed[1] not in _WANTED:
                    continue
                problem = member_problem(member, limit)
                if problem is not None:
                    yield parsed[0], parsed[1], problem
                    continue
                fobj = tf.extractfile(member)
                data = fobj.read() if fobj is not None else b""
            except Exception as exc:  # ReadError, EOFError, zlib/lzma, network errors mid-stream
                self.truncated = f"{self.shard}: {type(exc).__name__}: {exc}"
                yield last_key, "", None
                return
            yield parsed[0], parsed[1], data

    def _finish(
        self, group: _Group, seen: dict[str, int], *, truncated: str | None = None
    ) -> RawSample:
        key = group.key
        count = seen.get(key, 0) + 1
        seen[key] = count
        meta, note = parse_meta(group.meta)
        uid = sample_uid(self.shard, key, meta, count)
        caption: str | None = None
        caption_error: str | None = None
        if group.caption is not None:
            try:
                caption = group.caption.decode("utf-8")
            except UnicodeDecodeError as exc:
                caption_error = f"caption_not_utf8: {exc}"

        error: str | None
        if truncated is not None:
            error = f"truncated_shard: sample cut short ({truncated})"
        elif count > 1:
            error = f"duplicate_key: key {key!r} already appeared earlier in {self.shard}"
        elif is_unsafe_key(key):
            error = f"unsafe_member_name: key {key!r} is absolute or has a '..' component"
        elif group.problem is not None:
            error = group.problem
        elif group.image is None:
            error = f"missing_image: no .jpg/.jpeg/.png/.webp member for key {key!r}"
        elif group.caption is None:
            error = f"missing_caption: no .txt member for key {key!r}"
        elif caption_error is not None:
            error = caption_error
        elif is_blank_caption(caption):
            error = f"empty_caption: caption of key {key!r} is empty or whitespace"
        else:
            error = None

        ok = error is None
        return RawSample(
            key=key,
            uid=uid,
            shard=self.shard,
            image=group.image if ok else None,  # failures carry no pixels to the workers
            image_ext=group.image_ext,
            caption=caption,
            meta=meta,
            error=error,
            note=note,
        )

    def _missing_from_tar(self, seen: dict[str, int]) -> Iterator[RawSample]:
        rows = self._sidecar_rows()
        if rows is None:
            return
        present = {_norm_key(k) for k in seen}
        why = " (shard truncated)" if self.truncated else ""
        for key, caption in rows:
            norm = _norm_key(key)
            if norm in present:
                continue
            present.add(norm)  # a key repeated in the sidecar is reported once
            yield RawSample(
                key=key,
                uid=derive_uid(self.shard, key),
                shard=self.shard,
                image=None,
                image_ext=None,
                caption=caption,
                meta=None,
                error=f"missing_from_tar: sidecar lists key {key!r} as success{why}",
            )

    def _sidecar_rows(self) -> list[tuple[str, str | None]] | None:
        """(key, caption) of the sidecar's success rows, or None when there is no usable one."""
        url = _sidecar_url(self.url)
        if url is None:
            self.sidecar_note = "no sidecar lookup for this URL"
            return None
        try:
            import pyarrow.parquet as pq

            with fsspec.open(url, "rb") as fh:
                pf = pq.ParquetFile(fh)
                names = set(pf.schema_arrow.names)
                if not {"key", "status"} <= names:
                    self.sidecar_note = f"{url}: no key/status columns"
                    return None
                cols = ["key", "status"] + (["caption"] if "caption" in names else [])
                table = pf.read(columns=cols)
        except Exception as exc:  # absent or unreadable sidecars are optional by contract
            self.sidecar_note = f"{url}: {type(exc).__name__}: {exc}"
            return None
        data = table.to_pydict()
        captions = data.get("caption") or [None] * table.num_rows
        rows = []
        for key, status, caption in zip(data["key"], data["status"], captions, strict=True):
            if status != "success" or key is None:
                continue
            rows.append((str(key), caption if isinstance(caption, str) else None))
        self.sidecar_note = f"{url}: used"
        return rows


def is_blank_caption(caption: str) -> bool:
    """True for a caption that is empty or only whitespace (``str.isspace``: no-break and
    ideographic spaces, information separators ...; not a BOM). The caption itself is kept."""
    return not caption.strip()


def sample_uid(shard: str, key: str, meta: dict[str, Any] | None, occurrence: int = 1) -> str:
    """The uid of the `occurrence`-th sample with `key` in `shard` (see the module docstring)."""
    if occurrence > 1:
        return derive_uid(shard, f"{key}#{occurrence}")
    return uid_from_meta(meta) or derive_uid(shard, key)


def parse_meta(raw: bytes | None) -> tuple[dict[str, Any] | None, str | None]:
    """Parsed ``.json`` metadata and a ``bad_json`` note when it is unusable."""
    if raw is None:
        return None, None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        return None, f"bad_json: {_one_line(str(exc))}"
    if not isinstance(meta, dict):
        return None, f"bad_json: top level is {type(meta).__name__}, not an object"
    return meta, None


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
