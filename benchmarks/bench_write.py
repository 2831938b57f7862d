"""Throughput and peak memory of `curate write` (`write_subset`) against a plain tar-to-tar copy.

Throughput: `write_subset` of the FULL subset (every sample selected, so the same bytes move)
against a reference measured in the same run on the same shards: Python `tarfile` streaming
read of each input tar, each member written into a new tar (one process). A raw
`shutil.copyfile` of the tars is the roof, the reference plus an fsync of each output tar
(curate write fsyncs every file before renaming it into place) and a 30% random subset are
timed too (all three informational). Inputs are img2dataset-layout shards with random-bytes
"jpg" members of 50-100 KB (incompressible, like JPEGs), a caption and a DataComp-style json
with a `uid`. The inputs are read once before timing (page cache warm for every side); each
measurement is repeated, alternating the order of the sides, and the median is reported. MB/s
counts input tar bytes for the full copies and output tar bytes for the 30% subset.

Memory: peak RSS (`ru_maxrss`) of a fresh process that imports the library and calls
`write_subset` over S and 10·S input shards of the same size (small members), subset = all
samples. Target: ratio ≤ 1.10.

    python benchmarks/bench_write.py --total-mb 300 --repeats 5 --mem-shards 10 100

`--profile` adds the top functions (cProfile, cumulative) of one full curate write to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

from curate.io.uids import derive_uid
from curate.writing.stage import WriteOptions, write_subset

MB = 1024 * 1024

MEASURE = """
import resource, sys
from pathlib import Path
from curate.writing.stage import WriteOptions, write_subset


def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


shards, subset, out, workers, per_shard = sys.argv[1:6]
try:  # Linux: restart the high-water mark here, to see the write's own peak above the imports
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base_kb = status("VmRSS")
except OSError:
    base_kb = None
report = write_subset(
    shards, subset, out=Path(out),
    options=WriteOptions(workers=int(workers), max_samples=int(per_shard)),
)
assert report.written_samples == report.subset_uids, report.to_json()
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
if base_kb is not None:
    print("PEAK_ABOVE_IMPORT_KB", status("VmHWM") - base_kb)
"""


def _header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def make_shards(
    folder: Path, shards: int, per_shard: int, min_kb: int, max_kb: int, seed: int
) -> list[str]:
    """Write img2dataset-layout shards (jpg/txt/json, json carries a uid); returns all uids."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    uids: list[str] = []
    for s in range(shards):
        name = f"{s:05d}.tar"
        with tarfile.open(folder / name, "w", format=tarfile.GNU_FORMAT) as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                uid = derive_uid(name, key)
                uids.append(uid)
                image = rng.randbytes(rng.randint(min_kb * 1024, max_kb * 1024))
                caption = f"a photo of sample {key} " + "word " * rng.randint(3, 20)
                meta = {
                    "url": f"http://example.com/{key}.jpg",
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 512,
                    "height": 384,
                    "original_width": 1024,
                    "original_height": 768,
                    "uid": uid,
                }
                for ext, data in (
                    ("jpg", image),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    tf.addfile(_header(f"{key}.{ext}", len(data)), io.BytesIO(data))
    return uids


def write_uids(path: Path, uids: list[str]) -> Path:
    path.write_text("\n".join(uids) + "\n")
    return path


def warm_up(tars: list[Path]) -> None:
    for tar in tars:
        with open(tar, "rb") as fh:
            while fh.read(8 * MB):
                pass


def copyfile_roof(tars: list[Path], out: Path) -> None:
    out.mkdir()
    for tar in tars:
        shutil.copyfile(tar, out / tar.name)


def tar_copy(tars: list[Path], out: Path, fsync: bool = False) -> None:
    """The reference: stream-read each tar, write each member into a new tar (`fsync`: flush
    each output to disk before closing it, as curate write does; informational)."""
    out.mkdir()
    for tar in tars:
        with open(out / tar.name, "wb") as fh:
            with (
                tarfile.open(tar, "r|") as src,
                tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as dst,
            ):
                for member in src:
                    dst.addfile(member, src.extractfile(member) if member.isreg() else None)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _InlineExecutor:
    """Runs submitted work in the calling thread, so cProfile sees the workers' time."""

    def __init__(self, max_workers: int = 1) -> None:
        pass

    def __enter__(self) -> _InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def submit(self, fn: Callable[..., object], *args: object) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def map(self, fn: Callable[..., object], *iterables: object) -> Iterator[object]:
        return iter([fn(*a) for a in zip(*iterables, strict=True)])


def profile(run: Callable[[], object]) -> None:
    """cProfile one run in one thread (stage's thread pools made inline) and print to stderr."""
    import curate.writing.stage as stage

    pool = stage.ThreadPoolExecutor
    stage.ThreadPoolExecutor = _InlineExecutor  # type: ignore[misc, assignment]
    try:
        profiler = cProfile.Profile()
        profiler.runcall(run)
    finally:
        stage.ThreadPoolExecutor = pool  # type: ignore[misc]
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(35)
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(20)


def tar_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def throughput(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    avg_kb = (args.min_kb + args.max_kb) / 2
    shards = max(1, round(args.total_mb * 1024 / avg_kb / args.per_shard))
    data = tmp / "shards"
    uids = make_shards(data, shards, args.per_shard, args.min_kb, args.max_kb, seed=0)
    tars = sorted(data.glob("*.tar"))
    in_bytes = tar_bytes(data)
    full = write_uids(tmp / "all.txt", uids)
    part = write_uids(tmp / "part.txt", random.Random(1).sample(uids, round(0.3 * len(uids))))
    options = WriteOptions(workers=args.workers, max_samples=args.per_shard)

    def curate(subset: Path, out: Path) -> Callable[[], object]:
        return lambda: write_subset(str(data), subset, out=out, options=options)

    warm_up(tars)
    sides: dict[str, Callable[[Path], Callable[[], object]]] = {
        "copyfile": lambda out: lambda: copyfile_roof(tars, out),
        "tar_copy": lambda out: lambda: tar_copy(tars, out),
        "tar_copy_fsync": lambda out: lambda: tar_copy(tars, out, fsync=True),
        "curate_full": lambda out: curate(full, out),
        "curate_30pct": lambda out: curate(part, out),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    out_bytes: dict[str, int] = {}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            out = tmp / f"out_{name}"
            times[name].append(timed(sides[name](out)))
            out_bytes[name] = tar_bytes(out)
            shutil.rmtree(out)
    if args.profile:
        profile(curate(full, tmp / "out_profile"))
        shutil.rmtree(tmp / "out_profile")
    shutil.rmtree(data)

    median = {name: statistics.median(t) for name, t in times.items()}
    mbps = {name: in_bytes / MB / median[name] for name in sides if name != "curate_30pct"}
    mbps["curate_30pct"] = out_bytes["curate_30pct"] / MB / median["curate_30pct"]
    return {
        "shards": shards,
        "samples": len(uids),
        "input_mb": round(in_bytes / MB, 1),
        "output_mb_full": round(out_bytes["curate_full"] / MB, 1),
        "output_mb_30pct": round(out_bytes["curate_30pct"] / MB, 1),
        "workers": args.workers,
        "repeats": args.repeats,
        "seconds_median": {k: round(v, 3) for k, v in median.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "mb_per_s": {k: round(v, 1) for k, v in mbps.items()},
        "ratio": round(mbps["curate_full"] / mbps["tar_copy"], 3),
        "ratio_to_copyfile": round(mbps["curate_full"] / mbps["copyfile"], 3),
        "ratio_to_tar_copy_fsync": round(mbps["curate_full"] / mbps["tar_copy_fsync"], 3),
        "target": 0.5,
    }


def peak_rss(
    shards: Path, subset: Path, out: Path, workers: int, per_shard: int
) -> tuple[int, int | None]:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURE,
            str(shards),
            str(subset),
            str(out),
            str(workers),
            str(per_shard),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"write_subset failed: {done.stderr[-2000:]}")
    values = dict(line.split() for line in done.stdout.splitlines() if line.startswith("PEAK_"))
    above = values.get("PEAK_ABOVE_IMPORT_KB")
    return int(values["PEAK_RSS_KB"]), None if above is None else int(above)


def memory(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    runs = []
    for count in args.mem_shards:
        folder = tmp / f"mem{count}"
        uids = make_shards(folder, count, args.mem_per_shard, args.mem_kb, args.mem_kb, seed=2)
        subset = write_uids(tmp / f"mem{count}.txt", uids)
        kb, above_kb = peak_rss(
            folder, subset, tmp / f"memout{count}", args.workers, args.mem_per_shard
        )
        runs.append(
            {
                "shards": count,
                "samples": len(uids),
                "input_mb": round(tar_bytes(folder) / MB, 1),
                "peak_rss_mb": round(kb / 1024, 1),
                "peak_above_import_mb": None if above_kb is None else round(above_kb / 1024, 1),
            }
        )
        shutil.rmtree(folder)
        shutil.rmtree(tmp / f"memout{count}")
    small, large = runs
    result: dict[str, object] = {
        "runs": runs,
        "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "target": 1.10,
    }
    if small["peak_above_import_mb"] is not None:
        # What the write itself adds on top of the interpreter and its imports, per sample.
        grown = large["peak_above_import_mb"] - small["peak_above_import_mb"]
        result["above_import_bytes_per_extra_sample"] = round(
            grown * MB / (large["samples"] - small["samples"])
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mb", type=float, default=300, help="input size for throughput")
    parser.add_argument("--per-shard", type=int, default=250, help="samples per input shard")
    parser.add_argument("--min-kb", type=int, default=50, help="smallest jpg member")
    parser.add_argument("--max-kb", type=int, default=100, help="largest jpg member")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mem-shards", type=int, nargs=2, default=[10, 100])
    parser.add_argument("--mem-per-shard", type=int, default=100)
    parser.add_argument("--mem-kb", type=int, default=2, help="jpg member size for memory runs")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile one full write")
    parser.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    args = parser.parse_args()
    result: dict[str, object] = {
        "benchmark": "write",
        "cpu_count": os.cpu_count(),
        "load_avg_1min_before": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        if not args.skip_throughput:
            result["throughput"] = throughput(args, Path(tmp))
        if not args.skip_memory:
            result["memory"] = memory(args, Path(tmp))
    result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
