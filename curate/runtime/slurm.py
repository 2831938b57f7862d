"""`curate slurm`: a stage as a Slurm job array, and its reduce as a job that waits for it.

The map runs as ``sbatch --array=A-B`` where each array element is one task of
``--executor array`` (units i, i+k, ...); a stage with a separate reduce (balance's
``--phase sample``) gets a second job with ``--dependency=afterok:<array job>``. Both jobs are
``--requeue``-safe: a requeued task skips the units its records say are done.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from curate.errors import InputError

__all__ = ["SlurmOptions", "SlurmPlan", "parse_array", "plan_jobs", "submit"]

# Commands with a reduce after the map, as (flags of the array tasks, flags of the reduce job):
# balance's sample phase; write's manifest (a plain rerun once every shard is there: tasks that
# finish at the same moment may each miss the others' last shard); score's negclip and table
# (array tasks embed and score their share, the plain rerun reduces the whole run); rewrite's
# duplicate reduce and rewrite.json, audit's labels and metrics (the same plain rerun).
PHASED = {
    "balance": (["--phase", "match"], ["--phase", "sample"]),
    "write": ([], []),
    "score": ([], []),
    "rewrite": ([], []),
    "audit": ([], []),
}
# Commands that run as array tasks (the others have no map to split).
MAPPED = frozenset({"balance", "write", "embed", "score", "rewrite", "audit"})
_ARRAY = re.compile(r"^(\d+)(?:-(\d+))?(?:%(\d+))?$")


@dataclass(frozen=True)
class SlurmOptions:
    """sbatch settings shared by the map and the reduce job (None: Slurm's default)."""

    array: str = "0-7"
    partition: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    job_name: str = "curate"
    extra: tuple[str, ...] = ()  # more #SBATCH lines, e.g. "--account=abc"
    chdir: str | None = None  # where the jobs run (relative paths in ARGS); default: here


@dataclass
class SlurmPlan:
    """The scripts of one submission: the map array and the optional reduce."""

    tasks: int
    map_script: str
    reduce_script: str | None = None
    commands: list[list[str]] = field(default_factory=list)


def parse_array(spec: str) -> tuple[int, int]:
    """``"0-63"``, ``"0-63%8"`` or ``"64"`` (= 0-63) -> (first id, number of tasks)."""
    match = _ARRAY.match(spec.strip())
    if not match:
        raise InputError(f"--array {spec!r}: give A-B (e.g. 0-63), A-B%N or a task count")
    first, last = match.group(1), match.group(2)
    if last is None:
        count = int(first)
        if count < 1:
            raise InputError(f"--array {spec!r}: at least one task")
        return 0, count
    if int(last) < int(first):
        raise InputError(f"--array {spec!r}: the last id is below the first")
    return int(first), int(last) - int(first) + 1


def _header(options: SlurmOptions, name: str, array: str | None) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", "#SBATCH --requeue"]
    lines.append(f"#SBATCH --chdir={shlex.quote(options.chdir or os.getcwd())}")
    if array is not None:
        lines.append(f"#SBATCH --array={array}")
        lines.append(f"#SBATCH --output={name}-%A_%a.out")
    else:
        lines.append(f"#SBATCH --output={name}-%j.out")
    for flag, value in (
        ("--partition", options.partition),
        ("--gpus-per-task", options.gpus_per_task),
        ("--cpus-per-task", options.cpus_per_task),
        ("--mem", options.mem),
        ("--time", options.time),
    ):
        if value is not None:
            lines.append(f"#SBATCH {flag}={value}")
    lines += [f"#SBATCH {extra}" for extra in options.extra]
    return lines


def plan_jobs(
    args: Sequence[str], options: SlurmOptions, *, python: str | None = None
) -> SlurmPlan:
    """The sbatch scripts that run `curate ARGS` as an array (and its reduce)."""
    if not args:
        raise InputError("give the curate command to run, e.g. curate slurm balance SHARDS ...")
    command, rest = args[0], list(args[1:])
    if command not in MAPPED:
        raise InputError(
            f"curate {command} has no map split into array tasks yet; "
            f"supported: {', '.join(sorted(MAPPED))}"
        )
    for flag in ("--executor", "--num-tasks", "--task-index", "--phase"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise InputError(f"leave {flag} out: curate slurm sets it for each job")
    _, count = parse_array(options.array)
    array = options.array if "-" in options.array else f"0-{count - 1}"
    curate = [python or sys.executable, "-m", "curate"]
    map_flags, reduce_flags = PHASED.get(command, ([], None))
    map_cmd = [*curate, command, *rest, *map_flags, "--executor", "array"]
    map_cmd += ["--num-tasks", str(count), "--no-progress"]
    map_script = "\n".join(
        [
            *_header(options, f"{options.job_name}-{command}", array),
            "set -euo pipefail",
            "# each element runs units i, i+k, ...; i from SLURM_ARRAY_TASK_ID",
            shlex.join(map_cmd),
            "",
        ]
    )
    plan = SlurmPlan(tasks=count, map_script=map_script, commands=[map_cmd])
    if reduce_flags is not None:
        reduce_opts = SlurmOptions(
            partition=options.partition,
            cpus_per_task=options.cpus_per_task,
            mem=options.mem,
            time=options.time,
            job_name=options.job_name,
            extra=options.extra,
            chdir=options.chdir,
        )
        reduce_cmd = [*curate, command, *rest, *reduce_flags, "--no-progress"]
        plan.reduce_script = "\n".join(
            [
                *_header(reduce_opts, f"{options.job_name}-{command}-reduce", None),
                "set -euo pipefail",
                shlex.join(reduce_cmd),
                "",
            ]
        )
        plan.commands.append(reduce_cmd)
    return plan


def _sbatch(script: str, *flags: str) -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise InputError("sbatch is not on PATH: run on a Slurm login node, or print the scripts")
    done = subprocess.run(
        [sbatch, "--parsable", *flags], input=script, text=True, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise InputError(f"sbatch refused the job: {' '.join(done.stderr.split())}")
    return done.stdout.strip().split(";")[0]


def submit(plan: SlurmPlan) -> list[str]:
    """Submit the map array, then the reduce depending on it (afterok); the job ids."""
    ids = [_sbatch(plan.map_script)]
    if plan.reduce_script is not None:
        ids.append(_sbatch(plan.reduce_script, f"--dependency=afterok:{ids[0]}"))
    return ids
