"""`curate select`: score tables in, a subset (uid parquet + DataComp .npy) out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curate.cli import options as opt
from curate.cli.report import print_json, select_summary


def select_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="A run folder with scores.parquet (curate score's output), or a parquet "
            "table / folder / glob with a uid column (e.g. DataComp metadata).",
            show_default=False,
        ),
    ],
    top: Annotated[
        list[str] | None,
        typer.Option(
            "--top",
            help="COLUMN:FRACTION[:pool|remainder]. Keep the top fraction by a score column, "
            "DataComp semantics: n = floor(N·f), keep scores >= the value at position n of the "
            "descending order (ties kept). Repeat to chain; a later step must say whether its "
            "fraction is of the pool or of the remainder. normsim2_d as COLUMN runs NormSim_2-D "
            "(pool as its own target). Recipe negCLIPLoss ∩ NormSim: --top negclip:0.3 "
            "--top normsim_inf:0.2:pool.",
            rich_help_panel="Criteria",
        ),
    ] = None,
    where: Annotated[
        list[str] | None,
        typer.Option(
            "--where",
            help="'COLUMN OP NUMBER' (OP: > >= < <= == !=) on any numeric column or on "
            "caption_words, caption_chars, min_side, max_side, aspect_ratio, pixels. DataComp's "
            "basic filter (without language id): --where 'caption_words > 2' --where "
            "'caption_chars > 5' --where 'min_side >= 200' --where 'aspect_ratio <= 3'.",
            rich_help_panel="Criteria",
        ),
    ] = None,
    intersect: Annotated[
        list[Path] | None,
        typer.Option(
            "--intersect",
            help="Keep only uids in this file (.npy DataComp, .parquet with uid, .txt, or a "
            "subset folder). Repeatable.",
            rich_help_panel="Set algebra",
        ),
    ] = None,
    exclude: Annotated[
        list[Path] | None,
        typer.Option(
            "--exclude", help="Drop uids in this file. Repeatable.", rich_help_panel="Set algebra"
        ),
    ] = None,
    union: Annotated[
        list[Path] | None,
        typer.Option(
            "--union",
            help="Add back pool rows whose uid is in this file, after all criteria. Repeatable.",
            rich_help_panel="Set algebra",
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder for subset.parquet, subset.npy, decisions.parquet and select.json.",
            rich_help_panel="Output",
        ),
    ] = Path("curate-subset"),
    seed: Annotated[
        int,
        typer.Option(help="Seed of NormSim_2-D's initial sample.", rich_help_panel="NormSim_2-D"),
    ] = 0,
    normsim2d_rounds: Annotated[
        int,
        typer.Option(
            "--normsim2d-rounds",
            min=1,
            help="Rounds of NormSim_2-D.",
            rich_help_panel="NormSim_2-D",
        ),
    ] = 10,
    device: opt.DeviceOpt = "auto",
    as_json: opt.JsonOpt = False,
) -> int:
    """Choose a subset of a scored pool by fractions, thresholds and set algebra.

    Every row of the pool ends as kept, dropped (with the step that dropped it) or failed in
    OUT/decisions.parquet; the subset is OUT/subset.parquet and OUT/subset.npy (DataComp
    format, sorted), ready for [bold]curate write[/bold] or DataComp's resharder.

    Steps run in this order: failed rows out; --intersect/--exclude; --where; the --top chain
    in the order given; --union.
    """
    from curate.api import select as run_select
    from curate.selection.rules import Condition, TopStep
    from curate.selection.stage import SelectSpec

    spec = SelectSpec(
        top=[TopStep.parse(s) for s in top or []],
        where=[Condition.parse(s) for s in where or []],
        intersect=list(intersect or []),
        exclude=list(exclude or []),
        union=list(union or []),
        seed=seed,
        normsim2d_rounds=normsim2d_rounds,
    )
    report = run_select(source, out, spec, device=None if device == "auto" else device)
    if as_json:
        print_json(report.to_json())
    else:
        select_summary(report)
    return 0
