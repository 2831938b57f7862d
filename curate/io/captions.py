"""Captions to match, from shards or tables, one unit of work (shard or parquet file) at a time.

A source is one of:
- shards (any spec `io.shards.resolve_shards` takes): the `.txt` member of every sample, read by
  `io.tar_reader.ShardReader`, so uids and per-sample failures are the same as at score time;
- a run folder: its `scores.parquet` (captions and errors recorded by `curate score`);
- parquet tables (a file, a folder holding parquet and no tars, or a glob ending in `.parquet`)
  with a `uid` column and a caption column (`caption`, else `text` as in DataComp metadata).

Every unit reads into the same columns: uid, shard, key, caption, error (``code: detail`` or
null). A row with an error is a recorded per-sample failure; it is never dropped silently.
Captions are the decoded text as written, from every source alike: nothing is stripped and a
BOM stays. A caption that is empty or only whitespace (`tar_reader.is_blank_caption`, the same
rule for shards and tables) fails with ``empty_caption``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from curate.errors import InputError
from curate.io.shards import resolve_shards, shard_stems, source_signature
from curate.io.tar_reader import CAPTION_WHITESPACE, ShardReader

__all__ = ["CAPTION_COLUMNS", "CaptionUnit", "read_unit", "resolve_units"]

CAPTION_COLUMNS = ("caption", "text")
UNIT_SCHEMA = {
    "uid": pl.String,
    "shard": pl.String,
    "key": pl.String,
    "caption": pl.String,
    "error": pl.String,
}


@dataclass(frozen=True)
class CaptionUnit:
    """One unit of work: a shard or a parquet table; `name` is unique and names its outputs."""

    name: str
    url: str
    kind: str  # "shard" or "table"
    caption_column: str | None = None

    def signature(self) -> dict[str, str] | None:
        return source_signature(self.url)


def _table_files(source: str) -> list[str] | None:
    """Parquet files when `source` names tables, else None (it names shards)."""
    path = Path(os.path.expanduser(source))
    # A run folder is marked by run.json (embedding.store.RunFolder; not imported: it pulls torch).
    if path.is_dir() and (path / "run.json").is_file():
        table = path / "scores.parquet"
        if not table.is_file():
            raise InputError(f"run {path} has no scores.parquet yet; run `curate score {path}`")
        return [str(table.resolve())]
    if path.is_dir():
        if any(p.suffix == ".tar" for p in path.iterdir()):
            return None
        tables = sorted(str(p.resolve()) for p in path.glob("*.parquet"))
        return tables or None
    if source.endswith(".parquet"):
        if any(ch in source for ch in "*?["):
            files = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(source)))
            if not files:
                raise InputError(f"{source!r}: glob matched no parquet files")
            return files
        if not path.is_file():
            raise InputError(f"table {source} does not exist")
        return [str(path.resolve())]
    return None


def resolve_units(
    sources: str | Sequence[str], caption_column: str | None = None
) -> list[CaptionUnit]:
    """Units of work for one or more sources, in a stable order with unique names."""
    specs = [sources] if isinstance(sources, str) else list(sources)
    if not specs:
        raise InputError("no source given")
    shard_urls: list[str] = []
    table_urls: list[str] = []
    for spec in specs:
        tables = _table_files(os.fspath(spec))
        if tables is None:
            shard_urls.extend(resolve_shards(os.fspath(spec)))
        else:
            table_urls.extend(tables)
    if shard_urls and table_urls:
        raise InputError("give either shards or tables, not both")
    if shard_urls:
        stems = shard_stems(shard_urls)
        return [CaptionUnit(stems[u], u, "shard") for u in dict.fromkeys(shard_urls)]
    urls = list(dict.fromkeys(table_urls))
    stems = shard_stems(urls)
    units = [CaptionUnit(stems[u].removesuffix(".parquet"), u, "table") for u in urls]
    column = caption_column or _caption_column(urls[0])
    return [CaptionUnit(u.name, u.url, u.kind, column) for u in units]


def _caption_column(path: str) -> str:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise InputError(f"cannot read table {path}: {exc}") from exc
    for name in CAPTION_COLUMNS:
        if name in names:
            return name
    raise InputError(
        f"{path}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}); "
        "name one with --caption-column"
    )


def read_unit(unit: CaptionUnit) -> pl.DataFrame:
    """The unit's rows as uid, shard, key, caption, error."""
    if unit.kind == "shard":
        return _read_shard(unit)
    return _read_table(unit)


def _read_shard(unit: CaptionUnit) -> pl.DataFrame:
    reader = ShardReader(unit.url)
    rows = {name: [] for name in UNIT_SCHEMA}
    for sample in reader:
        rows["uid"].append(sample.uid)
        rows["shard"].append(sample.shard)
        rows["key"].append(sample.key)
        rows["caption"].append(sample.caption if sample.ok else None)
        rows["error"].append(sample.error)
    return pl.DataFrame(rows, schema=UNIT_SCHEMA)


def _read_table(unit: CaptionUnit) -> pl.DataFrame:
    column = unit.caption_column or "caption"
    try:
        frame = pl.read_parquet(unit.url)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"cannot read table {unit.url}: {exc}") from exc
    for needed in ("uid", column):
        if needed not in frame.columns:
            raise InputError(f"{unit.url}: table has no {needed!r} column")
    dtype = frame[column].dtype
    if dtype not in (pl.String, pl.Binary, pl.Null):
        raise InputError(f"{unit.url}: caption column {column!r} holds {dtype}, not text")
    n = frame.height
    if dtype == pl.Binary:  # per row: invalid UTF-8 becomes null (a recorded failure below)
        text = pl.Series([_utf8_or_none(b) for b in frame[column].to_list()], dtype=pl.String)
    else:
        text = frame[column].cast(pl.String)
    rows = pl.DataFrame(
        {
            "uid": frame["uid"].cast(pl.String),
            "shard": frame["shard"].cast(pl.String)
            if "shard" in frame.columns
            else [Path(unit.url).name] * n,
            "key": frame["key"].cast(pl.String)
            if "key" in frame.columns
            else [str(i) for i in range(n)],
            "caption": text,
            "upstream": frame["error"].cast(pl.String)
            if "error" in frame.columns
            else pl.Series([None] * n, dtype=pl.String),
            "not_utf8": frame[column].is_not_null() & text.is_null(),
        },
        schema_overrides={"shard": pl.String, "key": pl.String},
    )
    error = (
        pl.when(pl.col("upstream").is_not_null())
        .then(pl.col("upstream"))
        .when(pl.col("uid").is_null())
        .then(pl.lit("bad_uid: uid is null"))
        .when(pl.col("not_utf8"))
        .then(pl.lit("caption_not_utf8: caption bytes are not UTF-8"))
        .when(pl.col("caption").is_null())
        .then(pl.lit("missing_caption: caption is null"))
        .when(pl.col("caption").str.strip_chars(CAPTION_WHITESPACE) == "")
        .then(pl.lit("empty_caption: caption is empty or whitespace"))
    )
    return rows.with_columns(error.alias("error")).select(
        "uid",
        "shard",
        "key",
        pl.when(pl.col("error").is_null()).then(pl.col("caption")).alias("caption"),
        "error",
    )


def _utf8_or_none(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
