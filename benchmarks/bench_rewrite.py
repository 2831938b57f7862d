"""Request throughput of the rewrite engine against a stub server with a fixed latency.

The stub (tests/llm_stub.py, a threaded OpenAI-compatible server on 127.0.0.1) sleeps L seconds
per request. With C requests in flight the ideal rate is C / L requests per second; the
benchmark runs `engine.run_jobs_async` (OpenAIBackend, chat API, validation and cache writes
included) over `--rounds` · C jobs for each C and reports achieved / ideal. Target: ≥ 0.8 at
C = 64. The reference (the ideal) is a property of the same run's settings, not a constant.

    python benchmarks/bench_rewrite.py --latency 0.25 --concurrency 8 32 64 128 --rounds 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from llm_stub import StubConfig, StubServer  # noqa: E402

from curate.rewriting.backends import OpenAIBackend  # noqa: E402
from curate.rewriting.cache import RequestCache  # noqa: E402
from curate.rewriting.engine import EngineOptions, Job, run_jobs_async  # noqa: E402
from curate.rewriting.prompts import load_prompts  # noqa: E402
from curate.rewriting.validate import check_rewrite  # noqa: E402


def measure(latency: float, concurrency: int, rounds: int) -> dict[str, float]:
    template = load_prompts()
    jobs = [
        Job(f"k{concurrency}-{i}", f"{i:032x}", 0, f"a small dog number {i} on the grass")
        for i in range(concurrency * rounds)
    ]
    with StubServer(StubConfig(latency=latency)) as stub, tempfile.TemporaryDirectory() as tmp:
        backend = OpenAIBackend(
            stub.url, "stub-model", template, timeout=30.0, concurrency=concurrency
        )
        cache = RequestCache(Path(tmp) / "cache.sqlite")
        options = EngineOptions(concurrency=concurrency)

        async def run() -> dict:
            try:
                return await run_jobs_async(jobs, backend, cache, options, where="")
            finally:
                await backend.aclose()

        start = time.perf_counter()
        results = asyncio.run(run())
        seconds = time.perf_counter() - start
        cache.close()
        in_flight = stub.max_in_flight
    ok = sum(r.text is not None for r in results.values())
    achieved = len(jobs) / seconds
    ideal = concurrency / latency
    return {
        "concurrency": concurrency,
        "requests": len(jobs),
        "valid": ok,
        "seconds": round(seconds, 3),
        "achieved_rps": round(achieved, 1),
        "ideal_rps": round(ideal, 1),
        "ratio": round(achieved / ideal, 3),
        "max_in_flight": in_flight,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--rounds", type=int, default=8, help="Jobs per run = rounds x C.")
    args = parser.parse_args()
    check_rewrite("warm up", "the tokenizer")  # first call imports open_clip (seconds)
    rows = [measure(args.latency, c, args.rounds) for c in args.concurrency]
    for row in rows:
        print(
            f"C={row['concurrency']:>4}  {row['achieved_rps']:>8.1f} req/s of ideal "
            f"{row['ideal_rps']:>7.1f}  ratio {row['ratio']:.3f}  "
            f"(max in flight {row['max_in_flight']})",
            file=sys.stderr,
        )
    print(json.dumps({"latency": args.latency, "rows": rows}))


if __name__ == "__main__":
    main()
