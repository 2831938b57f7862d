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
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.embedding.store import RunFolder
from curate.errors import InputError, RunFolderError, failure_code
from curate.io.shards import check_out_apart
from curate.io.uid_files import read_uid_file, write_datacomp_npy
from curate.io.uids import is_uid
from curate.runtime.atomic import write_atomic, write_json_atomic
from curate.runtime.records import logged_stage
from curate.selection.rules import (
    DERIVED,
    NORMSIM2_D,
    Condition,
    TopStep,
    derived_columns,
    top_count,
    top_mask,
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


def load_pool_table(
    source: Path | str, *, out: Path | None = None
) -> tuple[pl.DataFrame, RunFolder | None]:
    """The pool: RUN/scores.parquet for a run folder, else a parquet file, folder or glob.

    With `out`, refuses an output folder that holds a pool file (a rerun would read it back)."""
    path = Path(source)
    if path.is_dir() and RunFolder.is_run(path):
        table = path / "scores.parquet"
        if not table.is_file():
            raise RunFolderError(
                f"run {path} has no scores.parquet yet; run `curate score {path}` first"
            )
        if out is not None:
            check_out_apart(out, [table])
        return _read_parquets([table]), RunFolder(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in sorted(glob.glob(str(source)))]
    if not files:
        raise InputError(
            f"{source}: no pool table found (give a run folder with scores.parquet, a parquet "
            "file, or a folder or glob of parquet files)"
        )
    if out is not None:
        check_out_apart(out, files)
    return _read_parquets(files), None


def _read_parquets(files: Sequence[Path]) -> pl.DataFrame:
    try:
        frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"cannot read pool table {files[0]}: {exc}") from exc
    if "uid" not in frame.columns:
        raise InputError(f"{files[0]}: pool table has no 'uid' column")
    return frame


class _Selection:
    """Mutable per-row state while the steps run."""

    def __init__(self, frame: pl.DataFrame) -> None:
        n = frame.height
        self.frame = frame
        self.uids: list[str] = [str(u).lower() if u is not None else "" for u in frame["uid"]]
        self.keep = np.zeros(n, dtype=bool)
        self.failed = np.zeros(n, dtype=bool)
        self.reason: list[str | None] = [None] * n
        self.kept_by: list[str | None] = [None] * n
        self.steps: list[StepCount] = []

    def drop(self, mask: np.ndarray, step: str, threshold: float | None = None) -> None:
        """Drop the candidates where `mask` is False, recording `step` as the reason."""
        before = int(self.keep.sum())
        dropped = self.keep & ~mask
        for i in np.flatnonzero(dropped):
            self.reason[i] = step
        self.keep &= mask
        self.steps.append(StepCount(step, before, int(self.keep.sum()), threshold))

    def uid_mask(self, wanted: set[str]) -> np.ndarray:
        return np.fromiter((u in wanted for u in self.uids), dtype=bool, count=len(self.uids))


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
    frame, run = load_pool_table(source, out=out)
    frame = derived_columns(frame)
    report = SelectReport(out=Path(out), source=str(source), rows=frame.height)
    report.spec = spec.to_json()
    state = _Selection(frame)
    _mark_pool(state)
    report.pool = int(state.keep.sum())
    report.failed = int(state.failed.sum())
    report.failures = dict(
        sorted(
            Counter(
                failure_code(r) for r, f in zip(state.reason, state.failed, strict=True) if f and r
            ).items()
        )
    )
    pool_size = report.pool
    restricted = False
    for path in spec.intersect:
        state.drop(state.uid_mask(set(read_uid_file(path).uids)), f"intersect {Path(path).name}")
        restricted = True
    for path in spec.exclude:
        state.drop(~state.uid_mask(set(read_uid_file(path).uids)), f"exclude {Path(path).name}")
        restricted = True
    for condition in spec.where:
        _require_column(frame, condition.column, "--where")
        mask = frame.select(condition.expr()).to_series().to_numpy()
        state.drop(np.asarray(mask, dtype=bool), condition.label)
        restricted = True
    for top in spec.top:
        if top.base is None and restricted:
            raise InputError(
                f"--top {top.column}:{top.fraction:g}: this step ranks a restricted set; say "
                f"whether {top.fraction:g} is of the pool or of the remainder ("
                f"{top.column}:{top.fraction:g}:pool or {top.column}:{top.fraction:g}:remainder)"
            )
        _apply_top(state, top, pool_size, run, spec, device)
        restricted = True
    for i in np.flatnonzero(state.keep):
        state.kept_by[i] = "criteria"
    for path in spec.union:
        _apply_union(state, path)
    report.steps = state.steps
    report.selected = int(state.keep.sum())
    _write_outputs(state, Path(out))
    report.seconds = time.perf_counter() - start
    write_json_atomic(Path(out) / REPORT_JSON, {**report.to_json(), "seconds": None})
    return report


def _mark_pool(state: _Selection) -> None:
    """Candidates = scored rows with a valid, first-seen uid; the rest fail with a reason."""
    frame = state.frame
    status = frame["status"].to_list() if "status" in frame.columns else ["scored"] * frame.height
    errors = frame["error"].to_list() if "error" in frame.columns else [None] * frame.height
    seen: set[str] = set()
    for i, (uid, st, err) in enumerate(zip(state.uids, status, errors, strict=True)):
        if st != "scored":
            state.reason[i] = err or f"status_{st}"
        elif not is_uid(uid):
            state.reason[i] = f"bad_uid: {frame['uid'][i]!r} is not 32 hex characters"
        elif uid in seen:
            state.reason[i] = "duplicate_uid: uid already earlier in the pool table"
        else:
            seen.add(uid)
            state.keep[i] = True
            continue
        state.failed[i] = True


def _require_column(frame: pl.DataFrame, column: str, option: str) -> None:
    if column in frame.columns and frame.schema[column].is_numeric():
        return
    numeric = [c for c, t in frame.schema.items() if t.is_numeric()]
    hint = f"numeric columns: {', '.join(numeric) or 'none'}"
    unavailable = sorted(set(DERIVED) - set(frame.columns))
    if column in unavailable:
        hint = f"{column} needs caption or width/height columns in the pool table"
    if column in frame.columns:
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
    _require_column(state.frame, top.column, "--top")
    column = state.frame[top.column].cast(pl.Float64)
    values = column.to_numpy()
    null = column.is_null().to_numpy() | np.isnan(values)
    if (state.keep & null).any():
        state.drop(~null, f"{top.column} is null")
    # After the null step (reported as its own step): the remainder is what this step ranks.
    base = pool_size if (top.base or "pool") == "pool" else int(state.keep.sum())
    n = top_count(top.fraction, base)
    index = np.flatnonzero(state.keep)
    keep, threshold = top_mask(values[index], n)
    mask = np.ones_like(state.keep)
    mask[index[~keep]] = False
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

    if "shard" not in state.frame.columns:
        raise RunFolderError(f"{run.path}/scores.parquet has no shard column; rerun curate score")
    stems = sorted(set(state.frame["shard"].drop_nulls().to_list()))
    meta, arrays = load_pool(run, stems, with_embeddings=["image_emb"])
    row_of: dict[str, int] = {}  # embedding row of each uid's first OK sample
    ok_uids = (
        u
        for u, e in zip(meta["uid"].to_pylist(), meta["error"].to_pylist(), strict=True)
        if e is None
    )
    for row, uid in enumerate(ok_uids):
        row_of.setdefault(uid, row)
    index = np.flatnonzero(state.keep)
    rows = np.array([row_of.get(state.uids[i], -1) for i in index], dtype=np.int64)
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
    column = np.full(state.frame.height, np.nan, dtype=np.float32)
    column[index] = scores
    state.frame = state.frame.with_columns(
        pl.Series(NORMSIM2_D, column).fill_nan(None).alias(NORMSIM2_D)
    )
    mask = np.ones_like(state.keep)
    mask[index[~mask_local]] = False
    state.drop(mask, top.label)
    state.steps[-1].note = f"{spec.normsim2d_rounds} rounds, seed {spec.seed}"


def _apply_union(state: _Selection, path: Path) -> None:
    uids = read_uid_file(path)
    wanted = set(uids.uids)
    mask = state.uid_mask(wanted)
    add = mask & ~state.keep & ~state.failed
    before = int(state.keep.sum())
    label = f"union {Path(path).name}"
    for i in np.flatnonzero(add):
        state.reason[i] = None
        state.kept_by[i] = label
    state.keep |= add
    present = {state.uids[i] for i in np.flatnonzero(mask & ~state.failed)}
    note = None
    if len(present) < len(wanted):
        note = f"{len(wanted) - len(present)} uids of the file are not in the pool's scored rows"
    state.steps.append(StepCount(label, before, int(state.keep.sum()), None, note))


def _write_outputs(state: _Selection, out: Path) -> None:
    frame = state.frame
    status = np.where(state.keep, "kept", np.where(state.failed, "failed", "dropped"))
    decisions = pl.DataFrame(
        {
            "uid": state.uids,
            "status": status.tolist(),
            "reason": [None if k else r for k, r in zip(state.keep, state.reason, strict=True)],
            "kept_by": state.kept_by,
        }
    )
    for column in ("key", "shard"):
        if column in frame.columns:
            decisions = decisions.with_columns(frame[column].alias(column))
    subset = (
        frame.with_columns(
            pl.Series("uid", state.uids), pl.Series("kept_by", state.kept_by, dtype=pl.String)
        )
        .filter(pl.Series(state.keep))
        .drop([c for c in ("status", "error") if c in frame.columns])
    )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / DECISIONS_TABLE, lambda tmp: decisions.write_parquet(tmp))
    write_atomic(out / SUBSET_TABLE, lambda tmp: subset.write_parquet(tmp))
    write_datacomp_npy(out / SUBSET_NPY, subset["uid"].to_list())
