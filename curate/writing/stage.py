"""The write stage: input shards + a subset in, new WebDataset shards holding only the subset out.

1. Read the subset (uid file) and decide each uid's number of copies (duplicates in the file,
   `--repeats COLUMN`).
2. Index every input shard's headers (`curate.io.tar_index`); each subset uid is matched to its
   first copyable sample. Uids found nowhere are `missing` (listed in OUT/missing_uids.txt); uids
   whose sample cannot be copied (truncated, no image, no caption) are `failed` with that reason.
   A compressed shard is decompressed once into OUT/.scratch to be indexed; the copy is kept,
   and read from, only if it holds a chosen sample, and the folder goes at the end of the run.
3. Plan the output (`curate.writing.plan`) and fingerprint each output shard.
4. Write each shard not already complete: members copied byte for byte from the inputs (a
   bounded number of them open at once, `_open_limit`) with deterministic headers, plus an
   img2dataset-style sidecar `NNNNN.parquet` and `NNNNN_stats.json`. The tar is renamed into
   place last, so a visible tar is always whole and its stats record says which plan produced
   it; a rerun skips shards whose record matches.
5. `manifest.json` (shards, counts, accounting, settings) and `sizes.json` (open_clip's
   per-shard sample counts) close the run.

Accounting: subset uids = written + missing + failed + zero copies (a uid with zero copies is
not looked for, so it is never also missing or failed).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import InputError, ShardOpenError
from curate.io.shards import check_out_apart, open_shard, resolve_shards, source_signature
from curate.io.sidecar import IMG2DATASET_SIDECAR_SCHEMA
from curate.io.tar_index import ShardIndex, index_shard
from curate.io.tar_reader import parse_meta
from curate.io.tar_writer import DeterministicTarWriter
from curate.runtime.atomic import atomic_path, write_atomic, write_json_atomic
from curate.runtime.executors import TaskSlice, make_executor
from curate.runtime.records import logged_stage
from curate.runtime.stage import MapStage, Unit, UnitFailure, run_map
from curate.writing.catalog import Catalog, ShardSamples, match, shard_samples
from curate.writing.extras import REWRITES_MEMBER, AddedMembers, added_members
from curate.writing.plan import Entry, WritePlan, cut_shards, order_copies
from curate.writing.subset import Duplicates, WriteSubset, read_write_subset

MANIFEST = "manifest.json"
SIZES = "sizes.json"
MISSING = "missing_uids.txt"
SCRATCH = ".scratch"  # decompressed copies of compressed input shards, while the run lasts
MAX_OPEN_INPUTS = 64  # input shards one writer thread keeps open at most
MAX_OPEN_TOTAL = 256  # ... and all writer threads together
_OUTPUT_NAME = re.compile(r"^(\d{5})(\.tar|\.parquet|_stats\.json)$")

# img2dataset's columns (key, url, caption, sizes, ...) plus where each row came from.
SIDECAR_SCHEMA = pa.schema(
    [
        *IMG2DATASET_SIDECAR_SCHEMA,
        pa.field("uid", pa.string()),
        pa.field("source_shard", pa.string()),
        pa.field("source_key", pa.string()),
        pa.field("copy", pa.int32()),
    ]
)


@dataclass
class WriteOptions:
    """How to cut, order and annotate the output shards."""

    max_samples: int = 10000
    max_bytes: int | None = None
    shuffle: bool = False
    seed: int = 0
    duplicates: Duplicates = "error"
    repeats_column: str | None = None
    with_columns: list[str] = field(default_factory=list)
    rewrites: str | None = None  # a curate rewrite output folder
    workers: int = 4
    overwrite: bool = False

    def settings(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("workers")
        data.pop("overwrite")
        return data


@dataclass
class WriteReport:
    """Where every subset uid and input sample went, and what was written."""

    out: Path
    subset: str
    subset_rows: int = 0
    subset_uids: int = 0
    written_uids: int = 0
    written_samples: int = 0
    missing_uids: int = 0
    failed_uids: dict[str, int] = field(default_factory=dict)
    zero_copies: int = 0
    with_rewrites: int = 0  # subset uids given a rewrites.json member
    repeated_uids: int = 0
    max_copies_in_one_shard: int = 0
    input_shards: int = 0
    input_samples: int = 0
    not_selected: int = 0
    duplicate_uid: int = 0
    shard_errors: dict[str, str] = field(default_factory=dict)
    truncated: dict[str, str] = field(default_factory=dict)
    complete: bool = True  # every output shard written (False: other tasks' shards pending)
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    bytes: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def train_data(self) -> str:
        """The brace pattern of the output shards, as open_clip's --train-data wants it."""
        if self.shards == 1:
            return str(self.out / "00000.tar")
        return str(self.out / f"{{00000..{self.shards - 1:05d}}}.tar")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["train_data"] = self.train_data
        return data


@logged_stage("write")
def write_subset(
    shards: str | Sequence[str],
    subset: Path | str,
    *,
    out: Path,
    options: WriteOptions | None = None,
    executor: Any = None,
    tasks: TaskSlice | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> WriteReport:
    """Write the samples of `subset` found in `shards` as new shards in `out` (module doc).

    The output shards are the units of a map stage (`WriteStage`) run on `executor` (default:
    `options.workers` threads); with array `tasks` each task writes its share and the one that
    finds every shard done writes the manifest. `progress(shards_done, shards_total,
    samples_done)` is called after each output shard of this call.
    """
    start = time.perf_counter()
    options = options or WriteOptions()
    tasks = tasks or TaskSlice()
    if options.overwrite and tasks.count > 1:
        raise InputError("--overwrite deletes outputs: run it once, not in every array task")
    out = Path(out)
    if "://" in str(out):
        raise InputError(f"--out {out}: curate write writes to a local folder")
    if options.max_samples < 1 or (options.max_bytes is not None and options.max_bytes < 1):
        raise InputError(
            f"shard size limits must be positive (max_samples={options.max_samples}, "
            f"max_bytes={options.max_bytes})"
        )
    report = WriteReport(out=out, subset=str(subset), settings=options.settings())
    wanted = read_write_subset(
        subset,
        duplicates=options.duplicates,
        repeats_column=options.repeats_column,
        seed=options.seed,
    )
    report.subset_rows = wanted.rows
    if not wanted.rows:
        raise InputError(f"subset {subset} is empty: nothing to write")
    report.subset_uids = len(wanted)
    report.zero_copies = int((wanted.copies == 0).sum())
    report.repeated_uids = int((wanted.copies > 1).sum())
    extras = added_members(wanted, subset, options.with_columns, options.rewrites)
    if options.rewrites is not None:
        report.with_rewrites = extras.count(REWRITES_MEMBER)

    urls = resolve_shards(shards)
    report.input_shards = len(urls)
    _check_out_folder(out, urls, options.overwrite)
    with _scratch_folder(out, tasks.label) as scratch:
        # Uids with zero copies are not looked for: they count once, as zero_copies.
        indexes = _index_all(urls, wanted, options.workers, report, scratch)
        matched = match(indexes, wanted)
        del indexes
        catalog = matched.catalog
        report.duplicate_uid = matched.duplicate_samples
        report.failed_uids = matched.failed_codes
        paths = _data_paths(urls, scratch, catalog)
        missing = (wanted.copies > 0) & ~matched.found
        report.missing_uids = int(missing.sum())
        del matched
        if not len(catalog):
            raise InputError(
                f"none of the {report.subset_uids} subset uids can be written: "
                f"{report.missing_uids} not in the shards, {sum(report.failed_uids.values())} "
                f"failed, {report.zero_copies} with zero copies"
            )
        plan = cut_shards(
            catalog,
            order_copies(catalog.copies(), shuffle=options.shuffle, seed=options.seed),
            max_samples=options.max_samples,
            max_bytes=options.max_bytes,
            extras=extras,
        )
        report.shards = plan.shards
        report.written_uids = len(catalog)
        report.written_samples = plan.copies
        report.max_copies_in_one_shard = plan.max_copies_in_one_shard

        signatures = {url: source_signature(url) for url in urls}
        settings = json.dumps(
            {"signatures": signatures, "with_columns": options.with_columns}, sort_keys=True
        )
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale(out, plan.shards)
        if tasks.count == 1:  # with several tasks a neighbour's temporary file may be in use
            _remove_temporaries(out)
        if report.missing_uids:
            write_atomic(out / MISSING, lambda tmp: _write_lines(tmp, wanted.hex_lines(missing)))
        elif (out / MISSING).exists():
            (out / MISSING).unlink()

        stage = WriteStage(
            out=out,
            shards=plan,
            urls=list(urls),
            paths=paths,
            fingerprints=[plan.fingerprint(i, urls, settings, extras) for i in range(plan.shards)],
            extras=extras,
            open_limit=_open_limit(options.workers),
        )
        done = {"shards": 0, "samples": 0, "total": plan.shards}

        def planned(units: int, skipped: int) -> None:
            done["shards"], done["total"] = skipped, units
            if skipped < units:  # the old manifest and sizes no longer describe the tars
                for name in (MANIFEST, SIZES):
                    (out / name).unlink(missing_ok=True)
            if progress:
                progress(skipped, units, 0)

        def advance(samples: int) -> None:
            done["shards"] += 1
            done["samples"] += samples
            if progress:
                progress(done["shards"], done["total"], done["samples"])

        executor = executor or make_executor("local", workers=options.workers, threads=True)[0]
        mapped = run_map(
            stage, out, executor=executor, tasks=tasks, on_plan=planned, on_unit=advance
        )
    report.shards_skipped = mapped.skipped
    report.shards_written = mapped.done_now
    report.shard_errors.update(mapped.failed)
    records = [_read_stats(_stats_path(out, i)) for i in range(plan.shards)]
    complete = all(
        records[i] is not None and stage.output_present(unit) for i, unit in enumerate(stage.plan())
    )
    report.complete = complete
    if not complete:  # another task's shards, or a failed one, are still to come
        report.seconds = time.perf_counter() - start
        return report
    report.bytes = sum(int(r["curate"]["bytes"]) for r in records if r)
    _write_manifest(out, plan, records, report)
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class WriteStage(MapStage):
    """Writing as a map stage: unit i is output shard i (its tar, sidecar parquet and stats)."""

    name: ClassVar[str] = "write"
    out: Path
    shards: WritePlan  # each output shard's entries, in order
    urls: list[str]
    paths: list[str]  # where each input's bytes are read (a decompressed copy, or the url)
    fingerprints: list[str]
    extras: AddedMembers
    open_limit: int

    def plan(self) -> list[Unit]:
        return [Unit(f"{i:05d}", f"{i:05d}.tar") for i in range(self.shards.shards)]

    def signature(self, unit: Unit) -> dict[str, Any]:
        return {"format": 1, "fingerprint": self.fingerprints[int(unit.name)]}

    def output_present(self, unit: Unit) -> bool:
        i = int(unit.name)
        return _complete_record(self.out, i, self.fingerprints[i]) is not None

    def run_unit(self, unit: Unit) -> dict[str, Any]:
        i = int(unit.name)
        inputs = _Inputs(self.urls, self.paths, self.open_limit)  # its own handles, LRU-bound
        try:
            entries = self.shards.entries(i)
            stats = _write_shard(
                self.out, i, entries, self.urls, self.fingerprints[i], self.extras, inputs
            )
        except ShardOpenError as exc:  # an input vanished or changed under us
            raise UnitFailure(str(exc)) from exc
        return {"samples": len(entries), "bytes": int(stats["curate"]["bytes"])}


def _write_lines(path: Path, blocks: Iterator[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for block in blocks:
            fh.write(block)


def _check_out_folder(out: Path, urls: Sequence[str], overwrite: bool) -> None:
    """Refuse to write over the inputs, or over tars this stage did not write."""
    check_out_apart(out, urls)
    if not out.is_dir():
        return
    foreign = [
        p.name
        for p in sorted(out.glob("*.tar"))
        if _read_stats(p.with_name(f"{p.stem}_stats.json")) is None
    ]
    if foreign and not overwrite:
        raise InputError(
            f"--out {out} holds tars not written by curate write ({foreign[0]}, ...); pick a new "
            "folder or pass --overwrite to replace them"
        )
    if overwrite:
        for p in out.iterdir():
            if _OUTPUT_NAME.match(p.name) or p.name in (MANIFEST, SIZES, MISSING):
                p.unlink()


def _index_all(
    urls: Sequence[str], wanted: WriteSubset, workers: int, report: WriteReport, scratch: Path
) -> list[ShardSamples | None]:
    """Each shard's wanted samples (uids with copies to write), columnar, in input order."""

    def looked_for(uid: str) -> bool:
        at = wanted.find(uid)
        return at >= 0 and bool(wanted.copies[at])

    def one(shard: int) -> tuple[ShardSamples | None, tuple[ShardIndex, int] | str]:
        try:
            index = index_shard(urls[shard], looked_for, scratch=scratch)
        except ShardOpenError as exc:
            return None, str(exc)
        samples = shard_samples(index, shard, wanted)
        kept = len(samples)
        index.samples = []  # the objects go now: the columns hold what is needed
        return samples, (index, kept)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, range(len(urls))))
    for url, (_, found) in zip(urls, results, strict=True):
        if isinstance(found, str):
            report.shard_errors[url] = found
            continue
        index, kept = found
        report.input_samples += index.count
        report.not_selected += index.count - kept
        if index.truncated:
            report.truncated[index.url] = index.truncated
    return [samples for samples, _ in results]


@contextmanager
def _scratch_folder(out: Path, task: str) -> Iterator[Path]:
    """OUT/.scratch/TASK, for decompressed copies of compressed shards (one per array task, so
    tasks never delete each other's): a killed run's leftovers go first, and the folder goes at
    the end, also on error (with OUT, if this run made it and it holds nothing else)."""
    scratch = out / SCRATCH / task
    made_out = not out.exists()
    # alone (not one task of an array), every leftover is a killed run's
    shutil.rmtree(out / SCRATCH if task == TaskSlice().label else scratch, ignore_errors=True)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            (out / SCRATCH).rmdir()  # only when no other task's copies are there
        if made_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _data_paths(urls: Sequence[str], scratch: Path, catalog: Catalog) -> list[str]:
    """Where each input shard's member bytes are read from: the shard itself, or its
    decompressed scratch copy; copies no chosen sample needs are deleted here."""
    paths = list(urls)
    for samples in catalog.shards:
        if samples.data_path is not None:
            paths[samples.shard] = samples.data_path
    used = set(paths) - set(urls)
    if scratch.is_dir():
        for copy in scratch.iterdir():
            if str(copy) not in used:
                copy.unlink(missing_ok=True)
    return paths


def _stats_path(out: Path, index: int) -> Path:
    return out / f"{index:05d}_stats.json"


def _read_stats(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("curate"), dict) else None


def _complete_record(out: Path, index: int, fingerprint: str) -> dict[str, Any] | None:
    """The shard's stats record when its tar and sidecar are complete for this fingerprint."""
    stats = _read_stats(_stats_path(out, index))
    if stats is None or stats["curate"].get("fingerprint") != fingerprint:
        return None
    tar = out / f"{index:05d}.tar"
    if not tar.is_file() or tar.stat().st_size != stats["curate"].get("bytes"):
        return None
    if not (out / f"{index:05d}.parquet").is_file():
        return None
    return stats


_TEMPORARY_NAME = re.compile(
    r"^\.(\d{5}(\.tar|\.parquet|_stats\.json)|manifest\.json|sizes\.json|missing_uids\.txt)"
    r"\.[0-9a-f]{8}\.tmp$"
)


def _remove_temporaries(out: Path) -> None:
    """Delete the temporary files (``atomic_path``'s) an earlier, killed run left behind."""
    for p in out.iterdir():
        if _TEMPORARY_NAME.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def _remove_stale(out: Path, count: int) -> None:
    """Delete this stage's outputs numbered beyond the plan (left by an earlier, larger plan)."""
    for p in out.iterdir():
        match = _OUTPUT_NAME.match(p.name)
        if match and int(match.group(1)) >= count:
            p.unlink()


def _open_limit(workers: int) -> int:
    """Input files one writer thread may keep open: MAX_OPEN_INPUTS, and all threads together
    at most MAX_OPEN_TOTAL or a quarter of the soft open-file limit (never fewer than one)."""
    total = MAX_OPEN_TOTAL
    try:
        import resource
    except ImportError:  # no rlimits (Windows)
        pass
    else:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            total = min(total, soft // 4)
    return max(1, min(MAX_OPEN_INPUTS, total // max(1, workers)))


class _Inputs:
    """The input shards one output shard reads from: at most `limit` files open at once (the
    least recently read is closed first), all closed at the end. `paths[i]` is where shard
    `urls[i]`'s bytes are (its decompressed copy, for a compressed shard)."""

    def __init__(self, urls: Sequence[str], paths: Sequence[str], limit: int) -> None:
        self._urls = urls
        self._paths = paths
        self._limit = max(1, limit)
        self._open: OrderedDict[int, BinaryIO] = OrderedDict()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        fh = self._open.get(shard)
        if fh is not None:
            self._open.move_to_end(shard)
        else:
            if len(self._open) >= self._limit:
                self._open.popitem(last=False)[1].close()
            fh = self._open[shard] = open_shard(self._paths[shard])
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise ShardOpenError(
                f"shard {self._urls[shard]} changed while writing (short read at {offset}); rerun"
            )
        return data

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()


def _write_shard(
    out: Path,
    index: int,
    entries: Sequence[Entry],
    urls: Sequence[str],
    fingerprint: str,
    extras: AddedMembers,
    inputs: _Inputs,
) -> dict[str, Any]:
    name = f"{index:05d}"
    rows: list[dict[str, Any]] = []
    # An old tar goes first: the new stats record is written before the new tar is renamed into
    # place, and must never end up beside an old tar (a same-size old tar would pass as done).
    (out / f"{name}.tar").unlink(missing_ok=True)
    try:
        with atomic_path(out / f"{name}.tar") as tmp:
            with open(tmp, "wb") as fh, DeterministicTarWriter(fh) as writer:
                added = extras.batch([e.source.sample.uid for e in entries])
                for entry, more in zip(entries, added, strict=True):
                    rows.append(_copy_sample(writer, inputs, entry, urls, more))
                size, sha256 = writer.close()
            table = pa.Table.from_pylist(rows, schema=SIDECAR_SCHEMA)
            write_atomic(out / f"{name}.parquet", lambda p: pq.write_table(table, p))
            stats = {
                "count": len(rows),
                "successes": len(rows),
                "failed_to_download": 0,
                "failed_to_resize": 0,
                "status_dict": {"success": len(rows)},
                "curate": {
                    "fingerprint": fingerprint,
                    "bytes": size,
                    "sha256": sha256,
                    "samples": len(rows),
                    "unique_uids": len({r["uid"] for r in rows}),
                    "sources": sorted({urls[e.source.shard].rsplit("/", 1)[-1] for e in entries}),
                },
            }
            write_json_atomic(_stats_path(out, index), stats)
    finally:
        inputs.close()
    return stats


def _copy_sample(
    writer: DeterministicTarWriter,
    inputs: _Inputs,
    entry: Entry,
    urls: Sequence[str],
    added: Sequence[tuple[str, bytes]],
) -> dict[str, Any]:
    sample = entry.source.sample
    meta_raw: bytes | None = None
    caption: bytes | None = None
    for member in sample.members:
        data = inputs.read(entry.source.shard, member.offset, member.size)
        writer.add(f"{entry.key}.{member.ext}", data)
        ext = member.ext.lower()
        if ext == "json" and meta_raw is None:
            meta_raw = data
        elif ext == "txt" and caption is None:
            caption = data
    for ext, data in added:
        writer.add(f"{entry.key}.{ext}", data)
    meta, _ = parse_meta(meta_raw)
    meta = meta or {}
    return {
        "key": entry.key,
        "uid": sample.uid,
        "url": _as_str(meta.get("url")),
        "caption": caption.decode("utf-8", "replace") if caption is not None else None,
        "status": "success",
        "error_message": None,
        "width": _as_int(meta.get("width")),
        "height": _as_int(meta.get("height")),
        "original_width": _as_int(meta.get("original_width")),
        "original_height": _as_int(meta.get("original_height")),
        "exif": _as_str(meta.get("exif")),
        "sha256": _as_str(meta.get("sha256")),
        "source_shard": urls[entry.source.shard].rsplit("/", 1)[-1],
        "source_key": sample.key,
        "copy": entry.copy,
    }


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_str(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _write_manifest(
    out: Path,
    plan: WritePlan,
    records: Sequence[dict[str, Any] | None],
    report: WriteReport,
) -> None:
    shards = []
    for i, record in enumerate(records):
        assert record is not None
        info = record["curate"]
        shards.append(
            {
                "tar": f"{i:05d}.tar",
                "samples": info["samples"],
                "unique_uids": info["unique_uids"],
                "bytes": info["bytes"],
                "sha256": info["sha256"],
            }
        )
    manifest = {
        "format": "curate-write/1",
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "accounting": {
            k: v
            for k, v in report.to_json().items()
            if k
            not in (
                "out",
                "subset",
                "train_data",
                "settings",
                "seconds",
                "shards_written",
                "shards_skipped",
            )
        },
        "settings": report.settings,
    }
    assert manifest["samples"] == plan.copies
    write_json_atomic(out / MANIFEST, manifest)
    write_json_atomic(out / SIZES, {s["tar"]: s["samples"] for s in shards})
