"""Parallel decoding: worker processes read shards, decode and preprocess images, tokenize captions.

Work is cut into units (shard, part): with fewer shards than workers each shard is split into
`parts` slices of whole batches (block b = samples b·B … b·B+B−1 belongs to part b % parts), so
two workers still share one shard while every batch holds the same samples whatever the worker
count. Each unit yields batches and ends with a batch whose `end` flag is set, which lets the
consumer know when a shard is complete. Rows carry their position in the shard, so the consumer
restores tar order and can check that no sample went missing between workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curate.errors import ShardOpenError
from curate.io.images import DEFAULT_MAX_PIXELS, SampleError, decode_image
from curate.io.tar_reader import ShardReader
from curate.models.tokens import cap_tokenizer

__all__ = ["DEFAULT_MAX_PIXELS", "DecodeDataset", "DecodedBatch", "SampleRow", "make_loader"]


@dataclass
class SampleRow:
    """One input sample as recorded: OK rows carry an embedding, failed rows an error."""

    position: int  # index of the sample in its shard (tar order, sidecar records last)
    uid: str
    key: str
    caption: str | None
    error: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class DecodedBatch:
    """What a worker hands to the model loop: rows of one shard part, tensors for OK rows."""

    shard_index: int
    part: int
    rows: list[SampleRow] = field(default_factory=list)  # OK rows match tensor rows in order
    pixels: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    end: bool = False  # last batch of this (shard, part) unit
    shard_error: str | None = None  # the shard could not be opened at all
    truncated: str | None = None  # the tar ended early; set on the unit's final batch

    def pin_memory(self) -> DecodedBatch:
        """Called by DataLoader(pin_memory=True): page-lock pixels for fast host-to-GPU copies."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


@dataclass(frozen=True)
class WorkUnit:
    shard_index: int
    url: str
    part: int
    parts: int


def plan_units(urls: list[str], shard_indices: list[int], num_workers: int) -> list[WorkUnit]:
    """Cut shards into units so that every worker has something to do."""
    parts = max(1, math.ceil(max(num_workers, 1) / max(len(urls), 1)))
    return [
        WorkUnit(index, url, part, parts)
        for index, url in zip(shard_indices, urls, strict=True)
        for part in range(parts)
    ]


class DecodeDataset(IterableDataset):
    """Iterable over `DecodedBatch`es; picklable so DataLoader workers can run it."""

    def __init__(
        self,
        units: list[WorkUnit],
        preprocess: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        batch_size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        self.units = units
        self.preprocess = preprocess
        self.tokenizer = cap_tokenizer(tokenizer)  # a huge caption costs what fits the context
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    def __iter__(self) -> Iterator[DecodedBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for unit in self.units[worker::workers]:
            yield from self._iter_unit(unit)

    def _iter_unit(self, unit: WorkUnit) -> Iterator[DecodedBatch]:
        reader = ShardReader(unit.url)
        pending: list[tuple[SampleRow, torch.Tensor | None]] = []
        try:
            for position, raw in enumerate(reader):
                if (position // self.batch_size) % unit.parts != unit.part:
                    continue
                pending.append(self._decode(position, raw))
                if len(pending) >= self.batch_size:
                    yield self._collate(unit, pending)
                    pending = []
        except ShardOpenError as exc:
            # Every part reports: a part that fails alone must not lose its samples silently.
            yield DecodedBatch(unit.shard_index, unit.part, end=True, shard_error=str(exc))
            return
        final = self._collate(unit, pending)
        final.end = True
        final.truncated = reader.truncated
        yield final

    def _decode(self, position: int, raw: Any) -> tuple[SampleRow, torch.Tensor | None]:
        row = SampleRow(position, uid=raw.uid, key=raw.key, caption=raw.caption, error=raw.error)
        if raw.error is not None:
            return row, None
        try:
            image = decode_image(raw.image, max_pixels=self.max_pixels)
        except SampleError as exc:
            row.error = str(exc)
            return row, None
        row.width, row.height = image.size
        try:
            return row, self.preprocess(image)
        except Exception as exc:  # a transform failure is this sample's failure, not the run's
            row.error = f"preprocess: {' '.join(str(exc).split())[:200]}"
            return row, None

    def _collate(
        self, unit: WorkUnit, pending: list[tuple[SampleRow, torch.Tensor | None]]
    ) -> DecodedBatch:
        batch = DecodedBatch(unit.shard_index, unit.part, rows=[row for row, _ in pending])
        ok = [(row, pixels) for row, pixels in pending if pixels is not None]
        if ok:
            batch.pixels = torch.stack([pixels for _, pixels in ok])
            batch.tokens = self.tokenizer([row.caption or "" for row, _ in ok])
        return batch


def make_loader(dataset: DecodeDataset, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader that passes pre-collated batches through unchanged."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
