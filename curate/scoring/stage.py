"""The score stage: a run folder's embeddings in, one scores table (a row per input sample) out.

Row-wise metrics (clipscore, normsim) are a map over the run's shards (`ScoreStage` on the stage
runtime: RUN/shard_scores/<stem>.parquet, records in RUN/.curate/score/); the reduce
(`score_run`) marks duplicate uids, computes negclip (a pool-level metric: seeded batches of the
whole pool) and writes RUN/scores.parquet.

Failed samples stay in the table with their error and null scores, so `read = scored + failed`
can always be checked. A uid already seen earlier in the pool (same DataComp uid in two places)
is recorded as a `duplicate_uid` failure: uids in the scores table are unique among scored rows.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.embedding.stage import EmbedConfig
from curate.embedding.store import META_COLUMNS, RunFolder, embeddings_to_numpy
from curate.errors import InputError, RunFolderError, failure_code
from curate.runtime import records
from curate.runtime.atomic import write_atomic, write_json_atomic
from curate.runtime.executors import TaskSlice
from curate.runtime.stage import MapStage, Unit, UnitFailure, run_map
from curate.scoring.clipscore import clipscore
from curate.scoring.negclip import negclip
from curate.scoring.normsim import normsim, second_moment
from curate.scoring.pool import EmbeddingStore, PoolIndex

METRICS = ("clipscore", "negclip", "normsim")
SCORE_META_FIELDS = [
    pa.field(c, pa.int32() if c in ("width", "height") else pa.string()) for c in META_COLUMNS
]  # the embedding tables' metadata, as scores.parquet stores them
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


@dataclass
class NegclipOptions:
    """negCLIPLoss settings; `temperature=None` means the model's own 1/exp(logit_scale)."""

    batch_size: int = 32768
    k: int = 10
    temperature: float | None = None
    seed: int = 0


@dataclass
class NormsimOptions:
    """NormSim settings: the target run (same model) and the norm p (a number ≥ 1 or inf)."""

    target: RunFolder | None = None
    p: float = math.inf


def normsim_column(p: float) -> str:
    if math.isinf(p):
        return "normsim_inf"
    return f"normsim_{int(p)}" if float(p).is_integer() else f"normsim_{p:g}".replace(".", "_")


@dataclass
class ScoreReport:
    """Counts, failures by reason, quantiles per metric and where the table went."""

    out: Path
    read: int = 0
    scored: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    quantiles: dict[str, dict[str, float]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    shard_errors: dict[str, str] = field(default_factory=dict)
    truncated: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    task: str = "local"
    complete: bool = True  # False: an array task scored its share; the reduce is still to run
    embedding: Any = field(default=None, repr=False)  # the EmbedReport of `score_inputs`

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        embedding = data.pop("embedding")
        if embedding is not None:
            data["embedding"] = {
                k: str(v) if isinstance(v, Path) else v for k, v in embedding.items()
            }
        return data


@dataclass
class ScoreConfig:
    """Every option of `curate score` (the CLI's defaults): metrics and their settings, and how
    missing embeddings are made (`embed`; its device also scores)."""

    metrics: Sequence[str] = ("clipscore",)
    negclip: NegclipOptions = field(default_factory=NegclipOptions)
    target: str | None = None  # NormSim target: shards (embedded into RUN/targets/) or a run
    normsim_p: float = math.inf
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # for what the run lacks

    def validate(self) -> list[str]:
        """The metrics asked for, once each, in the order given; one-line errors otherwise."""
        metrics = list(dict.fromkeys(self.metrics))
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise InputError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
        if not metrics:
            raise InputError("give at least one --metric")
        if "normsim" in metrics and self.target is None:
            raise InputError("--metric normsim needs --target (shards or an embedding run)")
        if not self.normsim_p >= 1:
            raise InputError(f"--normsim-p must be ≥ 1 (or 'inf'), not {self.normsim_p}")
        return metrics


def load_pool(
    run: RunFolder, stems: Sequence[str], *, with_embeddings: Sequence[str] = ()
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Concatenate the shard tables' metadata and, for OK rows, the requested embeddings."""
    model = run.model_record()
    dim = int(model["embed_dim"])
    columns = list(META_COLUMNS)
    metas: list[pa.Table] = []
    embs: dict[str, list[np.ndarray]] = {name: [] for name in with_embeddings}
    for stem in stems:
        record = run.read_shard_record(stem)
        if record is None or record.fingerprint != model["fingerprint"]:
            raise RunFolderError(
                f"shard {stem} of run {run.path} is not embedded with the run's model; "
                "rerun curate embed on the run to redo it"
            )
        table = run.read_shard(stem, columns + list(with_embeddings))
        metas.append(table.select(columns))
        ok = np.asarray(table.column("error").is_null())
        for name in with_embeddings:
            embs[name].append(embeddings_to_numpy(table.column(name), dim)[ok])
    meta = (
        pa.concat_tables(metas)
        if metas
        else pa.table({c: pa.array([], pa.string()) for c in columns})
    )
    arrays = {
        name: np.concatenate(parts) if parts else np.zeros((0, dim), np.float16)
        for name, parts in embs.items()
    }
    return meta, arrays


def summarize(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    qs = np.quantile(values.astype(np.float64), QUANTILES)
    stats = {f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs, strict=True)}
    stats["mean"] = float(values.mean())
    return stats


ROW_METRICS = ("clipscore", "normsim")  # one value per row from its own pair: a map
SHARD_SCORES = "shard_scores"  # RUN/shard_scores/<stem>.parquet: the map's outputs
SCORE_FORMAT = 1


@dataclass(frozen=True)
class NormsimTarget:
    """A checked NormSim target: its run, complete stems, content hash and, for p = 2, the
    cached second-moment matrix (RUN_TARGET/cache/moment-*.npy), so units never recompute it."""

    run: RunFolder
    stems: tuple[str, ...]
    content: str  # RunFolder.content_hash of the stems
    p: float
    moment: Path | None = None

    @classmethod
    def prepare(
        cls, pool: RunFolder, target: RunFolder, p: float, device: str | None
    ) -> NormsimTarget:
        if target.model_record()["fingerprint"] != pool.model_record()["fingerprint"]:
            raise RunFolderError(
                f"target run {target.path} was embedded with another model than the pool; "
                "embed the target with the same --model/--pretrained"
            )
        stems = target.complete_stems()
        if not stems:
            raise RunFolderError(f"target run {target.path} holds no embedded shards")
        content = target.content_hash(stems)
        moment = None
        if p == 2:
            moment = target.path / "cache" / f"moment-{content[:16]}.npy"
            if not moment.is_file():
                _, temb = load_pool(target, stems, with_embeddings=["image_emb"])
                matrix = second_moment(temb["image_emb"], device=device)
                write_atomic(moment, lambda tmp: _save_npy(tmp, matrix))
        return cls(target, tuple(stems), content, p, moment)

    def params(self) -> dict[str, Any]:
        return {
            "p": self.p if math.isfinite(self.p) else "inf",
            "target": str(self.run.path),
            "target_hash": self.content,
        }


@dataclass
class ScoreStage(MapStage):
    """The row-wise metrics (clipscore, normsim) as a map stage: one unit per embedded shard of
    the pool, whose output RUN/shard_scores/<stem>.parquet holds one float32 column per metric
    and a row per row of the shard's table (null where the row failed to embed).

    A unit reads only its own table (and, for normsim with p ≠ 2, the target's embeddings, loaded
    once per worker in `setup`). Its signature is the embed unit's signature (what the table is
    a function of, known before any table exists, so every array task plans the same units),
    the metrics and the target's content hash: a re-embedded shard or another target redoes it.
    A shard that is not embedded (its embed unit failed) fails here too.
    """

    name: ClassVar[str] = "score"
    run: RunFolder
    units: list[Unit]  # (stem, url) in pool order
    table_signatures: dict[str, str]  # stem -> what its embedding table depends on
    metrics: tuple[str, ...]  # row-wise metrics, output column names in `columns`
    target: NormsimTarget | None = None
    device: str | None = None
    _target_emb: np.ndarray | None = field(default=None, repr=False, compare=False)
    _moment: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_target_emb": None, "_moment": None}  # workers load their own

    @property
    def columns(self) -> dict[str, str]:
        """metric -> its column name in the tables."""
        out = {}
        for metric in self.metrics:
            if metric == "normsim":
                assert self.target is not None
                out[metric] = normsim_column(self.target.p)
            else:
                out[metric] = metric
        return out

    def plan(self) -> list[Unit]:
        return list(self.units)

    def signature(self, unit: Unit) -> dict[str, Any]:
        return {
            "format": SCORE_FORMAT,
            "stem": unit.name,
            "table": self.table_signatures[unit.name],
            "metrics": list(self.columns.values()),
            "normsim": self.target.params()["target_hash"] if self.target else None,
        }

    def part_path(self, stem: str) -> Path:
        return self.run.path / SHARD_SCORES / f"{stem}.parquet"

    def output_present(self, unit: Unit) -> bool:
        return self.part_path(unit.name).is_file()

    def setup(self) -> None:
        target = self.target
        if target is None or "normsim" not in self.metrics:
            return
        if target.moment is not None and self._moment is None:
            self._moment = np.load(target.moment, allow_pickle=False)
        elif target.moment is None and self._target_emb is None:
            _, temb = load_pool(target.run, target.stems, with_embeddings=["image_emb"])
            self._target_emb = temb["image_emb"]

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        record = self.run.read_shard_record(unit.name)
        if record is None or record.fingerprint != self.run.model_record()["fingerprint"]:
            raise UnitFailure(f"shard {unit.source} is not embedded with the run's model")
        self.setup()
        needed = ["image_emb"] + (["text_emb"] if "clipscore" in self.metrics else [])
        meta, emb = load_pool(self.run, [unit.name], with_embeddings=needed)
        ok = np.asarray(meta.column("error").is_null())
        values: dict[str, np.ndarray] = {}
        for metric, column in self.columns.items():
            if metric == "clipscore":
                values[column] = clipscore(emb["image_emb"], emb["text_emb"], device=self.device)
            else:
                assert self.target is not None
                values[column] = normsim(
                    emb["image_emb"],
                    self._target_emb,
                    p=self.target.p,
                    moment=self._moment,
                    device=self.device,
                )
        table = pa.table({name: _masked(vals, ok) for name, vals in values.items()})
        write_atomic(
            self.part_path(unit.name), lambda tmp: pq.write_table(table, tmp, compression="zstd")
        )
        return {"samples": meta.num_rows, "scored": int(ok.sum())}

    def read_part(self, stem: str) -> dict[str, np.ndarray]:
        """The map's columns of one shard as float32 arrays over its rows, NaN where null."""
        path = self.part_path(stem)
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise RunFolderError(f"cannot read {path}: {exc}") from exc
        return {
            column: table.column(column).to_numpy(zero_copy_only=False).astype(np.float32)
            for column in self.columns.values()
        }


def _masked(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """`values` of the OK rows spread over all rows, null (and NaN underneath) elsewhere."""
    full = np.full(ok.size, np.nan, dtype=np.float32)
    full[ok] = values
    return pa.array(full, pa.float32(), mask=~ok)


@records.logged_stage("score", lambda args: args["run"].path)
def score_run(
    run: RunFolder,
    stems: Sequence[str],
    metrics: Sequence[str],
    *,
    out: Path,
    negclip_opts: NegclipOptions | None = None,
    normsim_opts: NormsimOptions | None = None,
    device: str | None = None,
    shard_errors: dict[str, str] | None = None,
    executor: Any = None,
    tasks: TaskSlice | None = None,
    on_unit: Callable[[int], None] | None = None,
) -> ScoreReport:
    """Compute `metrics` over the pool held by `run` (restricted to `stems`) and write `out`.

    The row-wise metrics run first as a map (`ScoreStage`, on `executor`; with array `tasks`,
    this task's share only, and then the report says `complete=False` and nothing more is
    done); the reduce then marks duplicate uids, computes negclip over the whole pool and
    writes the table.
    """
    start = time.perf_counter()
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise InputError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    tasks = tasks or TaskSlice()
    negclip_opts = negclip_opts or NegclipOptions()
    normsim_opts = normsim_opts or NormsimOptions()
    if "normsim" in metrics and normsim_opts.target is None:
        raise InputError("--metric normsim needs --target (shards or an embedding run)")
    model = run.model_record()
    target = None
    if "normsim" in metrics:
        assert normsim_opts.target is not None
        target = NormsimTarget.prepare(run, normsim_opts.target, normsim_opts.p, device)
    stage = ScoreStage(
        run=run,
        units=[Unit(stem, _url_of(run, stem)) for stem in stems],
        table_signatures=_table_signatures(run, stems),
        metrics=tuple(m for m in ROW_METRICS if m in metrics),
        target=target,
        device=device,
    )
    report = ScoreReport(out=out, shard_errors=dict(shard_errors or {}), task=tasks.label)
    if stage.metrics:
        mapped = run_map(stage, run.path, executor=executor, tasks=tasks, on_unit=on_unit)
        for source, error in mapped.failed.items():
            if tasks.count == 1:  # the reduce scores embedded shards only: a broken run
                raise RunFolderError(f"cannot score {source}: {error}")
            report.shard_errors.setdefault(source, error)  # an array task's unembedded shard
    if tasks.count > 1:
        report.complete = False
        report.seconds = time.perf_counter() - start
        return report

    index = PoolIndex.read(run, stems)
    kept, (repeat_rows, first_rows) = index.first_occurrences()  # scored: new uids
    report.read, report.scored = index.rows, int(kept.sum())
    report.failed = report.read - report.scored
    report.params = {"model": {k: model[k] for k in ("model", "pretrained", "fingerprint")}}
    if target is not None:
        report.params["normsim"] = target.params()
    negclip_values = np.zeros(0, np.float32)
    if "negclip" in metrics:
        tau = negclip_opts.temperature or 1.0 / float(model["logit_scale"])
        batch = min(negclip_opts.batch_size, max(report.scored, 1))
        if report.scored:
            with EmbeddingStore(run, index, kept) as store:
                image, text = store.arrays()
                negclip_values = negclip(
                    image,
                    text,
                    temperature=tau,
                    batch_size=batch,
                    k=negclip_opts.k,
                    seed=negclip_opts.seed,
                    device=device,
                )
        report.params["negclip"] = {
            "batch_size": batch,
            "k": negclip_opts.k,
            "temperature": tau,
            "seed": negclip_opts.seed,
            "pool": report.scored,
        }
    names = _column_order(metrics, stage)
    schema = pa.schema(
        [*SCORE_META_FIELDS, *(pa.field(n, pa.float32()) for n in names), ("status", pa.string())]
    )
    failures: Counter[str] = Counter()
    scored_values: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def write_tables(path: Path) -> None:
        """One row group per shard: its metadata, errors with duplicates marked, scores."""
        at = 0  # position among the scored rows, in pool order (negclip's order)
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for s, stem in enumerate(index.stems):
                start, stop = index.bounds(s)
                scored = kept[start:stop]
                meta = run.read_shard(stem, META_COLUMNS)
                errors = meta.column("error").to_pylist()
                repeated = np.flatnonzero(index.embedded[start:stop] & ~scored)
                firsts = first_rows[np.searchsorted(repeat_rows, start + repeated)]
                for i, first in zip(repeated.tolist(), firsts.tolist(), strict=True):
                    earlier = index.stems[index.shard_of[first]]
                    errors[i] = f"duplicate_uid: uid also in shard {earlier}"
                failures.update(failure_code(e) for e in errors if e)
                columns = {c: meta.column(c) for c in META_COLUMNS}
                columns["error"] = pa.array(errors, pa.string())
                part = stage.read_part(stem) if stage.metrics else {}
                count = int(scored.sum())
                for name in names:
                    values = (
                        negclip_values[at : at + count] if name == "negclip" else part[name][scored]
                    )
                    scored_values[name].append(values)
                    columns[name] = _masked(values, scored)
                columns["status"] = pa.array(
                    np.where(scored, "scored", "failed").tolist(), pa.string()
                )
                writer.write_table(pa.table(columns, schema=schema))
                at += count
            if not index.stems:
                writer.write_table(schema.empty_table())

    write_atomic(out, write_tables)
    report.failures = dict(sorted(failures.items()))
    for name in names:
        values = scored_values[name]
        report.quantiles[name] = summarize(
            np.concatenate(values) if values else np.zeros(0, np.float32)
        )
    for stem in stems:
        record = run.read_shard_record(stem)
        if record and record.truncated:
            report.truncated[record.url] = record.truncated
    report.seconds = time.perf_counter() - start
    write_json_atomic(
        out.with_suffix(".json"), {**report.to_json(), "seconds": None, "task": "local"}
    )
    return report


def score_inputs(
    inputs: Sequence[str],
    out: Path | None = None,
    config: ScoreConfig | None = None,
    *,
    executor: Any = None,
    tasks: TaskSlice | None = None,
    progress: bool = True,
) -> ScoreReport:
    """`curate score`: embed what the run folder lacks (its input shards, and the NormSim target
    shards), run the row-wise map, then the reduce into RUN/scores.parquet.

    `inputs` is a run folder or shard specs (then `out` is the run folder, ./curate-run by
    default). As array task (`tasks`) it embeds its share of the pool and of the target, scores
    its share when the target is whole, and returns a report with ``complete=False``: the
    reduce is a later single `score_inputs` of the run (it embeds and maps nothing more).
    """
    from curate.embedding.stage import prepare_run, prepare_target, target_complete
    from curate.runtime.progress import scoring_status

    config = config or ScoreConfig()
    metrics = config.validate()
    tasks = tasks or TaskSlice()
    embed_options = {**config.embed.embed_options(), "progress": progress}
    prepared = prepare_run(
        list(inputs),
        out,
        executor=executor,
        tasks=tasks,
        progress=progress,
        **config.embed.prepare_options(),
    )
    run = prepared.run
    target_run, ready = None, True
    if "normsim" in metrics:
        assert config.target is not None
        target_run = prepare_target(
            config.target, run, prepared.spec, executor=executor, tasks=tasks, **embed_options
        )
        ready = target_complete(target_run)
    if tasks.count > 1:  # the map's units are the whole pool's, in the embed plan's order
        planned = records.read_plan(run.path / records.RUNTIME_DIR / "embed") or []
        stems = [u["name"] for u in planned]
    else:
        stems = prepared.stems
    if ready:
        with scoring_status(f"computing {', '.join(metrics)}", enabled=progress):
            report = score_run(
                run,
                stems,
                metrics,
                out=run.path / "scores.parquet",
                negclip_opts=config.negclip,
                normsim_opts=NormsimOptions(target=target_run, p=config.normsim_p),
                device=None if config.embed.device == "auto" else config.embed.device,
                shard_errors=prepared.report.shard_errors,
                executor=executor,
                tasks=tasks,
            )
    else:  # an array task before the target is whole: the reduce scores this share
        report = ScoreReport(
            out=run.path / "scores.parquet",
            shard_errors=dict(prepared.report.shard_errors),
            task=tasks.label,
            complete=False,
        )
    report.embedding = prepared.report
    return report


def _column_order(metrics: Sequence[str], stage: ScoreStage) -> list[str]:
    """Score columns in the fixed order clipscore, negclip, normsim (whatever order was asked)."""
    names = {**stage.columns, "negclip": "negclip"}
    return [names[m] for m in METRICS if m in metrics]


def _url_of(run: RunFolder, stem: str) -> str:
    return str((run.read_record() or {}).get("shards", {}).get(stem, stem))


def _table_signatures(run: RunFolder, stems: Sequence[str]) -> dict[str, str]:
    """Each shard's embed-unit signature (RUN/.curate/embed/plan.json); a table the runtime did
    not plan (a run folder written by other means) is identified by its hash instead."""
    planned = {
        u["name"]: u["signature"]
        for u in records.read_plan(run.path / records.RUNTIME_DIR / "embed") or []
    }
    signatures = {}
    for stem in stems:
        if stem in planned:
            signatures[stem] = f"embed:{planned[stem]}"
            continue
        record = run.read_shard_record(stem)
        if record is None:
            raise RunFolderError(f"shard {stem} of run {run.path} is not embedded")
        signatures[stem] = f"table:{record.sha256}"
    return signatures


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Through a handle: np.save on a path would append ".npy" to the temporary name.
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
