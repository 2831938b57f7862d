"""The rewrite stage: captions in (shards, run folder, tables), per-unit rewrite tables out.

A map stage on the runtime (`runtime.stage`: any executor, array tasks, resumable records), one
unit per caption unit (shard or table), then a reduce once every unit is done.

Map (`RewriteStage.run_unit`): every usable caption of the unit gets `num_rewrites` jobs; jobs
already in the unit's request cache ``OUT/cache/<unit>.sqlite`` (same uid, caption text, index,
prompt version, backend identity, sampling parameters and seed) are not sent again, nor are jobs
found in the single ``OUT/cache.sqlite`` of earlier versions (only read, and copied into the
unit's file), so results paid for before are never asked for twice. Each cache file has one
writer, the unit's own worker, so processes and Ray workers on many nodes never share a SQLite
file; results are committed as they finish, so a kill mid-unit loses only the requests in
flight. The unit's table ``OUT/rewrites/<unit>.parquet`` is built from the results and joined
by uid, never by position: uid, shard, key, caption, rewrites (valid ones, in index order),
reasons (one per index: null when valid), status (ok / partial / failed), error, backend, model,
prompt_version. Samples the reader could not use are there as failed with their error, so every
input row is accounted for. A uid seen earlier in the same unit (compared lowercased, as balance
does) fails as ``duplicate_uid`` and is not sent. The completion record follows the table; a
rerun skips a unit whose record carries its signature (source, caption column, prompt version,
backend, sampling, seed, number of rewrites) unless some of its requests failed on transport
(those are never cached): such a unit is redone, sending only what is missing.

Reduce (`mark_duplicates_across_units`, when every unit is done or failed): a row whose
lowercased uid appeared in an earlier unit (plan order; the first occurrence wins, even when it
failed itself) becomes failed with ``duplicate_uid`` and no rewrites, so `curate write
--rewrites` can never attach one caption's rewrites to another. The tables it changes are
rewritten atomically, and only when they change: running it again changes nothing. The requests
for such rows were sent by the map: that is the price of units being independent (a unit cannot
know what an earlier unit holds); duplicates within a unit are still never sent. Then
``OUT/rewrite.json`` is written. With array tasks each task runs its share of the map, and the
reduce runs in whichever call finds every unit done (any later call, too).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import pyarrow.parquet as pq

from curate.errors import ShardOpenError
from curate.io.captions import CaptionUnit, read_unit, resolve_units
from curate.io.shards import check_out_apart
from curate.rewriting.backends import Backend, SamplingParams
from curate.rewriting.cache import CachedResult, RequestCache, request_key
from curate.rewriting.checks import require_range
from curate.rewriting.engine import EngineOptions, Job, RewriteAborted, run_jobs_async
from curate.rewriting.prompts import PromptTemplate
from curate.runtime import records
from curate.runtime.atomic import write_atomic, write_json_atomic
from curate.runtime.executors import TaskSlice
from curate.runtime.stage import MapStage, Resources, Unit, UnitFailure, run_map

__all__ = [
    "CACHE_DIR",
    "LEGACY_CACHE_FILE",
    "REPORT_JSON",
    "REWRITES_DIR",
    "RewriteOptions",
    "RewriteReport",
    "RewriteStage",
    "mark_duplicates_across_units",
    "rewrite_source",
]

REWRITES_DIR = "rewrites"
CACHE_DIR = "cache"  # OUT/cache/<unit>.sqlite
LEGACY_CACHE_FILE = "cache.sqlite"  # the one cache of earlier versions: read, never written
REPORT_JSON = "rewrite.json"
TABLE_FORMAT = 1
DUPLICATE_UID = "duplicate_uid: the uid appeared earlier in the unit"
EARLIER_UNIT = "duplicate_uid: the uid appeared in an earlier unit"  # + " (<unit>)"
_META_KEY = b"curate.rewriting"
_TEMPORARY = re.compile(r"^\..+\.parquet\.[0-9a-f]{8}\.tmp$")  # atomic_path's, of a killed run
_TABLE_SCHEMA = {
    "uid": pl.String,
    "shard": pl.String,
    "key": pl.String,
    "caption": pl.String,
    "rewrites": pl.List(pl.String),
    "reasons": pl.List(pl.String),
    "status": pl.String,
    "error": pl.String,
    "backend": pl.String,
    "model": pl.String,
    "prompt_version": pl.String,
}
_TABLE_COUNTS = ("samples", "samples_failed", "ok", "partial", "failed", "rewrites")

log = logging.getLogger("curate.rewriting")


@dataclass
class RewriteOptions:
    """What to ask for and how hard to try."""

    num_rewrites: int = 4
    params: SamplingParams = field(default_factory=SamplingParams)
    engine: EngineOptions = field(default_factory=EngineOptions)
    seed: int = 0

    def __post_init__(self) -> None:
        require_range("--num-rewrites", self.num_rewrites, low=1, integer=True)


@dataclass
class RewriteReport:
    """Counts of one rewrite run (also written to rewrite.json).

    The table counts (units to reasons) are over every unit once the reduce has run
    (`complete`); otherwise over this task's units only, before duplicates across units are
    marked. `requests_sent` and `cached` are about this call's units."""

    source: str
    out: str
    backend: str
    model: str
    prompt_version: str
    num_rewrites: int
    units: int = 0  # units with a table
    samples: int = 0
    samples_failed: int = 0  # unusable input rows (reader errors, duplicate uids)
    ok: int = 0  # samples with every rewrite
    partial: int = 0
    failed: int = 0  # usable samples without any valid rewrite
    requests_sent: int = 0  # jobs run in this invocation (each may take several attempts)
    cached: int = 0  # jobs whose result was there already (cache, or a unit done before)
    rewrites: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    shard_errors: dict[str, str] = field(default_factory=dict)  # units that could not be read
    complete: bool = True  # every unit done or failed: duplicates marked, rewrite.json written
    pending_units: int = 0  # units not done yet (other array tasks) when not complete

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _setting(backend: Backend, template: PromptTemplate, options: RewriteOptions) -> str:
    return "|".join(
        (template.version, backend.identity(), options.params.key(), f"seed={options.seed}")
    )


def _reason(result: CachedResult | None) -> str:
    if result is None:
        return "failed: not run"
    return result.reason or "failed: unknown"


def _outcome(
    keys: list[str], results: dict[str, CachedResult]
) -> tuple[list[str], list[str | None], str, str | None]:
    """A usable row's rewrites, reasons, status and error from its jobs' results."""
    got = [results.get(k) for k in keys]
    texts = [r.text for r in got if r is not None and r.text is not None]
    why = [None if r is not None and r.text is not None else _reason(r) for r in got]
    if len(texts) == len(keys):
        return texts, why, "ok", None
    return texts, why, "partial" if texts else "failed", "; ".join(sorted({w for w in why if w}))


def _unit_table(
    frame: pl.DataFrame,
    keys: list[list[str]],
    results: dict[str, CachedResult],
    backend: Backend,
    template: PromptTemplate,
) -> pl.DataFrame:
    rewrites: list[list[str]] = []
    reasons: list[list[str | None]] = []
    status: list[str] = []
    errors: list[str | None] = []
    for row_error, row_keys in zip(frame["error"], keys, strict=True):
        if row_error is not None:
            outcome: tuple[list[str], list[str | None], str, str | None] = (
                [],
                [],
                "failed",
                row_error,
            )
        else:
            outcome = _outcome(row_keys, results)
        rewrites.append(outcome[0])
        reasons.append(outcome[1])
        status.append(outcome[2])
        errors.append(outcome[3])
    return frame.select("uid", "shard", "key", "caption").with_columns(
        pl.Series("rewrites", rewrites, dtype=pl.List(pl.String)),
        pl.Series("reasons", reasons, dtype=pl.List(pl.String)),
        pl.Series("status", status, dtype=pl.String),
        pl.Series("error", errors, dtype=pl.String),
        pl.lit(backend.name, pl.String).alias("backend"),
        pl.lit(backend.model, pl.String).alias("model"),
        pl.lit(template.version, pl.String).alias("prompt_version"),
    )


def _mark_duplicates(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` with rows whose uid is earlier in `frame` failed as ``duplicate_uid`` (rows with
    an error keep theirs)."""
    seen: set[str] = set()
    errors: list[str | None] = []
    for uid, error in zip(frame["uid"], frame["error"], strict=True):
        if uid is not None:
            lowered = uid.lower()
            if lowered in seen and error is None:
                error = DUPLICATE_UID
            seen.add(lowered)
        errors.append(error)
    return frame.with_columns(pl.Series("error", errors, dtype=pl.String))


def table_stats(table: pl.DataFrame) -> dict[str, Any]:
    """The counts of one unit table: samples, samples_failed (input rows without jobs), ok /
    partial / failed (of the others), rewrites, reasons, jobs, and transport_failed (jobs that
    failed on transport: never cached, so a rerun asks again)."""
    input_failed = table["error"].is_not_null() & (table["reasons"].list.len() == 0)
    counts = Counter(table.filter(~input_failed)["status"].to_list())
    reasons = Counter(r for row in table["reasons"].to_list() for r in row if r)
    return {
        "samples": table.height,
        "samples_failed": int(input_failed.sum()),
        "ok": counts.get("ok", 0),
        "partial": counts.get("partial", 0),
        "failed": counts.get("failed", 0),
        "rewrites": int(table["rewrites"].list.len().sum()),
        "reasons": dict(sorted(reasons.items())),
        "jobs": int(table["reasons"].list.len().sum()),
        "transport_failed": sum(n for r, n in reasons.items() if r.startswith("failed:")),
    }


def _write_table(path: Path, table: pl.DataFrame, meta: dict[str, Any]) -> None:
    """The table in its fixed schema, `meta` in the parquet metadata, atomically (the map and
    the reduce write the same bytes for the same rows)."""
    arrow = table.select(list(_TABLE_SCHEMA)).cast(_TABLE_SCHEMA).to_arrow()  # type: ignore[arg-type]
    arrow = arrow.replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True)})
    write_atomic(path, lambda tmp: pq.write_table(arrow, tmp, compression="zstd"))


def _read_meta(path: Path) -> dict[str, Any] | None:
    """The metadata `_write_table` stored, or None (missing, partial or foreign file)."""
    try:
        meta = json.loads((pq.read_schema(path).metadata or {})[_META_KEY])
    except Exception:
        return None
    return meta if isinstance(meta, dict) else None


def _open_legacy(path: Path) -> RequestCache | None:
    """A request cache opened read-only; None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return RequestCache(path, read_only=True)
    except sqlite3.Error as exc:
        log.warning("cannot read the request cache %s (%s): its results are not used", path, exc)
        return None


@dataclass
class RewriteStage(MapStage):
    """Rewriting as a map stage: one unit per caption unit, one table and one cache file each.
    Plain data (the backend makes its HTTP session and reads its key in the worker)."""

    name: ClassVar[str] = "rewrite"
    units: list[CaptionUnit]
    backend: Backend
    template: PromptTemplate
    out: Path
    options: RewriteOptions
    where: str = "the server"
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # this call: stats, abort
    _by_name: dict[str, CaptionUnit] = field(default_factory=dict, repr=False)
    _signatures: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {u.name: u for u in self.units}

    @property
    def resources(self) -> Resources:  # type: ignore[override]
        """A GPU per unit for in-process vLLM (Ray); a CPU otherwise."""
        return Resources(cpus=1.0, gpus=1.0 if self.backend.name == "vllm" else 0.0)

    @property
    def setting(self) -> str:
        return _setting(self.backend, self.template, self.options)

    def plan(self) -> list[Unit]:
        return [Unit(u.name, u.url) for u in self.units]

    def signature(self, unit: Unit) -> dict[str, Any]:
        """Everything a unit's table depends on (taken once per unit and call: the source is
        stat'ed when the plan is made)."""
        if unit.name not in self._signatures:
            caption_unit = self._by_name[unit.name]
            self._signatures[unit.name] = {
                "format": TABLE_FORMAT,
                "source": caption_unit.url,
                "kind": caption_unit.kind,
                "source_signature": caption_unit.signature(),
                "caption_column": caption_unit.caption_column,
                "setting": self.setting,
                "backend": self.backend.name,
                "model": self.backend.model,
                "num_rewrites": self.options.num_rewrites,
            }
        return self._signatures[unit.name]

    def signature_hash(self, unit: Unit) -> str:
        return records.signature_hash(self.signature(unit))

    def path(self, unit: Unit) -> Path:
        return self.out / REWRITES_DIR / f"{unit.name}.parquet"

    def cache_path(self, unit: Unit) -> Path:
        return self.out / CACHE_DIR / f"{unit.name}.sqlite"

    def table_current(self, unit: Unit) -> bool:
        """The unit's table is there and says it was made with this signature."""
        meta = _read_meta(self.path(unit))
        return meta is not None and meta.get("signature") == self.signature_hash(unit)

    def output_present(self, unit: Unit) -> bool:
        """The table is current and every job in it settled (a unit with requests that failed
        on transport is redone: only those are sent again)."""
        meta = _read_meta(self.path(unit))
        return (
            meta is not None
            and meta.get("signature") == self.signature_hash(unit)
            and int((meta.get("stats") or {}).get("transport_failed", 1)) == 0
        )

    # --- one unit ---------------------------------------------------------------------------

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        """Read the unit, send what its cache lacks, write its table; the stats of the table
        plus this run's requests_sent and cached."""
        self._check_abort()
        try:
            frame = _mark_duplicates(read_unit(self._by_name[unit.name]))
        except ShardOpenError as exc:
            raise UnitFailure(str(exc)) from exc
        setting = self.setting
        keys: list[list[str]] = []
        jobs: list[Job] = []
        for uid, caption, error in frame.select("uid", "caption", "error").iter_rows():
            if error is not None:
                keys.append([])
                continue
            row = [request_key(uid, caption, i, setting) for i in range(self.options.num_rewrites)]
            keys.append(row)
            jobs.extend(Job(k, uid, i, caption) for i, k in enumerate(row))
        cache = RequestCache(self.cache_path(unit))
        try:
            results = self._lookup(cache, [j.key for j in jobs])
            pending = [j for j in jobs if j.key not in results]
            if pending:
                try:
                    results.update(asyncio.run(self._send(pending, cache)))
                except RewriteAborted as exc:
                    self._abort(exc)
                    raise
        finally:
            cache.close()
        table = _unit_table(frame, keys, results, self.backend, self.template)
        stats = table_stats(table)
        _write_table(
            self.path(unit), table, {"signature": self.signature_hash(unit), "stats": stats}
        )
        return {
            **stats,
            "requests_sent": len(pending),
            "cached": len(jobs) - len(pending),
            "run": self.run_id,
        }

    async def _send(self, jobs: list[Job], cache: RequestCache) -> dict[str, CachedResult]:
        try:
            return await run_jobs_async(
                jobs, self.backend, cache, self.options.engine, where=self.where
            )
        finally:
            await self.backend.aclose()  # its session belongs to this unit's event loop

    def _lookup(self, cache: RequestCache, keys: list[str]) -> dict[str, CachedResult]:
        """Results of `keys` in the unit's cache, else in the old single cache (copied into the
        unit's file, so it holds every result its table needs)."""
        found = cache.get_many(keys)
        missing = [k for k in keys if k not in found]
        if missing:
            legacy = _open_legacy(self.out / LEGACY_CACHE_FILE)
            if legacy is not None:
                try:
                    old = legacy.get_many(missing)
                finally:
                    legacy.close()
                if old:
                    cache.put_many(old.items())
                    found.update(old)
        return found

    def lookup_read_only(self, unit: Unit, keys: list[str]) -> dict[str, CachedResult]:
        """Results of `keys` from the unit's cache and the old one, writing nothing."""
        found: dict[str, CachedResult] = {}
        for path in (self.cache_path(unit), self.out / LEGACY_CACHE_FILE):
            missing = [k for k in keys if k not in found]
            cache = _open_legacy(path) if missing else None
            if cache is not None:
                try:
                    found.update(cache.get_many(missing))
                finally:
                    cache.close()
        return found

    # --- stopping every worker when the server is down --------------------------------------

    def _abort_path(self) -> Path:
        return self.out / records.RUNTIME_DIR / self.name / f"aborted-{self.run_id}"

    def _abort(self, exc: RewriteAborted) -> None:
        """Tell this call's other units (any worker, any node) to stop before they start."""
        text = str(exc)
        write_atomic(self._abort_path(), lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def _check_abort(self) -> None:
        try:
            message = self._abort_path().read_text(encoding="utf-8")
        except OSError:
            return
        raise RewriteAborted(message)

    def clear_abort(self) -> None:
        self._abort_path().unlink(missing_ok=True)


# --- the reduce -------------------------------------------------------------------------------


def _restore(stage: RewriteStage, unit: Unit, rows: pl.DataFrame) -> list[tuple]:
    """Rewrites, reasons, status and error of rows whose earlier occurrence is gone, rebuilt
    from the caches (nothing is sent: a missing result reads ``failed: not run``, so the next
    run redoes the unit)."""
    n = stage.options.num_rewrites
    setting = stage.setting
    keys = [
        [request_key(uid, caption, i, setting) for i in range(n)]
        for uid, caption in rows.select("uid", "caption").iter_rows()
    ]
    results = stage.lookup_read_only(unit, [k for row in keys for k in row])
    return [_outcome(row, results) for row in keys]


def _reduce_unit(
    stage: RewriteStage, unit: Unit, marks: pl.DataFrame, meta: dict[str, Any]
) -> dict[str, Any]:
    """Apply `marks` (per row: mark, the target error) to the unit's table; its new stats."""
    table = pl.read_parquet(stage.path(unit))
    mark = marks["mark"]
    restore = table["error"].str.starts_with(EARLIER_UNIT).fill_null(False) & ~mark
    table = table.with_columns(
        pl.when(mark).then(pl.lit([], pl.List(pl.String))).otherwise("rewrites").alias("rewrites"),
        pl.when(mark).then(pl.lit([], pl.List(pl.String))).otherwise("reasons").alias("reasons"),
        pl.when(mark).then(pl.lit("failed")).otherwise("status").alias("status"),
        pl.when(mark).then(marks["target"]).otherwise("error").alias("error"),
    )
    if restore.any():
        index = restore.arg_true().to_list()
        outcomes = _restore(stage, unit, table[index])
        columns = {
            name: table[name].to_list() for name in ("rewrites", "reasons", "status", "error")
        }
        for i, outcome in zip(index, outcomes, strict=True):
            for name, value in zip(columns, outcome, strict=True):
                columns[name][i] = value
        table = table.with_columns(
            pl.Series(name, values, dtype=_TABLE_SCHEMA[name]) for name, values in columns.items()
        )
    stats = table_stats(table)
    _write_table(stage.path(unit), table, {**meta, "stats": stats})
    log.info("rewrite: %s: %d rows marked duplicate_uid across units", unit.name, int(mark.sum()))
    return stats


def mark_duplicates_across_units(stage: RewriteStage, done: Sequence[Unit]) -> dict[str, dict]:
    """The reduce: in the tables of `done` (plan order), fail every usable row whose lowercased
    uid appeared in an earlier unit (and give back a row whose earlier occurrence is gone);
    rewrite only the tables that change. Returns every unit's table stats, as now."""
    metas = {u.name: _read_meta(stage.path(u)) or {} for u in done}
    if not done:
        return {}
    frames = [
        pl.read_parquet(stage.path(u), columns=["uid", "error", "reasons"]).select(
            pl.lit(i, pl.Int64).alias("unit"),
            pl.col("uid").str.to_lowercase().alias("uid"),
            "error",
            (pl.col("reasons").list.len() > 0).alias("usable"),
        )
        for i, u in enumerate(done)
    ]
    names = {i: u.name for i, u in enumerate(done)}
    pool = pl.concat(frames, how="vertical").with_columns(
        pl.when(pl.col("uid").is_not_null()).then(pl.col("unit").min().over("uid")).alias("first"),
        pl.col("error").str.starts_with(EARLIER_UNIT).fill_null(False).alias("marked"),
    )
    pool = pool.with_columns(
        ((pl.col("usable") | pl.col("marked")) & (pl.col("first") < pl.col("unit")))
        .fill_null(False)
        .alias("mark")
    ).with_columns(
        pl.when(pl.col("mark"))
        .then(
            pl.concat_str(
                pl.lit(f"{EARLIER_UNIT} ("),
                pl.col("first").replace_strict(names, return_dtype=pl.String),
                pl.lit(")"),
            )
        )
        .alias("target")
    )
    changed = (pool["mark"] != pool["marked"]) | (
        pool["mark"] & (pool["target"] != pool["error"]).fill_null(True)
    )
    to_redo = set(pool.filter(changed)["unit"].unique().to_list())
    stats = {}
    for i, unit in enumerate(done):
        if i in to_redo:
            marks = pool.filter(pl.col("unit") == i).select("mark", "target")
            stats[unit.name] = _reduce_unit(stage, unit, marks, metas[unit.name])
        else:
            stats[unit.name] = metas[unit.name].get("stats") or {}
    return stats


# --- the command ------------------------------------------------------------------------------


def _remove_temporaries(folder: Path) -> None:
    """Delete the temporary tables a killed run left behind (never a finished one)."""
    if folder.is_dir():
        for path in folder.iterdir():
            if _TEMPORARY.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)


def _add_counts(report: RewriteReport, stats: dict[str, Any]) -> None:
    report.units += 1
    for name in _TABLE_COUNTS:
        setattr(report, name, getattr(report, name) + int(stats.get(name, 0)))
    for reason, n in (stats.get("reasons") or {}).items():
        report.reasons[reason] = report.reasons.get(reason, 0) + int(n)


def _unit_states(stage: RewriteStage) -> tuple[list[Unit], dict[str, str], int]:
    """Every unit's state from the records: the done ones (in plan order), the failed ones
    (source -> error) and how many are neither."""
    folder = records.stage_folder(stage.out, stage.name)
    done: list[Unit] = []
    failed: dict[str, str] = {}
    pending = 0
    for unit in stage.plan():
        wanted = stage.signature_hash(unit)
        if records.is_done(folder, unit, wanted) and stage.table_current(unit):
            done.append(unit)
            continue
        record = records.read_failed(folder, unit)
        if record is not None and record.get("signature") == wanted:
            failed[unit.source] = str(record.get("error"))
        else:
            pending += 1
    return done, failed, pending


def _plain(exc: RewriteAborted) -> RewriteAborted:
    """The abort itself, not Ray's wrapper of it (whose message holds a traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, RewriteAborted) else exc


@dataclass
class RewriteConfig:
    """Every option of `curate rewrite`: the backend (`rewrite.backends`: OpenAI-compatible,
    vLLM or rules), the prompt template (`rewrite.prompts.load_prompts`), the rewrite settings,
    the caption column of tables, and how the backend is named in messages."""

    backend: Backend
    template: PromptTemplate
    options: RewriteOptions
    caption_column: str | None = None
    where: str = "the server"


@records.logged_stage("rewrite")
def rewrite_source(
    source: str | Sequence[str],
    backend: Backend,
    template: PromptTemplate,
    out: Path,
    options: RewriteOptions,
    *,
    caption_column: str | None = None,
    where: str = "the server",
    executor: Any = None,
    tasks: TaskSlice | None = None,
    on_unit: Callable[[int], None] | None = None,
    on_units: Callable[[int, int], None] | None = None,
) -> RewriteReport:
    """Rewrite every usable caption of `source`: this task's units (`tasks`, default all) on
    `executor` (default: in this process), then, once every unit is done, the duplicate reduce
    and rewrite.json. Resumable (records, per-unit caches). `on_units(units, skipped)` once the
    done units are known, `on_unit(samples)` after each unit run now. Raises `RewriteAborted`
    when the server is down or fails too often."""
    start = time.perf_counter()
    tasks = tasks or TaskSlice()
    out = Path(out)
    units = resolve_units(source, caption_column)
    check_out_apart(out, [u.url for u in units])
    label = source if isinstance(source, str) else " ".join(source)
    report = RewriteReport(
        source=label,
        out=str(out),
        backend=backend.name,
        model=backend.model,
        prompt_version=template.version,
        num_rewrites=options.num_rewrites,
    )
    out.mkdir(parents=True, exist_ok=True)
    if tasks.count == 1:  # with several tasks a neighbour's temporary file may be in use
        _remove_temporaries(out / REWRITES_DIR)
    stage = RewriteStage(units, backend, template, out, options, where)
    try:
        mapped = run_map(
            stage, out, executor=executor, tasks=tasks, on_unit=on_unit, on_plan=on_units
        )
    except RewriteAborted as exc:
        raise _plain(exc) from None
    finally:
        stage.clear_abort()
    for stats in mapped.stats.values():
        if stats.get("run") == stage.run_id:
            report.requests_sent += int(stats.get("requests_sent", 0))
            report.cached += int(stats.get("cached", 0))
        else:  # done before: every job of it was answered then
            report.cached += int(stats.get("jobs", 0))

    done, failed, pending = _unit_states(stage)
    if pending:  # other array tasks' units: their reduce comes with the call that sees them all
        report.complete = False
        report.pending_units = pending
        report.shard_errors = dict(mapped.failed)
        for stats in mapped.stats.values():
            _add_counts(report, stats)
    else:
        report.shard_errors = failed
        for stats in mark_duplicates_across_units(stage, done).values():
            _add_counts(report, stats)
    report.reasons = dict(sorted(report.reasons.items()))
    report.seconds = time.perf_counter() - start
    if report.complete:
        write_json_atomic(
            out / REPORT_JSON,
            {
                "options": {
                    "num_rewrites": options.num_rewrites,
                    "params": asdict(options.params),
                    "engine": asdict(options.engine),
                    "seed": options.seed,
                },
                "report": {k: v for k, v in report.to_json().items() if k != "seconds"},
            },
        )
    return report
