"""The score stage: a run folder's embeddings in, one scores table (a row per input sample) out.

Failed samples stay in the table with their error and null scores, so `read = scored + failed`
can always be checked. A uid already seen earlier in the pool (same DataComp uid in two places)
is recorded as a `duplicate_uid` failure: uids in the scores table are unique among scored rows.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.embedding.store import META_COLUMNS, RunFolder, embeddings_to_numpy
from curate.errors import InputError, RunFolderError, failure_code
from curate.runtime.atomic import write_atomic, write_json_atomic
from curate.scoring.clipscore import clipscore
from curate.scoring.negclip import negclip
from curate.scoring.normsim import normsim, second_moment

METRICS = ("clipscore", "negclip", "normsim")
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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


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


def mark_duplicate_uids(meta: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """Later OK rows whose uid was already seen become `duplicate_uid` failures.

    Returns the updated table and a mask over the previously-OK rows saying which stay OK.
    """
    uids = meta.column("uid").to_pylist()
    errors = meta.column("error").to_pylist()
    shards = meta.column("shard").to_pylist()
    seen: dict[str, str] = {}
    keep: list[bool] = []
    for i, (uid, err) in enumerate(zip(uids, errors, strict=True)):
        if err is not None:
            continue
        if uid in seen:
            errors[i] = f"duplicate_uid: uid also in shard {seen[uid]}"
            keep.append(False)
        else:
            seen[uid] = shards[i]
            keep.append(True)
    index = meta.schema.get_field_index("error")
    meta = meta.set_column(index, "error", pa.array(errors, pa.string()))
    return meta, np.array(keep, dtype=bool)


def summarize(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    qs = np.quantile(values.astype(np.float64), QUANTILES)
    stats = {f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs, strict=True)}
    stats["mean"] = float(values.mean())
    return stats


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
) -> ScoreReport:
    """Compute `metrics` over the pool held by `run` (restricted to `stems`) and write `out`."""
    start = time.perf_counter()
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise InputError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    negclip_opts = negclip_opts or NegclipOptions()
    normsim_opts = normsim_opts or NormsimOptions()
    if "normsim" in metrics and normsim_opts.target is None:
        raise InputError("--metric normsim needs --target (shards or an embedding run)")
    model = run.model_record()
    needed = ["image_emb"] + (["text_emb"] if {"clipscore", "negclip"} & set(metrics) else [])
    meta, emb = load_pool(run, stems, with_embeddings=needed)
    ok_before = np.asarray(meta.column("error").is_null())
    meta, keep = mark_duplicate_uids(meta)
    image = emb["image_emb"][keep]
    text = emb["text_emb"][keep] if "text_emb" in emb else None
    ok = np.asarray(meta.column("error").is_null())
    assert int(ok.sum()) == image.shape[0] and int(ok_before.sum()) == keep.size

    report = ScoreReport(out=out, read=meta.num_rows, scored=int(ok.sum()))
    report.shard_errors = dict(shard_errors or {})
    report.failed = report.read - report.scored
    report.failures = dict(
        sorted(Counter(failure_code(e) for e in meta.column("error").to_pylist() if e).items())
    )
    report.params = {"model": {k: model[k] for k in ("model", "pretrained", "fingerprint")}}
    columns: dict[str, np.ndarray] = {}
    if "clipscore" in metrics:
        columns["clipscore"] = clipscore(image, text, device=device)
    if "negclip" in metrics:
        tau = negclip_opts.temperature or 1.0 / float(model["logit_scale"])
        batch = min(negclip_opts.batch_size, max(image.shape[0], 1))
        if image.shape[0]:
            columns["negclip"] = negclip(
                image,
                text,
                temperature=tau,
                batch_size=batch,
                k=negclip_opts.k,
                seed=negclip_opts.seed,
                device=device,
            )
        else:
            columns["negclip"] = np.zeros(0, np.float32)
        report.params["negclip"] = {
            "batch_size": batch,
            "k": negclip_opts.k,
            "temperature": tau,
            "seed": negclip_opts.seed,
            "pool": int(image.shape[0]),
        }
    if "normsim" in metrics:
        target = normsim_opts.target
        assert target is not None
        name = normsim_column(normsim_opts.p)
        columns[name] = _normsim_scores(run, target, image, normsim_opts.p, device)
        report.params["normsim"] = {
            "p": normsim_opts.p if math.isfinite(normsim_opts.p) else "inf",
            "target": str(target.path),
            "target_hash": target.content_hash(),
        }

    table = meta
    for name, values in columns.items():
        full = np.full(meta.num_rows, np.nan, dtype=np.float32)
        full[ok] = values
        table = table.append_column(name, pa.array(full, pa.float32(), mask=~ok))
        report.quantiles[name] = summarize(values)
    table = table.append_column(
        "status", pa.array(np.where(ok, "scored", "failed").tolist(), pa.string())
    )
    write_atomic(out, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    for stem in stems:
        record = run.read_shard_record(stem)
        if record and record.truncated:
            report.truncated[record.url] = record.truncated
    report.seconds = time.perf_counter() - start
    write_json_atomic(out.with_suffix(".json"), {**report.to_json(), "seconds": None})
    return report


def _normsim_scores(
    run: RunFolder, target: RunFolder, image: np.ndarray, p: float, device: str | None
) -> np.ndarray:
    pool_fp = run.model_record()["fingerprint"]
    if target.model_record()["fingerprint"] != pool_fp:
        raise RunFolderError(
            f"target run {target.path} was embedded with another model than the pool; "
            "embed the target with the same --model/--pretrained"
        )
    stems = target.complete_stems()
    if not stems:
        raise RunFolderError(f"target run {target.path} holds no embedded shards")
    if p == 2:
        cache = target.path / "cache" / f"moment-{target.content_hash(stems)[:16]}.npy"
        if cache.is_file():
            moment = np.load(cache, allow_pickle=False)
        else:
            _, temb = load_pool(target, stems, with_embeddings=["image_emb"])
            moment = second_moment(temb["image_emb"], device=device)
            write_atomic(cache, lambda tmp: _save_npy(tmp, moment))
        return normsim(image, p=2, moment=moment, device=device)
    _, temb = load_pool(target, stems, with_embeddings=["image_emb"])
    return normsim(image, temb["image_emb"], p=p, device=device)


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Through a handle: np.save on a path would append ".npy" to the temporary name.
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
