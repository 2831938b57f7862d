"""Use curate as a library: embed shards into a run folder, score them, read the table.

    python examples/score_with_library.py /tmp/example

Runs offline on synthetic shards with a randomly initialised tiny model (pass a real model and
`pretrained` tag or checkpoint for meaningful scores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

import curate
from curate.demo.synthetic import generate_shards
from curate.embedding.stage import EmbedConfig
from curate.scoring.stage import NegclipOptions, ScoreConfig


def main(workdir: Path) -> pl.DataFrame:
    data = generate_shards(workdir / "shards", num_samples=200, samples_per_shard=100, seed=1)
    config = ScoreConfig(
        metrics=["clipscore", "negclip"],
        negclip=NegclipOptions(batch_size=64, k=5, seed=0),
        # any open_clip name, e.g. model="ViT-B-32", pretrained="openai"
        embed=EmbedConfig(model="curate-tiny", pretrained="none", workers=0),
    )
    report = curate.score([str(p) for p in data.shards], workdir / "run", config, progress=False)
    print(f"read {report.read}, scored {report.scored}, failed {report.failed}")
    scores = pl.read_parquet(report.out)
    print(scores.sort("negclip", descending=True, nulls_last=True).head(5))
    return scores


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "example-run"))
