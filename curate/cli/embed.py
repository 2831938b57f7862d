"""`curate embed`: store L2-normalised float16 image and text embeddings per shard."""

from __future__ import annotations

import typer

from curate.cli import options as opt
from curate.cli.report import embed_summary, print_json, warn_shard_problems


def embed_command(
    shards: opt.ShardSpecs,
    out: opt.RunOutOpt = None,
    model: opt.ModelOpt = None,
    pretrained: opt.PretrainedOpt = None,
    device: opt.DeviceOpt = "auto",
    precision: opt.PrecisionOpt = opt.PrecisionChoice.auto,
    batch_size: opt.BatchSizeOpt = 256,
    workers: opt.WorkersOpt = None,
    max_pixels: opt.MaxPixelsOpt = opt.DEFAULT_MAX_PIXELS,
    no_progress: opt.NoProgressOpt = False,
    as_json: opt.JsonOpt = False,
) -> int:
    """Embed shards into a run folder (one table per shard), skipping shards already complete.

    Example: [bold]curate embed 'shards/{00000..00127}.tar' --out run/ --model ViT-B-32
    --pretrained openai[/bold]
    """
    from curate.embedding.stage import prepare_run

    prepared = prepare_run(
        shards,
        out,
        model=model,
        pretrained=pretrained,
        device=device,
        precision=precision.value,
        batch_size=batch_size,
        num_workers=workers,
        max_pixels=max_pixels,
        progress=not no_progress,
    )
    report = prepared.report
    warn_shard_problems(report.shard_errors, report.truncated)
    if as_json:
        print_json({**report.__dict__, "run_dir": str(report.run_dir)})
    else:
        embed_summary(report)
    if report.shard_errors:
        raise typer.Exit(1)
    return 0
