"""The run folder: per-shard embedding tables, their completion records and the model record.

Layout::

    RUN/run.json                  model record (name, tag, weights fingerprint, preprocessing)
    RUN/embeddings/<stem>.parquet one row per input sample: uid, key, shard, caption, error,
                                  width, height, image_emb, text_emb (float16, null on failure)
    RUN/embeddings/<stem>.json    completion record, written last: source url and signature (size,
                                  mtime or ETag, read before the shard was opened), weights
                                  fingerprint, counts, size and sha256 of the parquet

A shard is complete when its record exists, names the same source signature and weights
fingerprint, and the parquet has the recorded size; anything else is redone. Every file is
written atomically (temporary name, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import __version__
from curate.errors import RunFolderError
from curate.io.shards import shard_stems, source_signature
from curate.runtime.atomic import write_atomic, write_json_atomic

if TYPE_CHECKING:  # the loader imports torch; select and write read run folders without it
    from curate.embedding.loader import SampleRow

RUN_FORMAT = "curate-run/1"
_REQUIRED_MODEL_KEYS = ("model", "fingerprint", "embed_dim", "logit_scale")
META_COLUMNS = ["uid", "key", "shard", "caption", "error", "width", "height"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardRecord:
    """The completion record of one embedded shard."""

    stem: str
    url: str
    source: dict[str, str] | None  # source_signature() taken before reading the shard
    fingerprint: str  # weights fingerprint of the model that embedded it
    read: int
    ok: int
    failed: int
    bytes: int  # size of the parquet table
    sha256: str
    truncated: str | None = None


def _embedding_array(emb: np.ndarray, valid: np.ndarray) -> pa.Array:
    """Rows of `emb` aligned with `valid`; invalid rows become nulls (their slots are zeros)."""
    dim = emb.shape[1]
    full = np.zeros((len(valid), dim), dtype=np.float16)
    full[valid] = emb.astype(np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(full.ravel()), dim, mask=pa.array(~valid))


def embeddings_to_numpy(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """(rows, dim) float16 array from a fixed-size-list column; null rows hold zeros."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr.values.to_numpy(zero_copy_only=False)
    out = values.reshape(-1, dim)[arr.offset : arr.offset + len(arr)]
    return np.asarray(out, dtype=np.float16)


class RunFolder:
    """Reads and writes one run folder."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def record_path(self) -> Path:
        return self.path / "run.json"

    @property
    def embeddings_dir(self) -> Path:
        return self.path / "embeddings"

    @staticmethod
    def is_run(path: Path | str) -> bool:
        return (Path(path) / "run.json").is_file()

    def read_record(self) -> dict[str, Any] | None:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"run folder {self.path} is a file, not a folder")
        if not self.record_path.is_file():
            return None
        try:
            record = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"run record {self.record_path} is unreadable: {exc}") from exc
        model = record.get("model") if isinstance(record, dict) else None
        if not isinstance(model, dict) or not all(k in model for k in _REQUIRED_MODEL_KEYS):
            raise RunFolderError(
                f"run record {self.record_path} is malformed (needs model with "
                f"{', '.join(_REQUIRED_MODEL_KEYS)}); use a new --out folder"
            )
        return record

    def model_record(self) -> dict[str, Any]:
        record = self.read_record()
        if record is None:
            raise RunFolderError(f"{self.path} is not a curate run folder (no run.json)")
        return record["model"]

    def ensure_same_model(self, model_record: dict[str, Any], *, embedding: bool) -> None:
        """Refuse other weights; when new shards will be embedded, refuse another precision too."""
        existing = self.read_record()
        if existing is None:
            return
        old = existing["model"]
        if old["fingerprint"] != model_record["fingerprint"]:
            raise RunFolderError(
                f"run folder {self.path} holds embeddings of another model "
                f"({old.get('model')} / {old.get('pretrained')}); use a new --out folder"
            )
        old_precision = old.get("precision")
        if embedding and old_precision and old_precision != model_record.get("precision"):
            raise RunFolderError(
                f"run folder {self.path} was embedded in {old_precision}; pass --precision "
                f"{old_precision} to add shards to it, or use a new --out folder"
            )

    def assign_stems(self, urls: Sequence[str]) -> dict[str, str]:
        """Output names for `urls`: the names this run already gave them, new unique ones else."""
        known = {
            url: stem for stem, url in ((self.read_record() or {}).get("shards") or {}).items()
        }
        fresh = shard_stems([u for u in urls if u not in known])
        taken = set(known.values())
        stems = dict(known)
        for url, stem in fresh.items():
            if stem in taken:  # another URL got this name in an earlier call
                stem = f"{stem}-{hashlib.blake2b(url.encode(), digest_size=4).hexdigest()}"
            taken.add(stem)
            stems[url] = stem
        return {url: stems[url] for url in urls}

    def bind_model(
        self, model_record: dict[str, Any], shards: dict[str, str], *, embedding: bool
    ) -> None:
        """Create run.json, or check that an existing run was made with the same weights.

        The file is replaced atomically and only when its content changes: array tasks that
        bind the same model and the same map of every shard write the same bytes, in any order.
        """
        self.ensure_same_model(model_record, embedding=embedding)
        existing = self.read_record()
        if existing is None:
            record = {"format": RUN_FORMAT, "curate": __version__, "model": model_record}
        else:
            record = dict(existing)
        record["shards"] = {**(record.get("shards") or {}), **shards}
        if record != existing:
            write_json_atomic(self.record_path, record)

    def shard_paths(self, stem: str) -> tuple[Path, Path]:
        return self.embeddings_dir / f"{stem}.parquet", self.embeddings_dir / f"{stem}.json"

    def read_shard_record(self, stem: str) -> ShardRecord | None:
        _, done = self.shard_paths(stem)
        if not done.is_file():
            return None
        try:
            return ShardRecord(**json.loads(done.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError):
            return None

    def is_complete(self, stem: str, url: str, fingerprint: str | None) -> bool:
        """True when the shard's record matches the source, the weights and its table's size."""
        record = self.read_shard_record(stem)
        table, _ = self.shard_paths(stem)
        if record is None or fingerprint is None or record.fingerprint != fingerprint:
            return False
        if record.url != url or not table.is_file() or table.stat().st_size != record.bytes:
            return False
        now = source_signature(url)
        # A shard that can no longer be stat'ed (moved, offline) keeps its embeddings.
        return now is None or record.source is None or now == record.source

    def write_shard(
        self,
        stem: str,
        url: str,
        rows: Sequence[SampleRow],
        image_emb: np.ndarray,
        text_emb: np.ndarray,
        *,
        fingerprint: str,
        source: dict[str, str] | None,
        truncated: str | None = None,
    ) -> ShardRecord:
        """Write the shard table, then its completion record (the order makes it atomic)."""
        valid = np.array([row.error is None for row in rows], dtype=bool)
        if image_emb.shape[0] != int(valid.sum()):
            raise RunFolderError(
                f"internal: {stem} has {valid.sum()} OK rows but {image_emb.shape[0]} embeddings"
            )
        table = pa.table(
            {
                "uid": pa.array([r.uid for r in rows], pa.string()),
                "key": pa.array([r.key for r in rows], pa.string()),
                "shard": pa.array([stem] * len(rows), pa.string()),
                "caption": pa.array([r.caption for r in rows], pa.string()),
                "error": pa.array([r.error for r in rows], pa.string()),
                "width": pa.array([r.width for r in rows], pa.int32()),
                "height": pa.array([r.height for r in rows], pa.int32()),
                "image_emb": _embedding_array(image_emb, valid),
                "text_emb": _embedding_array(text_emb, valid),
            }
        )
        parquet_path, done_path = self.shard_paths(stem)
        write_atomic(parquet_path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        record = ShardRecord(
            stem=stem,
            url=url,
            source=source,
            fingerprint=fingerprint,
            read=len(rows),
            ok=int(valid.sum()),
            failed=int((~valid).sum()),
            bytes=parquet_path.stat().st_size,
            sha256=file_sha256(parquet_path),
            truncated=truncated,
        )
        write_json_atomic(done_path, record.__dict__)
        return record

    def read_shard(self, stem: str, columns: Sequence[str] | None = None) -> pa.Table:
        parquet_path, _ = self.shard_paths(stem)
        try:
            return pq.read_table(parquet_path, columns=list(columns) if columns else None)
        except (OSError, pa.ArrowInvalid) as exc:
            raise RunFolderError(f"cannot read {parquet_path}: {exc}") from exc

    def complete_stems(self) -> list[str]:
        """Stems of all complete shards, in the order the run recorded them."""
        record = self.read_record() or {}
        return [s for s in record.get("shards", {}) if self.read_shard_record(s) is not None]

    def content_hash(self, stems: Sequence[str] | None = None) -> str:
        """Identifies the embeddings: model fingerprint plus every shard table's hash."""
        digest = hashlib.sha256(self.model_record()["fingerprint"].encode())
        for stem in sorted(stems if stems is not None else self.complete_stems()):
            record = self.read_shard_record(stem)
            if record is None:
                raise RunFolderError(f"shard {stem} of run {self.path} is not embedded")
            digest.update(f"{stem}:{record.sha256}".encode())
        return digest.hexdigest()
