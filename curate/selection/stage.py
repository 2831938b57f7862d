"""The select stage: a pool table (a run's scores, or DataComp-style metadata parquet) in, a
subset out.

Steps run in a fixed order, each over the candidates the previous ones kept:

1. the pool: rows with status `scored` (rows without a status column count as scored); failed
   rows, rows whose uid is not 32 hex, and later repeats of a uid are recorded as failed;
2. `intersect` / `exclude` uid files;
3. `where` conditions, on score columns and on derived metadata (`rules.DERIVED`);
4. the `top` chain, in the order given (`rules` explains the fraction semantics);
5. `union` uid files add back pool rows that an earlier step dropped.

Every pool row ends as kept, dropped (with the step that dropped it) or failed (with the reason)
in `decisions.parquet`; the subset is `subset.parquet` (kept rows, their columns and `kept_by`)
and `subset.npy` (DataComp format, sorted).
"""

from __future__ import annotations

import glob
import itertools
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.embedding.store import RunFolder
from curate.errors import InputError, RunFolderError, failure_code
from curate.io.shards import check_out_apart
from curate.io.uid_files import (
    first_occurrences,
    member_mask,
    read_uid_pairs,
    uid_pairs,
    write_datacomp_pairs,
)
from curate.runtime.atomic import parquet_streams, write_json_atomic
from curate.runtime.records import logged_stage
from curate.selection.rules import (
    DERIVED,
    NORMSIM2_D,
    Condition,
    TopStep,
    derived_columns,
    top_count,
    top_threshold,
)

SUBSET_TABLE = "subset.parquet"
SUBSET_NPY = "subset.npy"
DECISIONS_TABLE = "decisions.parquet"
REPORT_JSON = "select.json"


@dataclass
class SelectSpec:
    """What to select; see the module docstring for the order the parts run in."""

    top: list[TopStep] = field(default_factory=list)
    where: list[Condition] = field(default_factory=list)
    intersect: list[Path] = field(default_factory=list)
    exclude: list[Path] = field(default_factory=list)
    union: list[Path] = field(default_factory=list)
    seed: int = 0  # NormSim_2-D's initial sample
    normsim2d_rounds: int = 10  # normsim_d.DEFAULT_ROUNDS (not imported: it needs torch)

    def to_json(self) -> dict[str, Any]:
        return {
            "top": [asdict(s) for s in self.top],
            "where": [c.label.removeprefix("where ") for c in self.where],
            "intersect": [str(p) for p in self.intersect],
            "exclude": [str(p) for p in self.exclude],
            "union": [str(p) for p in self.union],
            "seed": self.seed,
            "normsim2d_rounds": self.normsim2d_rounds,
        }


@dataclass
class StepCount:
    """Candidates before and after one step (`threshold`: the top rule's cut value)."""

    step: str
    before: int
    after: int
    threshold: float | None = None
    note: str | None = None


@dataclass
class SelectReport:
    """Counts at every step, failures by reason, and where the subset went."""

    out: Path
    source: str
    rows: int = 0
    pool: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    steps: list[StepCount] = field(default_factory=list)
    selected: int = 0
    spec: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


CHUNK_ROWS = 1 << 18  # rows read at once: the reads' memory does not grow with the pool
# Reason codes of `_Selection.reason` (int16); codes from STEPS_FROM on are `steps` labels.
NO_REASON, FROM_STATUS, BAD_UID, DUPLICATE_UID, STEPS_FROM = 0, 1, 2, 3, 4
DUPLICATE_REASON = "duplicate_uid: uid already earlier in the pool table"
_SIZE_SOURCES = ("caption", "text", "width", "height", "original_width", "original_height")


@dataclass
class PoolTable:
    """The pool's parquet files, read a chunk of rows at a time (never whole): their unified
    schema (polars' relaxed concatenation) with the `DERIVED` columns, and the run folder when
    the source is one."""

    files: list[Path]
    schema: pl.Schema
    rows: int
    run: RunFolder | None = None

    @classmethod
    def open(cls, source: Path | str, *, out: Path | None = None) -> PoolTable:
        """RUN/scores.parquet for a run folder, else a parquet file, folder or glob. With `out`,
        refuses an output folder that holds a pool file (a rerun would read it back)."""
        path = Path(source)
        run = None
        if path.is_dir() and RunFolder.is_run(path):
            files = [path / "scores.parquet"]
            if not files[0].is_file():
                raise RunFolderError(
                    f"run {path} has no scores.parquet yet; run `curate score {path}` first"
                )
            run = RunFolder(path)
        elif path.is_dir():
            files = sorted(path.glob("*.parquet"))
        elif path.is_file():
            files = [path]
        else:
            files = [Path(p) for p in sorted(glob.glob(str(source)))]
        if not files:
            raise InputError(
                f"{source}: no pool table found (give a run folder with scores.parquet, a "
                "parquet file, or a folder or glob of parquet files)"
            )
        if out is not None:
            check_out_apart(out, files)
        schemas, rows = [], 0
        for file in files:
            try:
                parquet = pq.ParquetFile(file)  # its footer: the schema and the row count
                empty = pl.from_arrow(parquet.schema_arrow.empty_table())
                assert isinstance(empty, pl.DataFrame)
                schemas.append(empty)
                rows += parquet.metadata.num_rows
            except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
                raise InputError(f"cannot read pool table {file}: {exc}") from exc
        schema = derived_columns(pl.concat(schemas, how="diagonal_relaxed")).schema
        if "uid" not in schema:
            raise InputError(f"{files[0]}: pool table has no 'uid' column")
        return cls(files, schema, rows, run)

    def chunks(self, columns: Sequence[str] | None = None) -> Iterator[pl.DataFrame]:
        """The rows in table order, `CHUNK_ROWS` at a time, as frames of `columns` (all, with
        the derived ones, by default) in the unified schema; a missing column is null."""
        wanted = list(self.schema) if columns is None else list(columns)
        template = pl.DataFrame(schema={c: self.schema[c] for c in wanted})
        derived = any(c in DERIVED for c in wanted)
        for file in self.files:
            try:
                parquet = pq.ParquetFile(file, pre_buffer=False)
                present = set(parquet.schema_arrow.names)
                read = [c for c in wanted if c in present]
                if derived:
                    read += [c for c in _SIZE_SOURCES if c in present and c not in read]
                # A row group at a time: iter_batches' read-ahead holds far more (measured)
                for group in range(parquet.num_row_groups):
                    part = parquet.read_row_group(group, columns=read)
                    for batch in part.to_batches(max_chunksize=CHUNK_ROWS):
                        chunk = pl.from_arrow(pa.Table.from_batches([batch], part.schema))
                        assert isinstance(chunk, pl.DataFrame)
                        if derived:
                            chunk = derived_columns(chunk)
                        chunk = chunk.select([c for c in wanted if c in chunk.columns])
                        yield pl.concat([template, chunk], how="diagonal_relaxed")
                    del part
            except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
                raise InputError(f"cannot read pool table {file}: {exc}") from exc

    def row_chunks(
        self, columns: Sequence[str] | None = None
    ) -> Iterator[tuple[slice, pl.DataFrame]]:
        """`chunks` with the slice of pool rows each one holds."""
        start = 0
        for chunk in self.chunks(columns):
            yield slice(start, start + chunk.height), chunk
            start += chunk.height

    def read(self) -> pl.DataFrame:
        """The whole table (small tables and tests only)."""
        return pl.concat(list(self.chunks()), how="vertical")

    def column(self, name: str) -> np.ndarray:
        """One numeric column over the pool as float32 when stored as float32 (4 bytes a row),
        else float64; nulls are NaN."""
        single = self.schema[name] == pl.Float32
        values = np.empty(self.rows, dtype=np.float32 if single else np.float64)
        for rows, chunk in self.row_chunks([name]):
            column = chunk[name].cast(pl.Float32 if single else pl.Float64)
            values[rows] = column.fill_null(float("nan")).to_numpy()
        return values

    def mask(self, expr: pl.Expr, column: str) -> np.ndarray:
        """A boolean expression over `column` (derived columns allowed), for every pool row."""
        mask = np.empty(self.rows, dtype=bool)
        for rows, chunk in self.row_chunks([column]):
            mask[rows] = chunk.select(expr).to_series().to_numpy()
        return mask


class _Selection:
    """Per-row state while the steps run, columnar and compact: the uid as two uint64 (16
    bytes), keep and failed flags, a reason code (int16) and a kept-by code (int8)."""

    def __init__(self, table: PoolTable) -> None:
        self.table = table
        n = table.rows
        self.hi, self.lo = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64)
        self.keep = np.zeros(n, dtype=bool)
        self.reason = np.zeros(n, dtype=np.int16)
        self.failures: Counter[str] = Counter()
        columns = [c for c in ("uid", "status", "error") if c in table.schema]
        for rows, chunk in table.row_chunks(columns):
            hi, lo, valid = uid_pairs(chunk["uid"].to_arrow())
            scored = (
                (chunk["status"] == "scored").fill_null(False).to_numpy()
                if "status" in chunk.columns
                else np.ones(chunk.height, dtype=bool)
            )
            self.hi[rows], self.lo[rows], self.keep[rows] = hi, lo, scored & valid
            self.reason[rows][~scored] = FROM_STATUS
            self.reason[rows][scored & ~valid] = BAD_UID
            self.failures.update(_status_failures(chunk, ~scored))
            self.failures["bad_uid"] += int((scored & ~valid).sum())
        duplicate = first_occurrences(self.hi, self.lo, self.keep)
        np.logical_not(duplicate, out=duplicate)
        duplicate &= self.keep
        self.reason[duplicate] = DUPLICATE_UID
        self.failures["duplicate_uid"] += int(duplicate.sum())
        self.keep &= ~duplicate
        del duplicate
        self.failed = self.reason != NO_REASON
        self.failures = Counter({k: v for k, v in self.failures.items() if v})
        self.kept_by = np.zeros(n, dtype=np.int8)  # 0: none, 1: criteria, 2+: union labels
        self.labels: list[str] = []  # reason code STEPS_FROM + i
        self.kept_labels: list[str] = ["criteria"]  # kept-by code 1 + i
        self.steps: list[StepCount] = []
        self.extra: dict[str, np.ndarray] = {}  # columns a step computed (normsim2_d)

    def drop(self, mask: np.ndarray, step: str, threshold: float | None = None) -> None:
        """Drop the candidates where `mask` is False, recording `step` as the reason."""
        before = int(self.keep.sum())
        self.labels.append(step)
        self.reason[self.keep & ~mask] = STEPS_FROM + len(self.labels) - 1
        self.keep &= mask
        self.steps.append(StepCount(step, before, int(self.keep.sum()), threshold))

    def uid_mask(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Rows whose uid is in the uid file `path`, and for each distinct uid of the file
        (sorted) whether a row that did not fail has it."""
        hi, lo = read_uid_pairs(path)
        return member_mask(self.hi, self.lo, hi, lo, where=~self.failed)


def _status_failures(chunk: pl.DataFrame, unscored: np.ndarray) -> Counter[str]:
    """Failure codes of the rows not scored: their error, else ``status_<status>``."""
    if not unscored.any():
        return Counter()
    rows = chunk.filter(pl.Series(unscored))
    reasons = _status_reasons(rows)
    return Counter(failure_code(r) for r in reasons.to_list())


def _status_reasons(rows: pl.DataFrame) -> pl.Series:
    """The reason of rows that were not scored: their error, else ``status_<status>``."""
    status = (
        pl.col("status").cast(pl.String).fill_null("None")
        if "status" in rows.columns
        else pl.lit("None")
    )
    error = pl.col("error").cast(pl.String) if "error" in rows.columns else pl.lit(None, pl.String)
    reason = pl.when(error.is_not_null() & (error != "")).then(error)
    return rows.select(reason.otherwise(pl.concat_str([pl.lit("status_"), status])).alias("r"))["r"]


@logged_stage("select")
def select_pool(
    source: Path | str,
    spec: SelectSpec,
    *,
    out: Path,
    device: str | None = None,
) -> SelectReport:
    """Run `spec` over the pool at `source` and write the subset files into `out`."""
    start = time.perf_counter()
    table = PoolTable.open(source, out=out)
    for condition in spec.where:
        _require_column(table.schema, condition.column, "--where")
    for top in spec.top:
        if top.column != NORMSIM2_D:
            _require_column(table.schema, top.column, "--top")
    state = _Selection(table)
    report = SelectReport(out=Path(out), source=str(source), rows=int(state.keep.size))
    report.spec = spec.to_json()
    report.pool = int(state.keep.sum())
    report.failed = int(state.failed.sum())
    report.failures = dict(sorted(state.failures.items()))
    pool_size = report.pool
    restricted = False
    for path in spec.intersect:
        state.drop(state.uid_mask(path)[0], f"intersect {Path(path).name}")
        restricted = True
    for path in spec.exclude:
        state.drop(~state.uid_mask(path)[0], f"exclude {Path(path).name}")
        restricted = True
    for condition in spec.where:
        state.drop(table.mask(condition.expr(), condition.column), condition.label)
        restricted = True
    for top in spec.top:
        if top.base is None and restricted:
            raise InputError(
                f"--top {top.column}:{top.fraction:g}: this step ranks a restricted set; say "
                f"whether {top.fraction:g} is of the pool or of the remainder ("
                f"{top.column}:{top.fraction:g}:pool or {top.column}:{top.fraction:g}:remainder)"
            )
        _apply_top(state, top, pool_size, table.run, spec, device)
        restricted = True
    state.kept_by[state.keep] = 1
    for path in spec.union:
        _apply_union(state, path)
    report.steps = state.steps
    report.selected = int(state.keep.sum())
    _write_outputs(state, Path(out))
    report.seconds = time.perf_counter() - start
    write_json_atomic(Path(out) / REPORT_JSON, {**report.to_json(), "seconds": None})
    return report


def _require_column(schema: pl.Schema, column: str, option: str) -> None:
    if column in schema and schema[column].is_numeric():
        return
    numeric = [c for c, t in schema.items() if t.is_numeric()]
    hint = f"numeric columns: {', '.join(numeric) or 'none'}"
    unavailable = sorted(set(DERIVED) - set(schema))
    if column in unavailable:
        hint = f"{column} needs caption or width/height columns in the pool table"
    if column in schema:
        raise InputError(f"{option}: column {column!r} is not numeric ({hint})")
    raise InputError(f"{option}: the pool table has no column {column!r} ({hint})")


def _apply_top(
    state: _Selection,
    top: TopStep,
    pool_size: int,
    run: RunFolder | None,
    spec: SelectSpec,
    device: str | None,
) -> None:
    if top.column == NORMSIM2_D:
        base = pool_size if (top.base or "pool") == "pool" else int(state.keep.sum())
        _apply_normsim2_d(state, top, top_count(top.fraction, base), run, spec, device)
        return
    values = state.table.column(top.column)  # float32 stays 4 bytes; NaN where null
    null = np.isnan(values)
    if (state.keep & null).any():
        state.drop(~null, f"{top.column} is null")
    del null
    # After the null step (reported as its own step): the remainder is what this step ranks.
    base = pool_size if (top.base or "pool") == "pool" else int(state.keep.sum())
    n = top_count(top.fraction, base)
    threshold = top_threshold(values[state.keep], n)
    mask = values >= threshold if threshold is not None else np.ones_like(state.keep)
    state.drop(mask, top.label, threshold)
    state.steps[-1].note = f"n = floor({top.fraction:g} x {base}) = {n}"


def _apply_normsim2_d(
    state: _Selection,
    top: TopStep,
    n: int,
    run: RunFolder | None,
    spec: SelectSpec,
    device: str | None,
) -> None:
    """Keep min(n + 1, candidates) by NormSim_2-D: the count the top rule keeps without ties."""
    if run is None:
        raise InputError(
            f"--top {NORMSIM2_D}: needs image embeddings; give a run folder (curate score's "
            "output), not a bare table"
        )
    from curate.scoring.stage import load_pool

    if "shard" not in state.table.schema:
        raise RunFolderError(f"{run.path}/scores.parquet has no shard column; rerun curate score")
    stems = sorted(
        {s for c in state.table.chunks(["shard"]) for s in c["shard"].drop_nulls().unique()}
    )
    meta, arrays = load_pool(run, stems, with_embeddings=["image_emb"])
    row_of: dict[str, int] = {}  # embedding row of each uid's first OK sample
    ok_uids = (
        u
        for u, e in zip(meta["uid"].to_pylist(), meta["error"].to_pylist(), strict=True)
        if e is None
    )
    for row, uid in enumerate(ok_uids):
        row_of.setdefault(uid.lower(), row)
    index = np.flatnonzero(state.keep)
    pairs = zip(state.hi[index], state.lo[index], strict=True)
    uids = [f"{int(h):016x}{int(lo):016x}" for h, lo in pairs]
    rows = np.array([row_of.get(u, -1) for u in uids], dtype=np.int64)
    if (rows < 0).any():
        raise RunFolderError(
            f"{int((rows < 0).sum())} candidates have no image embedding in run {run.path}; "
            "rerun curate score"
        )
    emb = arrays["image_emb"][rows]
    from curate.selection.normsim_d import normsim2_d  # torch, only for this rule

    mask_local, scores = normsim2_d(
        emb, min(n + 1, index.size), rounds=spec.normsim2d_rounds, seed=spec.seed, device=device
    )
    column = np.full(state.keep.size, np.nan, dtype=np.float32)
    column[index] = scores
    state.extra[NORMSIM2_D] = column
    mask = np.ones_like(state.keep)
    mask[index[~mask_local]] = False
    state.drop(mask, top.label)
    state.steps[-1].note = f"{spec.normsim2d_rounds} rounds, seed {spec.seed}"


def _apply_union(state: _Selection, path: Path) -> None:
    mask, found = state.uid_mask(path)
    add = mask & ~state.keep & ~state.failed
    before = int(state.keep.sum())
    label = f"union {Path(path).name}"
    state.kept_labels.append(label)
    state.reason[add] = NO_REASON
    state.kept_by[add] = len(state.kept_labels)
    state.keep |= add
    note = None
    if not found.all():
        note = f"{int((~found).sum())} uids of the file are not in the pool's scored rows"
    state.steps.append(StepCount(label, before, int(state.keep.sum()), None, note))


def _write_outputs(state: _Selection, out: Path) -> None:
    """decisions.parquet (every row) and subset.parquet (kept rows, all their columns), written
    a chunk of the pool at a time in table order, and subset.npy from the kept pairs."""
    table = state.table
    labels = pl.Series([None, None, None, DUPLICATE_REASON, *state.labels], dtype=pl.String)
    kept_labels = pl.Series([None, *state.kept_labels], dtype=pl.String)
    out.mkdir(parents=True, exist_ok=True)
    with parquet_streams(out / DECISIONS_TABLE, out / SUBSET_TABLE) as (decisions_out, subset_out):
        empty = (slice(0, 0), pl.DataFrame(schema=table.schema))
        written = False
        for rows, chunk in itertools.chain(table.row_chunks(), [empty]):
            if chunk is empty[1] and written:
                break
            decisions, subset = _chunk_outputs(state, chunk, rows, labels, kept_labels)
            decisions_out.write(decisions)
            subset_out.write(subset)
            written = True
    write_datacomp_pairs(out / SUBSET_NPY, state.hi[state.keep], state.lo[state.keep])


def _chunk_outputs(
    state: _Selection, chunk: pl.DataFrame, rows: slice, labels: pl.Series, kept: pl.Series
) -> tuple[pa.Table, pa.Table]:
    """One chunk's rows of decisions.parquet and subset.parquet, as Arrow tables."""
    keep = state.keep[rows]
    code = state.reason[rows]
    uid = chunk["uid"].cast(pl.String).str.to_lowercase().fill_null("")
    reason = labels.gather(code.astype(np.int64))
    unscored = np.flatnonzero(code == FROM_STATUS)  # reasons from the row itself: few rows
    if unscored.size:
        rows_of = chunk[unscored.tolist()]
        reason = reason.scatter(unscored, _status_reasons(rows_of))
    bad = np.flatnonzero(code == BAD_UID)
    if bad.size:
        raw = chunk["uid"].gather(bad).to_list()
        text = [f"bad_uid: {value!r} is not 32 hex characters" for value in raw]
        reason = reason.scatter(bad, pl.Series(text, dtype=pl.String))
    flags = pl.DataFrame({"keep": keep, "failed": state.failed[rows]})
    status = flags.select(
        pl.when("keep").then(pl.lit("kept")).when("failed").then(pl.lit("failed"))
        .otherwise(pl.lit("dropped")).alias("status")
    )["status"]  # fmt: skip
    decisions = pl.DataFrame(
        {
            "uid": uid,
            "status": status,
            "reason": reason.zip_with(pl.Series(~keep), pl.Series([None], dtype=pl.String)),
            "kept_by": kept.gather(state.kept_by[rows].astype(np.int64)),
        }
    )
    for column in ("key", "shard"):
        if column in chunk.columns:
            decisions = decisions.with_columns(chunk[column].alias(column))
    extra = [pl.Series(name, col[rows]).fill_nan(None) for name, col in state.extra.items()]
    subset = (
        chunk.with_columns(*extra, uid, decisions["kept_by"])
        .filter(pl.Series(keep))
        .drop([c for c in ("status", "error") if c in chunk.columns])
    )
    compat = pl.CompatLevel.oldest()
    return decisions.to_arrow(compat_level=compat), subset.to_arrow(compat_level=compat)
