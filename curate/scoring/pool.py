"""The pool of a run as the score reduce needs it, in memory bounded by a few bytes per sample.

- `PoolIndex`: per row of the pool (shards in run order, rows in table order) its uid as 16
  bytes, whether it embedded, and which shard it is in; duplicate uids are found on those bytes
  (first OK occurrence in pool order wins), never on Python strings.
- `EmbeddingStore`: the kept rows' image and text embeddings copied shard by shard into two
  memory-mapped float16 files (N × D each) in a scratch folder of the run, so negclip gathers
  its batches from disk-backed pages and resident memory is bounded by the batch work, not by N.
  The folder is removed when the store is closed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from curate.embedding.store import RunFolder, embeddings_to_numpy
from curate.errors import RunFolderError
from curate.io.uid_files import repeats, uid_pairs

__all__ = ["EmbeddingStore", "PoolIndex"]


@dataclass
class PoolIndex:
    """Compact per-row columns of the pool: 16 + 1 + 4 bytes per row, plus the shard table."""

    stems: list[str]
    hi: np.ndarray  # (n,) uint64: the uid's first 64 bits (DataComp's pair)
    lo: np.ndarray  # (n,) uint64: its last 64 bits
    embedded: np.ndarray  # (n,) bool: the row has embeddings (no error in its table)
    shard_of: np.ndarray  # (n,) int32 index into `stems`
    rows_per_shard: np.ndarray  # (len(stems),) int64

    @classmethod
    def read(cls, run: RunFolder, stems: Sequence[str]) -> PoolIndex:
        his, los, embedded, counts = [], [], [], []
        for stem in stems:
            table = run.read_shard(stem, ["uid", "error"])
            hi, lo, valid = uid_pairs(table.column("uid"))
            if not valid.all():
                bad = table.column("uid")[int(np.flatnonzero(~valid)[0])].as_py()
                raise RunFolderError(
                    f"shard {stem} of run {run.path}: uid {bad!r} is not 32 hex characters"
                )
            his.append(hi), los.append(lo)
            embedded.append(np.asarray(pc.is_null(table.column("error"))))
            counts.append(table.num_rows)
        rows = np.array(counts, dtype=np.int64)
        return cls(
            stems=list(stems),
            hi=np.concatenate(his) if his else np.zeros(0, np.uint64),
            lo=np.concatenate(los) if los else np.zeros(0, np.uint64),
            embedded=np.concatenate(embedded) if embedded else np.zeros(0, bool),
            shard_of=np.repeat(np.arange(len(stems), dtype=np.int32), rows),
            rows_per_shard=rows,
        )

    @property
    def rows(self) -> int:
        return int(self.embedded.size)

    def first_occurrences(self) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """(kept, (rows, firsts)): `kept` marks embedded rows whose uid no earlier embedded row
        has; `rows` (sorted) are the other embedded rows, `firsts` the first embedded row with
        each one's uid (`io.uid_files.repeats`)."""
        rows, firsts = repeats(self.hi, self.lo, self.embedded)
        kept = self.embedded.copy()
        kept[rows] = False
        return kept, (rows, firsts)

    def bounds(self, shard: int) -> tuple[int, int]:
        """Row range [start, stop) of shard number `shard` in the pool."""
        start = int(self.rows_per_shard[:shard].sum())
        return start, start + int(self.rows_per_shard[shard])


class EmbeddingStore:
    """Image and text embeddings of the pool's kept rows as float16 memmaps (module doc)."""

    def __init__(self, run: RunFolder, index: PoolIndex, kept: np.ndarray) -> None:
        dim = int(run.model_record()["embed_dim"])
        count = int(kept.sum())
        scratch = run.path / ".scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="negclip-", dir=scratch))
        shape = (max(count, 1), dim)  # a memmap cannot be empty
        self.image = np.lib.format.open_memmap(
            self.folder / "image.npy", mode="w+", dtype=np.float16, shape=shape
        )
        self.text = np.lib.format.open_memmap(
            self.folder / "text.npy", mode="w+", dtype=np.float16, shape=shape
        )
        at = 0
        for s, stem in enumerate(index.stems):
            start, stop = index.bounds(s)
            take = kept[start:stop][index.embedded[start:stop]]  # over the table's OK rows
            if not take.any():
                continue
            table = run.read_shard(stem, ["error", "image_emb", "text_emb"])
            ok = np.asarray(pc.is_null(table.column("error")))
            for column, target in (("image_emb", self.image), ("text_emb", self.text)):
                values = embeddings_to_numpy(table.column(column), dim)[ok][take]
                target[at : at + values.shape[0]] = values
            at += int(take.sum())
        assert at == count
        self.image.flush()
        self.text.flush()
        self.count = count

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The kept rows' (image, text) embeddings, memory-mapped, in pool order."""
        return self.image[: self.count], self.text[: self.count]

    def close(self) -> None:
        del self.image, self.text
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
