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
    executor: opt.ExecutorOpt = opt.ExecutorChoice.local,
    ray_address: opt.RayAddressOpt = None,
    num_tasks: opt.NumTasksOpt = None,
    task_index: opt.TaskIndexOpt = None,
    no_progress: opt.NoProgressOpt = False,
    as_json: opt.JsonOpt = False,
) -> int:
    """Embed shards into a run folder (one table per shard), skipping shards already complete.

    Example: [bold]curate embed 'shards/{00000..00127}.tar' --out run/ --model ViT-B-32
    --pretrained openai[/bold]

    On a cluster: --executor ray runs the shards on Ray actors that load the model once each
    (a GPU each when the model runs on CUDA; --workers decoding processes each); --executor
    array --num-tasks K runs as task i of K (shards i, i+K, ...; see `curate slurm`). Every
    task writes into the same run folder, on a filesystem they share.
    """
    from curate.api import Runtime
    from curate.api import embed as run_embed
    from curate.embedding.stage import EmbedConfig

    config = EmbedConfig(
        model=model,
        pretrained=pretrained,
        device=device,
        precision=precision.value,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
    )
    runtime = Runtime(
        executor.value, ray_address=ray_address, num_tasks=num_tasks, task_index=task_index
    )  # local: this process streams the shards through --workers decoding processes
    report = run_embed(shards, out, config, runtime=runtime, progress=not no_progress)
    warn_shard_problems(report.shard_errors, report.truncated)
    if as_json:
        print_json(report.to_json())
    else:
        embed_summary(report)
    if report.shard_errors:
        raise typer.Exit(1)
    return 0
