"""The embed stage: shards in, one embedding table per shard out, resumable.

Embedding is a map stage on the runtime (`EmbedStage`, one unit per input shard): local runs
stream every pending shard through one DataLoader, whose workers (see `loader`) decode and
preprocess while this process runs the model and writes each shard as soon as all of its parts
have arrived; on Ray a pool of actors loads the model once each (a GPU each on CUDA) and
embeds a shard per call; array tasks take their share.
The model is only loaded when some shard still needs embedding (or run.json does not name the
model asked for), so re-scoring a finished run costs no model load.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from curate.embedding.loader import (
    DEFAULT_MAX_PIXELS,
    DecodeDataset,
    DecodedBatch,
    SampleRow,
    make_loader,
    plan_units,
)
from curate.embedding.store import RunFolder, ShardRecord, source_signature
from curate.embedding.threads import threads_beside
from curate.errors import InputError, RunFolderError
from curate.io.shards import resolve_shards
from curate.models.loading import LoadedModel, Precision, load_model
from curate.runtime import records
from curate.runtime.executors import TaskSlice
from curate.runtime.progress import progress_bar
from curate.runtime.stage import MapStage, Resources, Unit, UnitFailure, run_map

EMBED_FORMAT = 1
# What of the model record a table depends on (its name and tag only say where weights came from)
_TABLE_MODEL_KEYS = (
    "architecture", "fingerprint", "precision", "embed_dim", "preprocess", "context_length",
)  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for; loading is deferred until a shard needs the model."""

    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    device: str = "auto"
    precision: Precision = "auto"

    def load(self) -> LoadedModel:
        """Load once per process: embedding a pool and its target shares one model."""
        return _load_cached(self)

    def matches(self, recorded: dict[str, object]) -> bool:
        """Does this spec name the model a run recorded (same config and same weights file)?
        ``none`` and no tag are the same random weights, as `load_model` reads them."""
        pretrained = recorded.get("pretrained")
        theirs = (recorded.get("model"), _tag(pretrained if isinstance(pretrained, str) else None))
        return (self.model, _tag(self.pretrained)) == theirs


def _tag(pretrained: str | None) -> str | None:
    return None if pretrained in (None, "", "none") else pretrained


def normalize_model_ref(value: str | None) -> str | None:
    """Local files (JSON configs, checkpoints) as absolute paths, so runs can find them again."""
    if value and not value.startswith("hf-hub:") and Path(value).expanduser().is_file():
        return str(Path(value).expanduser().resolve())
    return value


@functools.cache
def _load_cached(spec: ModelSpec) -> LoadedModel:
    return load_model(spec.model, spec.pretrained, device=spec.device, precision=spec.precision)


@dataclass
class EmbedReport:
    """What happened to every shard and sample of an embed call."""

    run_dir: Path
    shards_total: int = 0
    shards_skipped: int = 0
    shards_embedded: int = 0
    samples_read: int = 0
    samples_ok: int = 0
    samples_failed: int = 0
    shard_errors: dict[str, str] = field(default_factory=dict)  # url -> why it could not open
    truncated: dict[str, str] = field(default_factory=dict)  # url -> tar error
    seconds: float = 0.0
    model_record: dict | None = None
    task: str = "local"  # the array task whose share this reports (shards_total: its units)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "run_dir": str(self.run_dir)}


@dataclass
class _ShardState:
    """Rows and embeddings of one shard as batches arrive (any part, any order)."""

    parts: int
    done_parts: int = 0
    error: str | None = None
    truncated: str | None = None
    rows: list[SampleRow] = field(default_factory=list)  # arrival order
    image: list[np.ndarray] = field(default_factory=list)  # OK rows of `rows`, same order
    text: list[np.ndarray] = field(default_factory=list)

    def add(self, batch: DecodedBatch, image: np.ndarray | None, text: np.ndarray | None) -> None:
        self.rows.extend(batch.rows)
        if image is not None and text is not None:
            self.image.append(image)
            self.text.append(text)
        if batch.end:
            self.done_parts += 1
            self.error = self.error or batch.shard_error
            self.truncated = self.truncated or batch.truncated

    def assemble(self, stem: str, dim: int) -> tuple[list[SampleRow], np.ndarray, np.ndarray]:
        """Rows back in shard order with their embeddings; every position exactly once."""
        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i].position)
        if [self.rows[i].position for i in order] != list(range(len(self.rows))):
            raise RunFolderError(f"internal: samples of shard {stem} went missing between workers")
        ok = np.array([row.error is None for row in self.rows], dtype=bool)
        emb_index = np.cumsum(ok) - 1  # row i's embedding, when it has one
        keep = [emb_index[i] for i in order if ok[i]]
        image = np.concatenate(self.image)[keep] if self.image else np.zeros((0, dim), np.float16)
        text = np.concatenate(self.text)[keep] if self.text else np.zeros((0, dim), np.float16)
        return [self.rows[i] for i in order], image, text


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def unit_resources(spec: ModelSpec, workers: int) -> Resources:
    """What one shard needs where units are scheduled (Ray): its decoding workers' CPUs, and a
    GPU when the model runs on CUDA (``auto`` means CUDA where this process sees one)."""
    cuda = torch.cuda.is_available() if spec.device == "auto" else spec.device.startswith("cuda")
    return Resources(cpus=float(max(1, workers)), gpus=1.0 if cuda else 0.0)


@dataclass
class EmbedStage(MapStage):
    """Embedding as a map stage: one unit per input shard (its run stem, its url), whose output
    is RUN/embeddings/<stem>.parquet and its completion record (`RunFolder.write_shard`).

    In this process (`run_units`) one DataLoader streams every pending shard's parts through the
    model and a shard is written as soon as its last part arrives; elsewhere (a Ray task) a unit
    is one shard with its own DataLoader (`run_unit`). The table depends on the shard (url,
    source signature), the model (weights fingerprint, precision, preprocessing) and max_pixels:
    the signature. Batch size and worker count do not change which samples share a batch.
    """

    name: ClassVar[str] = "embed"
    actors: ClassVar[bool] = True  # on Ray: each actor loads the model once (a GPU each)
    run: RunFolder
    spec: ModelSpec
    model_record: dict[str, Any]  # the run's model (run.json): what the tables are made with
    urls: list[str]
    stems: dict[str, str]  # url -> stem
    sources: dict[str, dict[str, str] | None]  # url -> source signature, taken before reading
    trusted: str | None = None  # fingerprint a table must carry to be kept (None: a new run.json)
    batch_size: int = 256
    workers: int = 0  # decoding processes per DataLoader
    max_pixels: int = DEFAULT_MAX_PIXELS
    resources: Resources = field(default_factory=Resources)  # per instance: a GPU or not
    model: LoadedModel | None = field(default=None, repr=False, compare=False)
    on_samples: Callable[[int], None] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "model": None, "on_samples": None}  # workers load their own

    def plan(self) -> list[Unit]:
        return [Unit(self.stems[url], url) for url in self.urls]

    def signature(self, unit: Unit) -> dict[str, Any]:
        return {
            "format": EMBED_FORMAT,
            "url": unit.source,
            "stem": unit.name,
            "source": self.sources[unit.source],
            "model": {key: self.model_record.get(key) for key in _TABLE_MODEL_KEYS},
            "max_pixels": self.max_pixels,
        }

    def output_present(self, unit: Unit) -> bool:
        """`RunFolder.is_complete`: record, source, weights and table size still agree."""
        return self.run.is_complete(unit.name, unit.source, self.trusted)

    def setup(self) -> None:
        """Load the model (once per process) and refuse other weights or another precision than
        the run's."""
        if self.model is None:
            self.model = self.spec.load()
        self.run.ensure_same_model(self.model.record(), embedding=True)

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        ((_, outcome),) = list(self.run_units([unit]))
        if isinstance(outcome, UnitFailure):
            raise outcome
        return outcome

    def run_units(
        self, units: Sequence[Unit]
    ) -> Iterator[tuple[Unit, dict[str, Any] | UnitFailure]]:
        """Decode `units` with one DataLoader (shards cut into parts when there are fewer shards
        than workers), encode in this process, write each shard once all its parts are in."""
        if self.model is None:
            self.setup()
        model = self.model
        assert model is not None
        work = plan_units([u.source for u in units], list(range(len(units))), self.workers)
        dataset = DecodeDataset(
            work,
            model.preprocess,
            model.tokenizer,
            batch_size=self.batch_size,
            max_pixels=self.max_pixels,
        )
        loader = make_loader(dataset, self.workers, pin_memory=model.device.type == "cuda")
        parts = work[0].parts if work else 1
        states = {i: _ShardState(parts=parts) for i in range(len(units))}
        with threads_beside(self.workers, model.model, model.device):
            for batch in loader:
                image = text = None
                if batch.pixels is not None and batch.tokens is not None:
                    img_t, txt_t = model.encode(batch.pixels, batch.tokens)
                    image = img_t.numpy().astype(np.float16)
                    text = txt_t.numpy().astype(np.float16)
                state = states[batch.shard_index]
                state.add(batch, image, text)
                if self.on_samples is not None:
                    self.on_samples(len(batch.rows))
                if state.done_parts == state.parts:
                    del states[batch.shard_index]
                    unit = units[batch.shard_index]
                    yield unit, self._finish(unit, state, model)

    def _finish(
        self, unit: Unit, state: _ShardState, model: LoadedModel
    ) -> dict[str, Any] | UnitFailure:
        if state.error is not None:
            return UnitFailure(state.error)
        rows, image, text = state.assemble(unit.name, model.embed_dim)
        record = self.run.write_shard(
            unit.name,
            unit.source,
            rows,
            image,
            text,
            fingerprint=model.fingerprint,
            source=self.sources[unit.source],
            truncated=state.truncated,
        )
        return _stats(record)


def _stats(record: ShardRecord) -> dict[str, Any]:
    return {"samples": record.read, "ok": record.ok, "failed": record.failed, "bytes": record.bytes}


def _sources(run: RunFolder, urls: list[str], stems: dict[str, str]) -> dict[str, Any]:
    """Each shard's source signature now; one that cannot be stat'ed (moved, offline) counts as
    the one its table recorded, so its embeddings are kept (`RunFolder.is_complete`)."""
    sources: dict[str, Any] = {}
    for url in urls:
        now = source_signature(url)
        if now is None:
            shard = run.read_shard_record(stems[url])
            now = shard.source if shard is not None and shard.url == url else None
        sources[url] = now
    return sources


_TEMPORARY = re.compile(r"^\..+\.(parquet|json)\.[0-9a-f]{8}\.tmp$")  # atomic_path's


def _remove_temporaries(run: RunFolder) -> None:
    """Delete the temporary files (``atomic_path``'s) of tables, their records and run.json that
    an earlier, killed run left behind."""
    folders = [run.embeddings_dir, run.path]
    for path in (p for folder in folders if folder.is_dir() for p in folder.iterdir()):
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _adopt_complete_tables(stage: EmbedStage, tasks: TaskSlice) -> None:
    """Give a completion record to each table of this task's share that is complete but was
    never recorded by the runtime (a run folder made before embedding ran on it, lost .curate
    records, a kill between the table's record and the runtime's), so it is not embedded again.
    Such a table counts as made with this call's max_pixels (earlier records did not hold it)."""
    folder = records.stage_folder(stage.run.path, stage.name)
    for unit in tasks.select(stage.plan()):
        if records.read_done(folder, unit) is not None:
            continue
        if records.read_failed(folder, unit) is not None or not stage.output_present(unit):
            continue
        shard = stage.run.read_shard_record(unit.name)
        assert shard is not None  # output_present read it
        signature = records.signature_hash(stage.signature(unit))
        records.write_done(folder, unit, signature, _stats(shard), 0.0)


@records.logged_stage("embed", lambda args: args["run"].path)
def embed_shards(
    urls: list[str],
    run: RunFolder,
    spec: ModelSpec,
    *,
    batch_size: int = 256,
    num_workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    loaded: LoadedModel | None = None,
    executor: Any = None,
    tasks: TaskSlice | None = None,
) -> EmbedReport:
    """Embed every shard of `urls` (this task's share of them: `tasks`) that `run` does not hold
    yet, as the units of an `EmbedStage` on `executor` (default: this process, streaming).

    run.json (the model record and the url -> stem map of every shard of `urls`) is written
    before any unit runs; every array task computes the same record and map, so concurrent tasks
    replace it with the same bytes. The model is loaded here only to learn its fingerprint when
    run.json does not name the asked-for model; units load it where they run, so a run whose
    shards are all complete costs no model load.
    """
    start = time.perf_counter()
    tasks = tasks or TaskSlice()
    urls = list(dict.fromkeys(urls))
    stems = run.assign_stems(urls)
    record = run.read_record()
    recorded = record["model"] if record else None
    if recorded is not None and loaded is None and spec.matches(recorded):
        model_record = recorded
    else:  # a new run, or other weights asked for than recorded: compare fingerprints
        loaded = loaded or spec.load()
        if recorded is not None:
            run.ensure_same_model(loaded.record(), embedding=False)
        model_record = recorded or loaded.record()
    run.bind_model(model_record, {stems[u]: u for u in urls}, embedding=False)
    if tasks.count == 1:  # with several tasks a neighbour's temporary file may be in use
        _remove_temporaries(run)
    workers = default_workers() if num_workers is None else num_workers
    stage = EmbedStage(
        run=run,
        spec=spec,
        model_record=model_record,
        urls=urls,
        stems=stems,
        sources=_sources(run, urls, stems),
        trusted=recorded["fingerprint"] if recorded else None,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
        resources=unit_resources(spec, workers),
        model=loaded,
    )
    _adopt_complete_tables(stage, tasks)
    with progress_bar("embedding", total_shards=None, enabled=progress) as bar:
        finished = {"samples": 0}

        def planned(units: int, skipped: int) -> None:
            bar.set_total_shards(units - skipped)

        def unit_done(samples: int) -> None:
            bar.advance_shard()
            finished["samples"] += samples
            if finished["samples"] > bar.samples:  # units that ran elsewhere (Ray)
                bar.advance_samples(finished["samples"] - bar.samples)

        stage.on_samples = bar.advance_samples
        mapped = run_map(
            stage, run.path, executor=executor, tasks=tasks, on_unit=unit_done, on_plan=planned
        )
    report = EmbedReport(
        run_dir=run.path,
        shards_total=mapped.units,
        shards_skipped=mapped.skipped,
        shards_embedded=mapped.done_now,
        shard_errors=dict(mapped.failed),
        model_record=model_record,
        task=mapped.task,
    )
    _count_existing(
        run, [u.name for u in tasks.select(stage.plan()) if u.name in mapped.stats], report
    )
    report.seconds = time.perf_counter() - start
    return report


def _count_existing(run: RunFolder, stems: list[str], report: EmbedReport) -> None:
    for stem in stems:
        record = run.read_shard_record(stem)
        if record is None:
            continue
        report.samples_read += record.read
        report.samples_ok += record.ok
        report.samples_failed += record.failed
        if record.truncated:
            report.truncated[record.url] = record.truncated


DEFAULT_MODEL = ModelSpec()


@dataclass
class EmbedConfig:
    """How `curate embed` (and `curate score`, for what a run lacks) makes embeddings: the model
    (None: the run's own, else ViT-B-32 / openai), device, precision, batch size, decoding
    processes (None: from the cores) and the decoded-pixel limit."""

    model: str | None = None
    pretrained: str | None = None
    device: str = "auto"
    precision: Precision = "auto"
    batch_size: int = 256
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def prepare_options(self) -> dict[str, Any]:
        """The keyword arguments of `prepare_run` (and `prepare_target`, without the model)."""
        return {
            "model": self.model,
            "pretrained": self.pretrained,
            "device": self.device,
            "precision": self.precision,
            **self.embed_options(),
        }

    def embed_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.workers,
            "max_pixels": self.max_pixels,
        }


@dataclass
class PreparedRun:
    """A run folder whose shards are all embedded (as far as they could be opened)."""

    run: RunFolder
    stems: list[str]  # complete shards (of this task's share), in input order
    spec: ModelSpec
    report: EmbedReport


def prepare_run(
    inputs: list[str],
    out: Path | None,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    device: str = "auto",
    precision: Precision = "auto",
    default_out: Path = Path("curate-run"),
    executor: Any = None,
    tasks: TaskSlice | None = None,
    **embed_options: object,
) -> PreparedRun:
    """Open a run folder (given directly, or `out` for shard inputs) and embed what is missing
    (on `executor`; with array `tasks`, this task's share only: scoring then waits for a run
    whose every task is done).

    Model options left as None fall back to what the run folder recorded, then to ViT-B-32 /
    openai, so `curate score RUN` reuses the run's own model.
    """
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the run")
    model, pretrained = normalize_model_ref(model), normalize_model_ref(pretrained)
    if len(inputs) == 1 and RunFolder.is_run(inputs[0]):
        run = RunFolder(inputs[0])
        if out is not None and Path(out).resolve() != run.path.resolve():
            raise RunFolderError("--out cannot differ from the run folder given as input")
        urls = list((run.read_record() or {}).get("shards", {}).values())
    else:
        urls = resolve_shards(inputs)
        run = RunFolder(out if out is not None else default_out)
    recorded = (run.read_record() or {}).get("model", {})
    use_recorded = bool(recorded) and model in (None, recorded.get("model"))
    spec = ModelSpec(
        model=model or (recorded["model"] if use_recorded else DEFAULT_MODEL.model),
        pretrained=pretrained
        if pretrained is not None
        else (recorded.get("pretrained") if use_recorded else DEFAULT_MODEL.pretrained),
        device=device,
        precision=precision,
    )
    tasks = tasks or TaskSlice()
    report = embed_shards(
        urls,
        run,
        spec,
        executor=executor,
        tasks=tasks,
        **embed_options,  # type: ignore[arg-type]
    )
    stems = run.assign_stems(urls)
    mine = tasks.select(list(dict.fromkeys(urls)))
    done = [stems[u] for u in mine if u not in report.shard_errors]
    return PreparedRun(run=run, stems=done, spec=spec, report=report)


def prepare_target(
    target: str, run: RunFolder, spec: ModelSpec, **embed_options: object
) -> RunFolder:
    """A NormSim target: an existing embedding run, or shards embedded once with the pool's
    model into RUN/targets/<hash of weights fingerprint and shard URLs> (on the `executor` of
    `embed_options`, if given; an array task (`tasks` in `embed_options`) embeds its share:
    `target_complete` says whether every task's is there)."""
    if RunFolder.is_run(target):
        return RunFolder(target)
    urls = resolve_shards([target])
    fingerprint = run.model_record()["fingerprint"]
    key = hashlib.sha256("\n".join([fingerprint, *urls]).encode()).hexdigest()[:16]
    target_run = RunFolder(run.path / "targets" / key)
    report = embed_shards(urls, target_run, spec, **embed_options)  # type: ignore[arg-type]
    if report.shard_errors:
        url, error = next(iter(report.shard_errors.items()))
        raise InputError(f"target shard {url} cannot be read: {error}")
    return target_run


def target_complete(target: RunFolder) -> bool:
    """Whether every shard the target run records is embedded (array tasks embed shares)."""
    shards = (target.read_record() or {}).get("shards", {})
    return bool(shards) and set(target.complete_stems()) == set(shards)
