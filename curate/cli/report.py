"""Human summaries (rich tables on stdout) and machine summaries (--json) of stage reports."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from curate.runtime.progress import stderr_console

if TYPE_CHECKING:
    from curate.embedding.stage import EmbedReport
    from curate.scoring.stage import ScoreReport

stdout_console = Console()
_QUANTILE_LABELS = {
    "q00": "min",
    "q05": "5%",
    "q25": "25%",
    "q50": "median",
    "q75": "75%",
    "q95": "95%",
    "q100": "max",
    "mean": "mean",
}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


def warn_shard_problems(shard_errors: dict[str, str], truncated: dict[str, str]) -> None:
    """Name every shard that could not be opened or ended early (on stderr)."""
    for url, error in shard_errors.items():
        stderr_console.print(
            f"[bold red]shard failed:[/bold red] {url}: {error}", highlight=False, soft_wrap=True
        )
    for url, error in truncated.items():
        stderr_console.print(
            f"[yellow]shard truncated:[/yellow] {url}: {error}", highlight=False, soft_wrap=True
        )


def embed_summary(report: EmbedReport) -> None:
    table = Table(title="curate embed", show_header=False, title_justify="left")
    table.add_row("run folder", str(report.run_dir))
    table.add_row(
        "shards",
        f"{report.shards_total} ({report.shards_embedded} embedded, "
        f"{report.shards_skipped} already complete, {len(report.shard_errors)} failed)",
    )
    table.add_row("samples read", str(report.samples_read))
    table.add_row("embedded", str(report.samples_ok))
    table.add_row("failed", str(report.samples_failed))
    table.add_row("seconds", f"{report.seconds:.1f}")
    stdout_console.print(table)


def score_summary(report: ScoreReport) -> None:
    counts = Table(title="curate score", show_header=False, title_justify="left")
    counts.add_row("samples read", str(report.read))
    counts.add_row("scored", str(report.scored))
    counts.add_row("failed", str(report.failed))
    for code, n in report.failures.items():
        counts.add_row(f"  {code}", str(n))
    stdout_console.print(counts)
    if report.quantiles:
        # One column per metric, one row per statistic: stays narrow for any terminal.
        metrics = list(report.quantiles)
        quant = Table(title="score quantiles", title_justify="left", box=box.SIMPLE_HEAD)
        quant.add_column("")
        for metric in metrics:
            quant.add_column(metric, justify="right")
        for stat, label in _QUANTILE_LABELS.items():
            quant.add_row(label, *(_fmt(report.quantiles[m].get(stat)) for m in metrics))
        stdout_console.print(quant)
    negclip = report.params.get("negclip")
    if negclip:
        stdout_console.print(
            f"negclip: batch {negclip['batch_size']}, K {negclip['k']}, "
            f"τ {negclip['temperature']:.4g}, seed {negclip['seed']}",
            highlight=False,
        )
    stdout_console.print(f"scores: [bold]{report.out}[/bold]", highlight=False, soft_wrap=True)
