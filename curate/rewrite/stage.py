"""The rewrite stage: captions in (shards, run folder, tables), per-unit rewrite tables out.

For each unit (shard or table), every usable caption gets `num_rewrites` jobs; jobs already in
the cache (same uid, caption text, index, prompt version, backend identity, sampling parameters
and seed) are not sent again. The unit's table ``OUT/rewrites/<unit>.parquet`` is rebuilt from
the cache and joined by uid, never by position: uid, shard, key, caption, rewrites (valid ones,
in index order), reasons (one per index: null when valid), status (ok / partial / failed),
error, backend, model, prompt_version. Samples the reader could not use are there as failed with
their error, so every input row is accounted for.

A uid seen before in the pool (units in order, rows in order; compared lowercased, as balance
does) fails as ``duplicate_uid`` and is not sent: the first occurrence wins, even when it
failed itself, so `curate write --rewrites` can never attach one caption's rewrites to another.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from curate.errors import ShardOpenError
from curate.io.captions import CaptionUnit, read_unit, resolve_units
from curate.io.shards import check_out_apart
from curate.rewrite.backends import Backend, SamplingParams
from curate.rewrite.cache import CachedResult, RequestCache, request_key
from curate.rewrite.checks import require_range
from curate.rewrite.engine import EngineOptions, Job, run_jobs_async
from curate.rewrite.prompts import PromptTemplate
from curate.runtime.atomic import write_atomic, write_json_atomic

REWRITES_DIR = "rewrites"
CACHE_FILE = "cache.sqlite"
REPORT_JSON = "rewrite.json"
DUPLICATE_UID = "duplicate_uid: the uid appeared earlier in the pool"


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
    """Counts of one rewrite run (also written to rewrite.json)."""

    source: str
    out: str
    backend: str
    model: str
    prompt_version: str
    num_rewrites: int
    units: int = 0
    samples: int = 0
    samples_failed: int = 0  # unusable input rows (reader errors)
    ok: int = 0  # samples with every rewrite
    partial: int = 0
    failed: int = 0  # usable samples without any valid rewrite
    requests_sent: int = 0  # jobs run in this invocation (each may take several attempts)
    cached: int = 0
    rewrites: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    shard_errors: dict[str, str] = field(default_factory=dict)  # units that could not be read

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _setting(backend: Backend, template: PromptTemplate, options: RewriteOptions) -> str:
    return "|".join(
        (template.version, backend.identity(), options.params.key(), f"seed={options.seed}")
    )


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
            rewrites.append([])
            reasons.append([])
            status.append("failed")
            errors.append(row_error)
            continue
        got = [results.get(k) for k in row_keys]
        texts = [r.text for r in got if r is not None and r.text is not None]
        why = [None if r is not None and r.text is not None else _reason(r) for r in got]
        rewrites.append(texts)
        reasons.append(why)
        if len(texts) == len(row_keys):
            status.append("ok")
            errors.append(None)
        else:
            status.append("partial" if texts else "failed")
            errors.append("; ".join(sorted({w for w in why if w})))
    return frame.select("uid", "shard", "key", "caption").with_columns(
        pl.Series("rewrites", rewrites, dtype=pl.List(pl.String)),
        pl.Series("reasons", reasons, dtype=pl.List(pl.String)),
        pl.Series("status", status, dtype=pl.String),
        pl.Series("error", errors, dtype=pl.String),
        pl.lit(backend.name).alias("backend"),
        pl.lit(backend.model).alias("model"),
        pl.lit(template.version).alias("prompt_version"),
    )


def _mark_duplicates(frame: pl.DataFrame, seen: set[str]) -> pl.DataFrame:
    """`frame` with rows whose uid is in `seen` (or earlier in `frame`) failed as
    ``duplicate_uid`` (rows with an error keep theirs); adds the frame's uids to `seen`."""
    errors: list[str | None] = []
    for uid, error in zip(frame["uid"], frame["error"], strict=True):
        if uid is not None:
            lowered = uid.lower()
            if lowered in seen and error is None:
                error = DUPLICATE_UID
            seen.add(lowered)
        errors.append(error)
    return frame.with_columns(pl.Series("error", errors, dtype=pl.String))


def _reason(result: CachedResult | None) -> str:
    if result is None:
        return "failed: not run"
    return result.reason or "failed: unknown"


async def _rewrite_units(
    units: Sequence[CaptionUnit],
    backend: Backend,
    template: PromptTemplate,
    out: Path,
    options: RewriteOptions,
    report: RewriteReport,
    on_request: Callable[[], None] | None,
    on_unit: Callable[[int], None] | None,
    where: str,
) -> None:
    setting = _setting(backend, template, options)
    cache = RequestCache(out / CACHE_FILE)
    seen: set[str] = set()  # lowercased uids of the units so far, for duplicate_uid
    try:
        for unit in units:
            try:
                frame = _mark_duplicates(read_unit(unit), seen)
            except ShardOpenError as exc:  # the others go on; the command names it, exits 1
                report.shard_errors[unit.url] = str(exc)
                if on_unit:
                    on_unit(0)
                continue
            keys: list[list[str]] = []
            jobs: list[Job] = []
            for uid, caption, error in frame.select("uid", "caption", "error").iter_rows():
                if error is not None:
                    keys.append([])
                    continue
                row = [request_key(uid, caption, i, setting) for i in range(options.num_rewrites)]
                keys.append(row)
                jobs.extend(Job(k, uid, i, caption) for i, k in enumerate(row))
            results = cache.get_many([j.key for j in jobs])
            pending = [j for j in jobs if j.key not in results]
            report.cached += len(jobs) - len(pending)
            report.requests_sent += len(pending)
            done = await run_jobs_async(
                pending,
                backend,
                cache,
                options.engine,
                where=where,
                on_done=(lambda _job, _result: on_request()) if on_request else None,
            )
            results.update(done)
            table = _unit_table(frame, keys, results, backend, template)
            path = out / REWRITES_DIR / f"{unit.name}.parquet"
            write_atomic(path, lambda tmp, table=table: table.write_parquet(tmp))
            _count(report, table)
            if on_unit:
                on_unit(frame.height)
    finally:
        cache.close()
        await backend.aclose()


def _count(report: RewriteReport, table: pl.DataFrame) -> None:
    report.units += 1
    report.samples += table.height
    input_failed = table["error"].is_not_null() & (table["reasons"].list.len() == 0)
    report.samples_failed += int(input_failed.sum())
    counts = Counter(table.filter(~input_failed)["status"].to_list())
    report.ok += counts.get("ok", 0)
    report.partial += counts.get("partial", 0)
    report.failed += counts.get("failed", 0)
    report.rewrites += int(table["rewrites"].list.len().sum())
    reasons = Counter(r for row in table["reasons"].to_list() for r in row if r)
    for reason, n in reasons.items():
        report.reasons[reason] = report.reasons.get(reason, 0) + n


def rewrite_source(
    source: str | Sequence[str],
    backend: Backend,
    template: PromptTemplate,
    out: Path,
    options: RewriteOptions,
    *,
    caption_column: str | None = None,
    where: str = "the server",
    on_request: Callable[[], None] | None = None,
    on_unit: Callable[[int], None] | None = None,
    on_units: Callable[[int, int], None] | None = None,
) -> RewriteReport:
    """Rewrite every usable caption of `source`; resumable through OUT/cache.sqlite."""
    start = time.perf_counter()
    units = resolve_units(source, caption_column)
    check_out_apart(out, [u.url for u in units])
    if on_units:
        on_units(len(units), len(units) * options.num_rewrites)
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
    asyncio.run(
        _rewrite_units(units, backend, template, out, options, report, on_request, on_unit, where)
    )
    report.reasons = dict(sorted(report.reasons.items()))
    report.seconds = time.perf_counter() - start
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
