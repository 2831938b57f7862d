"""Options shared by several commands, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from curate.balancing.draws import DrawRule
from curate.io.images import DEFAULT_MAX_PIXELS


class PrecisionChoice(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


ShardSpecs = Annotated[
    list[str],
    typer.Argument(
        help="Shards: a folder of *.tar, a glob, a brace pattern ('shards/{00000..00127}.tar', "
        "quoted), a text file listing shard paths, or fsspec URLs (s3://, gs://, http://).",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="open_clip model name (ViT-B-32, ViT-L-14, ...), an hf-hub: name, or a JSON "
        "model config file. Default: ViT-B-32, or the model recorded in the run folder. "
        "Models over 5 billion parameters (estimated from the config) are refused; set "
        "CURATE_MAX_PARAMS to change the limit.",
        rich_help_panel="Model",
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="open_clip pretrained tag (openai, laion2b_s34b_b79k, ...) or a local checkpoint "
        "(.safetensors/.pt, loaded without pickle execution); 'none' for random weights. "
        "Default: openai, or what the run folder recorded.",
        rich_help_panel="Model",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.", rich_help_panel="Model"),
]
PrecisionOpt = Annotated[
    PrecisionChoice,
    typer.Option(help="auto: bf16/fp16 on GPU, fp32 on CPU.", rich_help_panel="Model"),
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Images per model call.", rich_help_panel="Speed")
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=0,
        help="Decoding worker processes (0: decode in the main process). Default: CPU count, "
        "at most 8.",
        rich_help_panel="Speed",
    ),
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option(
        "--max-pixels",
        min=1,
        help="Images with more pixels fail as image_too_large (decompression-bomb guard).",
        rich_help_panel="Input",
    ),
]
NoProgressOpt = Annotated[
    bool, typer.Option("--no-progress", help="Hide progress bars.", rich_help_panel="Output")
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the summary as JSON on stdout.", rich_help_panel="Output"),
]
RunOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Run folder for embeddings and scores (default ./curate-run, or the run folder "
        "given as input); rerunning into it resumes.",
        rich_help_panel="Output",
    ),
]

CaptionSources = Annotated[
    list[str],
    typer.Argument(
        help="Shards (folder, glob, brace pattern, list file, URL), a run folder (its "
        "scores.parquet), or parquet tables with uid and caption/text columns.",
        show_default=False,
    ),
]
CaptionColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--caption-column",
        help="Caption column of parquet inputs (default: caption, else text).",
        rich_help_panel="Input",
    ),
]

MatchWorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=1,
        help="Processes matching units. Default: CPU count, at most 8.",
        rich_help_panel="Speed",
    ),
]


def match_workers(value: int | None) -> int:
    """--workers of the match phase (balance, audit), defaulted."""
    from curate.balancing.stage import default_match_workers

    return value if value is not None else default_match_workers()


__all__ = ["DEFAULT_MAX_PIXELS"]

DrawOpt = Annotated[
    DrawRule,
    typer.Option(
        "--draw",
        help="How keep probabilities become the subset. systematic: within each exact class "
        "(same concepts or matched entries, same labels) samples are taken in a seeded uid "
        "order at evenly spaced points of their cumulative probability, so a class keeps the "
        "floor or ceiling of its expected count. independent: one seeded coin per uid "
        "(MetaCLIP's published rule; counts scatter on small classes). Each sample's keep "
        "probability is the same under both.",
        rich_help_panel="Output",
    ),
]


class ExecutorChoice(str, Enum):
    local = "local"
    ray = "ray"
    array = "array"


ExecutorOpt = Annotated[
    ExecutorChoice,
    typer.Option(
        "--executor",
        help="Where the units run. local: this machine (--workers processes). ray: one Ray "
        "task per unit (a local Ray instance, or the cluster of --ray-address). array: this "
        "process is task i of k of an array job and runs units i, i+k, i+2k, ... "
        "(--task-index/--num-tasks, default from Slurm's array variables); see `curate slurm`.",
        rich_help_panel="Cluster",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Ray cluster to join: auto (the one on this node), ray://HOST:10001, HOST:6379. "
        "Default: start a local Ray instance.",
        rich_help_panel="Cluster",
    ),
]
NumTasksOpt = Annotated[
    int | None,
    typer.Option(
        "--num-tasks",
        min=1,
        help="Tasks of the array job (--executor array). Default: $SLURM_ARRAY_TASK_COUNT.",
        rich_help_panel="Cluster",
    ),
]
TaskIndexOpt = Annotated[
    int | None,
    typer.Option(
        "--task-index",
        min=0,
        help="This task's index, from 0 (--executor array). Default: $SLURM_ARRAY_TASK_ID "
        "(minus $SLURM_ARRAY_TASK_MIN).",
        rich_help_panel="Cluster",
    ),
]
