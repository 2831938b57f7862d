"""The balance stage: captions in, per-unit matches, global entry counts, a balanced subset out.

Two phases, so that the map part can run as many tasks (Slurm array, several machines) and the
rest once:

1. ``match`` (map, per unit): captions of one shard or table → ``OUT/matches/<unit>.parquet``
   with uid, shard, key, caption, the matched entry ids and the per-sample error. A unit whose
   file records the same metadata hash, match mode, normalisation, caption column and source
   signature is skipped on a rerun. Units go to task ``i`` of ``k`` by position (``units[i::k]``).
2. ``sample`` (reduce, once): read every unit's matches, mark later repeats of a uid as failed,
   count entries over the pool, choose t, compute every text's keep probability, draw the
   seeded subset (`draws.draw_subset`: systematic rounding among texts matching the same
   entries by default, or MetaCLIP's independent coin per uid), and write
   ``entry_counts.parquet`` (per entry: count before and after, sampling probability, expected
   count after), ``decisions.parquet`` (every row: kept / dropped with reason / failed with
   error, its keep probability), ``subset.parquet`` + ``subset.npy`` (the balanced subset, like
   `curate select`'s) and ``balance.json`` (parameters and summary).

The result depends on the inputs, the metadata, the mode, the rule for t, the draw rule and the
seed only: not on the number of tasks or workers.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from curate.balancing.draws import DrawRule
from curate.balancing.matching import Matcher, MatchMode, Normalization
from curate.balancing.metadata import Metadata, load_metadata
from curate.balancing.reduce import Tally, decide_unit, rank_classes, scan_pool
from curate.balancing.sampling import (
    DEFAULT_TAIL_SHARE,
    TailRule,
    ThresholdChoice,
    entry_probabilities,
    tail_share,
    threshold_for_size,
    threshold_from_tail_share,
)
from curate.errors import InputError, RunFolderError, ShardOpenError
from curate.io.captions import CaptionUnit, read_unit, resolve_units
from curate.io.shards import check_out_apart
from curate.io.uid_files import write_datacomp_pairs
from curate.runtime import records
from curate.runtime.atomic import parquet_streams, write_atomic, write_json_atomic
from curate.runtime.executors import TaskSlice
from curate.runtime.stage import MapReport, MapStage, Unit, UnitFailure, run_map

MATCHES_DIR = "matches"
ENTRY_COUNTS_TABLE = "entry_counts.parquet"
DECISIONS_TABLE = "decisions.parquet"
SUBSET_TABLE = "subset.parquet"
SUBSET_NPY = "subset.npy"
REPORT_JSON = "balance.json"
MATCH_FORMAT = 2  # 2: captions as written (format 1 matched stripped shard captions)
_META_KEY = b"curate.balancing.match"
_TEMPORARY = re.compile(r"^\..+\.parquet\.[0-9a-f]{8}\.tmp$")  # atomic_path's, of a killed run
HEAD_ROWS = 10


@dataclass
class BalanceSpec:
    """How to balance: exactly one of `t`, `target_size` may be set; else `tail_share` is used,
    turned into t by `tail_rule`."""

    t: float | None = None
    tail_share: float = DEFAULT_TAIL_SHARE
    tail_rule: TailRule = TailRule.curate
    target_size: int | None = None
    seed: int = 0
    draw: DrawRule = DrawRule.systematic  # systematic: within texts matching the same entries

    def validate(self) -> None:
        if self.t is not None and self.target_size is not None:
            raise InputError("give at most one of --t and --target-size")
        if self.t is not None and not (self.t > 0 and math.isfinite(self.t)):
            raise InputError(f"--t must be a positive, finite number, got {self.t}")
        if self.target_size is not None and self.target_size <= 0:
            raise InputError(f"--target-size must be positive, got {self.target_size}")
        if not 0.0 < self.tail_share < 1.0:
            raise InputError(f"--tail-share must be between 0 and 1, got {self.tail_share}")
        if TailRule(self.tail_rule) is not TailRule.curate and (
            self.t is not None or self.target_size is not None
        ):
            raise InputError("--tail-rule applies to --tail-share only, not to --t / --target-size")


@dataclass
class EntryRow:
    """One entry of the head table printed in the summary."""

    entry_id: int
    entry: str
    before: int
    after: int
    probability: float


@dataclass
class CountBucket:
    """Entries whose pool count falls in [low, high): how many, and their matches before/after."""

    low: int
    high: int | None
    entries: int
    matches_before: int
    matches_after: int


@dataclass
class BalanceReport:
    """The numbers of one balance run (also written to balance.json)."""

    source: str
    out: str
    metadata: str
    metadata_sha256: str
    entries: int
    mode: str
    normalize: str  # caption normalisation before matching (none, strip)
    seed: int
    draw: str
    units: int
    rows: int
    failed: int
    failures: dict[str, int]
    matched: int  # texts that match at least one entry
    kept: int
    expected_kept: float
    t: float
    t_rule: str  # given, tail_share (curate's rule), tail_share_metaclip2 or target_size
    tail_share_target: float | None
    tail_share_before: float
    tail_share_after: float
    entries_matched: int
    head_entries: int  # entries with count >= t (the ones that get sampled down)
    matches_before: int
    matches_after: int
    max_count_before: int
    max_count_after: int
    note: str | None = None
    shard_errors: dict[str, str] = field(default_factory=dict)  # units that could not be read
    head: list[EntryRow] = field(default_factory=list)
    buckets: list[CountBucket] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def matched_fraction(self) -> float:
        pool = self.rows - self.failed
        return self.matched / pool if pool else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["matched_fraction"] = self.matched_fraction
        return data


def match_signature(
    unit: CaptionUnit,
    metadata: Metadata,
    mode: MatchMode,
    normalize: Normalization = Normalization.none,
) -> dict[str, Any]:
    """What a unit's match file depends on (its completion record carries the hash)."""
    return {
        "format": MATCH_FORMAT,
        "metadata_sha256": metadata.sha256,
        "entries": metadata.size,
        "mode": MatchMode(mode).value,
        "normalize": Normalization(normalize).value,
        "caption_column": unit.caption_column,
        "source": unit.url,
        "signature": unit.signature(),
    }


@dataclass
class MatchStage(MapStage):
    """The match phase as a map stage: one unit per caption unit, one match file each."""

    name: ClassVar[str] = "match"
    units: list[CaptionUnit]
    metadata: Metadata
    mode: MatchMode
    normalize: Normalization
    out: Path
    _matcher: Matcher | None = field(default=None, repr=False)
    _by_name: dict[str, CaptionUnit] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {u.name: u for u in self.units}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_matcher": None}  # each worker builds its own automaton

    def plan(self) -> list[Unit]:
        return [Unit(u.name, u.url) for u in self.units]

    def _unit(self, unit: Unit) -> CaptionUnit:
        return self._by_name[unit.name]

    def signature(self, unit: Unit) -> dict[str, Any]:
        return match_signature(self._unit(unit), self.metadata, self.mode, self.normalize)

    def path(self, unit: Unit) -> Path:
        return self.out / MATCHES_DIR / f"{unit.name}.parquet"

    def output_present(self, unit: Unit) -> bool:
        """The match file is there and says it was made with this signature (a foreign or
        damaged file is redone)."""
        try:
            meta = pq.read_schema(self.path(unit)).metadata or {}
            return json.loads(meta[_META_KEY]) == self.signature(unit)
        except Exception:  # missing, partial or foreign file
            return False

    def setup(self) -> None:
        self._matcher = Matcher(self.metadata.entries, self.mode, normalize=self.normalize)

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        """Match one unit's captions into its match file (uid, shard, key, caption, error,
        entry_ids; the signature in the parquet metadata too)."""
        if self._matcher is None:
            self.setup()
        assert self._matcher is not None
        try:
            frame = read_unit(self._unit(unit))
        except ShardOpenError as exc:
            raise UnitFailure(str(exc)) from exc
        captions = frame["caption"].to_list()
        ids = [[] if c is None else self._matcher.match(c) for c in captions]
        table = frame.with_columns(pl.Series("entry_ids", ids, dtype=pl.List(pl.Int32))).to_arrow()
        signature = json.dumps(self.signature(unit), sort_keys=True)
        table = table.replace_schema_metadata({_META_KEY: signature})
        write_atomic(self.path(unit), lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        return {"samples": frame.height, "failed": int(frame["error"].is_not_null().sum())}


def _remove_temporaries(folder: Path) -> None:
    """Delete the temporary match files a killed run left behind (never a finished one)."""
    for path in folder.iterdir():
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def match_units(
    units: Sequence[CaptionUnit],
    metadata: Metadata,
    out: Path,
    *,
    mode: MatchMode = MatchMode.metaclip,
    normalize: Normalization | str = Normalization.none,
    executor: Any = None,
    tasks: TaskSlice | None = None,
    on_unit: Callable[[int], None] | None = None,
) -> MapReport:
    """The match phase for this task's units (`tasks`, default all) on `executor`."""
    tasks = tasks or TaskSlice()
    check_out_apart(out, [u.url for u in units])
    stage = MatchStage(list(units), metadata, MatchMode(mode), Normalization(normalize), out)
    folder = out / MATCHES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if tasks.count == 1:  # with several tasks a neighbour's temporary file may be in use
        _remove_temporaries(folder)
    return run_map(stage, out, executor=executor, tasks=tasks, on_unit=on_unit)


def match_files(
    units: Sequence[CaptionUnit],
    metadata: Metadata,
    out: Path,
    mode: MatchMode,
    *,
    normalize: Normalization | str = Normalization.none,
) -> tuple[list[Path], dict[str, str]]:
    """Every done unit's match file in unit order, and the units that failed (url -> error);
    refuses when a unit has not been matched (or was matched with other settings)."""
    stage = MatchStage(list(units), metadata, MatchMode(mode), Normalization(normalize), out)
    folder = records.stage_folder(out, stage.name)
    paths: list[Path] = []
    missing: list[str] = []
    errors: dict[str, str] = {}
    for unit in stage.plan():
        wanted = records.signature_hash(stage.signature(unit))
        if records.is_done(folder, unit, wanted) and stage.output_present(unit):
            paths.append(stage.path(unit))
            continue
        failed = records.read_failed(folder, unit)
        if failed is not None and failed.get("signature") == wanted:
            errors[unit.source] = str(failed.get("error"))
        else:
            missing.append(unit.name)
    if missing:
        raise RunFolderError(
            f"{len(missing)} of {len(units)} units have no current match file in "
            f"{out / MATCHES_DIR} (first: {missing[0]}); run the match phase for them first"
        )
    return paths, errors


def read_matches(
    units: Sequence[CaptionUnit],
    metadata: Metadata,
    out: Path,
    mode: MatchMode,
    columns: Sequence[str] = ("uid", "shard", "key", "error", "entry_ids"),
    *,
    normalize: Normalization | str = Normalization.none,
) -> tuple[pl.DataFrame, dict[str, str]]:
    """`match_files`' rows as one frame (`columns`), and the units that failed."""
    paths, errors = match_files(units, metadata, out, mode, normalize=normalize)
    frames = [pl.read_parquet(path, columns=list(columns)) for path in paths]
    return (pl.concat(frames, how="vertical") if frames else pl.DataFrame()), errors


def pool_errors(frame: pl.DataFrame) -> tuple[pl.Series, pl.Series]:
    """Lower-cased uids and each row's error: the unit's own, else ``bad_uid`` for a uid that is
    not 32 hex characters, else ``duplicate_uid`` for a later repeat (as at score time)."""
    uid = frame["uid"].str.to_lowercase()
    valid = uid.str.contains(r"^[0-9a-f]{32}$").fill_null(False)
    errors = (
        pl.DataFrame({"e": frame["error"], "valid": valid, "first": uid.is_first_distinct()})
        .select(
            pl.when(pl.col("e").is_not_null())
            .then(pl.col("e"))
            .when(~pl.col("valid"))
            .then(pl.lit("bad_uid: uid is not 32 hex characters"))
            .when(~pl.col("first"))
            .then(pl.lit("duplicate_uid: the uid appeared earlier in the pool"))
        )
        .to_series()
        .alias("error")
    )
    return uid, errors


def matches_csr(lists: pl.Series, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row entry id lists as CSR (offsets, ids); rows not `ok` contribute no matches."""
    all_lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = lists.explode().drop_nulls().to_numpy().astype(np.int64)
    entry_ids = flat[np.repeat(ok, all_lengths)]
    lengths = np.where(ok, all_lengths, 0)
    offsets = np.zeros(len(ok) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, entry_ids


def raise_empty(source: str, shard_errors: dict[str, str]) -> None:
    """Refuse a pool without rows, naming the unreadable units when that is why."""
    if shard_errors:
        url, error = next(iter(shard_errors.items()))
        raise ShardOpenError(
            f"{source}: no unit could be read ({len(shard_errors)} failed; {url}: {error})"
        )
    raise InputError(f"{source}: the source holds no samples")


@records.logged_stage("balance")
def sample_pool(
    units: Sequence[CaptionUnit],
    metadata: Metadata,
    out: Path,
    spec: BalanceSpec,
    *,
    mode: MatchMode = MatchMode.metaclip,
    normalize: Normalization | str = Normalization.none,
    source: str = "",
) -> BalanceReport:
    """The sample phase: counts, t, keep probabilities, draws and every output file."""
    start = time.perf_counter()
    spec.validate()
    check_out_apart(out, [u.url for u in units])
    normalize = Normalization(normalize)
    files, shard_errors = match_files(units, metadata, out, mode, normalize=normalize)
    report = reduce_matches(
        files, metadata, out, spec, mode=mode, normalize=normalize, source=source,
        units=len(units), shard_errors=shard_errors,
    )  # fmt: skip
    report.seconds = time.perf_counter() - start
    return report


def reduce_matches(
    files: Sequence[Path],
    metadata: Metadata,
    out: Path,
    spec: BalanceSpec,
    *,
    mode: MatchMode,
    normalize: Normalization,
    source: str,
    units: int,
    shard_errors: dict[str, str],
) -> BalanceReport:
    """The sample phase on match files (`match_files`), in bounded memory (`balancing.reduce`):
    writes every output file and returns the report."""
    files = list(files)
    systematic = DrawRule(spec.draw) is DrawRule.systematic
    scan = scan_pool(
        files, metadata.size, class_key=systematic, keep_matches=spec.target_size is not None
    )
    n = scan.rows
    if n == 0:
        raise_empty(source, shard_errors)
    counts = scan.counts
    choice = _choose_threshold(spec, scan.csr, counts)
    t = choice.t
    ranks = rank_classes(scan, spec.seed) if systematic else None
    scan.release()
    ok = scan.ok()
    failed, matched = int((~ok).sum()), int(scan.matched().sum())
    del ok

    out.mkdir(parents=True, exist_ok=True)
    tally = Tally(metadata.size)
    with parquet_streams(out / DECISIONS_TABLE, out / SUBSET_TABLE) as (decisions, subset):
        for index in range(len(files)):
            chunk = decide_unit(scan, index, t, spec.seed, DrawRule(spec.draw), ranks, tally)
            decisions.write(chunk[0])
            subset.write(chunk[1])
    del ranks
    after = tally.after
    entry_table = pl.DataFrame(
        {
            "entry_id": np.arange(metadata.size, dtype=np.int32),
            "entry": metadata.entries,
            "count": counts,
            "count_after": after,
            "probability": entry_probabilities(counts, t),
            "expected_after": tally.expected_after,
        }
    )

    report = BalanceReport(
        source=source,
        out=str(out),
        metadata=str(metadata.path),
        metadata_sha256=metadata.sha256,
        entries=metadata.size,
        mode=mode.value,
        normalize=normalize.value,
        seed=spec.seed,
        draw=spec.draw.value,
        units=units,
        rows=n,
        failed=failed,
        failures=dict(sorted(tally.failures.items())),
        matched=matched,
        kept=tally.kept,
        expected_kept=tally.expected_kept,
        t=t,
        t_rule=choice.rule,
        tail_share_target=spec.tail_share if choice.rule.startswith("tail_share") else None,
        tail_share_before=choice.tail_share,
        tail_share_after=tail_share(after, t),
        entries_matched=int((counts > 0).sum()),
        head_entries=int(((counts > 0) & (counts >= t)).sum()),
        matches_before=int(counts.sum()),
        matches_after=int(after.sum()),
        max_count_before=int(counts.max(initial=0)),
        max_count_after=int(after.max(initial=0)),
        note=choice.note,
        head=_head_rows(metadata.entries, counts, after, t),
        buckets=_buckets(counts, after),
        shard_errors=shard_errors,
    )
    write_atomic(out / ENTRY_COUNTS_TABLE, lambda tmp: entry_table.write_parquet(tmp))
    write_datacomp_pairs(out / SUBSET_NPY, *tally.kept_pairs())
    record = {
        "spec": asdict(spec),
        "report": {k: v for k, v in report.to_json().items() if k != "seconds"},
    }
    write_json_atomic(out / REPORT_JSON, record)
    return report


def _choose_threshold(
    spec: BalanceSpec, matches: tuple[np.ndarray, np.ndarray] | None, counts: np.ndarray
) -> ThresholdChoice:
    if spec.t is not None:
        return ThresholdChoice(t=float(spec.t), rule="given", tail_share=tail_share(counts, spec.t))
    if spec.target_size is not None:
        assert matches is not None  # the scan kept them for this
        return threshold_for_size(*matches, counts, spec.target_size)
    return threshold_from_tail_share(counts, spec.tail_share, spec.tail_rule)


def _head_rows(
    entries: Sequence[str], counts: np.ndarray, after: np.ndarray, t: float
) -> list[EntryRow]:
    """The most matched entries (count descending, then id)."""
    order = np.lexsort((np.arange(len(counts)), -counts))[:HEAD_ROWS]
    probability = entry_probabilities(counts, t)
    return [
        EntryRow(int(i), entries[i], int(counts[i]), int(after[i]), float(probability[i]))
        for i in order
        if counts[i] > 0
    ]


def _buckets(counts: np.ndarray, after: np.ndarray) -> list[CountBucket]:
    """Entries grouped by pool count in decades: [1, 10), [10, 100), ..."""
    top = int(counts.max(initial=0))
    buckets = []
    low = 1
    while low <= top:
        high = low * 10
        inside = (counts >= low) & (counts < high)
        buckets.append(
            CountBucket(
                low=low,
                high=high,
                entries=int(inside.sum()),
                matches_before=int(counts[inside].sum()),
                matches_after=int(after[inside].sum()),
            )
        )
        low = high
    return buckets


class Phase(str, Enum):
    """Which part of balance to run: both, the map only (per task), the reduce only."""

    all = "all"
    match = "match"
    sample = "sample"


def default_match_workers() -> int:
    """Match processes when none are asked for (balance, audit)."""
    return min(os.cpu_count() or 1, 8)


@dataclass
class BalanceConfig:
    """Every option of `curate balance`: the metadata (a file, or loaded), t and the draw
    (`spec`), the match rule, the caption column of tables and which phase to run."""

    metadata: str | Path | Metadata
    spec: BalanceSpec = field(default_factory=BalanceSpec)
    mode: MatchMode = MatchMode.metaclip
    normalize: Normalization | str = Normalization.none
    caption_column: str | None = None
    phase: Phase | str = Phase.all

    def loaded_metadata(self) -> Metadata:
        if isinstance(self.metadata, Metadata):
            return self.metadata
        return load_metadata(self.metadata)


@dataclass
class BalanceRun:
    """What a `balance` call ran: the match map (this task's share) and/or the sample reduce."""

    match: MapReport | None = None
    sample: BalanceReport | None = None

    @property
    def shard_errors(self) -> dict[str, str]:
        """Units that could not be read (the command exits 1 naming them)."""
        errors = dict(self.match.failed) if self.match else {}
        errors.update(self.sample.shard_errors if self.sample else {})
        return errors

    def to_json(self) -> dict[str, Any]:
        if self.sample is not None:
            return self.sample.to_json()
        assert self.match is not None
        return self.match.to_json()


def balance(
    source: str | Sequence[str],
    metadata: Metadata,
    out: Path,
    spec: BalanceSpec,
    *,
    mode: MatchMode = MatchMode.metaclip,
    normalize: Normalization | str = Normalization.none,
    caption_column: str | None = None,
    phase: Phase | str = Phase.all,
    executor: Any = None,
    tasks: TaskSlice | None = None,
    on_unit: Callable[[int], None] | None = None,
    on_units: Callable[[int], None] | None = None,
) -> BalanceRun:
    """`curate balance`: the match map over this task's units (`tasks`; on `executor`), then,
    unless `phase` is ``match``, the sample reduce over every unit's matches."""
    spec.validate()
    phase = Phase(phase)
    tasks = tasks or TaskSlice()
    if tasks.count > 1 and phase is Phase.all:
        raise InputError(
            "with several array tasks run --phase match in each, then --phase sample once"
        )
    units = resolve_units(source, caption_column)
    result = BalanceRun()
    if phase is not Phase.sample:
        if on_units:
            on_units(len(tasks.select(units)))
        result.match = match_units(
            units, metadata, out, mode=mode, normalize=normalize, executor=executor,
            tasks=tasks, on_unit=on_unit,
        )  # fmt: skip
    if phase is not Phase.match:
        label = source if isinstance(source, str) else " ".join(source)
        result.sample = sample_pool(
            units, metadata, out, spec, mode=mode, normalize=normalize, source=label
        )
    return result
