"""The subset `curate write` writes: its distinct uids, sorted, and each uid's number of copies.

Uids are held as DataComp pairs (two uint64, 16 bytes) and copies as uint32, so a subset of
10^8 uids takes about 2 GB however it was given (.npy, raw, parquet, text); a uid is looked up
by binary search (`find`, `positions`) and named again as hex only where a file needs it.

Copies: 1 per distinct uid; with ``duplicates="repeat"`` the number of times the file lists it;
with a ``repeats`` column (parquet) the sum of its rows' weights, stochastically rounded (a
seeded draw per row, in file order; ``duplicates="once"``: only a uid's first row counts).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import InputError
from curate.io.uid_files import read_uid_pairs, sorted_positions, uid_pairs

Duplicates = Literal["error", "once", "repeat"]
MAX_COPIES = 2**32 - 1  # copies of one uid (uint32)
_HEX_ROWS = 1 << 16  # uids turned back into hex strings at once
_HEX = re.compile(r"[0-9a-fA-F]{32}")


@dataclass
class WriteSubset:
    """Distinct subset uids in (hi, lo) order, which is their hex order, and their copies."""

    path: str
    hi: np.ndarray  # uint64
    lo: np.ndarray  # uint64
    copies: np.ndarray  # uint32, per distinct uid (a read-only view of 1 when all are 1)
    rows: int  # rows of the file, repeats included

    @property
    def single(self) -> bool:
        """Every uid is written once: `copies` takes no memory."""
        return self.copies.strides == (0,)

    def __len__(self) -> int:
        return int(self.hi.size)

    def uid(self, position: int) -> str:
        """The hex uid at `position`."""
        return f"{int(self.hi[position]):016x}{int(self.lo[position]):016x}"

    def hexes(self, positions: np.ndarray) -> list[str]:
        """The hex uids at `positions`: one hex conversion of their big-endian bytes."""
        pairs = np.empty((np.asarray(positions).size, 2), dtype=">u8")
        pairs[:, 0], pairs[:, 1] = self.hi[positions], self.lo[positions]
        text = pairs.tobytes().hex()
        return [text[i : i + 32] for i in range(0, len(text), 32)]

    def find(self, uid: str) -> int:
        """Position of a 32-hex uid (either case), -1 when absent or not a uid."""
        if len(uid) != 32 or not _HEX.fullmatch(uid):
            return -1
        hi, lo = np.uint64(int(uid[:16], 16)), np.uint64(int(uid[16:], 16))
        left = int(np.searchsorted(self.hi, hi, side="left"))
        while left < self.hi.size and self.hi[left] == hi:
            if self.lo[left] == lo:
                return left
            left += 1
        return -1

    def positions(self, uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Positions (int64, -1 absent) of a column of uids."""
        hi, lo, valid = uid_pairs(uids)
        found = sorted_positions(self.hi, self.lo, hi, lo)
        found[~valid] = -1
        return found

    def hex_lines(self, where: np.ndarray) -> Iterator[str]:
        """The uids at the marked positions, in order, as blocks of newline-ended hex lines."""
        chosen = np.flatnonzero(where)
        for start in range(0, chosen.size, _HEX_ROWS):
            rows = chosen[start : start + _HEX_ROWS]
            yield "".join(
                f"{h:016x}{lo:016x}\n"
                for h, lo in zip(self.hi[rows].tolist(), self.lo[rows].tolist(), strict=True)
            )


def read_write_subset(
    path: Path | str,
    *,
    duplicates: Duplicates,
    repeats_column: str | None,
    seed: int,
) -> WriteSubset:
    """Read a uid file (`read_uid_pairs`' formats and errors) and decide each uid's copies."""
    hi, lo = read_uid_pairs(path)
    rows = int(hi.size)
    order = np.lexsort((lo, hi))  # stable: a uid's rows stay in file order
    hi, lo = hi[order], lo[order]
    starts = (
        np.flatnonzero(np.concatenate([[True], (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])]))
        if rows
        else np.zeros(0, dtype=np.int64)
    )
    counts = np.diff(np.append(starts, rows))
    first_rows = order[starts]  # each distinct uid's first row in the file
    repeated = counts > 1
    if repeated.any() and duplicates == "error":
        example = int(np.flatnonzero(repeated)[np.argmin(first_rows[repeated])])
        uid = f"{int(hi[starts[example]]):016x}{int(lo[starts[example]]):016x}"
        raise InputError(
            f"subset {path} lists {int(repeated.sum())} uids more than once (e.g. {uid} "
            f"x{int(counts[example])}); pass --duplicates repeat to write the repeats spread "
            "across shards, or --duplicates once to write each uid once"
        )
    if repeats_column is None:
        copies = counts if duplicates == "repeat" else np.ones(counts.size, dtype=np.int64)
    else:
        weights = _weights(path, repeats_column)
        whole = np.floor(weights)
        draws = np.random.default_rng([seed, 1]).random(rows)
        # Stochastic rounding: expected copies equal the weight; seeded, in file order.
        per_row = whole.astype(np.int64) + (draws < weights - whole)
        del weights, whole, draws
        distinct = np.repeat(np.arange(counts.size), counts)  # distinct uid of each sorted row
        if duplicates == "once":  # a uid's first row alone decides its copies
            copies = per_row[first_rows]
        else:
            copies = np.bincount(distinct, weights=per_row[order], minlength=counts.size)
        del distinct, per_row
    del order
    if copies.size and float(copies.max()) > MAX_COPIES:  # repeated rows' weights add up
        example = int(np.argmax(copies))
        uid = f"{int(hi[starts[example]]):016x}{int(lo[starts[example]]):016x}"
        raise InputError(
            f"subset {path}: uid {uid} would be written {int(copies[example])} times; a uid is "
            f"written at most {MAX_COPIES} times"
        )
    copies = np.asarray(copies).astype(np.uint32)
    if bool((copies == 1).all()):
        copies = np.broadcast_to(np.uint32(1), copies.shape)
    return WriteSubset(
        path=str(path),
        hi=np.ascontiguousarray(hi[starts]),
        lo=np.ascontiguousarray(lo[starts]),
        copies=copies,
        rows=rows,
    )


def _weights(path: Path | str, column: str) -> np.ndarray:
    """The repeats column as float64, or a one-line error naming the first bad row."""
    path = Path(path)
    path = path / "subset.parquet" if path.is_dir() else path
    if path.suffix.lower() != ".parquet" or column not in pq.read_schema(path).names:
        raise InputError(
            f"--repeats {column}: the subset must be a parquet file with a {column!r} column"
        )
    values = pq.read_table(path, columns=[column]).column(column)
    numeric = pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
    bad = 0
    if numeric:
        as_float = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
        good = np.isfinite(as_float) & (as_float >= 0)  # nulls read as NaN
        if good.all():
            huge = as_float > MAX_COPIES
            if huge.any():
                row = int(np.argmax(huge))
                raise InputError(
                    f"--repeats {column}: row {row} has {values[row].as_py()!r}; a uid is "
                    f"written at most {MAX_COPIES} times"
                )
            return as_float
        bad = int(np.argmin(good))
    raise InputError(
        f"--repeats {column}: row {bad} has {values[bad].as_py()!r}; weights must be finite "
        "numbers >= 0"
    )


def subset_table(path: Path | str, columns: list[str]) -> pa.Table:
    """The parquet subset's `uid` and `columns` (for members built from its rows)."""
    path = Path(path)
    path = path / "subset.parquet" if path.is_dir() else path
    if path.suffix.lower() != ".parquet":
        raise InputError("--with-columns needs a parquet subset (curate select's subset.parquet)")
    names = pq.read_schema(path).names
    absent = [c for c in columns if c not in names]
    if absent:
        raise InputError(
            f"--with-columns: the subset has no column {absent[0]!r} (columns: {', '.join(names)})"
        )
    return pq.read_table(path, columns=["uid", *columns])
