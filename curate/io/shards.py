"""Shard specs: turn what a user typed into an ordered list of shard URLs/paths, and open them.

A spec is one of
- a local directory: every ``*.tar`` directly inside it, sorted by name (compressed tars,
  ``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz``, count as tars everywhere);
- a glob: ``shards/*.tar`` (local or remote);
- a brace pattern: ``shards/{00000..00127}.tar`` (expanded with ``braceexpand``; may combine
  with globs);
- a list file: any existing file whose name does not end in ``.tar`` holds one path/URL per
  line; blank lines and ``#`` comments are skipped, relative paths are relative to the list
  file's folder. Lines are taken literally (no glob/brace expansion); local ones must exist,
  remote ones are checked when opened (one request per shard would make big lists slow);
- an fsspec URL (``s3://bucket/prefix/``, ``http://host/x.tar``, ``file:///data/x.tar``):
  directories and globs are listed through ``fsspec.core.url_to_fs`` / ``fs.ls`` / ``fs.glob``.

Local paths come back absolute; remote ones as URLs. Several specs concatenate, and repeats are
dropped keeping the first occurrence.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from typing import BinaryIO
from urllib.parse import urlsplit

import fsspec
from braceexpand import braceexpand
from fsspec.core import url_to_fs

from curate.errors import InputError, ShardOpenError

__all__ = [
    "TAR_SUFFIXES",
    "check_out_apart",
    "open_shard",
    "resolve_shards",
    "shard_basename",
    "shard_stems",
]

_GLOB_CHARS = re.compile(r"[*?\[]")
# A brace group braceexpand would expand: a comma list or a numeric/alpha range.
_BRACE_GROUP = re.compile(r"\{[^{}]*(,|\.\.)[^{}]*\}")
_QUOTE_HINT = "quote brace patterns in the shell, e.g. 'shards/{00000..00127}.tar'"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _is_url(spec: str) -> bool:
    """True for ``scheme://...`` specs (``file://`` included); Windows drives are not URLs."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", spec) is not None


def _is_http(spec: str) -> bool:
    return spec.lower().startswith(("http://", "https://"))


# A shard's name: a tar, or one compressed as a whole (tarfile's r|* reads them all).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def _tar_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in TAR_SUFFIXES if lower.endswith(s)), None)


def _is_tar_name(path: str) -> bool:
    return _tar_suffix(path) is not None


def shard_basename(url: str) -> str:
    """The shard file's name (``00000.tar``) from a path or URL, ignoring any query string."""
    path = urlsplit(url).path if _is_url(url) else url
    return posixpath.basename(path.replace(os.sep, "/").rstrip("/"))


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """Resolve one spec or several into shard paths/URLs (order kept, duplicates removed).

    Raises ``InputError`` with one line naming the spec when a path is missing or nothing matches.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise InputError("no shard spec given")
    out: list[str] = []
    seen: set[str] = set()
    for one in specs:
        for url in _resolve_one(os.fspath(one)):
            if url not in seen:
                seen.add(url)
                out.append(url)
    return out


def _resolve_one(spec: str) -> list[str]:
    spec = spec.strip()
    if not spec:
        raise InputError("empty shard spec")
    if _BRACE_GROUP.search(spec):
        return _resolve_braces(spec)
    if _is_url(spec):
        return _resolve_remote(spec)
    return _resolve_local(spec)


def _missing_message(spec: str) -> str:
    msg = f"shard spec {spec!r}: no such file or directory"
    if "{" in spec or "}" in spec:
        # A brace pattern braceexpand could not read (e.g. '{0...9}') or one the shell mangled.
        msg += f" (it contains a literal brace; {_QUOTE_HINT})"
    return msg


def _resolve_braces(spec: str) -> list[str]:
    """Expand braces, then resolve each piece; every expanded shard must exist."""
    pieces = list(braceexpand(spec))
    found: list[str] = []
    missing: list[str] = []
    listings: dict[str, set[str] | None] = {}
    for piece in pieces:
        if _GLOB_CHARS.search(piece):
            try:
                found.extend(_resolve_glob(piece))
            except InputError:
                missing.append(piece)
            continue
        if _is_url(piece):
            if _remote_exists(piece, listings):
                found.append(piece)
            else:
                missing.append(piece)
        elif os.path.isfile(piece):
            found.append(os.path.abspath(piece))
        else:
            missing.append(piece)
    if missing:
        raise InputError(
            f"brace pattern {spec!r} expanded to {len(pieces)} paths, {len(missing)} of them "
            f"missing (first: {missing[0]!r}); check the range, and {_QUOTE_HINT}"
        )
    return found


def _remote_exists(url: str, listings: dict[str, set[str] | None]) -> bool:
    """Existence of a remote shard, listing each parent folder once instead of one request each."""
    if _is_http(url):
        return True  # HTTP has no listing; a missing URL is reported when the shard is opened
    try:
        fs, path = url_to_fs(url)
        parent = posixpath.dirname(path.rstrip("/"))
        if parent not in listings:
            try:
                listings[parent] = {p.rstrip("/") for p in fs.ls(parent, detail=False)}
            except (FileNotFoundError, NotADirectoryError):
                listings[parent] = None
        names = listings[parent]
        return names is not None and path.rstrip("/") in names
    except (ImportError, ValueError, OSError) as exc:
        raise InputError(f"cannot access {url!r}: {exc}") from None


def _resolve_glob(spec: str) -> list[str]:
    if _is_url(spec):
        fs, path = _fs_for(spec)
        try:
            # detail=True gives types in the listing, saving one request per match.
            found = fs.glob(path, detail=True)
            matches = sorted(p for p, info in found.items() if info.get("type") != "directory")
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot list shard spec {spec!r}: {exc}") from None
        urls = [_unstrip(fs, spec, p) for p in matches]
    else:
        urls = sorted(
            os.path.abspath(p) for p in globlib.glob(os.path.expanduser(spec)) if os.path.isfile(p)
        )
    if not urls:
        raise InputError(f"shard spec {spec!r}: glob matched no files")
    return urls


def _resolve_local(spec: str) -> list[str]:
    if _GLOB_CHARS.search(spec):
        return _resolve_glob(spec)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        tars = sorted(
            os.path.join(os.path.abspath(path), name)
            for name in os.listdir(path)
            if _is_tar_name(name) and os.path.isfile(os.path.join(path, name))
        )
        if not tars:
            raise InputError(f"shard spec {spec!r}: directory holds no .tar files")
        return tars
    if os.path.isfile(path):
        if _is_tar_name(path):
            return [os.path.abspath(path)]
        with open(path, "rb") as fh:
            data = fh.read()
        return _parse_list(spec, data, base=os.path.dirname(os.path.abspath(path)), remote=None)
    raise InputError(_missing_message(spec))


def _fs_for(spec: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(spec)
    except (ImportError, ValueError) as exc:
        raise InputError(f"cannot access shard spec {spec!r}: {exc}") from None


def _unstrip(fs: fsspec.AbstractFileSystem, spec: str, path: str) -> str:
    """Turn a filesystem path back into a URL of the same scheme as the spec."""
    if _is_http(spec):
        return path  # HTTP paths are already full URLs
    return fs.unstrip_protocol(path)


def _resolve_remote(spec: str) -> list[str]:
    if _GLOB_CHARS.search(urlsplit(spec).path):
        return _resolve_glob(spec)
    if _is_http(spec) and _is_tar_name(urlsplit(spec).path):
        # No cheap existence check over HTTP (and isdir would fetch the body); opening reports it.
        return [spec]
    fs, path = _fs_for(spec)
    try:
        if fs.isdir(path):
            entries = fs.ls(path, detail=True)
            tars = sorted(
                e["name"]
                for e in entries
                if _is_tar_name(e["name"]) and e.get("type") != "directory"
            )
            if not tars:
                raise InputError(f"shard spec {spec!r}: directory holds no .tar files")
            return [_unstrip(fs, spec, p) for p in tars]
        if not fs.isfile(path):
            raise InputError(_missing_message(spec))
        if _is_tar_name(path):
            return [spec]
        with fs.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot access shard spec {spec!r}: {exc}") from None
    base_url = _unstrip(fs, spec, posixpath.dirname(path.rstrip("/")))
    return _parse_list(spec, data, base=None, remote=base_url)


def _parse_list(spec: str, data: bytes, *, base: str | None, remote: str | None) -> list[str]:
    """Parse a shard list file; ``base`` (local folder) or ``remote`` (URL folder) anchors
    relative lines."""
    if b"\0" in data:
        raise InputError(f"shard spec {spec!r}: not a .tar file and not a text list of shards")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(
            f"shard spec {spec!r}: not a .tar file and not a UTF-8 text list of shards"
        ) from None
    out: list[str] = []
    missing: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if _is_url(line):
            out.append(line)
        elif remote is not None:
            out.append(line if line.startswith("/") else remote.rstrip("/") + "/" + line)
        else:
            assert base is not None
            path = os.path.normpath(os.path.join(base, os.path.expanduser(line)))
            if os.path.isfile(path):
                out.append(path)
            else:
                missing.append(line)
    if missing:
        raise InputError(
            f"shard list {spec!r}: {len(missing)} listed shard(s) missing (first: {missing[0]!r})"
        )
    if not out:
        raise InputError(f"shard list {spec!r} names no shards")
    return out


def _split_path(url: str) -> list[str]:
    """Path components of a local path or URL, scheme and host kept as the first component."""
    if _is_url(url):
        parts = urlsplit(url)
        head = f"{parts.scheme}://{parts.netloc}"
        return [head, *[p for p in parts.path.split("/") if p]]
    return [p for p in os.path.abspath(url).replace(os.sep, "/").split("/") if p]


def _strip_tar(name: str) -> str:
    suffix = _tar_suffix(name)
    return name[: -len(suffix)] if suffix else name


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("_") or "shard"


def shard_stems(urls: Sequence[str]) -> dict[str, str]:
    """A unique, filesystem-safe stem per shard, for naming per-shard output files.

    The basename without ``.tar`` when basenames are unique; otherwise the path relative to the
    longest common parent folder with ``/`` replaced by ``__``. Any stem still colliding (after
    replacing unsafe characters) gets a short hash of its URL appended.
    """
    urls = list(dict.fromkeys(urls))
    bases = [_safe(_strip_tar(shard_basename(u))) for u in urls]
    if len(set(bases)) == len(bases):
        return dict(zip(urls, bases, strict=True))
    split = [_split_path(u) for u in urls]
    common = _common_prefix([s[:-1] for s in split])
    stems = [_safe("__".join([*s[len(common) : -1], _strip_tar(s[-1])])) for s in split]
    return dict(zip(urls, _dedupe(urls, stems), strict=True))


def _common_prefix(parts: Iterable[list[str]]) -> list[str]:
    parts = list(parts)
    if not parts:
        return []
    prefix = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(prefix), len(p)) and prefix[n] == p[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def _dedupe(urls: list[str], stems: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out = []
    for url, stem in zip(urls, stems, strict=True):
        if counts[stem] > 1:
            # Rare ('a__b/x' vs 'a/b__x', or unsafe characters folded together).
            stem = f"{stem}_{hashlib.blake2b(url.encode('utf-8'), digest_size=4).hexdigest()}"
        out.append(stem)
    return out


def open_shard(url: str) -> BinaryIO:
    """Open a shard for binary streaming through fsspec; ``ShardOpenError`` names the shard."""
    try:
        return fsspec.open(url, "rb").open()
    except Exception as exc:  # fsspec backends raise many types (ImportError, aiohttp, botocore)
        reason = str(exc) or type(exc).__name__
        raise ShardOpenError(f"cannot open shard {url}: {reason}") from exc


_SIGNATURE_FIELDS = ("size", "mtime", "LastModified", "last_modified", "ETag", "etag", "md5Hash")


def source_signature(url: str) -> dict[str, str] | None:
    """Size plus modification time or ETag of a shard, as strings; None if it cannot be stat'ed.

    Sizes alone miss rewrites (tar sizes are rounded to 10 KiB blocks), hence the second field.
    """
    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except Exception:
        return None
    signature = {k: str(info[k]) for k in _SIGNATURE_FIELDS if info.get(k) is not None}
    return signature or None


def check_out_apart(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output folder that is an input or the folder holding an input file: a folder or
    glob given as input would read the stage's own outputs back on the next run. `inputs`: the
    resolved input files (globs are expanded); remote ones are never local. A subfolder of the
    inputs' folder is fine: no stage reads subfolders."""
    if _is_url(os.fspath(out)):
        return
    target = os.path.realpath(os.path.expanduser(os.fspath(out)))
    for given in inputs:
        spec = os.fspath(given)
        if _is_url(spec):
            continue
        spec = os.path.expanduser(spec)
        paths = globlib.glob(spec) if _GLOB_CHARS.search(spec) else [spec]
        for path in paths:
            real = os.path.realpath(path)
            if target == real:
                raise InputError(f"--out {out} is the input {given}; pick a new folder")
            if os.path.isfile(real) and os.path.dirname(real) == target:
                raise InputError(
                    f"--out {out} is the folder of the input {path}: a rerun could read its own "
                    "outputs as input; pick a new folder"
                )
