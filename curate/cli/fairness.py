"""`curate audit` and `curate rebalance`: demographic bias in a pool, measured and reduced."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from curate.balancing.matching import MatchMode
from curate.cli import options as opt
from curate.cli.report import audit_summary, print_json, rebalance_summary, warn_shard_problems

BUILTIN_CONCEPTS = ("occupations",)


class InferChoice(str, Enum):
    auto = "auto"
    caption = "caption"
    image = "image"
    both = "both"


class TargetChoice(str, Enum):
    spec = "spec"
    uniform = "uniform"
    pool = "pool"


class DesiredChoice(str, Enum):
    uniform = "uniform"
    pool = "pool"


class MethodChoice(str, Enum):
    m4 = "m4"
    resample = "resample"
    none = "none"


class BoundChoice(str, Enum):
    conditional = "conditional"
    joint = "joint"


class AugmentChoice(str, Enum):
    none = "none"
    swap = "swap"


class RebalanceTarget(str, Enum):
    audit = "audit"
    uniform = "uniform"
    pool = "pool"


AttributeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--attribute",
        "-a",
        help="Attribute of the spec to audit (repeatable). Default: every attribute.",
        rich_help_panel="Attributes",
    ),
]
RebalanceAttributeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--attribute",
        "-a",
        help="Attribute to balance (repeatable; m4 balances several at once). Default: the "
        "audit's first (gender in the built-in spec).",
        rich_help_panel="Method",
    ),
]


def _concepts_path(value: str) -> Path:
    if value in BUILTIN_CONCEPTS:
        from importlib import resources

        return Path(str(resources.files("curate.fairness") / "spec_data" / f"{value}.txt"))
    return Path(value)


def audit_command(
    sources: opt.CaptionSources,
    concepts: Annotated[
        str,
        typer.Option(
            "--concepts",
            "-c",
            help="Concepts to measure association with: 'occupations' (built in, ~100), a text "
            "file with one concept per line, or MetaCLIP metadata (JSON list).",
            rich_help_panel="Concepts",
        ),
    ] = "occupations",
    match: Annotated[
        MatchMode,
        typer.Option(
            "--match",
            help="How concepts match captions. words: word boundaries, case-insensitive. "
            "metaclip: MetaCLIP's exact sub-string rule.",
            rich_help_panel="Concepts",
        ),
    ] = MatchMode.words,
    spec: Annotated[
        Path | None,
        typer.Option(
            "--spec",
            help="Attribute spec (YAML or JSON): attributes, groups, caption terms, image "
            "prompts. Default: the built-in perceived gender and age group.",
            show_default=False,
            rich_help_panel="Attributes",
        ),
    ] = None,
    attribute: AttributeOpt = None,
    run: Annotated[
        Path | None,
        typer.Option(
            "--run",
            help="A curate run folder with image embeddings of the same samples: enables "
            "zero-shot image labels and retrieval bias. Implied when the source is a run.",
            rich_help_panel="Attributes",
        ),
    ] = None,
    infer: Annotated[
        InferChoice,
        typer.Option(
            help="Label sources. auto: caption and image when embeddings are at hand, else "
            "caption. A caption label wins over an image label.",
            rich_help_panel="Attributes",
        ),
    ] = InferChoice.auto,
    min_confidence: Annotated[
        float,
        typer.Option(
            "--min-confidence",
            help="Image labels whose top probability is lower stay unknown.",
            rich_help_panel="Attributes",
        ),
    ] = 0.6,
    person_threshold: Annotated[
        float,
        typer.Option(
            "--person-threshold",
            help="Image person probability needed to treat an image as showing a person.",
            rich_help_panel="Attributes",
        ),
    ] = 0.5,
    target: Annotated[
        TargetChoice,
        typer.Option(
            help="π for representation and association bias: the spec's shares (uniform "
            "unless given), uniform, or the pool's own labelled shares.",
            rich_help_panel="Metrics",
        ),
    ] = TargetChoice.spec,
    k: Annotated[
        int,
        typer.Option(
            "--k",
            min=1,
            help="Retrieval depth for MaxSkew@k and NDKL (capped at the labelled images).",
            rich_help_panel="Metrics",
        ),
    ] = 1000,
    desired: Annotated[
        DesiredChoice,
        typer.Option(
            help="Retrieval's desired distribution: uniform (equal opportunity) or the pool's "
            "labelled shares (demographic parity).",
            rich_help_panel="Metrics",
        ),
    ] = DesiredChoice.uniform,
    alpha: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Skew smoothing: added to every group's top-k count, so a group missing from "
            "the top k has a finite skew (0: the raw formula).",
            rich_help_panel="Metrics",
        ),
    ] = 1.0,
    prompt: Annotated[
        str,
        typer.Option(help="Neutral retrieval prompt per concept.", rich_help_panel="Metrics"),
    ] = "a photo of a {concept}.",
    min_support: Annotated[
        int,
        typer.Option(
            "--min-support",
            min=1,
            help="Concepts with fewer labelled samples are left out of the summary and the "
            "headline association bias (they stay in association.parquet).",
            rich_help_panel="Metrics",
        ),
    ] = 20,
    no_retrieval: Annotated[
        bool,
        typer.Option("--no-retrieval", help="Skip retrieval bias.", rich_help_panel="Metrics"),
    ] = False,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder: matches/, labels.parquet, representation.parquet, "
            "association.parquet, retrieval.parquet, audit.json. Rerunning reuses matches.",
            rich_help_panel="Output",
        ),
    ] = Path("curate-audit"),
    caption_column: opt.CaptionColumnOpt = None,
    device: opt.DeviceOpt = "auto",
    workers: opt.MatchWorkersOpt = None,
    executor: opt.ExecutorOpt = opt.ExecutorChoice.local,
    ray_address: opt.RayAddressOpt = None,
    num_tasks: opt.NumTasksOpt = None,
    task_index: opt.TaskIndexOpt = None,
    no_progress: opt.NoProgressOpt = False,
    as_json: opt.JsonOpt = False,
) -> None:
    """Measure demographic bias in a pool: label who each sample shows (from caption words and,
    with image embeddings, zero-shot image classification), then report representation bias
    (max |P(group | person) − π|), association bias per concept (max |P(group | concept) − π|,
    with 95% Wilson intervals) and retrieval MaxSkew@k / NDKL for neutral concept prompts.

    Labels are perceived and coarse: use them for dataset statistics, never about individuals.
    `curate rebalance OUT` reduces what the audit found.

    On a cluster the matching spreads: --executor ray matches one unit per Ray task;
    --executor array --num-tasks K matches units i, i+K, ... and stops, and one plain
    [bold]curate audit[/bold] with the same arguments afterwards measures (`curate slurm --
    audit ...` submits both).
    """
    from curate.api import Runtime
    from curate.api import audit as run_audit
    from curate.balancing.metadata import load_metadata
    from curate.fairness.audit import AuditConfig, AuditOptions
    from curate.fairness.spec import load_spec
    from curate.runtime.progress import stderr_console

    options = AuditOptions(
        infer=None if infer is InferChoice.auto else infer.value,  # type: ignore[arg-type]
        min_confidence=min_confidence,
        person_threshold=person_threshold,
        target=target.value,  # type: ignore[arg-type]
        k=k,
        desired=desired.value,  # type: ignore[arg-type]
        alpha=alpha,
        prompt=prompt,
        retrieval=not no_retrieval,
        min_support=min_support,
    )
    options.validate()
    attribute_spec = load_spec(spec).select(attribute)
    concept_list = load_metadata(_concepts_path(concepts))
    runtime = Runtime(
        executor.value,
        workers=opt.match_workers(workers),
        ray_address=ray_address,
        num_tasks=num_tasks,
        task_index=task_index,
    )
    config = AuditConfig(
        concepts=concept_list,
        spec=attribute_spec,
        options=options,
        run=run,
        mode=match,
        caption_column=caption_column,
        device=device,
    )
    report = run_audit(sources, out, config, runtime=runtime, progress=not no_progress)
    warn_shard_problems(report.shard_errors, {})
    if as_json:
        print_json(report.to_json())
    elif report.complete:
        audit_summary(report)
    if not report.complete:
        stderr_console.print(
            f"{report.task} matched its share of the units; once every task is done, rerun "
            "this command without --executor array (one process) to measure",
            highlight=False,
            soft_wrap=True,
        )
    if report.shard_errors:
        raise typer.Exit(1)


def rebalance_command(
    audit_dir: Annotated[
        Path,
        typer.Argument(help="A curate audit output folder.", show_default=False),
    ],
    method: Annotated[
        MethodChoice,
        typer.Option(
            help="m4: keep weights in [0, 1] with mean --eta under representation (--eps-r) and "
            "association (--eps-d) constraints (Alabdulmohsin et al. 2024). resample: per "
            "concept, downsample each group to the target shares. none: only --augment.",
            rich_help_panel="Method",
        ),
    ] = MethodChoice.m4,
    attribute: RebalanceAttributeOpt = None,
    eta: Annotated[
        float,
        typer.Option(
            help="M4: mean keep weight (the fraction of the pool kept).", rich_help_panel="Method"
        ),
    ] = 0.9,
    eps_r: Annotated[
        float,
        typer.Option("--eps-r", help="M4: bound on representation bias.", rich_help_panel="Method"),
    ] = 0.01,
    eps_d: Annotated[
        float,
        typer.Option(
            "--eps-d",
            help="M4: bound on association bias per concept and group.",
            rich_help_panel="Method",
        ),
    ] = 0.05,
    bound: Annotated[
        BoundChoice,
        typer.Option(
            help="What ε bounds. conditional: |P(group | concept, person) − π| under the "
            "weights, the audit's own measure. joint: the paper's |mean q·y·(s − π·h)| over "
            "the whole pool.",
            rich_help_panel="Method",
        ),
    ] = BoundChoice.conditional,
    target: Annotated[
        RebalanceTarget,
        typer.Option(
            help="π: the audit's targets, uniform, or the pool's labelled shares.",
            rich_help_panel="Method",
        ),
    ] = RebalanceTarget.audit,
    augment: Annotated[
        AugmentChoice,
        typer.Option(
            help="swap: counterfactual captions of kept samples with gendered terms swapped "
            "(an involution: swapping twice gives the caption back), written in curate "
            "rewrite's format; `curate write --rewrites OUT` adds them to the shards.",
            rich_help_panel="Augment",
        ),
    ] = AugmentChoice.none,
    swap_table: Annotated[
        str | None,
        typer.Option(
            "--swap-table",
            help="Swap pairs file (one pair per line). Default: the spec's gender table.",
            rich_help_panel="Augment",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the keep draws (one per uid).", rich_help_panel="Output")
    ] = 0,
    draw: opt.DrawOpt = opt.DrawRule.systematic,
    min_support: Annotated[
        int | None,
        typer.Option(
            "--min-support",
            min=1,
            help="Concepts with fewer labelled samples are left out of the max association "
            "bias in the summary (the mean covers every constrained concept). Default: the "
            "audit's.",
            rich_help_panel="Output",
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder: subset.parquet + subset.npy (the seeded subset), "
            "weights.parquet, decisions.parquet, metrics.parquet, rewrites/, rebalance.json.",
            rich_help_panel="Output",
        ),
    ] = Path("curate-rebalance"),
    as_json: opt.JsonOpt = False,
) -> None:
    """Reduce the bias an audit measured: per-sample keep weights (M4 or per-concept
    resampling), a seeded subset drawn from them, and optional counterfactual captions. Bias
    before, under the weights and in the subset is printed and saved.

    Hand the result to `curate write --subset OUT` (the subset), or
    `curate write --subset OUT/weights.parquet --repeats weight` (the weights).
    """
    from curate.api import rebalance as run_rebalance
    from curate.fairness.rebalance import RebalanceOptions
    from curate.runtime.progress import scoring_status

    options = RebalanceOptions(
        method=method.value,  # type: ignore[arg-type]
        attributes=tuple(attribute or ()),
        eta=eta,
        eps_r=eps_r,
        eps_d=eps_d,
        bound=bound.value,  # type: ignore[arg-type]
        target=target.value,  # type: ignore[arg-type]
        seed=seed,
        draw=draw.value,
        augment=augment.value,  # type: ignore[arg-type]
        swap_table=swap_table,
        min_support=min_support,
    )
    options.validate()
    with scoring_status("rebalancing", enabled=not as_json):
        report = run_rebalance(audit_dir, out, options)
    if as_json:
        print_json(report.to_json())
    else:
        rebalance_summary(report)
