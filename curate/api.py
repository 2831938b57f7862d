"""The library's entry points: one function per command, all with the same shape.

    report = curate.NAME(source, out, config, runtime=Runtime(...), progress=True)
    report.to_json()

- `source`: what the command reads (shard specs, a run folder, a table, an audit folder);
- `out`: the folder it writes (None where the command has a default);
- `config`: one dataclass holding the command's options, defaults as the CLI's;
- `runtime`: where map units run (`Runtime`: local processes/threads, Ray, or one task of an
  array); commands without units refuse anything but local;
- `progress`: progress bars on stderr (the CLI's), or none.

The CLI parses its flags into these, calls them and prints the report; everything else lives
here and below. `import curate` imports none of this until a function is used, and select,
write, balance and rebalance never import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curate.errors import InputError
from curate.runtime.executors import ExecutorKind, make_executor
from curate.runtime.progress import progress_bar

if TYPE_CHECKING:  # the configs and reports, without importing their stages (torch) here
    from curate.balancing.stage import BalanceConfig, BalanceRun
    from curate.embedding.stage import EmbedConfig, EmbedReport
    from curate.fairness.audit import AuditConfig, AuditReport
    from curate.fairness.rebalance import RebalanceOptions, RebalanceReport
    from curate.rewriting.stage import RewriteConfig, RewriteReport
    from curate.scoring.stage import ScoreConfig, ScoreReport
    from curate.selection.stage import SelectReport, SelectSpec
    from curate.writing.stage import WriteOptions, WriteReport

__all__ = [
    "Runtime",
    "audit",
    "balance",
    "embed",
    "rebalance",
    "rewrite",
    "score",
    "select",
    "write",
]

Source = str | Path | Sequence[str | Path]


@dataclass(frozen=True)
class Runtime:
    """Where a command's units run (the CLI's --executor, --workers, --ray-address,
    --num-tasks, --task-index); `workers` None: the command's own default."""

    executor: ExecutorKind = "local"
    workers: int | None = None
    ray_address: str | None = None
    num_tasks: int | None = None
    task_index: int | None = None

    def build(self, *, workers: int = 1, threads: bool = False) -> tuple[Any, Any]:
        """The executor and this task's share (`make_executor`); `workers` is the default."""
        return make_executor(
            self.executor,
            workers=self.workers if self.workers is not None else workers,
            ray_address=self.ray_address,
            num_tasks=self.num_tasks,
            task_index=self.task_index,
            threads=threads,
        )

    def require_local(self, command: str) -> None:
        if self.executor != "local" or (self.num_tasks or 1) > 1 or self.ray_address:
            raise InputError(f"curate {command} has no units to spread: run it locally")


def _sources(source: Source) -> list[str]:
    return [str(source)] if isinstance(source, str | Path) else [str(s) for s in source]


def embed(
    source: Source,
    out: Path | None = None,
    config: EmbedConfig | None = None,
    *,
    runtime: Runtime | None = None,
    progress: bool = True,
) -> EmbedReport:
    """`curate embed`: embeddings of every shard not yet in the run folder `out` (or the run
    folder given as `source`), one table per shard."""
    from curate.embedding.stage import EmbedConfig, prepare_run

    config = config or EmbedConfig()
    executor, tasks = (runtime or Runtime()).build()
    prepared = prepare_run(
        _sources(source), out, executor=executor, tasks=tasks, progress=progress,
        **config.prepare_options(),
    )  # fmt: skip
    return prepared.report


def score(
    source: Source,
    out: Path | None = None,
    config: ScoreConfig | None = None,
    *,
    runtime: Runtime | None = None,
    progress: bool = True,
) -> ScoreReport:
    """`curate score`: embeds what is missing, the row-wise map, the reduce (scores.parquet);
    as an array task its share only (``complete=False``)."""
    from curate.scoring.stage import score_inputs

    executor, tasks = (runtime or Runtime()).build()
    return score_inputs(
        _sources(source), out, config, executor=executor, tasks=tasks, progress=progress
    )


def select(
    source: Source,
    out: Path,
    config: SelectSpec | None = None,
    *,
    runtime: Runtime | None = None,
    progress: bool = True,
    device: str | None = None,
) -> SelectReport:
    """`curate select`: a subset of a scored pool (one pass, no units); `device` only for
    NormSim_2-D."""
    from curate.selection.stage import SelectSpec, select_pool

    (runtime or Runtime()).require_local("select")
    (path,) = _sources(source) if not isinstance(source, str | Path) else [str(source)]
    return select_pool(path, config or SelectSpec(), out=Path(out), device=device)


def write(
    source: Source,
    out: Path,
    config: WriteOptions | None = None,
    *,
    subset: str | Path,
    runtime: Runtime | None = None,
    progress: bool = True,
) -> WriteReport:
    """`curate write`: the samples of `subset` found in the shards `source`, copied into new
    shards in `out` (output shards are the units; threads by default)."""
    from curate.writing.stage import WriteOptions, write_subset

    config = config or WriteOptions()
    executor, tasks = (runtime or Runtime()).build(workers=config.workers, threads=True)
    with progress_bar("writing", total_shards=0, enabled=progress) as bar:
        return write_subset(
            _sources(source), subset, out=Path(out), options=config, executor=executor,
            tasks=tasks, progress=bar.set,
        )  # fmt: skip


def balance(
    source: Source,
    out: Path,
    config: BalanceConfig,
    *,
    runtime: Runtime | None = None,
    progress: bool = True,
) -> BalanceRun:
    """`curate balance`: the match map (units of captions), then the sample reduce."""
    from curate.balancing.stage import balance as run_balance
    from curate.cli.options import match_workers

    executor, tasks = (runtime or Runtime()).build(workers=match_workers(None))
    metadata = config.loaded_metadata()  # bad metadata fails before any bar is drawn
    with progress_bar("matching", total_shards=None, enabled=progress) as bar:

        def advance(samples: int) -> None:
            bar.advance_samples(samples)
            bar.advance_shard()

        return run_balance(
            _sources(source), metadata, Path(out), config.spec,
            mode=config.mode, normalize=config.normalize, caption_column=config.caption_column,
            phase=config.phase, executor=executor, tasks=tasks, on_unit=advance,
            on_units=bar.set_total_shards,
        )  # fmt: skip


def audit(
    source: Source,
    out: Path,
    config: AuditConfig,
    *,
    runtime: Runtime | None = None,
    progress: bool = True,
) -> AuditReport:
    """`curate audit`: concept matching (a map), then labels and bias metrics."""
    from curate.cli.options import match_workers
    from curate.fairness.audit import audit as run_audit

    executor, tasks = (runtime or Runtime()).build(workers=match_workers(None))
    with progress_bar("auditing", total_shards=None, enabled=progress) as bar:

        def advance(samples: int) -> None:
            bar.advance_samples(samples)
            bar.advance_shard()

        return run_audit(
            _sources(source), config.concepts, Path(out), config.spec, config.options,
            run=config.run, mode=config.mode, caption_column=config.caption_column,
            executor=executor, tasks=tasks, device=config.device,
            on_units=bar.set_total_shards, on_unit=advance, on_step=bar.set_description,
        )  # fmt: skip


def rebalance(
    source: str | Path,
    out: Path,
    config: RebalanceOptions | None = None,
    *,
    runtime: Runtime | None = None,
    progress: bool = True,
) -> RebalanceReport:
    """`curate rebalance`: weights and a subset from an audit folder (`source`); no units."""
    from curate.fairness.rebalance import RebalanceOptions
    from curate.fairness.rebalance import rebalance as run_rebalance

    (runtime or Runtime()).require_local("rebalance")
    return run_rebalance(Path(source), Path(out), config or RebalanceOptions())


def rewrite(
    source: Source,
    out: Path,
    config: RewriteConfig,
    *,
    runtime: Runtime | None = None,
    progress: bool = True,
) -> RewriteReport:
    """`curate rewrite`: caption rewrites per unit (a map), then the duplicate reduce."""
    from curate.rewriting.stage import rewrite_source

    executor, tasks = (runtime or Runtime()).build()
    with progress_bar("rewriting", total_shards=0, enabled=progress) as bar:
        state = {"units": 0, "done": 0, "samples": 0}

        def on_units(units: int, skipped: int) -> None:
            state["units"], state["done"] = units, skipped
            bar.set(skipped, units, 0)

        def on_unit(samples: int) -> None:
            state["done"] += 1
            state["samples"] += samples
            bar.set(state["done"], state["units"], state["samples"])

        return rewrite_source(
            _sources(source), config.backend, config.template, Path(out), config.options,
            caption_column=config.caption_column, where=config.where, executor=executor,
            tasks=tasks, on_unit=on_unit, on_units=on_units,
        )  # fmt: skip
