"""Members `curate write` adds to each written sample, built a batch of uids at a time.

- ``scores.json`` (``--with-columns``): the chosen columns of the uid's first subset row, as a
  JSON object with sorted keys (non-finite floats as null);
- ``rewrites.json`` (``--rewrites``): the uid's first row with rewrites in a curate rewrite
  folder's tables (sorted by file name): the rewrites, model and prompt version. Its uids
  match in either case, as a subset file's do.

The source rows stay in Arrow tables (columnar; only rows of subset uids are kept) and each
subset uid holds the index of its row (-1 none). A member's bytes are made when a batch of uids
asks for them: the plan's byte sizes, each shard's fingerprint and the shard's writer, so no
Python object is held per uid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import InputError
from curate.writing.subset import WriteSubset, subset_table

SCORES_MEMBER = "scores.json"
REWRITES_MEMBER = "rewrites.json"
_REWRITE_COLUMNS = ["uid", "rewrites", "model", "prompt_version"]

Members = list[tuple[str, bytes]]  # (extension, bytes) members added to one sample


@dataclass
class _Source:
    """One kind of added member: its rows and each subset uid's row (-1: none)."""

    member: str
    table: pa.Table  # the member's fields, one row per source row kept
    rows: np.ndarray  # int64 per subset position
    finite: bool = False  # non-finite floats become null (JSON has no NaN)

    def payloads(self, positions: np.ndarray) -> list[bytes | None]:
        at = self.rows[positions]
        present = at >= 0
        values = self.table.take(pa.array(at[present])).to_pylist()
        out: list[bytes | None] = [None] * int(positions.size)
        for i, row in zip(np.flatnonzero(present).tolist(), values, strict=True):
            out[i] = _json(row, self.finite)
        return out


@dataclass
class AddedMembers:
    """The added members of a write (module doc); empty when neither option is given."""

    subset: WriteSubset
    sources: list[_Source] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.sources)

    def count(self, member: str) -> int:
        """Subset uids given `member`."""
        return sum(int((s.rows >= 0).sum()) for s in self.sources if s.member == member)

    def batch(self, uids: Sequence[str]) -> list[Members]:
        """The added members of each of `uids` (subset uids), in member order."""
        out: list[Members] = [[] for _ in uids]
        if not self.sources:
            return out
        positions = self.subset.positions(pa.array(list(uids), pa.string()))
        for source in self.sources:
            for members, data in zip(out, source.payloads(positions), strict=True):
                if data is not None:
                    members.append((source.member, data))
        return out


def added_members(
    subset: WriteSubset, path: Path | str, columns: Sequence[str], rewrites: Path | str | None
) -> AddedMembers:
    """What `--with-columns` (columns of the subset file at `path`) and `--rewrites` (a curate
    rewrite folder) add; one-line errors for a subset without the columns or an unfinished or
    empty rewrite folder."""
    added = AddedMembers(subset)
    if columns:
        table = subset_table(path, list(columns))
        added.sources.append(
            _Source(SCORES_MEMBER, table.select(list(columns)), _first_rows(subset, table), True)
        )
    if rewrites is not None:
        table = _rewrite_rows(Path(rewrites), subset)
        fields = table.select(["rewrites", "model", "prompt_version"])
        added.sources.append(_Source(REWRITES_MEMBER, fields, _first_rows(subset, table)))
    return added


def _first_rows(subset: WriteSubset, table: pa.Table) -> np.ndarray:
    """Each subset position's first row in `table` (by its uid column), -1 when none."""
    positions = subset.positions(table.column("uid"))
    listed = np.flatnonzero(positions >= 0)
    none = np.iinfo(np.int64).max
    rows = np.full(len(subset), none, dtype=np.int64)
    np.minimum.at(rows, positions[listed], listed)
    rows[rows == none] = -1
    return rows


def _rewrite_rows(folder: Path, subset: WriteSubset) -> pa.Table:
    """The rows of a rewrite folder's tables whose uid is in `subset` and that hold rewrites,
    in file-name then row order."""
    tables = sorted((folder / "rewrites").glob("*.parquet"))
    if not tables:
        raise InputError(f"--rewrites {folder}: no rewrites/*.parquet (curate rewrite's output)")
    unfinished = (folder / ".curate" / "rewrite").is_dir() and not (
        folder / "rewrite.json"
    ).is_file()
    if unfinished:  # a rewrite run writes rewrite.json once every unit is done and deduped
        raise InputError(
            f"--rewrites {folder}: the rewrite run is not finished (no rewrite.json; uids "
            f"repeated across units are marked only at the end); see `curate status {folder}`"
        )
    kept: list[pa.Table] = []
    for path in tables:
        table = pq.read_table(path, columns=_REWRITE_COLUMNS)
        listed = subset.positions(table.column("uid")) >= 0
        has_rewrites = pc.fill_null(pc.list_value_length(table.column("rewrites")), 0)
        keep = pa.array(listed) if len(table) else pa.array([], pa.bool_())
        kept.append(table.filter(pc.and_(keep, pc.greater(has_rewrites, 0))))
    return pa.concat_tables(kept, promote_options="permissive")


def _json(row: dict[str, object], finite: bool) -> bytes:
    if finite:
        row = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
    return json.dumps(row, sort_keys=True).encode()
