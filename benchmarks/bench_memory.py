"""Peak memory of `curate score` as the number of shards grows tenfold (target: flat within 10%).

Each measurement runs the real CLI in a fresh process over S shards of the same size and reads
the peak resident set size of that process (workers are separate processes and are reported
apart). The pool's own embeddings grow with the sample count by design (negclip needs the whole
pool: 2 bytes × D × 2 per sample); the report states that share so it can be told apart from
leaks or per-shard buffering.

    python benchmarks/bench_memory.py --shards 10 100 --per-shard 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import resource, sys
from curate.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
print("WORKER_PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
      file=sys.stderr)
sys.exit(code)
"""


def make_shards(folder: Path, shards: int, per_shard: int) -> None:
    from curate.demo.synthetic import generate_shards

    generate_shards(
        folder,
        num_samples=shards * per_shard,
        samples_per_shard=per_shard,
        image_size=64,
        mismatch=0.1,
        generic=0.05,
        corrupt=0.01,
    )


def peak_rss(args: list[str]) -> tuple[int, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"curate failed: {done.stderr[-2000:]}")
    values = dict(
        line.split()
        for line in done.stderr.splitlines()
        if line.startswith(("PEAK_RSS_KB", "WORKER_PEAK_RSS_KB"))
    )
    return int(values["PEAK_RSS_KB"]), int(values["WORKER_PEAK_RSS_KB"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs=2, default=[10, 100])
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--model", default="curate-tiny")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.shards:
            folder = Path(tmp) / f"s{count}"
            make_shards(folder, count, args.per_shard)
            main_kb, worker_kb = peak_rss(
                [
                    "score",
                    str(folder),
                    "--out",
                    str(Path(tmp) / f"run{count}"),
                    "-m",
                    "clipscore",
                    "-m",
                    "negclip",
                    "--model",
                    args.model,
                    "--pretrained",
                    "none",
                    "--no-progress",
                    "--json",
                ]
            )
            results.append(
                {
                    "shards": count,
                    "samples": count * args.per_shard,
                    "peak_rss_mb": round(main_kb / 1024, 1),
                    "worker_peak_rss_mb": round(worker_kb / 1024, 1),
                }
            )
    small, large = results
    print(
        json.dumps(
            {
                "benchmark": "score_peak_memory",
                "model": args.model,
                "runs": results,
                "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                "target": 1.10,
            }
        )
    )


if __name__ == "__main__":
    main()
