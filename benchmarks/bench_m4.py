"""Speed, memory and linearity of the M4 solver (`curate.fairness.m4.solve_m4`) on synthetic pools,
against the naive per-sample dual ascent measured in the same run.

Data (synthetic, seeded): N samples, `--concepts` concepts with Zipf-like frequencies (weight
1 / rank^s), 0 to `--max-concepts` concepts per sample (drawn with replacement; repeats collapse),
one attribute with `--groups` groups, `--labelled` of the samples labelled. Group shares are
mildly off the uniform target (first group most frequent), and every fifth concept is strongly
skewed: each labelled sample carrying it takes that concept's group with probability
`--skew`. So both representation and association rows bind.

Timings: `solve_m4` on each `--sizes` pool, with a uniform utility and with random utilities
(uniform in [0.5, 2]); wall seconds, microseconds per sample (flat across sizes = linear),
iterations, status, classes, and peak RSS above the RSS before the solve (high-water mark reset
through /proc/self/clear_refs on Linux; ru_maxrss difference otherwise, which can only
underestimate).

Reference: the same accelerated dual ascent without class compression, on the smallest pool:
per-sample dense rows a_i (N × (m+1) float64), each iteration z = A y, q = clip(η − z/(2u)),
gradient Aᵀ q / N − b. It is timed for `--reference-iterations` iterations and extrapolated to
the iterations the compressed solver needed at that size (plus its setup: rows, scaling, step);
the ratio is that estimate over the compressed solver's measured seconds (uniform utility), and
per iteration, over the compressed solver's seconds after its setup (class compression, timed
again alone) divided by its iterations.

Scenarios (unless --no-scenarios), on the largest pool with a uniform utility: tighter ε (the
feasible set is thinner than tol, so an LP certifies it and the margin shrinks), an infeasible ε
(LPs find the closest achievable ε), and the joint bound; seconds, iterations, LPs, enforced ε.

    python benchmarks/bench_m4.py --sizes 250000 500000 1000000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable

import numpy as np
from peak_memory import peak_rss
from scipy.sparse.linalg import eigsh

from curate.fairness.m4 import AttributeInput, M4Options, M4Result, _Problem, solve_m4


def make_pool(args: argparse.Namespace, n: int) -> tuple[AttributeInput, np.ndarray, np.ndarray]:
    """One attribute and concept lists (CSR) for n samples, from `args.seed`."""
    rng = np.random.default_rng(args.seed)
    r, k = args.concepts, args.groups
    freq = 1.0 / np.arange(1, r + 1) ** args.zipf
    freq /= freq.sum()
    counts = rng.integers(0, args.max_concepts + 1, size=n)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = rng.choice(r, size=int(indptr[-1]), p=freq).astype(np.int64)
    base = np.linspace(1.1, 1.0, k)
    labels = rng.choice(k, size=n, p=base / base.sum())
    owner = np.repeat(np.arange(n), counts)
    skewed = (indices % 5 == 0) & (rng.random(len(indices)) < args.skew)
    labels[owner[skewed]] = indices[skewed] % k
    labels[rng.random(n) >= args.labelled] = -1
    target = np.full(k, 1.0 / k)
    attr = AttributeInput("group", labels, target, tuple(f"g{j}" for j in range(k)))
    return attr, indptr, indices


def measured(fn: Callable[[], M4Result]) -> tuple[M4Result, float, float]:
    """Result, wall seconds and peak RSS increase (MB) of one call."""
    with peak_rss() as memory:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    return result, seconds, memory.peak_increase_mb


def dense_rows(
    attr: AttributeInput, indptr: np.ndarray, indices: np.ndarray, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample rows [a_i, 1] (N × (m+1)) and b of the conditional bound, no compression."""
    n = len(indptr) - 1
    labels, target = attr.labels, attr.target
    h = (labels >= 0).astype(np.float64)
    onehot = (labels[:, None] == np.arange(len(target))[None, :]).astype(np.float64)
    carries = np.zeros((n, args.concepts), dtype=bool)
    carries[np.repeat(np.arange(n), np.diff(indptr)), indices] = True
    scopes = [(np.ones(n, dtype=bool), args.eps_r)]
    scopes += [
        (carries[:, c], args.eps_d) for c in range(args.concepts) if (carries[:, c] & (h > 0)).any()
    ]
    m = 2 * len(scopes) * len(target)
    a = np.empty((n, m + 1))
    col = 0
    for y, eps in scopes:
        for group in range(len(target)):
            signed = y * (onehot[:, group] - target[group] * h)
            mass = eps * y * h
            a[:, col], a[:, col + 1] = signed - mass, -signed - mass
            col += 2
    a[:, m] = 1.0
    b = np.concatenate([np.zeros(m), [args.eta]])
    return a, b


def naive_reference(
    attr: AttributeInput, indptr: np.ndarray, indices: np.ndarray, args: argparse.Namespace
) -> dict[str, float]:
    """Seconds per iteration of the uncompressed accelerated dual ascent (uniform utility)."""
    t0 = time.perf_counter()
    a, b = dense_rows(attr, indptr, indices, args)
    n, m1 = a.shape
    curvature = 0.5  # 1 / (2u), u = 1
    diag = curvature * np.einsum("ij,ij->j", a, a) / n
    scale = 1.0 / np.sqrt(diag)
    gram = (a.T @ a) * np.outer(scale, scale) * curvature / n
    top = eigsh(gram, k=1, which="LA", v0=np.ones(m1), return_eigenvectors=False)[0]
    step = 1.0 / top
    build_s = time.perf_counter() - t0
    y = np.zeros(m1)
    x, t = y.copy(), 1.0
    times = []
    for _ in range(args.reference_iterations):
        t1 = time.perf_counter()
        z = a @ (x * scale)
        q = np.clip(args.eta - z * curvature, 0.0, 1.0)
        grad = scale * (a.T @ q / n - b)
        y_new = x + step * grad
        y_new[:-1] = np.maximum(y_new[:-1], 0.0)
        if np.dot(y_new - x, y_new - y) < 0:
            t = 1.0
        t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        x = y_new + (t - 1) / t_new * (y_new - y)
        y, t = y_new, t_new
        times.append(time.perf_counter() - t1)
    return {
        "samples": n,
        "rows": m1 - 1,
        "dense_mb": round(a.nbytes / 2**20, 1),
        "setup_seconds": round(build_s, 3),  # rows, scaling and step
        "seconds_per_iteration": float(np.median(times)),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    options = M4Options(eta=args.eta, eps_r=args.eps_r, eps_d=args.eps_d, bound=args.bound)
    rows: list[dict[str, object]] = []
    smallest = min(args.sizes)
    reference: dict[str, object] = {}
    for n in sorted(args.sizes):
        attr, indptr, indices = make_pool(args, n)
        utility = np.random.default_rng(args.seed + 1).uniform(0.5, 2.0, n)
        for mode, util in (("uniform", None), ("random", utility)):
            call = functools.partial(
                solve_m4, [attr], indptr, indices, args.concepts, options, util
            )
            res, seconds, peak = measured(call)
            t0 = time.perf_counter()  # the part before the first iteration, timed again alone
            _Problem([attr], indptr, indices, args.concepts, options, util)
            setup = time.perf_counter() - t0
            per_iteration = max(seconds - setup, 0.0) / max(res.iterations, 1)
            rows.append(
                {
                    "samples": n,
                    "utility": mode,
                    "seconds": round(seconds, 3),
                    "us_per_sample": round(1e6 * seconds / n, 3),
                    "iterations": res.iterations,
                    "setup_seconds": round(setup, 3),
                    "ms_per_iteration": round(1e3 * per_iteration, 3),
                    "status": res.status,
                    "classes": res.classes,
                    "mean": round(res.mean, 6),
                    "max_violation_r": res.max_violation_r,
                    "max_violation_d": res.max_violation_d,
                    "peak_rss_increase_mb": round(peak, 1),
                }
            )
            print(res.message, file=sys.stderr)
            if n == smallest and mode == "uniform" and not args.skip_reference:
                reference = naive_reference(attr, indptr, indices, args)
                naive_iter = reference["seconds_per_iteration"]
                estimate = reference["setup_seconds"] + naive_iter * res.iterations
                reference["iterations_extrapolated"] = res.iterations
                reference["estimated_seconds"] = round(estimate, 3)
                reference["compressed_seconds"] = round(seconds, 3)
                reference["ratio"] = round(estimate / seconds, 1)
                reference["ratio_per_iteration"] = round(naive_iter / max(per_iteration, 1e-9), 1)
                reference["seconds_per_iteration"] = round(naive_iter, 4)
            del res
    return {
        "runs": rows,
        "reference": reference,
        "scenarios": scenarios(args) if args.scenarios else [],
    }


SCENARIOS = [  # (name, options) at the largest size, uniform utility
    ("tighter ε", M4Options(eps_r=0.005, eps_d=0.01)),
    ("infeasible ε", M4Options(eps_r=0.002, eps_d=0.005)),
    ("joint bound", M4Options(eps_r=0.001, eps_d=0.001, bound="joint")),
]


def scenarios(args: argparse.Namespace) -> list[dict[str, object]]:
    """Harder settings on the largest pool: where the LPs (feasibility, closest ε) come in."""
    n = max(args.sizes)
    attr, indptr, indices = make_pool(args, n)
    out = []
    for name, options in SCENARIOS:
        options = dataclasses.replace(options, eta=args.eta)
        call = functools.partial(solve_m4, [attr], indptr, indices, args.concepts, options)
        res, seconds, peak = measured(call)
        lps = re.search(r"\((\d+) LPs\)", res.message)
        out.append(
            {
                "scenario": name,
                "samples": n,
                "bound": options.bound,
                "eps_asked": [options.eps_r, options.eps_d],
                "eps_enforced": [round(res.eps_r, 6), round(res.eps_d, 6)],
                "status": res.status,
                "seconds": round(seconds, 3),
                "iterations": res.iterations,
                "lps": int(lps.group(1)) if lps else None,
                "peak_rss_increase_mb": round(peak, 1),
            }
        )
        print(res.message, file=sys.stderr)
    return out


def summary(result: dict[str, object]) -> str:
    lines = [
        "| samples | utility | seconds | µs/sample | setup s | iterations | ms/iter | status "
        "| classes | peak RSS MB |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in result["runs"]:  # type: ignore[union-attr]
        lines.append(
            f"| {row['samples']:,} | {row['utility']} | {row['seconds']} | {row['us_per_sample']} "
            f"| {row['setup_seconds']} | {row['iterations']} | {row['ms_per_iteration']} "
            f"| {row['status']} "
            f"| {row['classes']:,} | {row['peak_rss_increase_mb']} |"
        )
    extra = result.get("scenarios")
    if extra:
        lines += [
            "",
            "| scenario | samples | bound | ε asked | ε enforced | status | seconds | iterations "
            "| LPs | peak RSS MB |",
            "|---|---:|---|---|---|---|---:|---:|---:|---:|",
        ]
        for row in extra:  # type: ignore[union-attr]
            lines.append(
                f"| {row['scenario']} | {row['samples']:,} | {row['bound']} "
                f"| {row['eps_asked']} | {row['eps_enforced']} | {row['status']} "
                f"| {row['seconds']} | {row['iterations']} | {row['lps']} "
                f"| {row['peak_rss_increase_mb']} |"
            )
    ref = result.get("reference")
    if isinstance(ref, dict) and ref:
        lines.append(
            f"naive per-sample dual ascent at {ref['samples']:,} samples ({ref['rows']} rows, "
            f"{ref['dense_mb']} MB dense): setup {ref['setup_seconds']} s + "
            f"{ref['seconds_per_iteration']} s/iteration × {ref['iterations_extrapolated']} "
            f"iterations ≈ {ref['estimated_seconds']} s vs {ref['compressed_seconds']} s "
            f"compressed: ratio {ref['ratio']}x overall, "
            f"{ref['ratio_per_iteration']}x per iteration"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    parser.add_argument("--concepts", type=int, default=50)
    parser.add_argument("--max-concepts", type=int, default=3, help="concepts per sample, at most")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--labelled", type=float, default=0.6, help="share of labelled samples")
    parser.add_argument("--skew", type=float, default=0.3, help="pull of skewed concepts")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of concepts")
    parser.add_argument("--eta", type=float, default=0.9)
    parser.add_argument("--eps-r", type=float, default=0.01)
    parser.add_argument("--eps-d", type=float, default=0.05)
    parser.add_argument("--bound", choices=["conditional", "joint"], default="conditional")
    parser.add_argument("--reference-iterations", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--no-scenarios",
        dest="scenarios",
        action="store_false",
        help="skip the harder settings (tighter, infeasible, joint) on the largest pool",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.bound != "conditional" and not args.skip_reference:
        parser.error("the naive reference implements the conditional rows only")
    result: dict[str, object] = {
        "benchmark": "m4",
        "cpu_count": os.cpu_count(),
        "load_avg_1min_before": round(os.getloadavg()[0], 2),
        "config": {k: v for k, v in vars(args).items() if k != "skip_reference"},
    }
    t0 = time.perf_counter()
    result.update(run(args))
    result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    print(summary(result), file=sys.stderr)


if __name__ == "__main__":
    main()
