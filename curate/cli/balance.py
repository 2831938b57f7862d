"""`curate balance`: MetaCLIP-style balancing of a pool over metadata entries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curate.balancing.matching import MatchMode, Normalization
from curate.balancing.sampling import DEFAULT_TAIL_SHARE, TailRule
from curate.balancing.stage import Phase
from curate.cli import options as opt
from curate.cli.report import balance_summary, match_summary, print_json, warn_shard_problems


def balance_command(
    sources: opt.CaptionSources,
    metadata: Annotated[
        Path,
        typer.Option(
            "--metadata",
            "-m",
            help="Metadata: a JSON list of strings (MetaCLIP's metadata.json) or a text file "
            "with one entry per line; the position is the entry id. Build one with "
            "`curate metadata build`.",
            show_default=False,
            rich_help_panel="Metadata",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder: matches/ per unit, entry_counts.parquet, decisions.parquet, "
            "subset.parquet + subset.npy, balance.json. Rerunning into it resumes.",
            rich_help_panel="Output",
        ),
    ] = Path("curate-balance"),
    match: Annotated[
        MatchMode,
        typer.Option(
            "--match",
            help="metaclip: MetaCLIP's exact rule (case-sensitive; ' '+entry+' ' in the text "
            "padded with spaces and spaced , . ; : ? ! `). words: Unicode word boundaries and "
            "case folding (dog matches 'Dog-friendly').",
            rich_help_panel="Metadata",
        ),
    ] = MatchMode.metaclip,
    normalize: Annotated[
        Normalization,
        typer.Option(
            "--normalize",
            help="Caption text before matching, the same for shards and tables. none: as "
            "written, as MetaCLIP matches it ('\\xa0dog' does not match dog). strip: Python's "
            "str.strip(), as MetaCLIP 2's curation does (outer whitespace such as no-break "
            "spaces goes; a BOM stays).",
            rich_help_panel="Metadata",
        ),
    ] = Normalization.none,
    t: Annotated[
        float | None,
        typer.Option(
            "--t",
            help="Balancing threshold: a text is kept with probability 1 − Π(1 − min(1, "
            "t/count)) over its matched entries. MetaCLIP: 20000 for 400M of a 1.6B pool.",
            rich_help_panel="Balancing",
        ),
    ] = None,
    tail_share: Annotated[
        float,
        typer.Option(
            "--tail-share",
            help="Without --t / --target-size: choose t so that the entries below t hold this "
            "share of all matches (MetaCLIP's choice is about 0.06), by --tail-rule.",
            rich_help_panel="Balancing",
        ),
    ] = DEFAULT_TAIL_SHARE,
    tail_rule: Annotated[
        TailRule,
        typer.Option(
            "--tail-rule",
            help="How --tail-share becomes t. curate (default): the smallest t whose entries "
            "below t hold at least the share (a share measured by MetaCLIP's t_to_p gives back "
            "a t with exactly that share). metaclip2: MetaCLIP 2's p_to_t, the sorted entry count "
            "whose cumulative share is nearest (its own matches count in the share, so the "
            "tail below t holds less).",
            rich_help_panel="Balancing",
        ),
    ] = TailRule.curate,
    target_size: Annotated[
        int | None,
        typer.Option(
            "--target-size",
            help="Choose t so that the expected number of kept texts is this.",
            rich_help_panel="Balancing",
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the keep draws (one per uid; the same for any split into tasks).",
            rich_help_panel="Balancing",
        ),
    ] = 0,
    draw: opt.DrawOpt = opt.DrawRule.systematic,
    caption_column: opt.CaptionColumnOpt = None,
    phase: Annotated[
        Phase,
        typer.Option(
            help="all: match then sample. match: only this task's units (for job arrays). "
            "sample: counts, t and draws over every unit's matches (once, after all tasks).",
            rich_help_panel="Cluster",
        ),
    ] = Phase.all,
    executor: opt.ExecutorOpt = opt.ExecutorChoice.local,
    ray_address: opt.RayAddressOpt = None,
    num_tasks: opt.NumTasksOpt = None,
    task_index: opt.TaskIndexOpt = None,
    workers: opt.MatchWorkersOpt = None,
    no_progress: opt.NoProgressOpt = False,
    as_json: opt.JsonOpt = False,
) -> None:
    """Balance the pool over metadata entries, MetaCLIP style: count how many texts match each
    entry over the whole pool, then keep each text with probability 1 − Π(1 − min(1, t/count))
    over the entries it matches (texts matching nothing are dropped). Head entries are capped
    near t, tail entries are kept whole. The balanced subset (OUT/subset.npy, or OUT itself) goes
    to `curate write --subset` or `curate select --intersect` like any other.

    On a cluster: run `--phase match --num-tasks K` as K tasks, then `--phase sample` once.
    """
    from curate.api import Runtime
    from curate.api import balance as run_balance
    from curate.balancing.stage import BalanceConfig, BalanceSpec

    spec = BalanceSpec(
        t=t,
        tail_share=tail_share,
        tail_rule=tail_rule,
        target_size=target_size,
        seed=seed,
        draw=draw,
    )
    spec.validate()
    runtime = Runtime(
        executor.value,
        workers=opt.match_workers(workers),
        ray_address=ray_address,
        num_tasks=num_tasks,
        task_index=task_index,
    )
    config = BalanceConfig(
        metadata=metadata,
        spec=spec,
        mode=match,
        normalize=normalize,
        caption_column=caption_column,
        phase=phase,
    )
    result = run_balance(sources, out, config, runtime=runtime, progress=not no_progress)
    warn_shard_problems(result.shard_errors, {})
    if as_json:
        print_json(result.to_json())
    elif result.sample is not None:
        balance_summary(result.sample)
    else:
        assert result.match is not None
        match_summary(result.match, out)
    if result.shard_errors:
        raise typer.Exit(1)
