"""`curate demo`: the whole scoring path offline, on data and a model the project makes itself."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from curate.cli import options as opt
from curate.cli.report import print_json, score_summary, stdout_console
from curate.runtime.progress import stderr_console


def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for shards and run.")] = Path(
        "demo-run"
    ),
    samples: Annotated[int, typer.Option(min=10, help="Synthetic samples to generate.")] = 2000,
    samples_per_shard: Annotated[int, typer.Option(min=1, help="Samples per shard.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
    workers: opt.WorkersOpt = None,
    no_progress: opt.NoProgressOpt = False,
    as_json: opt.JsonOpt = False,
) -> int:
    """Generate noisy synthetic shards, score them with the project's tiny CLIP, and show how
    well negclip and clipscore separate the injected noise (AUROC, 1.0 = perfect, 0.5 = chance).

    The tiny CLIP is trained on first use (about 2 minutes on 2 CPU cores) and cached in
    $CURATE_CACHE or ~/.cache/curate.
    """
    from curate.demo.run_demo import run_demo

    result = run_demo(
        out,
        num_samples=samples,
        samples_per_shard=samples_per_shard,
        seed=seed,
        num_workers=workers,
        progress=not no_progress,
        log=lambda msg: stderr_console.print(msg, highlight=False),
    )
    if as_json:
        print_json(
            {
                "score": result.score.to_json(),
                "auroc": result.auroc,
                "counts": result.counts,
                "failed_by_kind": result.accounted,
            }
        )
        return 0
    score_summary(result.score)
    table = Table(
        title="noise separation (AUROC: clean pairs vs injected noise)", title_justify="left"
    )
    table.add_column("metric")
    kinds = sorted({k for per in result.auroc.values() for k in per})
    for kind in kinds:
        table.add_column(f"{kind} ({result.counts.get(kind, 0)})", justify="right")
    for metric, per in result.auroc.items():
        table.add_row(metric, *(f"{per[k]:.3f}" for k in kinds))
    stdout_console.print(table)
    corrupt = result.counts.get("corrupt", 0)
    stdout_console.print(
        f"corrupt samples injected: {corrupt}, recorded as failed: "
        f"{result.accounted.get('corrupt', 0)}",
        highlight=False,
    )
    stdout_console.print(
        "\n[bold]next[/bold]: select with the negCLIPLoss ∩ NormSim recipe, write the curated "
        "shards, and fine-tune the demo CLIP on them with open_clip's trainer:\n"
        f"  curate select {out}/run --top negclip:0.3 --top normsim_inf:0.2:pool "
        f"--out {out}/subset\n"
        f"  curate write {out}/shards --subset {out}/subset --out {out}/curated "
        "--shard-samples 200\n"
        f"  python -m open_clip_train.main --model local-dir:{out}/open_clip "
        f"--dataset-type webdataset --train-data '<printed by curate write>' "
        "--train-num-samples <printed> --batch-size 32 --epochs 1 --precision fp32 "
        "--workers 1 --lr 1e-4 --warmup 1\n"
        "or balance the pool over metadata mined from its captions (MetaCLIP):\n"
        f"  curate metadata build --corpus {out}/shards --min-unigram-count 20 "
        f"--min-bigram-pmi 1 --out {out}/metadata.json\n"
        f"  curate balance {out}/shards --metadata {out}/metadata.json --out {out}/balanced",
        highlight=False,
        soft_wrap=True,
    )
    return 0
