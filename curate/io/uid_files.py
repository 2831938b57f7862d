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

import codecs
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import InputError
from curate.io.uids import is_uid
from curate.runtime.atomic import atomic_path

__all__ = [
    "DATACOMP_DTYPE",
    "UidList",
    "first_occurrences",
    "member_mask",
    "pairs_to_uids",
    "read_uid_file",
    "read_uid_pairs",
    "repeated_groups",
    "repeats",
    "sorted_positions",
    "uid_pairs",
    "uids_to_pairs",
    "write_datacomp_npy",
    "write_datacomp_pairs",
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


_SEARCH_ROWS = 1 << 20  # rows per binary-search chunk: its temporaries stay a few MB
_KEY_PARTS = 8  # `repeated_groups` sorts one eighth of the keys at a time (a power of two)
_PIECE_ROWS = 1 << 20  # member rows `repeated_groups` yields at once (one group may be more)


def uid_pairs(uids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A column of uids as DataComp's pair, two native uint64 arrays (hi, lo: 16 bytes a row),
    and a mask of the rows that hold a 32-hex uid (either case); the others (null, wrong
    length, not hex, not a string) are 0 in hi and lo. Vectorised over Arrow's character buffer:
    no Python string per row."""
    array = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    n = len(array)
    hi, lo = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64)
    try:
        array = array.cast(pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return hi, lo, np.zeros(n, dtype=bool)
    if n == 0:
        return hi, lo, np.zeros(0, dtype=bool)
    lengths = pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    valid = lengths == 32
    if not valid.all():
        array = pc.if_else(pa.array(valid), array, "0" * 32)
        array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[array.offset : array.offset + n + 1]
    chars = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[0] + 32 * n]
    nibbles = _HEX_VALUE[chars].reshape(n, 32)
    valid &= (nibbles != 255).all(axis=1)
    nibbles[~valid] = 0
    for half, target in ((nibbles[:, :16], hi), (nibbles[:, 16:], lo)):
        for k in range(16):
            target <<= np.uint64(4)
            target |= half[:, k]
    return hi, lo, valid


def repeated_groups(keys: np.ndarray, candidates: np.ndarray) -> Iterator[np.ndarray]:
    """The candidate rows whose 64-bit key another candidate row shares, as ascending row
    indices, a piece of about `_PIECE_ROWS` rows at a time (a group of equal keys is never
    split). The keys are taken `_KEY_PARTS` ranges of their top bits at a time, so the sorted
    copy that finds the repeated values holds a fraction of the candidates; a piece's members
    are found by binary search a chunk of rows at a time."""
    shift = np.uint64(64 - _KEY_PARTS.bit_length() + 1)
    for part in range(_KEY_PARTS):
        in_part = np.zeros(keys.size, dtype=bool)
        for start in range(0, keys.size, _SEARCH_ROWS):
            rows = slice(start, start + _SEARCH_ROWS)
            in_part[rows] = candidates[rows] & ((keys[rows] >> shift) == part)
        values = keys[in_part]
        del in_part
        values.sort()  # in place: runs of equal keys, without np.unique's second copy
        starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
        sizes = np.diff(np.append(starts, values.size))
        repeated, sizes = values[starts[sizes > 1]], sizes[sizes > 1]
        del values, starts
        # Pieces of about _PIECE_ROWS member rows (a larger group is a piece of its own).
        targets = np.arange(1, int(sizes.sum()) // _PIECE_ROWS + 2) * _PIECE_ROWS
        ends = np.searchsorted(np.cumsum(sizes), targets, side="right")
        bounds = np.unique(np.concatenate([[0], np.minimum(ends, repeated.size)]))
        for low, high in itertools.pairwise(bounds.tolist()):
            wanted = repeated[low:high]
            in_group = np.zeros(keys.size, dtype=bool)
            for start in range(0, keys.size, _SEARCH_ROWS):
                rows = slice(start, start + _SEARCH_ROWS)
                at = np.minimum(np.searchsorted(wanted, keys[rows]), wanted.size - 1)
                in_group[rows] = candidates[rows] & (wanted[at] == keys[rows])
            members = np.flatnonzero(in_group)
            del in_group
            yield members


def _repeat_pieces(
    hi: np.ndarray, lo: np.ndarray, candidates: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`repeats`' pairs, a piece of the repeated hi values at a time (not in row order)."""
    for members in repeated_groups(hi, candidates):
        by_uid = members[np.lexsort((members, lo[members], hi[members]))]
        del members
        new = np.ones(by_uid.size, dtype=bool)
        new[1:] = (hi[by_uid][1:] != hi[by_uid][:-1]) | (lo[by_uid][1:] != lo[by_uid][:-1])
        run_start = np.maximum.accumulate(np.where(new, np.arange(by_uid.size), 0))
        yield by_uid[~new], by_uid[run_start[~new]]


def repeats(
    hi: np.ndarray, lo: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, firsts): the candidate rows whose uid (hi, lo) an earlier candidate row has, in
    row order, and that first row for each. Finds the hi values seen twice (real repeats, or a
    64-bit collision: `repeated_groups`) and orders only the rows holding those by (uid, row),
    a piece of those hi values at a time (so a table of mostly repeated rows needs no more)."""
    pieces = list(_repeat_pieces(hi, lo, candidates))
    rows = np.concatenate([np.zeros(0, np.int64), *(r for r, _ in pieces)])
    firsts = np.concatenate([np.zeros(0, np.int64), *(f for _, f in pieces)])
    order = np.argsort(rows)
    return rows[order], firsts[order]


def first_occurrences(hi: np.ndarray, lo: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Mask of the candidate rows whose uid no earlier candidate row has (`repeats`, without
    collecting the repeated rows)."""
    first = candidates.copy()
    for rows, _ in _repeat_pieces(hi, lo, candidates):
        first[rows] = False
    return first


def member_mask(
    hi: np.ndarray, lo: np.ndarray, want_hi: np.ndarray, want_lo: np.ndarray, where: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, found): `rows` marks the rows whose uid is among the wanted ones; `found` marks,
    for each distinct wanted uid in (hi, lo) order, whether a row in `where` has it. Binary
    search over the sorted wanted uids, a chunk of rows at a time."""
    w_hi, w_lo = want_hi, want_lo
    ascending = (w_hi[1:] > w_hi[:-1]) | ((w_hi[1:] == w_hi[:-1]) & (w_lo[1:] > w_lo[:-1]))
    if not ascending.all():  # a DataComp file is sorted and distinct already: no copies then
        del ascending
        order = np.lexsort((want_lo, want_hi))
        w_hi, w_lo = want_hi[order], want_lo[order]
        del order
        distinct = np.ones(w_hi.size, dtype=bool)
        distinct[1:] = (w_hi[1:] != w_hi[:-1]) | (w_lo[1:] != w_lo[:-1])
        w_hi, w_lo = w_hi[distinct], w_lo[distinct]
    rows = np.zeros(hi.size, dtype=bool)
    found = np.zeros(w_hi.size, dtype=bool)
    for start in range(0, hi.size, _SEARCH_ROWS):  # a chunk's positions at a time: few MB
        stop = start + _SEARCH_ROWS
        at = sorted_positions(w_hi, w_lo, hi[start:stop], lo[start:stop])
        rows[start:stop] = hit = at >= 0
        found[at[hit & where[start:stop]]] = True
    return rows, found


def sorted_positions(
    w_hi: np.ndarray, w_lo: np.ndarray, hi: np.ndarray, lo: np.ndarray
) -> np.ndarray:
    """Where each uid (hi, lo) is among the sorted, distinct uids (w_hi, w_lo): an int64 index,
    -1 when absent. Binary search, a chunk of rows at a time."""
    positions = np.full(hi.size, -1, dtype=np.int64)
    if w_hi.size == 0:
        return positions
    for start in range(0, hi.size, _SEARCH_ROWS):
        h, lo_ = hi[start : start + _SEARCH_ROWS], lo[start : start + _SEARCH_ROWS]
        left = np.searchsorted(w_hi, h, side="left")
        right = np.searchsorted(w_hi, h, side="right")
        out = positions[start : start + h.size]
        # Within equal hi (at most a few, by chance), the wanted lo are sorted: search them.
        for extra in range(int((right - left).max(initial=0))):
            at = np.minimum(left + extra, w_hi.size - 1)
            hit = (left + extra < right) & (w_lo[at] == lo_)
            out[hit] = at[hit]
    return positions


def write_datacomp_pairs(path: Path, hi: np.ndarray, lo: np.ndarray) -> int:
    """`write_datacomp_npy` from uint64 pairs: sorted, de-duplicated; returns how many."""
    order = np.lexsort((lo, hi))
    array = np.empty(order.size, dtype=DATACOMP_DTYPE)
    array["f0"], array["f1"] = hi[order], lo[order]
    if array.size:
        keep = np.ones(array.size, dtype=bool)
        keep[1:] = (array["f0"][1:] != array["f0"][:-1]) | (array["f1"][1:] != array["f1"][:-1])
        array = array[keep]
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    return int(array.size)


def pairs_to_uids(pairs: np.ndarray) -> list[str]:
    """Inverse of ``uids_to_pairs`` for any two-uint64-field structured array."""
    first, second = pairs.dtype.names or ("", "")
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(pairs[first], pairs[second], strict=True)]


def write_datacomp_npy(path: Path, uids: Iterable[str] | pa.Array | pa.ChunkedArray) -> int:
    """Write the sorted, de-duplicated uids (any case) as a DataComp subset file; returns how
    many (`write_datacomp_pairs`)."""
    if isinstance(uids, pa.Array | pa.ChunkedArray):
        column = uids
    else:
        column = pa.array(list(uids), pa.string())
    hi, lo, valid = uid_pairs(column)
    if not valid.all():
        bad = column[int(np.flatnonzero(~valid)[0])].as_py()
        raise InputError(f"cannot write {path}: {bad!r} is not a 32-hex-character uid")
    return write_datacomp_pairs(path, hi, lo)


def _uid_path(path: Path) -> Path:
    """The uid file: `path`, or a folder's ``subset.parquet``."""
    if path.is_dir():
        inner = path / "subset.parquet"
        if not inner.is_file():
            raise InputError(f"{path} is a folder without subset.parquet; give a uid file")
        path = inner
    if not path.is_file():
        raise InputError(f"uid file {path} does not exist")
    return path


def _pairs_array(path: Path, *, mapped: bool = False) -> np.ndarray:
    if not _has_npy_header(path):
        return _raw_array(path, mapped=mapped)
    return _npy_array(path, mapped=mapped)


def read_uid_file(path: Path | str) -> UidList:
    """Read a uid file by extension (a folder means its ``subset.parquet``); one-line errors."""
    path = _uid_path(Path(path))
    suffix = path.suffix.lower()
    if suffix == ".npy" or suffix in RAW_SUFFIXES:
        return _from_pairs(path, _pairs_array(path))
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix in (".txt", ".uids", ".csv", ""):
        return _read_text(path)
    raise InputError(f"{path}: unknown uid file type {suffix!r}; use {UID_FORMATS}")


def read_uid_pairs(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """A uid file's uids as DataComp pairs (hi, lo: native uint64, 16 bytes a uid, file order,
    repeats kept), without a Python string per uid for .npy, raw and parquet files; the same
    files and one-line errors as `read_uid_file`."""
    path = _uid_path(Path(path))
    suffix = path.suffix.lower()
    if suffix == ".npy" or suffix in RAW_SUFFIXES:
        array = _pairs_array(path, mapped=True)  # file pages: only hi and lo are held
        names = array.dtype.names or ("", "")
        return array[names[0]].astype(np.uint64), array[names[1]].astype(np.uint64)
    if suffix == ".parquet":
        try:
            column = pq.read_table(path, columns=["uid"]).column("uid")
        except (pa.ArrowException, OSError, KeyError) as exc:
            _read_parquet(path)  # says what is wrong in read_uid_file's words
            raise InputError(f"{path}: not a readable parquet file ({exc})") from exc
        hi, lo, valid = uid_pairs(column)
        if not valid.all():
            bad = int(np.flatnonzero(~valid)[0])
            raise InputError(
                f"{path}: row {bad} is not a 32-hex-character uid: {column[bad].as_py()!r}"
            )
        return hi, lo
    if suffix in (".txt", ".uids", ".csv", ""):
        return _text_pairs(path)
    raise InputError(f"{path}: unknown uid file type {suffix!r}; use {UID_FORMATS}")


def _text_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A text uid file as pairs, read a block at a time (only one block's lines are Python
    strings); the same lines, header rule and errors as `_read_text`, which decodes the whole
    file first: a bad line is reported once every byte has decoded."""
    his: list[np.ndarray] = []
    los: list[np.ndarray] = []
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0  # bytes read before the block
    number = 0  # lines before the block, as str.splitlines counts them
    header_seen = False
    carry = ""
    bad: tuple[int, str] | None = None  # the first line that is not a uid
    try:
        with open(path, "rb") as handle:
            while True:
                data = handle.read(_TEXT_BLOCK)
                held = len(decoder.getstate()[0])  # bytes of a character cut by the last block
                try:
                    chunk = decoder.decode(data, final=not data)
                except UnicodeDecodeError as exc:
                    raise InputError(_decode_error(path, exc, done - held)) from exc
                done += len(data)
                lines = (carry + chunk).splitlines(keepends=True)
                # The last line may go on in the next block ("\r" may be half of "\r\n").
                carry = lines.pop() if data and lines else ""
                if bad is None:
                    numbered = [
                        (n, text)
                        for n, text in enumerate((line.strip() for line in lines), number + 1)
                        if text and not text.startswith("#")
                    ]
                    if numbered and not header_seen:
                        header_seen = True
                        if numbered[0][1].lower() == "uid":  # a one-column CSV's header
                            numbered = numbered[1:]
                    hi, lo, valid = uid_pairs(pa.array([t for _, t in numbered], pa.string()))
                    if valid.all():
                        his.append(hi)
                        los.append(lo)
                    else:
                        bad = numbered[int(np.argmin(valid))]
                number += len(lines)
                if not data:
                    break
    except OSError as exc:
        raise InputError(f"{path}: not a readable UTF-8 text file ({exc})") from exc
    if bad is not None:
        raise InputError(f"{path}: line {bad[0]} is not a 32-hex-character uid: {bad[1]!r}")
    return np.concatenate([np.zeros(0, np.uint64), *his]), np.concatenate(
        [np.zeros(0, np.uint64), *los]
    )


def _decode_error(path: Path, exc: UnicodeDecodeError, offset: int) -> str:
    """`_read_text`'s message for a decoding error, its position counted from the file start
    (`offset`: where the failed buffer starts)."""
    start, end = offset + exc.start, offset + exc.end
    if exc.end - exc.start == 1:
        where = f"byte 0x{exc.object[exc.start]:02x} in position {start}"
    else:
        where = f"bytes in position {start}-{end - 1}"
    detail = f"'{exc.encoding}' codec can't decode {where}: {exc.reason}"
    return f"{path}: not a readable UTF-8 text file ({detail})"


_TEXT_BLOCK = 1 << 24  # bytes of a text uid file read at a time (~500k uids)


def _has_npy_header(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    except OSError as exc:
        raise InputError(f"cannot read uid file {path}: {exc.strerror or exc}") from None


def _raw_array(path: Path, *, mapped: bool = False) -> np.ndarray:
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
    if not size:
        return np.empty(0, dtype=_RECORD)
    return np.memmap(path, dtype=_RECORD, mode="r") if mapped else np.fromfile(path, _RECORD)


def _from_pairs(path: Path, array: np.ndarray) -> UidList:
    names = array.dtype.names or ("", "")
    a, b = array[names[0]], array[names[1]]
    was_sorted = bool(np.all((a[1:] > a[:-1]) | ((a[1:] == a[:-1]) & (b[1:] >= b[:-1]))))
    return UidList(str(path), pairs_to_uids(array), was_sorted=was_sorted)


def _npy_array(path: Path, *, mapped: bool = False) -> np.ndarray:
    """A DataComp .npy's records (`mapped`: memory-mapped, read-only, not loaded)."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mapped else None)
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
    return array


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
