"""Peak memory per sample of the reduces as the pool grows tenfold (issue 15: flat in N).

Synthetic pools are written straight into the project's formats, skipping the model: a run
folder of random unit float16 embeddings (shards of --per-shard rows, one uid in 1,000 repeated
from an earlier shard, one row in 200 failed). Each size is measured in a fresh process; a
sampler thread records the peak of anonymous memory (RssAnon: what the process itself holds)
and of file-backed pages (RssFile: mostly the memory-mapped embedding store, which the kernel
can evict), reported apart, in bytes per pool sample.

    python benchmarks/bench_scale.py --stage score --sizes 100000 1000000 --dim 64

Stages:
- score: the reduce of `curate score -m negclip -m clipscore` (the clipscore map is run first
  and not measured; negclip with a small |B| and K=1, so the time is the reduce's own work
  rather than the matmuls);
- select: `curate select` on a scores.parquet-shaped table (uid, key, shard, status, error,
  clipscore and negclip as float32; one row group per --per-shard rows; one uid in 1,000
  repeated, one row in 200 failed), with `--where 'clipscore > 0.1' --top negclip:0.5:pool
  --top clipscore:0.5:remainder`: the whole stage, outputs included. With --bad, half the rows
  repeat a uid and `--intersect` takes a subset file as long as the table, half unknown.
- balance: the sample phase of `curate balance` (matching excluded: it is a map) on match
  files written directly (one per --per-shard rows, --entries entries, 0 to 3 matches a row
  drawn from a power law, one uid in 1,000 repeated, one row in 200 failed), default tail
  share and the systematic draw: every output file included.
- write: the plan of `curate write` (subset read, the columnar per-shard index, match,
  order, cut, every shard's fingerprint) on a DataComp .npy of every uid of a synthetic pool
  (shards of --per-shard tiny samples given as header indexes); --shuffle shuffles; with
  --bad the subset holds as many unknown uids again.
Rebalance joins here when its reduce becomes bounded.

    python benchmarks/bench_scale.py --stage select --sizes 1000000 10000000
    python benchmarks/bench_scale.py --stage balance --sizes 1000000 10000000
    python benchmarks/bench_scale.py --stage write --sizes 1000000 10000000 [--shuffle]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def make_run(folder: Path, samples: int, per_shard: int, dim: int, seed: int = 0) -> list[str]:
    """A run folder with `samples` rows of random unit embeddings; returns its stems."""
    from curate.embedding.loader import SampleRow
    from curate.embedding.store import RunFolder

    run = RunFolder(folder)
    record = {
        "model": "synthetic", "architecture": "synthetic", "pretrained": None,
        "precision": "fp32", "fingerprint": "synthetic-" + "0" * 16, "embed_dim": dim,
        "logit_scale": 100.0, "preprocess": "none", "context_length": 77,
    }  # fmt: skip
    shards = (samples + per_shard - 1) // per_shard
    stems = [f"{s:05d}" for s in range(shards)]
    run.bind_model(record, {s: f"synthetic://{s}.tar" for s in stems}, embedding=False)
    rng = np.random.default_rng(seed)
    for s, stem in enumerate(stems):
        n = min(per_shard, samples - s * per_shard)
        base = s * per_shard
        rows = []
        for i in range(n):
            row = base + i
            # every 1000th row repeats the uid of the row 1000 before it (an earlier shard)
            uid_of = row - 1000 if row % 1000 == 999 and row >= 1000 else row
            error = "decode_error: synthetic" if row % 200 == 7 else None
            rows.append(SampleRow(i, f"{uid_of:032x}", f"{stem}{i:05d}", f"caption {row}", error))
        ok = sum(r.error is None for r in rows)
        image = rng.standard_normal((ok, dim)).astype(np.float32)
        text = image + 0.5 * rng.standard_normal((ok, dim)).astype(np.float32)
        image /= np.linalg.norm(image, axis=1, keepdims=True)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        run.write_shard(
            stem, f"synthetic://{stem}.tar", rows, image.astype(np.float16),
            text.astype(np.float16), fingerprint=record["fingerprint"], source=None,
        )  # fmt: skip
    return stems


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def make_score_table(
    path: Path, samples: int, per_shard: int, seed: int = 0, *, bad: bool = False
) -> None:
    """A scores.parquet-like table written a row group at a time (vectorised: uids hex-encoded
    from random bytes straight into an Arrow buffer). `bad`: every second row repeats the uid
    of the row before it (half the table is duplicate rows), and SUBSET.npy beside the table
    lists as many uids as the table has rows, half of them not in it (for --intersect)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer = None
    previous: pa.Array | None = None
    subset: list[np.ndarray] = []
    for start in range(0, samples, per_shard):
        n = min(per_shard, samples - start)
        raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
        uid = _hex_uids(raw)
        rows = np.arange(start, start + n)
        if bad:
            raw[1::2] = raw[0::2][: n // 2]  # each odd row repeats the even row before it
            uid = _hex_uids(raw)
            subset.append(raw[0::2])  # the table's distinct uids
            subset.append(rng.integers(0, 256, size=(n // 2, 16), dtype=np.uint8))  # unknown
        elif previous is not None:  # one uid in 1,000 repeats one of the previous row group
            repeat = np.flatnonzero(rows % 1000 == 999)
            values = uid.to_numpy(zero_copy_only=False)
            values[repeat] = previous.to_numpy(zero_copy_only=False)[repeat % len(previous)]
            uid = pa.array(values, type=pa.string())
        previous = uid
        failed = rows % 200 == 7
        stem = f"{start // per_shard:05d}"
        table = pa.table({
            "uid": uid,
            "key": pa.array([f"{stem}{i:05d}" for i in range(n)]),
            "shard": pa.array([stem] * n),
            "status": pa.array(np.where(failed, "failed", "scored")),
            "error": pa.array(np.where(failed, "decode_error: synthetic", None)),
            "clipscore": pa.array(rng.random(n, dtype=np.float32)),
            "negclip": pa.array(rng.standard_normal(n, dtype=np.float32)),
        })  # fmt: skip
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    if bad:
        halves = np.concatenate(subset).view(">u8")
        pairs = np.empty(len(halves), dtype=np.dtype("u8,u8"))
        pairs["f0"], pairs["f1"] = halves[:, 0], halves[:, 1]
        np.save(path.with_name("SUBSET.npy"), np.sort(pairs, order=["f0", "f1"]))


def _hex_uids(raw: np.ndarray):
    """32-character hex uids (an Arrow string array) from (n, 16) random bytes."""
    import pyarrow as pa

    n = len(raw)
    chars = np.empty((n, 32), dtype=np.uint8)
    chars[:, 0::2], chars[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 15]
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * 32).tobytes())
    return pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(chars.tobytes())])


def make_match_files(
    folder: Path, samples: int, per_shard: int, entries: int, seed: int = 0
) -> list[Path]:
    """Match files as the balance match phase writes them (uid, shard, key, caption, error,
    entry_ids), one per `per_shard` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    previous = None
    for start in range(0, samples, per_shard):
        n = min(per_shard, samples - start)
        raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
        rows = np.arange(start, start + n)
        if previous is not None:  # one uid in 1,000 repeats one of the previous file
            repeat = np.flatnonzero(rows % 1000 == 999)
            raw[repeat] = previous[repeat % len(previous)]
        previous = raw
        k = rng.choice(4, size=n, p=[0.2, 0.4, 0.25, 0.15])
        base = (entries * rng.random(n) ** 3).astype(np.int64)  # a heavy head
        step = rng.integers(1, max(entries // 3, 2), size=n)
        ids = np.stack([(base + j * step) % entries for j in range(3)], axis=1)
        keep = np.arange(3)[None, :] < k[:, None]
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(k, out=offsets[1:])
        entry_ids = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(ids[keep].astype(np.int32))
        )
        failed = rows % 200 == 7
        stem = f"{start // per_shard:05d}"
        table = pa.table({
            "uid": _hex_uids(raw),
            "shard": pa.array([stem] * n, pa.string()),
            "key": pa.array(np.char.add(stem, np.arange(n).astype("U5"))),
            "caption": pa.array(["a synthetic caption"] * n, pa.string()),
            "error": pa.array(np.where(failed, "empty_caption: synthetic", None), pa.string()),
            "entry_ids": entry_ids,
        })  # fmt: skip
        path = folder / f"{stem}.parquet"
        pq.write_table(table, path, compression="zstd")
        paths.append(path)
    return paths


def measure_balance(folder: Path, entries: int) -> dict[str, float]:
    """In this (fresh) process: the balance sample phase over the match files, measured whole."""
    import gc

    from curate.balancing.matching import MatchMode, Normalization
    from curate.balancing.metadata import Metadata
    from curate.balancing.stage import BalanceSpec, reduce_matches

    files = sorted(folder.glob("*.parquet"))
    names = [f"entry{i}" for i in range(entries)]
    metadata = Metadata(entries=names, path=str(folder / "synthetic"), sha256="0" * 64)
    gc.collect()
    base_anon, base_file = Sampler.read()
    start = time.perf_counter()
    with Sampler() as sampler:
        report = reduce_matches(
            files, metadata, folder.parent / "balanced", BalanceSpec(), mode=MatchMode.metaclip,
            normalize=Normalization.none, source=str(folder), units=len(files), shard_errors={},
        )  # fmt: skip
    return {
        "rows": report.rows,
        "kept": report.kept,
        "failed": report.failed,
        "t": report.t,
        "seconds": time.perf_counter() - start,
        "anon_peak_bytes": sampler.anon - base_anon,
        "file_peak_bytes": sampler.file - base_file,
    }


def measure_select(table: Path) -> dict[str, float]:
    """In this (fresh) process: `select_pool` over the table, measured whole (with
    --intersect SUBSET.npy when the table was made `bad`)."""
    import gc

    from curate.selection.rules import Condition, TopStep
    from curate.selection.stage import SelectSpec, select_pool

    subset = table.with_name("SUBSET.npy")
    spec = SelectSpec(
        where=[Condition.parse("clipscore > 0.1")],
        top=[TopStep.parse("negclip:0.5:pool"), TopStep.parse("clipscore:0.5:remainder")],
        intersect=[subset] if subset.is_file() else [],
    )
    gc.collect()
    base_anon, base_file = Sampler.read()
    start = time.perf_counter()
    with Sampler() as sampler:
        report = select_pool(table, spec, out=table.parent / "subset")
    return {
        "rows": report.rows,
        "scored": report.selected,
        "failures": report.failures,
        "steps": [(step.step, step.before, step.after) for step in report.steps[:2]],
        "seconds": time.perf_counter() - start,
        "anon_peak_bytes": sampler.anon - base_anon,
        "file_peak_bytes": sampler.file - base_file,
    }


def make_write_pool(
    folder: Path, samples: int, per_shard: int, seed: int = 0, *, bad: bool = False
) -> None:
    """A write subset (DataComp .npy of every pool uid) and the pool's per-shard header index
    as `curate.io.tar_index` gives it for img2dataset shards of tiny members (jpg, txt, json;
    keys SSSSSIIII), saved as arrays: writing 10^8 real samples would take 300 GB of tars.
    With `bad`, the subset file is twice as long: as many uids again that no shard holds."""
    from curate.io.uid_files import write_datacomp_pairs

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    hi = rng.integers(0, 2**63, size=samples, dtype=np.uint64)
    lo = rng.integers(0, 2**63, size=samples, dtype=np.uint64)
    np.save(folder / "hi.npy", hi)
    np.save(folder / "lo.npy", lo)
    if bad:  # unknown uids: the top bit set, which the pool's never have
        hi = np.concatenate([hi, rng.integers(2**63, 2**64 - 1, size=samples, dtype=np.uint64)])
        lo = np.concatenate([lo, rng.integers(0, 2**63, size=samples, dtype=np.uint64)])
    write_datacomp_pairs(folder / "subset.npy", hi, lo)


def _shard_index(shard: int, hi: np.ndarray, lo: np.ndarray, subset):  # -> ShardSamples
    """The columnar index `curate.writing.catalog.shard_samples` makes of one tiny shard."""
    from curate.io.uid_files import sorted_positions
    from curate.writing.catalog import ShardSamples

    n = hi.size
    keys = np.char.add(f"{shard:05d}", np.char.zfill(np.arange(n).astype("U4"), 4)).astype("S9")
    sizes = np.tile(np.array([3000, 40, 120], dtype=np.uint32), n)
    headers = np.arange(3 * n, dtype=np.int64) + 1
    offsets = headers * 512 + np.cumsum(-(-sizes.astype(np.int64) // 512) * 512) - sizes
    return ShardSamples(
        shard=shard,
        key_ends=np.arange(n + 1, dtype=np.int64) * 9,
        key_bytes=np.frombuffer(keys.tobytes(), dtype=np.uint8).copy(),
        positions=sorted_positions(subset.hi, subset.lo, hi, lo).astype(np.uint32),
        failures={},
        member_ends=np.arange(n + 1, dtype=np.int64) * 3,
        ext_names=["jpg", "txt", "json"],
        exts=np.tile(np.arange(3, dtype=np.uint8), n),
        offsets=offsets.astype(np.uint32),
        sizes=sizes,
    )


def measure_write(folder: Path, per_shard: int, shuffle: bool) -> dict[str, float]:
    """In this (fresh) process: the write plan (subset read, per-shard columnar index, match,
    order, cut, every shard's fingerprint) as `write_subset` makes it before copying bytes."""
    import gc

    from curate.writing.catalog import match
    from curate.writing.plan import cut_shards, order_copies
    from curate.writing.subset import read_write_subset

    hi_all = np.load(folder / "hi.npy", mmap_mode="r")
    lo_all = np.load(folder / "lo.npy", mmap_mode="r")
    gc.collect()
    base_anon, base_file = Sampler.read()
    start = time.perf_counter()
    with Sampler() as sampler:
        subset = read_write_subset(
            folder / "subset.npy", duplicates="error", repeats_column=None, seed=0
        )
        shards = [
            _shard_index(
                i, np.array(hi_all[s : s + per_shard]), np.array(lo_all[s : s + per_shard]), subset
            )
            for i, s in enumerate(range(0, hi_all.size, per_shard))
        ]
        matched = match(shards, subset)
        del shards
        catalog = matched.catalog
        plan = cut_shards(
            catalog,
            order_copies(catalog.copies(), shuffle=shuffle, seed=0),
            max_samples=per_shard,
            max_bytes=None,
        )
        planned = time.perf_counter() - start
        urls = [f"{i:05d}.tar" for i in range(len(catalog.shards))]
        fingerprints = [plan.fingerprint(i, urls, "{}") for i in range(plan.shards)]
    return {
        "rows": len(subset),
        "missing": int((~matched.found).sum()),
        "written": plan.copies,
        "shards": len(fingerprints),
        "plan_seconds": planned,
        "seconds": time.perf_counter() - start,
        "anon_peak_bytes": sampler.anon - base_anon,
        "file_peak_bytes": sampler.file - base_file,
    }


class Sampler:
    """Peak RssAnon and RssFile of this process, sampled every 5 ms."""

    def __init__(self) -> None:
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> tuple[int, int]:
        fields = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    name, value, _ = line.split()
                    fields[name[:-1]] = int(value) * 1024
        return fields["RssAnon"], fields["RssFile"] + fields.get("RssShmem", 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file = self.read()
            self.anon, self.file = max(self.anon, anon), max(self.file, file)
            time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_score(folder: Path, batch: int) -> dict[str, float]:
    """In this (fresh) process: the clipscore map unmeasured, then the reduce measured."""
    import gc

    from curate.embedding.store import RunFolder
    from curate.scoring.stage import NegclipOptions, score_run

    run = RunFolder(folder)
    stems = run.complete_stems()
    score_run(run, stems, ["clipscore"], out=folder / "map-only.parquet", device="cpu")
    gc.collect()
    base_anon, base_file = Sampler.read()
    start = time.perf_counter()
    with Sampler() as sampler:
        report = score_run(
            run, stems, ["clipscore", "negclip"], out=folder / "scores.parquet",
            negclip_opts=NegclipOptions(batch_size=batch, k=1), device="cpu",
        )  # fmt: skip
    return {
        "rows": report.read,
        "scored": report.scored,
        "seconds": time.perf_counter() - start,
        "anon_peak_bytes": sampler.anon - base_anon,
        "file_peak_bytes": sampler.file - base_file,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["score", "select", "balance", "write"], default="score")
    parser.add_argument("--entries", type=int, default=50_000, help="balance: metadata entries")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--negclip-batch", type=int, default=256)
    parser.add_argument(
        "--bad", action="store_true", help="select: half the rows duplicates, --intersect a "
        "subset file as long as the table, half of its uids unknown; write: a subset twice as "
        "long as the pool, half of its uids unknown"
    )  # fmt: skip
    parser.add_argument("--shuffle", action="store_true", help="write: --shuffle")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one size, this process
    args = parser.parse_args()
    if args.measure:
        if args.stage == "select":
            print(json.dumps(measure_select(Path(args.measure))))
        elif args.stage == "balance":
            print(json.dumps(measure_balance(Path(args.measure), args.entries)))
        elif args.stage == "write":
            print(json.dumps(measure_write(Path(args.measure), args.per_shard, args.shuffle)))
        else:
            print(json.dumps(measure_score(Path(args.measure), args.negclip_batch)))
        return
    results = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            folder = Path(tmp) / "run"
            started = time.perf_counter()
            if args.stage == "select":
                folder = Path(tmp) / "scores.parquet"
                make_score_table(folder, size, args.per_shard, bad=args.bad)
            elif args.stage == "balance":
                folder = Path(tmp) / "matches"
                make_match_files(folder, size, args.per_shard, args.entries)
            elif args.stage == "write":
                make_write_pool(folder, size, args.per_shard, bad=args.bad)
            else:
                make_run(folder, size, args.per_shard, args.dim)
            made = time.perf_counter() - started
            done = subprocess.run(
                [sys.executable, __file__, "--measure", str(folder), "--stage", args.stage,
                 "--negclip-batch", str(args.negclip_batch), "--entries", str(args.entries),
                 "--per-shard", str(args.per_shard), *(["--shuffle"] if args.shuffle else [])],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result |= {
                "size": size,
                "dim": args.dim,
                "generate_seconds": round(made, 1),
                "anon_bytes_per_sample": round(result["anon_peak_bytes"] / size, 1),
                "file_bytes_per_sample": round(result["file_peak_bytes"] / size, 1),
            }
            if args.stage == "score":
                result["memmap_bytes_per_sample"] = 2 * 2 * args.dim
            results.append(result)
            print(json.dumps(result), flush=True)
    ratio = results[-1]["anon_bytes_per_sample"] / max(results[0]["anon_bytes_per_sample"], 1)
    print(json.dumps({"benchmark": "scale", "stage": args.stage, "anon_ratio_last_first": ratio}))


if __name__ == "__main__":
    main()
