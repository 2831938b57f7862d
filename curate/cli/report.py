"""Human summaries (rich tables on stdout) and machine summaries (--json) of stage reports."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from curate.runtime.atomic import strict_json
from curate.runtime.progress import stderr_console

if TYPE_CHECKING:
    from pathlib import Path

    from curate.balancing.build import SourceCount
    from curate.balancing.stage import BalanceReport
    from curate.embedding.stage import EmbedReport
    from curate.fairness.audit import AuditReport
    from curate.fairness.rebalance import RebalanceReport
    from curate.rewriting.stage import RewriteReport
    from curate.runtime.stage import MapReport
    from curate.scoring.stage import ScoreReport
    from curate.selection.stage import SelectReport
    from curate.writing.stage import WriteReport

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


def _add_columns(table: Table, *columns: tuple[str, str]) -> None:
    """Columns as (header, justify) pairs."""
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _finite(value: float) -> float | None:
    """None (printed as '-') for NaN: a measure over nothing."""
    return None if value != value else value


def print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(strict_json(payload), indent=2, sort_keys=True, default=str))


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


def select_summary(report: SelectReport) -> None:
    """Counts at every step, so the numbers can be checked against the subset."""
    head = Table(title="curate select", show_header=False, title_justify="left")
    head.add_row("pool table", report.source)
    head.add_row("rows", str(report.rows))
    head.add_row("scored (the pool)", str(report.pool))
    head.add_row("failed", str(report.failed))
    for code, n in report.failures.items():
        head.add_row(f"  {code}", str(n))
    stdout_console.print(head)
    if report.steps:
        steps = Table(title="steps", title_justify="left", box=box.SIMPLE_HEAD)
        _add_columns(
            steps,
            ("step", "left"),
            ("before", "right"),
            ("after", "right"),
            ("threshold", "right"),
            ("note", "left"),
        )
        for s in report.steps:
            steps.add_row(s.step, str(s.before), str(s.after), _fmt(s.threshold), s.note or "")
        stdout_console.print(steps)
    stdout_console.print(
        f"selected [bold]{report.selected}[/bold] of {report.pool}: "
        f"{report.out}/subset.parquet, {report.out}/subset.npy",
        highlight=False,
        soft_wrap=True,
    )


def write_summary(report: WriteReport) -> None:
    """Where every subset uid went, what was written, and how to train on it."""
    table = Table(title="curate write", show_header=False, title_justify="left")
    table.add_row("subset uids", str(report.subset_uids))
    table.add_row("written uids", str(report.written_uids))
    table.add_row("written samples (with repeats)", str(report.written_samples))
    table.add_row("missing from shards", str(report.missing_uids))
    for code, n in report.failed_uids.items():
        table.add_row(f"failed: {code}", str(n))
    if report.zero_copies:
        table.add_row("zero copies (weight)", str(report.zero_copies))
    if report.with_rewrites:
        table.add_row("uids with rewrites.json", str(report.with_rewrites))
    if report.repeated_uids:
        table.add_row("repeated uids", str(report.repeated_uids))
        table.add_row("max copies of a uid in one shard", str(report.max_copies_in_one_shard))
    table.add_row("input shards / samples", f"{report.input_shards} / {report.input_samples}")
    table.add_row(
        "output shards",
        f"{report.shards} ({report.shards_written} written, {report.shards_skipped} already "
        "complete)",
    )
    table.add_row("bytes", f"{report.bytes:,}")
    table.add_row("seconds", f"{report.seconds:.1f}")
    stdout_console.print(table)
    if report.missing_uids:
        stdout_console.print(
            f"[yellow]{report.missing_uids} subset uids are not in the shards:[/yellow] "
            f"{report.out}/missing_uids.txt",
            highlight=False,
            soft_wrap=True,
        )
    if not report.complete:
        stdout_console.print(
            "[yellow]not every output shard is written yet[/yellow] (other array tasks, or "
            "failed shards): manifest.json and sizes.json come with the call that finds them "
            f"all done; `curate status {report.out}` shows what is left",
            highlight=False,
            soft_wrap=True,
        )
        return
    stdout_console.print(
        f"train with open_clip: --dataset-type webdataset --train-data '{report.train_data}' "
        f"--train-num-samples {report.written_samples}",
        highlight=False,
        soft_wrap=True,
    )


def match_summary(report: MapReport, out: Path) -> None:
    """What one match task did."""
    failed = sum(int(s.get("failed", 0)) for s in report.stats.values())
    samples = sum(int(s.get("samples", 0)) for s in report.stats.values())
    stdout_console.print(
        f"matched {report.done_now} units ({report.skipped} already done, "
        f"{len(report.failed)} unreadable) of {report.task}'s {report.units}: {samples} "
        f"samples, {failed} failed; files in {out}/matches ({report.seconds:.1f}s)",
        highlight=False,
        soft_wrap=True,
    )


def balance_summary(report: BalanceReport) -> None:
    """Pool, t, kept count, and the entry distribution before and after balancing."""
    head = Table(title="curate balance", show_header=False, title_justify="left")
    head.add_row(
        "metadata",
        f"{report.metadata} ({report.entries} entries, {report.mode}, "
        f"normalize {report.normalize})",
    )
    head.add_row("pool rows", str(report.rows))
    head.add_row("failed", str(report.failed))
    for code, n in report.failures.items():
        head.add_row(f"  {code}", str(n))
    if report.shard_errors:
        head.add_row("units not read", f"{len(report.shard_errors)} (named above)")
    head.add_row(
        "texts matching an entry", f"{report.matched} ({report.matched_fraction:.1%} of the pool)"
    )
    head.add_row("entries matched", f"{report.entries_matched} of {report.entries}")
    rule = {
        "given": "given",
        "tail_share": f"tail share {report.tail_share_target}",
        "tail_share_metaclip2": f"tail share {report.tail_share_target}, MetaCLIP 2's p_to_t",
    }.get(report.t_rule, "target size")
    head.add_row("t", f"{report.t:g} ({rule})")
    head.add_row("entries at or above t (sampled)", str(report.head_entries))
    head.add_row(
        "tail share (matches of entries below t)",
        f"{report.tail_share_before:.3f} before, {report.tail_share_after:.3f} after",
    )
    head.add_row("matches", f"{report.matches_before} before, {report.matches_after} after")
    head.add_row(
        "largest entry count", f"{report.max_count_before} before, {report.max_count_after} after"
    )
    head.add_row(
        "kept",
        f"{report.kept} (expected {report.expected_kept:.1f}), seed {report.seed}, "
        f"{report.draw} draw",
    )
    stdout_console.print(head)
    if report.note:
        stdout_console.print(f"[yellow]{report.note}[/yellow]", highlight=False)
    if report.head:
        top = Table(title="head: most matched entries", title_justify="left", box=box.SIMPLE_HEAD)
        _add_columns(
            top,
            ("id", "right"),
            ("entry", "left"),
            ("before", "right"),
            ("after", "right"),
            ("min(1, t/count)", "right"),
        )
        for row in report.head:
            top.add_row(
                str(row.entry_id),
                escape(row.entry),
                str(row.before),
                str(row.after),
                f"{row.probability:.3f}",
            )
        stdout_console.print(top)
    if report.buckets:
        dist = Table(
            title="entries by pool count (tail at the top)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for name in ("count", "entries", "matches before", "matches after"):
            dist.add_column(name, justify="right")
        for b in report.buckets:
            dist.add_row(
                f"{b.low}–{b.high - 1}" if b.high else f"{b.low}+",
                str(b.entries),
                str(b.matches_before),
                str(b.matches_after),
            )
        stdout_console.print(dist)
    stdout_console.print(
        f"balanced subset: [bold]{report.kept}[/bold] of {report.rows - report.failed}: "
        f"{report.out}/subset.parquet, {report.out}/subset.npy",
        highlight=False,
        soft_wrap=True,
    )


def metadata_build_summary(
    entries: int, sources: list[SourceCount], out: Path, unmatchable: int
) -> None:
    """Per-source counts of a metadata build."""
    table = Table(title="curate metadata build", title_justify="left", box=box.SIMPLE_HEAD)
    _add_columns(
        table,
        ("source", "left"),
        ("read", "right"),
        ("added", "right"),
        ("duplicates", "right"),
        ("blank", "right"),
        ("punctuation", "right"),
    )
    for s in sources:
        table.add_row(
            s.name, str(s.read), str(s.added), str(s.duplicates), str(s.blank), str(s.punctuation)
        )
    stdout_console.print(table)
    stdout_console.print(f"{entries} entries written to {out}", highlight=False, soft_wrap=True)
    if unmatchable:
        stdout_console.print(
            f"[yellow]{unmatchable} entries can never match with --match metaclip[/yellow] "
            "(a , . ; : ? ! or ` not surrounded by spaces, e.g. 'U.S.'); "
            "`curate metadata check` lists them",
            highlight=False,
            soft_wrap=True,
        )


def rewrite_summary(report: RewriteReport) -> None:
    """Where every sample's rewrites stand, and what this run sent."""
    table = Table(title="curate rewrite", show_header=False, title_justify="left")
    table.add_row("backend / model", f"{report.backend} / {report.model}")
    table.add_row("prompt version", report.prompt_version)
    table.add_row("units / samples", f"{report.units} / {report.samples}")
    table.add_row("input rows failed", str(report.samples_failed))
    table.add_row(f"all {report.num_rewrites} rewrites", str(report.ok))
    table.add_row("some rewrites", str(report.partial))
    table.add_row("no rewrite", str(report.failed))
    table.add_row("rewrites", str(report.rewrites))
    for reason, n in report.reasons.items():
        table.add_row(f"  {reason}", str(n))
    table.add_row("requests run now / from cache", f"{report.requests_sent} / {report.cached}")
    table.add_row("seconds", f"{report.seconds:.1f}")
    stdout_console.print(table)
    stdout_console.print(
        f"rewrites: {report.out}/rewrites/*.parquet (joined by uid)",
        highlight=False,
        soft_wrap=True,
    )


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.1%}"


def _signed(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:+.3f}"


def audit_summary(report: AuditReport) -> None:
    """Who the pool shows per attribute, and the concepts furthest from the target shares."""
    head = Table(title="curate audit", show_header=False, title_justify="left")
    head.add_row("source", report.source)
    head.add_row("labels from", report.infer)
    head.add_row("pool rows", str(report.rows))
    head.add_row("failed", str(report.failed))
    for code, n in report.failures.items():
        head.add_row(f"  {code}", str(n))
    ok = report.rows - report.failed
    head.add_row(
        "with a concept", f"{report.with_concept} ({_pct(report.with_concept / max(1, ok))})"
    )
    if report.person_gated:
        head.add_row(
            "showing a person",
            f"{report.persons} ({_pct(report.persons / max(1, ok))}; caption "
            f"{report.persons_caption}, image {report.persons_image})",
        )
    else:
        head.add_row("labelled subjects", "every sample (the spec has no person block)")
    if report.infer != "caption":
        head.add_row("with an image embedding", str(report.images))
    stdout_console.print(head)
    for attr in report.attributes:
        stdout_console.print(
            f"\n[bold]{attr.name}[/bold]: {attr.labelled} labelled (caption {attr.from_caption}, "
            f"image {attr.from_image}), {attr.mixed} naming several groups",
            highlight=False,
        )
        rep = Table(title=f"{attr.name}: representation", title_justify="left", box=box.SIMPLE_HEAD)
        _add_columns(
            rep,
            ("group", "left"),
            ("count", "right"),
            ("share", "right"),
            ("95% CI", "right"),
            ("target", "right"),
            ("share − target", "right"),
        )
        for i, group in enumerate(attr.groups):
            rep.add_row(
                group,
                f"{attr.counts[i]:.0f}",
                _pct(attr.shares[i]),
                f"{_pct(attr.ci_low[i])}–{_pct(attr.ci_high[i])}",
                _pct(attr.target[i]),
                _signed(attr.shares[i] - attr.target[i]),
            )
        stdout_console.print(rep)
        association = (
            f"association bias {_fmt(attr.association_bias)} (max over "
            f"{attr.concepts_measured} concepts with enough labelled samples)"
            if attr.concepts_measured
            else "association bias not measured: no concept has --min-support labelled samples "
            "(per-concept values are in association.parquet)"
        )
        stdout_console.print(
            f"representation bias {_fmt(attr.representation_bias)}; {association}",
            highlight=False,
        )
        if attr.most_skewed:
            top = Table(
                title=f"{attr.name}: most skewed concepts",
                title_justify="left",
                box=box.SIMPLE_HEAD,
            )
            _add_columns(
                top,
                ("concept", "left"),
                ("labelled", "right"),
                ("group", "left"),
                ("share", "right"),
                ("95% CI", "right"),
                ("target", "right"),
            )
            for row in attr.most_skewed:
                top.add_row(
                    escape(row.concept),
                    f"{row.total:.0f}",
                    row.group,
                    _pct(row.share),
                    f"{_pct(row.ci_low)}–{_pct(row.ci_high)}",
                    _pct(row.target),
                )
            stdout_console.print(top)
        if attr.retrieval_worst:
            stdout_console.print(
                f"retrieval (k = {attr.retrieval_k}): mean MaxSkew@k "
                f"{_fmt(attr.retrieval_max_skew_mean)}, mean NDKL "
                f"{_fmt(attr.retrieval_ndkl_mean)}",
                highlight=False,
            )
            ret = Table(
                title=f"{attr.name}: retrieval bias", title_justify="left", box=box.SIMPLE_HEAD
            )
            _add_columns(
                ret,
                ("concept", "left"),
                ("k", "right"),
                ("MaxSkew@k", "right"),
                ("over-represented", "left"),
                ("NDKL", "right"),
            )
            for row in attr.retrieval_worst:
                ret.add_row(
                    escape(row["concept"]),
                    str(row["k"]),
                    _fmt(row["max_skew"]),
                    str(row["group"]),
                    _fmt(row["ndkl"]),
                )
            stdout_console.print(ret)
    stdout_console.print(
        f"tables: {report.out}/representation.parquet, association.parquet"
        + (", retrieval.parquet" if report.retrieval else "")
        + f"; labels: {report.out}/labels.parquet",
        highlight=False,
        soft_wrap=True,
    )


def rebalance_summary(report: RebalanceReport) -> None:
    """Method, status, kept fraction, and bias before / under the weights / in the subset."""
    head = Table(title="curate rebalance", show_header=False, title_justify="left")
    head.add_row("method", report.method)
    head.add_row("status", report.status)
    if report.eps_r is not None:
        head.add_row(
            "ε enforced", f"representation {report.eps_r:.4g}, association {report.eps_d:.4g}"
        )
    head.add_row("pool", f"{report.pool} ({report.failed} failed rows)")
    head.add_row(
        "kept",
        f"{report.kept} ({_pct(report.kept_fraction)}; expected "
        f"{report.expected_kept:.1f}), seed {report.seed}",
    )
    if report.counterfactuals is not None:
        head.add_row("counterfactual captions", str(report.counterfactuals))
    stdout_console.print(head)
    if report.message:
        colour = "yellow" if report.status in ("infeasible", "max_iter") else "default"
        stdout_console.print(f"[{colour}]{escape(report.message)}[/{colour}]", highlight=False)
    for change in report.attributes:
        below = change.concepts_constrained - change.concepts_measured
        table = Table(
            title=f"{change.attribute}: bias before and after ({change.concepts_constrained} "
            f"concepts constrained, {below} of them below --min-support "
            f"{change.min_support} labelled samples)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        _add_columns(
            table, ("", "left"), ("before", "right"), ("weights", "right"), ("subset", "right")
        )
        table.add_row(
            "representation bias",
            _fmt(change.representation_before),
            _fmt(change.representation_weights),
            _fmt(change.representation_subset),
        )
        if change.concepts_measured:
            table.add_row(
                f"association bias (max, {change.concepts_measured} concepts with ≥ "
                f"{change.min_support} samples)",
                _fmt(change.association_before),
                _fmt(change.association_weights),
                _fmt(change.association_subset),
            )
        table.add_row(
            f"association bias (mean, {change.concepts_constrained} constrained concepts)",
            _fmt(_finite(change.association_mean_before)),
            _fmt(_finite(change.association_mean_weights)),
            _fmt(_finite(change.association_mean_subset)),
        )
        for i, group in enumerate(change.groups):
            table.add_row(
                f"share {group} (target {_pct(change.target[i])})",
                _pct(change.shares_before[i]),
                "",
                _pct(change.shares_subset[i]),
            )
        stdout_console.print(table)
    if report.unbalanced_concepts:
        names = escape(", ".join(report.unbalanced_concepts[:10]))
        more = len(report.unbalanced_concepts) - 10
        stdout_console.print(
            f"[yellow]left as they are (a group has no labelled sample): {names}"
            + (f" and {more} more" if more > 0 else "")
            + "[/yellow]",
            highlight=False,
        )
    stdout_console.print(
        f"subset: {report.out}/subset.parquet (curate write --subset {report.out}); weights: "
        f"{report.out}/weights.parquet (--repeats weight)"
        + (
            f"; counterfactuals: curate write --rewrites {report.out}"
            if report.counterfactuals
            else ""
        ),
        highlight=False,
        soft_wrap=True,
    )
