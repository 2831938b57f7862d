"""Cost of the systematic subset draw (`curate.balancing.draws`) against the per-uid coin, and how
far each lands from the weights' expected counts, on the same synthetic pool in the same run.

Pool (synthetic, seeded): N samples; each carries 0-3 concepts drawn Zipf-like from `--concepts`
ids and a label in {-1, 0, 1}; keep probabilities uniform in [0, 1]. Both rules get the same
uids, weights and seed. Reported per N: seconds of each rule (median of `--repeats`), their
ratio (systematic ÷ independent), the peak RSS increase per sample of the systematic draw, and
the largest |kept − expected| over exact classes for each rule (systematic must stay below 1).

    python benchmarks/bench_draws.py --sizes 100000 1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from peak_memory import peak_rss

from curate.balancing.draws import DrawRule, class_keys, draw_subset


def make_pool(n: int, concepts: int, seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4, n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    zipf = 1.0 / np.arange(1, concepts + 1) ** 1.1
    indices = rng.choice(concepts, size=int(indptr[-1]), p=zipf / zipf.sum()).astype(np.int64)
    labels = rng.integers(-1, 2, n)
    weights = rng.random(n)
    uids = [hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=16).hexdigest() for i in range(n)]
    return indptr, indices, labels, weights, uids


def worst_class_gap(kept: np.ndarray, weights: np.ndarray, keys: tuple) -> float:
    """max over exact classes of |kept count − Σ weights|."""
    _, cls = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
    cls = cls.ravel()
    expected = np.bincount(cls, weights=weights)
    got = np.bincount(cls, weights=kept.astype(np.float64))
    return float(np.abs(got - expected).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--concepts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        indptr, indices, labels, weights, uids = make_pool(n, args.concepts, args.seed)
        ok = np.ones(n, dtype=bool)
        seconds: dict[str, list[float]] = {rule.value: [] for rule in DrawRule}
        kept: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for rule in DrawRule:
                start = time.perf_counter()
                kept[rule.value] = draw_subset(
                    weights, uids, ok, args.seed, rule, indptr, indices, [labels]
                )
                seconds[rule.value].append(time.perf_counter() - start)
        with peak_rss() as peak:
            draw_subset(
                weights, uids, ok, args.seed, DrawRule.systematic, indptr, indices, [labels]
            )
        keys = class_keys(indptr, indices, [labels])
        med = {rule: statistics.median(times) for rule, times in seconds.items()}
        rows.append(
            {
                "n": n,
                "systematic_s": round(med["systematic"], 4),
                "independent_s": round(med["independent"], 4),
                "ratio": round(med["systematic"] / med["independent"], 2),
                "peak_bytes_per_sample": round(peak.peak_increase_mb * 2**20 / n, 1),
                "worst_class_gap_systematic": round(
                    worst_class_gap(kept["systematic"], weights, keys), 4
                ),
                "worst_class_gap_independent": round(
                    worst_class_gap(kept["independent"], weights, keys), 4
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if any(r["worst_class_gap_systematic"] >= 1.0 for r in rows):
        sys.exit("systematic draw missed a class's floor/ceiling")


if __name__ == "__main__":
    main()
