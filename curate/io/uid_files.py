"""Uid files: DataComp subset `.npy`, parquet with a `uid` column, plain text (one uid per line).

A DataComp subset file is a numpy structured array of two unsigned 64-bit ints per uid, dtype
exactly ``np.dtype("u8,u8")`` (fields ``f0``, ``f1``: DataComp's resharder asserts
``subset.dtype == np.dtype("u8,u8")``, and numpy compares structured dtypes by field name),
**sorted** (the resharder binary-searches it, so an unsorted file silently loses samples there).
Reading accepts any 1-D structured dtype with exactly two little-endian uint64 fields (older
curate files named them ``u0``/``u1``), and, as the resharder does, a raw memmap of the same
16-byte records without a ``.npy`` header (``.bin``, or a headerless ``.npy``).

Reading keeps the file's multiplicity: ``UidList.uids`` is in file order with repeats, and
``UidList.duplicates`` counts the extra copies so callers decide whether repeats are an error,
a no-op (set algebra) or upweighting (``curate write --duplicates repeat``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import InputError
from curate.io.uids import is_uid
from curate.runtime.atomic import atomic_path

__all__ = [
    "DATACOMP_DTYPE",
    "UidList",
    "pairs_to_uids",
    "read_uid_file",
    "uids_to_pairs",
    "write_datacomp_npy",
]

DATACOMP_DTYPE = np.dtype("u8,u8")  # what the resharder asserts: fields f0, f1, native uint64
_RECORD = np.dtype("<u8,<u8")  # a raw memmap's records, read as little-endian
_NPY_MAGIC = b"\x93NUMPY"
RAW_SUFFIXES = (".bin", ".mmap", ".memmap", ".u16")
UID_FORMATS = (
    ".npy (DataComp), .bin (raw memmap of 16-byte records), .parquet (uid column), "
    ".txt (one uid per line)"
)


@dataclass
class UidList:
    """Uids read from one file, in file order, lowercased, repeats kept."""

    path: str
    uids: list[str]
    table: pa.Table | None = None  # the parquet's other columns, row-aligned with `uids`
    was_sorted: bool = True  # for .npy: whether the file was in DataComp order

    @property
    def duplicates(self) -> int:
        return len(self.uids) - len(set(self.uids))

    def repeated(self) -> Counter[str]:
        """Uids present more than once, with their count."""
        counts = Counter(self.uids)
        return Counter({uid: n for uid, n in counts.items() if n > 1})


def uids_to_pairs(uids: Sequence[str]) -> np.ndarray:
    """32-hex uids to DataComp's structured (f0, f1) array, in the given order."""
    out = np.empty(len(uids), dtype=DATACOMP_DTYPE)
    for i, uid in enumerate(uids):
        out[i] = (int(uid[:16], 16), int(uid[16:], 16))
    return out


_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i


def uid_bytes(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An Arrow column of 32-hex uids as an (n, 16) uint8 array: the 128 bits, big-endian, so
    ``.view(">u8")`` is DataComp's pair. Vectorised over Arrow's character buffer, 16 bytes
    per uid and no Python string per row; a null or malformed uid is a ValueError."""
    array = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    array = array.cast(pa.large_string())
    n = len(array)
    if n == 0:
        return np.zeros((0, 16), dtype=np.uint8)
    if array.null_count:
        raise ValueError("a uid column holds nulls")
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[array.offset : array.offset + n + 1]
    if not bool((np.diff(offsets) == 32).all()):
        raise ValueError("a uid is not 32 hex characters long")
    chars = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[0] + 32 * n]
    nibbles = _HEX_VALUE[chars].reshape(n, 16, 2)
    if bool((nibbles == 255).any()):
        raise ValueError("a uid holds a character that is not hexadecimal")
    return (nibbles[:, :, 0] << 4) | nibbles[:, :, 1]


def pairs_to_uids(pairs: np.ndarray) -> list[str]:
    """Inverse of ``uids_to_pairs`` for any two-uint64-field structured array."""
    first, second = pairs.dtype.names or ("", "")
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(pairs[first], pairs[second], strict=True)]


def write_datacomp_npy(path: Path, uids: Iterable[str]) -> int:
    """Write the sorted, de-duplicated uids as a DataComp subset file; returns how many."""
    unique = sorted({uid.lower() for uid in uids})  # hex order == (u0, u1) numeric order
    bad = next((u for u in unique if not is_uid(u)), None)
    if bad is not None:
        raise InputError(f"cannot write {path}: {bad!r} is not a 32-hex-character uid")
    array = uids_to_pairs(unique)
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    return len(unique)


def read_uid_file(path: Path | str) -> UidList:
    """Read a uid file by extension (a folder means its ``subset.parquet``); one-line errors."""
    path = Path(path)
    if path.is_dir():
        inner = path / "subset.parquet"
        if not inner.is_file():
            raise InputError(f"{path} is a folder without subset.parquet; give a uid file")
        path = inner
    if not path.is_file():
        raise InputError(f"uid file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy" or suffix in RAW_SUFFIXES:
        return _read_npy(path) if _has_npy_header(path) else _read_raw(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix in (".txt", ".uids", ".csv", ""):
        return _read_text(path)
    raise InputError(f"{path}: unknown uid file type {suffix!r}; use {UID_FORMATS}")


def _has_npy_header(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    except OSError as exc:
        raise InputError(f"cannot read uid file {path}: {exc.strerror or exc}") from None


def _read_raw(path: Path) -> UidList:
    """A headerless file of 16-byte little-endian (u64, u64) records, as DataComp memmaps it."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(64)
    seen = f"{size} bytes starting {head[:16]!r}"
    if size % _RECORD.itemsize:
        raise InputError(
            f"{path}: neither a .npy file (no {_NPY_MAGIC!r} header) nor a raw memmap of 16-byte "
            f"uid records (length not a multiple of 16): saw {seen}"
        )
    if head and all(32 <= byte < 127 or byte in b"\t\n\r" for byte in head):
        raise InputError(
            f"{path}: looks like text, not a .npy file or a raw memmap of 16-byte uid records "
            f"(saw {seen}); a list of hex uids, one per line, goes in a .txt file"
        )
    array = np.fromfile(path, dtype=_RECORD) if size else np.empty(0, dtype=_RECORD)
    return _from_pairs(path, array)


def _from_pairs(path: Path, array: np.ndarray) -> UidList:
    names = array.dtype.names or ("", "")
    a, b = array[names[0]], array[names[1]]
    was_sorted = bool(np.all((a[1:] > a[:-1]) | ((a[1:] == a[:-1]) & (b[1:] >= b[:-1]))))
    return UidList(str(path), pairs_to_uids(array), was_sorted=was_sorted)


def _read_npy(path: Path) -> UidList:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy file ({exc})") from exc
    names = array.dtype.names
    if (
        array.ndim != 1
        or names is None
        or len(names) != 2
        or any(array.dtype[n] != np.dtype("<u8") for n in names)
    ):
        raise InputError(
            f"{path}: dtype {array.dtype} with shape {array.shape} is not a DataComp subset "
            "(a 1-D array of two little-endian uint64 fields, np.dtype('u8,u8'))"
        )
    return _from_pairs(path, array)


def _read_parquet(path: Path) -> UidList:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from exc
    if "uid" not in table.column_names:
        raise InputError(f"{path}: no 'uid' column (columns: {', '.join(table.column_names)})")
    raw = table.column("uid").to_pylist()
    uids = _validated(path, raw, lambda i: f"row {i}")
    return UidList(str(path), uids, table=table)


def _read_text(path: Path) -> UidList:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable UTF-8 text file ({exc})") from exc
    numbered = [(n, line.strip()) for n, line in enumerate(lines, 1)]
    numbered = [(n, text) for n, text in numbered if text and not text.startswith("#")]
    if numbered and numbered[0][1].lower() == "uid":  # a one-column CSV's header
        numbered = numbered[1:]
    uids = _validated(path, [t for _, t in numbered], lambda i: f"line {numbered[i][0]}")
    return UidList(str(path), uids)


def _validated(path: Path, values: list[object], where: object) -> list[str]:
    out: list[str] = []
    for i, value in enumerate(values):
        if not is_uid(value):
            at = where(i)  # type: ignore[operator]
            raise InputError(f"{path}: {at} is not a 32-hex-character uid: {value!r}")
        out.append(str(value).lower())
    return out
