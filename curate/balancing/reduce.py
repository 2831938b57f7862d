"""The balance reduce in bounded memory: compact per-row state, then decisions a unit at a time.

The sample phase reads the match files three times, never holding a string or a Python object
per row:

1. `scan_pool`: per row the uid's two halves (hi, lo: 16 bytes), a flags byte (error, valid
   uid, matched, repeat) and, for the systematic rule and matched rows only, the first half of
   the class key (8 bytes); per entry the pool count. Later repeats of a uid are found on the
   halves (`io.uid_files.first_occurrences`) and their matches taken back out of the counts
   (only the files holding a repeat are read again). ``--target-size`` also keeps each row's matched
   entries (8 bytes + 4 per match): its bisection evaluates the expected size many times.
2. t from the counts; for the systematic rule each row's rank within its class
   (`draws.class_ranks`, 4 bytes a row), on the uid halves cut down to the matched rows. The
   uid halves and class keys are then released.
3. `decide_unit`, once per match file in pool order: the file's rows again, their keep
   probabilities, class offsets and draws recomputed from their own matches, the decisions and
   subset rows returned as Arrow tables, the kept uids and the entry counts after balancing
   tallied.

Every number is the one the whole-pool computation gives: the same keep probabilities, the
same draws, ranks and offsets, hence the same subset (`tests/test_balance_scale.py` compares
with `draws.draw_subset` on the whole pool).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.balancing.draws import (
    DrawRule,
    class_keys,
    class_ranks,
    systematic_from_ranks,
)
from curate.balancing.sampling import count_entries, keep_probabilities, uniform_draws
from curate.errors import failure_code
from curate.io.uid_files import DATACOMP_DTYPE, first_occurrences, uid_pairs

__all__ = ["PoolScan", "Tally", "decide_unit", "scan_pool"]

ERRORED = np.uint8(1)  # the match file recorded an error for the row
VALID = np.uint8(2)  # the uid is 32 hex characters
MATCHED = np.uint8(4)  # the caption matched at least one entry
REPEAT = np.uint8(8)  # a valid uid an earlier row of the pool has
BAD_UID = "bad_uid: uid is not 32 hex characters"
REPEAT_UID = "duplicate_uid: the uid appeared earlier in the pool"
_COLUMNS = ("uid", "error", "entry_ids")


@dataclass
class PoolScan:
    """The compact per-row state of the pool (`scan_pool`)."""

    files: list[Path]
    starts: np.ndarray  # first row of each file, and the total (len(files) + 1)
    flags: np.ndarray  # uint8: ERRORED | VALID | MATCHED | REPEAT
    counts: np.ndarray  # pool count per entry (int64), over the ok rows
    hi: np.ndarray | None = None
    lo: np.ndarray | None = None
    class_key: np.ndarray | None = None  # first half of the class key of each `keyed` row
    csr: tuple[np.ndarray, np.ndarray] | None = None  # ok rows' matches (for --target-size)

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def ok(self, rows: slice = slice(None)) -> np.ndarray:
        """Rows that take part: no error, a valid uid, not a repeat."""
        flags = self.flags[rows]
        return (flags & (ERRORED | VALID | REPEAT)) == VALID

    def matched(self, rows: slice = slice(None)) -> np.ndarray:
        return self.ok(rows) & ((self.flags[rows] & MATCHED) != 0)

    def keyed(self) -> np.ndarray:
        """Rows that have a `class_key`: matched, no error, a valid uid (repeats included:
        they are only known once the whole pool is read)."""
        return (self.flags & (ERRORED | VALID | MATCHED)) == (VALID | MATCHED)

    def release(self) -> None:
        """Drop what only the reduce's global steps need (uid halves, class keys, matches)."""
        self.hi = self.lo = self.class_key = None
        self.csr = None


def _read(path: Path, columns: tuple[str, ...] = _COLUMNS) -> pa.Table:
    return pq.read_table(path, columns=list(columns))


def _entries(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, flat ids) of the entry_ids list column (int64 arrays)."""
    column = table["entry_ids"].combine_chunks()
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return lengths.astype(np.int64), flat.astype(np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def scan_pool(
    files: list[Path], n_entries: int, *, class_key: bool, keep_matches: bool
) -> PoolScan:
    """Pass 1 of the reduce (module docstring): flags, uid halves, counts, class keys."""
    sizes = [pq.ParquetFile(path).metadata.num_rows for path in files]
    starts = _offsets(np.asarray(sizes, dtype=np.int64))
    n = int(starts[-1])
    scan = PoolScan(
        files=list(files),
        starts=starts,
        flags=np.zeros(n, dtype=np.uint8),
        counts=np.zeros(n_entries, dtype=np.int64),
        hi=np.zeros(n, dtype=np.uint64),
        lo=np.zeros(n, dtype=np.uint64),
    )
    # Class keys of the keyed rows, packed at the front; the rest is never touched (calloc'd
    # pages stay unmapped) and is cut off at the end. Not a list of per-file arrays joined at
    # the end: their freed heap pages stayed resident beside the joined copy.
    keys = np.zeros(n if class_key else 0, dtype=np.uint64)
    filled = 0
    match_lengths: list[np.ndarray] = []
    match_ids: list[np.ndarray] = []
    for index, path in enumerate(files):
        rows = slice(int(starts[index]), int(starts[index + 1]))
        table = _read(path)
        hi, lo, valid = uid_pairs(table["uid"])
        errored = table["error"].is_valid().to_numpy(zero_copy_only=False)
        lengths, flat = _entries(table)
        flags = np.where(errored, ERRORED, 0).astype(np.uint8)
        flags |= np.where(valid, VALID, 0).astype(np.uint8)
        flags |= np.where(lengths > 0, MATCHED, 0).astype(np.uint8)
        scan.flags[rows], scan.hi[rows], scan.lo[rows] = flags, hi, lo  # type: ignore[index]
        candidate = valid & ~errored  # ok unless a repeat, known after every file is read
        taken = np.repeat(candidate, lengths)
        scan.counts += count_entries(flat[taken], n_entries)
        if class_key:
            keyed = class_keys(_offsets(lengths), flat)[0][candidate & (lengths > 0)]
            keys[filled : filled + keyed.size] = keyed
            filled += keyed.size
        if keep_matches:
            match_lengths.append(np.where(candidate, lengths, 0))
            match_ids.append(flat[taken].astype(np.int32))
    assert scan.hi is not None and scan.lo is not None
    valid = (scan.flags & VALID) != 0
    repeat = valid & ~first_occurrences(scan.hi, scan.lo, valid)
    scan.flags[repeat] |= REPEAT
    _take_back_repeats(scan, repeat, match_lengths, match_ids)
    if class_key:
        keys.resize(filled, refcheck=False)  # in place: nothing else refers to it
        scan.class_key = keys
    if keep_matches:
        lengths = np.concatenate([np.zeros(0, np.int64), *match_lengths])
        ids = np.concatenate([np.zeros(0, np.int32), *match_ids])
        scan.csr = (_offsets(lengths), ids)
    return scan


def _take_back_repeats(
    scan: PoolScan, repeat: np.ndarray, lengths: list[np.ndarray], ids: list[np.ndarray]
) -> None:
    """Remove the matches of repeated rows (counted as candidates in pass 1) from the counts
    and the kept matches, reading again only the files that hold such a row."""
    counted = repeat & ((scan.flags & ERRORED) == 0)
    if not counted.any():
        return
    for index, path in enumerate(scan.files):
        rows = slice(int(scan.starts[index]), int(scan.starts[index + 1]))
        drop = counted[rows]
        if not drop.any():
            continue
        unit_lengths, flat = _entries(_read(path, ("entry_ids",)))
        scan.counts -= count_entries(flat[np.repeat(drop, unit_lengths)], scan.counts.size)
        if lengths:
            kept_lengths = np.where(drop, 0, lengths[index])
            keep_ids = ~np.repeat(drop, lengths[index])
            lengths[index], ids[index] = kept_lengths, ids[index][keep_ids]


def rank_classes(scan: PoolScan, seed: int) -> np.ndarray:
    """Each matched row's rank within its class (`draws.class_ranks`), 0 for the other rows.
    Releases the scan's uid halves and class keys: they are cut down to the keyed rows first,
    so ranking holds about 24 bytes per matched row rather than per row."""
    assert scan.class_key is not None and scan.hi is not None and scan.lo is not None
    keyed = scan.keyed()
    hi = scan.hi[keyed]
    scan.hi = None
    lo = scan.lo[keyed]
    scan.lo = None
    key, scan.class_key = scan.class_key, None
    eligible = (scan.flags[keyed] & REPEAT) == 0
    ranks = np.zeros(scan.rows, dtype=np.uint32)
    ranks[keyed] = class_ranks(key, eligible, hi, lo, seed)
    return ranks


@dataclass
class Tally:
    """What the decisions of every unit add up to."""

    n_entries: int
    after: np.ndarray = field(init=False)  # entry counts of the kept rows
    expected_after: np.ndarray = field(init=False)  # Σ keep probability per entry
    expected_kept: float = 0.0
    kept: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    kept_hi: list[np.ndarray] = field(default_factory=list)
    kept_lo: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.after = np.zeros(self.n_entries, dtype=np.int64)
        self.expected_after = np.zeros(self.n_entries, dtype=np.float64)

    def kept_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros(0, dtype=np.uint64)
        return np.concatenate([empty, *self.kept_hi]), np.concatenate([empty, *self.kept_lo])


def decide_unit(
    scan: PoolScan,
    index: int,
    t: float,
    seed: int,
    rule: DrawRule,
    ranks: np.ndarray | None,
    tally: Tally,
) -> tuple[pa.Table, pa.Table]:
    """Pass 3 for one match file: (decisions rows, subset rows) as Arrow tables, its kept uids
    and counts added to `tally`."""
    rows = slice(int(scan.starts[index]), int(scan.starts[index + 1]))
    table = _read(scan.files[index], ("uid", "shard", "key", "error", "entry_ids"))
    flags = scan.flags[rows]
    ok, matched = scan.ok(rows), scan.matched(rows)
    all_lengths, all_flat = _entries(table)
    lengths = np.where(ok, all_lengths, 0)  # rows that do not take part have no matches
    flat = all_flat[np.repeat(ok, all_lengths)]
    del all_lengths, all_flat
    offsets = _offsets(lengths)
    probability = keep_probabilities(offsets, flat, scan.counts, t)
    hi, lo, _ = uid_pairs(table["uid"])
    hi, lo = np.where(ok, hi, 0).astype(np.uint64), np.where(ok, lo, 0).astype(np.uint64)
    weights = np.where(ok, probability, 0.0)
    if rule is DrawRule.independent:
        pairs = np.zeros(ok.size, dtype=DATACOMP_DTYPE)
        pairs["f0"], pairs["f1"] = hi, lo
        kept = matched & (uniform_draws(pairs, seed) < weights)
    else:
        assert ranks is not None
        keys = class_keys(offsets, flat)
        kept = matched & systematic_from_ranks(weights, ranks[rows], keys, seed)

    rows_of = np.repeat(np.arange(ok.size), lengths)
    np.add.at(tally.expected_after, flat, probability[rows_of])  # in pool order, as bincount
    tally.after += count_entries(flat[kept[rows_of]], tally.n_entries)
    tally.expected_kept += float(probability[ok].sum())
    tally.kept += int(kept.sum())
    tally.kept_hi.append(hi[kept])
    tally.kept_lo.append(lo[kept])

    frame = pl.from_arrow(table.select(["uid", "shard", "key", "error"]))
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns(
        pl.Series("bad", (flags & VALID) == 0),
        pl.Series("repeat", (flags & REPEAT) != 0),
        pl.Series("kept", kept),
        pl.Series("ok", ok),
        pl.Series("matched", matched),
    )
    error = (
        pl.when(pl.col("error").is_not_null()).then(pl.col("error"))
        .when("bad").then(pl.lit(BAD_UID))
        .when("repeat").then(pl.lit(REPEAT_UID))
    )  # fmt: skip
    reason = (
        pl.when(pl.col("ok") & ~pl.col("matched")).then(pl.lit("no_match"))
        .when(pl.col("matched") & ~pl.col("kept")).then(pl.lit("not_sampled"))
    )  # fmt: skip
    status = (
        pl.when("kept").then(pl.lit("kept")).when("ok").then(pl.lit("dropped"))
        .otherwise(pl.lit("failed"))
    )  # fmt: skip
    decisions = frame.select(
        pl.col("uid").str.to_lowercase(),
        "shard",
        "key",
        status.alias("status"),
        pl.coalesce(error, reason).alias("reason"),
        pl.Series("matches", lengths.astype(np.int32)),
        pl.Series("keep_prob", np.where(ok, probability, np.nan)),
    ).cast(DECISIONS_SCHEMA)  # type: ignore[arg-type]
    tally.failures.update(
        failure_code(e) for e in frame.select(error.alias("e"))["e"].drop_nulls().to_list()
    )
    subset = decisions.filter(pl.Series(kept)).select(list(SUBSET_SCHEMA))
    return decisions.to_arrow(), subset.to_arrow()


DECISIONS_SCHEMA = {
    "uid": pl.String,
    "shard": pl.String,
    "key": pl.String,
    "status": pl.String,
    "reason": pl.String,
    "matches": pl.Int32,
    "keep_prob": pl.Float64,
}
SUBSET_SCHEMA = {k: DECISIONS_SCHEMA[k] for k in ("uid", "shard", "key", "matches", "keep_prob")}
