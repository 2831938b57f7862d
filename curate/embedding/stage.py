"""The embed stage: shards in, one embedding table per shard out, resumable.

Workers (see `loader`) decode and preprocess; this process runs the model and writes each shard
as soon as all of its parts have arrived. The model is only loaded when some shard still needs
embedding, so re-scoring a finished run costs no model load.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
from curate.embedding.store import RunFolder, source_signature
from curate.errors import InputError, RunFolderError
from curate.io.shards import resolve_shards
from curate.models.loading import LoadedModel, Precision, load_model
from curate.runtime.progress import progress_bar


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
        """Does this spec name the model a run recorded (same config and same weights file)?"""
        return (self.model, self.pretrained) == (recorded.get("model"), recorded.get("pretrained"))


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


@contextmanager
def _cpu_threads_beside(workers: int, device: torch.device) -> Iterator[None]:
    """On CPU, leave the decoding workers their cores: the model gets what remains (≥ 1).

    Oversubscribing (model threads + workers > cores) made embedding ~25% slower on 2 cores.
    """
    before = torch.get_num_threads()
    if device.type == "cpu" and workers > 0:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


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
) -> EmbedReport:
    """Embed every shard of `urls` that `run` does not hold yet."""
    start = time.perf_counter()
    urls = list(dict.fromkeys(urls))
    stems = run.assign_stems(urls)
    report = EmbedReport(run_dir=run.path, shards_total=len(urls))
    record = run.read_record()
    fingerprint = record["model"]["fingerprint"] if record else None
    pending = [u for u in urls if not run.is_complete(stems[u], u, fingerprint)]
    report.shards_skipped = len(urls) - len(pending)
    if record is not None and not pending:
        recorded = record["model"]
        if loaded is None and not spec.matches(recorded):
            loaded = spec.load()  # asked for other weights than recorded: compare fingerprints
        if loaded is not None:
            run.ensure_same_model(loaded.record(), embedding=False)
        run.bind_model(recorded, {stems[u]: u for u in urls}, embedding=False)
        report.model_record = recorded
        _count_existing(run, [stems[u] for u in urls], report)
        report.seconds = time.perf_counter() - start
        return report

    model = loaded or spec.load()
    report.model_record = model.record()
    run.bind_model(report.model_record, {stems[u]: u for u in urls}, embedding=True)
    sources = {u: source_signature(u) for u in pending}  # before reading: changes show up later
    workers = default_workers() if num_workers is None else num_workers
    units = plan_units(pending, list(range(len(pending))), workers)
    dataset = DecodeDataset(
        units, model.preprocess, model.tokenizer, batch_size=batch_size, max_pixels=max_pixels
    )
    loader = make_loader(dataset, workers, pin_memory=model.device.type == "cuda")
    states = {i: _ShardState(parts=units[0].parts) for i in range(len(pending))}
    with (
        _cpu_threads_beside(workers, model.device),
        progress_bar("embedding", total_shards=len(pending), enabled=progress) as bar,
    ):
        for batch in loader:
            image = text = None
            if batch.pixels is not None and batch.tokens is not None:
                img_t, txt_t = model.encode(batch.pixels, batch.tokens)
                image = img_t.numpy().astype(np.float16)
                text = txt_t.numpy().astype(np.float16)
            state = states[batch.shard_index]
            state.add(batch, image, text)
            bar.advance_samples(len(batch.rows))
            if state.done_parts == state.parts:
                url = pending[batch.shard_index]
                _finish_shard(run, stems[url], url, state, model, sources[url], report)
                del states[batch.shard_index]
                bar.advance_shard()
    _count_existing(run, [stems[u] for u in urls if u not in sources], report)
    report.seconds = time.perf_counter() - start
    return report


def _finish_shard(
    run: RunFolder,
    stem: str,
    url: str,
    state: _ShardState,
    model: LoadedModel,
    source: dict[str, str] | None,
    report: EmbedReport,
) -> None:
    if state.error is not None:
        report.shard_errors[url] = state.error
        return
    rows, image, text = state.assemble(stem, model.embed_dim)
    record = run.write_shard(
        stem,
        url,
        rows,
        image,
        text,
        fingerprint=model.fingerprint,
        source=source,
        truncated=state.truncated,
    )
    report.shards_embedded += 1
    report.samples_read += record.read
    report.samples_ok += record.ok
    report.samples_failed += record.failed
    if state.truncated:
        report.truncated[url] = state.truncated


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
class PreparedRun:
    """A run folder whose shards are all embedded (as far as they could be opened)."""

    run: RunFolder
    stems: list[str]  # complete shards, in input order
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
    **embed_options: object,
) -> PreparedRun:
    """Open a run folder (given directly, or `out` for shard inputs) and embed what is missing.

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
    report = embed_shards(urls, run, spec, **embed_options)  # type: ignore[arg-type]
    stems = run.assign_stems(urls)
    done = [stems[u] for u in dict.fromkeys(urls) if u not in report.shard_errors]
    return PreparedRun(run=run, stems=done, spec=spec, report=report)


def prepare_target(
    target: str, run: RunFolder, spec: ModelSpec, **embed_options: object
) -> RunFolder:
    """A NormSim target: an existing embedding run, or shards embedded once with the pool's
    model into RUN/targets/<hash of weights fingerprint and shard URLs>."""
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
