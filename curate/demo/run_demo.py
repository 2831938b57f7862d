"""The offline demo: synthetic shards with injected noise, the project's tiny CLIP, scores, AUROC.

Runs the same library path as `curate score` (embed stage, score stage), then joins the scores
with the generator's noise labels to show how well each metric separates noise from clean pairs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from curate.demo.evaluate import auroc
from curate.demo.synthetic import generate_shards
from curate.demo.train_tiny import CONFIG_NAME, CONFIG_PATH, ensure_demo_model
from curate.embedding.stage import prepare_run, prepare_target
from curate.errors import InputError
from curate.runtime.atomic import write_atomic, write_json_atomic
from curate.scoring.stage import NormsimOptions, ScoreReport, score_run

DEMO_METRICS = ("clipscore", "negclip")  # AUROC is reported for these
TARGET_SAMPLES = 200  # clean pairs standing in for a downstream task's images (NormSim target)


@dataclass
class DemoResult:
    """The score report plus AUROC per (metric, noise kind) against clean pairs."""

    run_dir: Path
    shards_dir: Path
    score: ScoreReport
    target_dir: Path | None = None
    open_clip_dir: Path | None = None
    checkpoint: Path | None = None
    auroc: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # noise kind -> samples
    accounted: dict[str, int] = field(default_factory=dict)  # noise kind -> failed


def run_demo(
    out: Path,
    *,
    num_samples: int = 2000,
    samples_per_shard: int = 500,
    seed: int = 0,
    num_workers: int | None = None,
    progress: bool = True,
    model_cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Generate data into OUT/shards (and a clean NormSim target set into OUT/target), score
    it into OUT/run (clipscore, negclip, normsim_inf), evaluate against the labels, and export
    the model as an open_clip `local-dir:` folder OUT/open_clip for open_clip's trainer.

    OUT is the demo's own folder: a rerun replaces its shards and run (a folder not made by
    the demo is refused rather than overwritten).
    """
    _claim_demo_folder(out)
    checkpoint = ensure_demo_model(model_cache, log=log)
    shards_dir = out / "shards"
    data = generate_shards(
        shards_dir, num_samples=num_samples, samples_per_shard=samples_per_shard, seed=seed
    )
    log(
        f"wrote {len(data.shards)} shards, {num_samples} samples to {shards_dir} "
        f"(noise: {', '.join(f'{k} {v}' for k, v in data.counts.items())})"
    )
    target_dir = out / "target"
    generate_shards(
        target_dir,
        num_samples=TARGET_SAMPLES,
        samples_per_shard=TARGET_SAMPLES,
        mismatch=0.0,
        generic=0.0,
        corrupt=0.0,
        seed=seed + 1,
    )
    prepared = prepare_run(
        [str(shards_dir)],
        out / "run",
        model=CONFIG_NAME,
        pretrained=str(checkpoint),
        num_workers=num_workers,
        progress=progress,
    )
    target = prepare_target(
        str(target_dir), prepared.run, prepared.spec, num_workers=num_workers, progress=False
    )
    report = score_run(
        prepared.run,
        prepared.stems,
        (*DEMO_METRICS, "normsim"),
        out=prepared.run.path / "scores.parquet",
        normsim_opts=NormsimOptions(target=target),
    )
    open_clip_dir = export_open_clip_dir(checkpoint, out / "open_clip")
    scores = pl.read_parquet(report.out).with_columns(
        (pl.col("shard") + pl.lit(".tar")).alias("shard_file")
    )
    labels = pl.read_parquet(data.labels).rename({"shard": "shard_file"})
    joined = labels.join(scores, on=["shard_file", "key"], how="left", validate="1:1")
    result = DemoResult(
        out / "run",
        shards_dir,
        report,
        target_dir=target_dir,
        open_clip_dir=open_clip_dir,
        checkpoint=checkpoint,
        counts=dict(data.counts),
    )
    result.accounted = {
        kind: int(joined.filter((pl.col("noise") == kind) & (pl.col("status") == "failed")).height)
        for kind in data.counts
    }
    for metric in DEMO_METRICS:
        clean = _scores(joined, "clean", metric)
        result.auroc[metric] = {
            kind: auroc(clean, _scores(joined, kind, metric))
            for kind in ("mismatch", "generic")
            if data.counts.get(kind)
        }
    return result


def export_open_clip_dir(checkpoint: Path, folder: Path) -> Path:
    """An open_clip `local-dir:` model folder (open_clip_config.json + weights) so that
    `python -m open_clip_train.main --model local-dir:FOLDER` fine-tunes the demo CLIP."""
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = json.loads(CONFIG_PATH.read_text(encoding="utf-8"))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {}}
    write_json_atomic(folder / "open_clip_config.json", config)
    write_atomic(
        folder / "open_clip_model.safetensors", lambda tmp: shutil.copyfile(checkpoint, tmp)
    )
    return folder


_MARKER = ".curate-demo"


def _claim_demo_folder(out: Path) -> None:
    """Start from an empty OUT/shards and OUT/run so no earlier demo's data is scored."""
    if out.exists() and any(out.iterdir()) and not (out / _MARKER).exists():
        raise InputError(f"{out} exists and was not made by curate demo; pick another --out")
    for sub in ("shards", "run", "target", "open_clip"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("made by curate demo; reruns replace shards/ and run/\n")


def _scores(table: pl.DataFrame, kind: str, metric: str) -> np.ndarray:
    rows = table.filter((pl.col("noise") == kind) & pl.col(metric).is_not_null())
    return rows.get_column(metric).to_numpy()
