"""`curate score`: CLIPScore, negCLIPLoss and NormSim for every pair, as a parquet table."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from curate.cli import options as opt
from curate.cli.report import print_json, score_summary, warn_shard_problems
from curate.errors import InputError


class Metric(str, Enum):
    clipscore = "clipscore"
    negclip = "negclip"
    normsim = "normsim"


def _parse_p(value: str) -> float:
    try:
        p = math.inf if value.lower() in ("inf", "infinity") else float(value)
    except ValueError:
        raise InputError(f"--normsim-p must be a number ≥ 1 or 'inf', not {value!r}") from None
    if not p >= 1:
        raise InputError(f"--normsim-p must be ≥ 1 (or 'inf'), not {value}")
    return p


def score_command(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="A run folder made by curate embed/score, or shards (folder of *.tar, glob, "
            "quoted brace pattern, list file, fsspec URLs).",
            show_default=False,
        ),
    ],
    metric: Annotated[
        list[Metric],
        typer.Option(
            "--metric",
            "-m",
            help="Metric to compute; repeat for several (-m clipscore -m negclip).",
        ),
    ] = [Metric.clipscore],  # noqa: B006 - typer needs a literal default
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Run folder (default: the input run, or ./curate-run for shards). Scores go to "
            "RUN/scores.parquet.",
            rich_help_panel="Output",
        ),
    ] = None,
    negclip_batch: Annotated[
        int,
        typer.Option(
            "--negclip-batch",
            min=1,
            help="negCLIPLoss batch size |B| (capped at the pool size).",
            rich_help_panel="negclip",
        ),
    ] = 32768,
    negclip_k: Annotated[
        int,
        typer.Option(
            "--negclip-k", min=1, help="Random batches per sample (K).", rich_help_panel="negclip"
        ),
    ] = 10,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            min=1e-6,
            help="τ; default: the model's own 1/exp(logit_scale).",
            rich_help_panel="negclip",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the negclip batch permutations.", rich_help_panel="negclip")
    ] = 0,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="NormSim target: an embedding run made with "
            "the same model, or shards (embedded and cached in "
            "RUN/targets/).",
            rich_help_panel="normsim",
        ),
    ] = None,
    normsim_p: Annotated[
        str,
        typer.Option(
            "--normsim-p",
            help="NormSim norm: inf (max similarity), 2 (via "
            "the target's second-moment matrix) or any number ≥ 1.",
            rich_help_panel="normsim",
        ),
    ] = "inf",
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
    """Score every image-text pair; embeds what the run folder does not hold yet.

    Examples:

      [bold]curate score shards/ --metric negclip --metric clipscore[/bold]

      [bold]curate score curate-run/ -m normsim --target imagenet-shards/ --normsim-p inf[/bold]

    On a cluster: --executor ray embeds one shard per Ray task (the --target shards too) and
    computes the row-wise scores (clipscore, normsim) one shard per task; negclip, a pool-wide
    reduce, runs here. With --executor array --num-tasks K each task embeds and scores its
    share (shards i, i+K, ...) and stops; once every task is done, [bold]curate score RUN[/bold]
    (one process) embeds and maps nothing more and writes scores.parquet. `curate slurm --
    score ...` submits both.
    """
    from rich.markup import escape

    from curate.api import Runtime
    from curate.api import score as run_score
    from curate.cli.report import embed_summary
    from curate.embedding.stage import EmbedConfig
    from curate.runtime.progress import stderr_console
    from curate.scoring.stage import NegclipOptions, ScoreConfig

    config = ScoreConfig(
        metrics=[m.value for m in metric],
        negclip=NegclipOptions(
            batch_size=negclip_batch, k=negclip_k, temperature=temperature, seed=seed
        ),
        target=target,
        normsim_p=_parse_p(normsim_p),
        embed=EmbedConfig(
            model=model,
            pretrained=pretrained,
            device=device,
            precision=precision.value,
            batch_size=batch_size,
            workers=workers,
            max_pixels=max_pixels,
        ),
    )
    config.validate()
    runtime = Runtime(
        executor.value, ray_address=ray_address, num_tasks=num_tasks, task_index=task_index
    )
    report = run_score(inputs, out, config, runtime=runtime, progress=not no_progress)
    warn_shard_problems(report.shard_errors, report.truncated or report.embedding.truncated)
    if not report.complete:  # an array task: its share is done, the reduce waits for every task
        flags = " ".join(f"-m {m}" for m in dict.fromkeys(config.metrics))
        then = escape(f"curate score {report.out.parent} {flags}")
        if as_json:
            print_json(report.to_json())
        else:
            embed_summary(report.embedding)
        stderr_console.print(
            f"{report.task} embedded and scored its share of the shards; once every task is "
            f"done, run [bold]{then}[/bold] (one process, with your other scoring options) to "
            "write scores.parquet",
            highlight=False,
            soft_wrap=True,
        )
    elif as_json:
        print_json(report.to_json())
    else:
        score_summary(report)
    if report.shard_errors:
        raise typer.Exit(1)
    return 0
