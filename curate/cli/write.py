"""`curate write`: new WebDataset shards holding only a subset's samples, bytes unchanged."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from curate.cli import options as opt
from curate.cli.report import print_json, warn_shard_problems, write_summary
from curate.errors import InputError


class DuplicateChoice(str, Enum):
    error = "error"
    once = "once"
    repeat = "repeat"


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
}


def parse_size(value: str) -> int:
    """'512MB', '1g', '1000000' → bytes (binary units)."""
    text = value.strip().lower().replace("ib", "b")
    number = text.rstrip("kmgb")
    unit = text[len(number) :]
    try:
        size = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise InputError(f"--shard-bytes {value!r}: expected a size such as 500MB or 1GB") from None
    if size <= 0:
        raise InputError(f"--shard-bytes must be positive, not {value!r}")
    return size


def write_command(
    shards: opt.ShardSpecs,
    subset: Annotated[
        Path,
        typer.Option(
            "--subset",
            "-s",
            help="The subset: curate select's folder or subset.parquet, a DataComp .npy (or a "
            "raw .bin memmap of 16-byte uid records), or a .txt with one uid per line.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the new shards; rerunning into it resumes.",
            rich_help_panel="Output",
        ),
    ] = Path("curate-shards"),
    shard_samples: Annotated[
        int,
        typer.Option(
            "--shard-samples",
            min=1,
            help="Samples per output shard (at most).",
            rich_help_panel="Shards",
        ),
    ] = 10000,
    shard_bytes: Annotated[
        str | None,
        typer.Option(
            "--shard-bytes",
            help="Bytes per output shard (at most), e.g. 1GB.",
            rich_help_panel="Shards",
        ),
    ] = None,
    shuffle: Annotated[
        bool,
        typer.Option(
            "--shuffle",
            help="Shuffle samples across output shards (seeded).",
            rich_help_panel="Shards",
        ),
    ] = False,
    seed: Annotated[
        int,
        typer.Option(help="Seed of --shuffle and of weight rounding.", rich_help_panel="Shards"),
    ] = 0,
    duplicates: Annotated[
        DuplicateChoice,
        typer.Option(
            help="Uids listed more than once in the subset: error, write once, or repeat "
            "(copies spread across shards, never bunched in one batch).",
            rich_help_panel="Repeats",
        ),
    ] = DuplicateChoice.error,
    repeats: Annotated[
        str | None,
        typer.Option(
            "--repeats",
            help="Parquet subset column of weights to turn into copies: floor(w) copies plus "
            "one more with probability w - floor(w) (seeded); 0 drops the sample.",
            rich_help_panel="Repeats",
        ),
    ] = None,
    with_columns: Annotated[
        list[str] | None,
        typer.Option(
            "--with-column",
            help="Subset column to add to each sample's <key>.scores.json member. Repeatable.",
            rich_help_panel="Output",
        ),
    ] = None,
    rewrites: Annotated[
        Path | None,
        typer.Option(
            "--rewrites",
            help="A curate rewrite output folder: each sample with rewrites gets a "
            "<key>.rewrites.json member (the valid rewrites, model, prompt version), so a "
            "loader can pick the original or a rewrite at random.",
            rich_help_panel="Output",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace shards in OUT not written by curate write.",
            rich_help_panel="Output",
        ),
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, help="Shards written in parallel.", rich_help_panel="Speed"
        ),
    ] = 4,
    executor: opt.ExecutorOpt = opt.ExecutorChoice.local,
    ray_address: opt.RayAddressOpt = None,
    num_tasks: opt.NumTasksOpt = None,
    task_index: opt.TaskIndexOpt = None,
    no_progress: opt.NoProgressOpt = False,
    as_json: opt.JsonOpt = False,
) -> int:
    """Write the subset's samples from SHARDS into new shards: image, caption and json bytes
    copied verbatim, deterministic tars (same inputs, same bytes), an img2dataset-style
    NNNNN.parquet and NNNNN_stats.json per shard, manifest.json and sizes.json (open_clip reads
    the sample counts). Subset uids not found in SHARDS are counted and listed in
    OUT/missing_uids.txt. Uids are the DataComp uid from a sample's json, else derived from
    the shard file name and key (README, uids); DataComp's resharder reads uids from the json
    only, so it cannot find samples with derived uids in a subset.npy: write those with
    `curate write`.
    """
    from curate.api import Runtime
    from curate.api import write as run_write
    from curate.writing.stage import WriteOptions

    options = WriteOptions(
        max_samples=shard_samples,
        max_bytes=parse_size(shard_bytes) if shard_bytes else None,
        shuffle=shuffle,
        seed=seed,
        duplicates=duplicates.value,
        repeats_column=repeats,
        with_columns=list(with_columns or []),
        rewrites=str(rewrites) if rewrites else None,
        workers=workers,
        overwrite=overwrite,
    )
    runtime = Runtime(
        executor.value,
        workers=workers,
        ray_address=ray_address,
        num_tasks=num_tasks,
        task_index=task_index,
    )
    report = run_write(
        shards, out, options, subset=subset, runtime=runtime, progress=not no_progress
    )
    warn_shard_problems(report.shard_errors, report.truncated)
    if as_json:
        print_json(report.to_json())
    else:
        write_summary(report)
    return 1 if report.shard_errors else 0
