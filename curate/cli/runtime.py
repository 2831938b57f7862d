"""`curate status` and `curate slurm`: look at a run's stages, run a stage as a Slurm array."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from curate.cli import options as opt
from curate.cli.report import print_json, stdout_console


def status_command(
    folder: Annotated[
        Path, typer.Argument(help="An output folder of any stage (balance, audit, ...).")
    ],
    as_json: opt.JsonOpt = False,
) -> int:
    """Units done / pending / failed (with errors), samples and samples/s of every map stage
    that ran into FOLDER, read from its records (OUT/.curate/STAGE/).

    Example: curate status curate-balance/
    """
    from curate.runtime.status import run_status

    stages = run_status(folder)
    if as_json:
        print_json({"folder": str(folder), "stages": [s.to_json() for s in stages]})
    else:
        table = Table(title=f"curate status {folder}", title_justify="left")
        for column in ("stage", "units", "done", "pending", "failed", "samples", "samples/s"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for s in stages:
            rate = s.samples_per_second
            table.add_row(
                s.stage, str(s.units), str(s.done), str(s.pending), str(len(s.failed)),
                str(s.samples), f"{rate:,.0f}" if rate is not None else "-",
            )  # fmt: skip
        stdout_console.print(table)
        for s in stages:
            for source, error in s.failed.items():
                stdout_console.print(
                    f"[red]failed[/red] {s.stage} {source}: {error}", highlight=False,
                    soft_wrap=True, markup=True,
                )  # fmt: skip
    return 1 if any(s.failed for s in stages) else 0


def slurm_command(
    ctx: typer.Context,
    array: Annotated[
        str,
        typer.Option(
            "--array", help="Array task ids, as sbatch takes them: 0-63, 0-63%8 (8 at a time)."
        ),
    ] = "0-7",
    partition: Annotated[str | None, typer.Option("--partition", help="sbatch -p.")] = None,
    gpus_per_task: Annotated[
        int | None, typer.Option("--gpus-per-task", min=0, help="GPUs of each array task.")
    ] = None,
    cpus_per_task: Annotated[
        int | None, typer.Option("--cpus-per-task", min=1, help="CPUs of each task.")
    ] = None,
    mem: Annotated[str | None, typer.Option("--mem", help="Memory per node, e.g. 32G.")] = None,
    time_limit: Annotated[
        str | None, typer.Option("--time", help="Time limit per task, e.g. 04:00:00.")
    ] = None,
    sbatch_option: Annotated[
        list[str] | None,
        typer.Option("--sbatch", help="One more #SBATCH line, e.g. --sbatch=--account=abc."),
    ] = None,
    do_submit: Annotated[
        bool, typer.Option("--submit", help="Submit with sbatch (default: print the scripts).")
    ] = False,
) -> int:
    """Run a curate command (balance, embed, score, write, rewrite) as a Slurm job array: the
    map as --array tasks, each running its share of the units (--executor array), and the
    reduce (balance --phase sample; for score, write and rewrite a plain rerun that scores,
    writes the manifest or marks repeated uids) as a job that starts when every task succeeded
    (--dependency=afterok). Requeue-safe: a requeued task skips the units already done. Put the
    command after `--`.

    Example: curate slurm --array 0-63 --submit -- balance shards/ -m metadata.json -o bal/
    """
    from curate.runtime.slurm import SlurmOptions, plan_jobs, submit

    options = SlurmOptions(
        array=array,
        partition=partition,
        gpus_per_task=gpus_per_task,
        cpus_per_task=cpus_per_task,
        mem=mem,
        time=time_limit,
        extra=tuple(sbatch_option or ()),
    )
    plan = plan_jobs(list(ctx.args), options)
    if not do_submit:
        print(plan.map_script, end="")
        if plan.reduce_script is not None:
            print("\n# then, with --dependency=afterok:<the array job id>:\n")
            print(plan.reduce_script, end="")
        return 0
    ids = submit(plan)
    stdout_console.print(
        f"submitted array job {ids[0]} ({plan.tasks} tasks)"
        + (f" and reduce job {ids[1]} (afterok:{ids[0]})" if len(ids) > 1 else ""),
        highlight=False,
    )
    return 0
