"""How many CPU threads the model gets while decoding workers run beside it, chosen by measuring.

On a CPU two regimes want opposite settings. When the model is the bottleneck (ViT-B-32), it
should use every core: the workers need little CPU, and a model held to one thread of two ran
at 0.6× a plain single-process loop. When decoding is the bottleneck (a tiny model), the model
should leave the workers their cores (``cores − workers`` threads): an oversubscribed machine
decoded ~25% slower on 2 cores.

`ThreadTuner` decides while the batches stream. After a warm-up (each worker's first batch:
they start together and arrive in a burst), it times a window of batches with every core (at
least `MIN_WINDOW_SECONDS`): when the model hardly waited for its batches (under
`IDLE_SHARE` of the time) over more batches than the loader holds ready (so they were not
just a backlog), decoding keeps up and every core stays with the model at no cost of
measuring. Otherwise it times the frugal count too and keeps whichever gave the shorter time
per sample. The choice holds `HOLD_FACTOR` times as long as measuring took, then both are
measured again (the balance moves with shard sizes, caption lengths, the page cache). Thread
counts change how fast the model runs, not what it computes: the embeddings of the models the
tests use are bit-identical at 1 and 2 threads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

__all__ = ["ThreadTuner", "tuned_threads"]

MIN_WINDOW_SECONDS = 0.25  # a measuring window lasts at least this long (and one timed batch)
IDLE_SHARE = 0.05  # waiting less than this share of the time: decoding keeps up
HOLD_FACTOR = 10.0  # the winner holds this many times as long as its round of measuring took


@dataclass
class ThreadTuner:
    """Chooses the model's thread count among `candidates` (the first is tried first and kept
    when the model hardly waits; see the module docstring). Call `start_batch` when a batch
    has arrived, before the forward pass, and `end_batch` after it; `set_threads` applies a
    count (only when it changes)."""

    candidates: tuple[int, ...]
    set_threads: Callable[[int], None] = torch.set_num_threads
    min_window: float = MIN_WINDOW_SECONDS
    idle_share: float = IDLE_SHARE
    hold_factor: float = HOLD_FACTOR
    clock: Callable[[], float] = time.perf_counter
    warmup: int = 0  # batches run with the first candidate, untimed
    queue: int = 0  # batches the loader may hold ready: an idle window must be longer
    chosen: int | None = None  # the count being held (None while measuring)
    measured: dict[int, float] = field(default_factory=dict)  # seconds per sample, this round
    _queue: list[int] = field(default_factory=list)  # candidates still to measure
    _current: int | None = None
    _mark: float | None = None  # when the last batch ended
    _round_start: float | None = None  # None until the first round (after the warm-up)
    _hold_until: float = 0.0
    _seconds: float = 0.0  # timed so far in this window: batch ends after the first
    _waited: float = 0.0  # of which waiting for batches
    _samples: int = 0
    _batches: int = 0  # timed batches in this window

    def __post_init__(self) -> None:
        self.candidates = tuple(dict.fromkeys(self.candidates))  # distinct, in order
        if not self.candidates:
            raise ValueError("ThreadTuner needs at least one candidate thread count")

    def start_batch(self) -> int:
        """A batch has arrived: account the wait, decide (window over? hold over?) and apply
        the thread count for its forward pass, which is returned."""
        now = self.clock()
        if self.warmup > 0:  # the workers' first batches: startup, not the steady state
            self.warmup -= 1
            if self._current is None:
                self._switch(self.candidates[0])
            self._mark = None
            return self.candidates[0]
        if self._round_start is None:
            self._new_round(now)
        elif self.chosen is None and self._samples and self._seconds >= self.min_window:
            self._close_window(now)
        elif self.chosen is not None and now >= self._hold_until:
            self._new_round(now)
        if self._mark is not None:  # this batch's wait counts where its forward pass does
            self._waited += now - self._mark
        assert self._current is not None
        return self._current

    def end_batch(self, samples: int) -> None:
        """The forward pass of the batch (`samples` rows) is over."""
        now = self.clock()
        if self._mark is not None:  # the first batch of a run has no start to time from
            self._seconds += now - self._mark
            self._samples += samples
            self._batches += 1
        self._mark = now

    def _close_window(self, now: float) -> None:
        assert self._current is not None
        idle = self._waited / self._seconds <= self.idle_share
        if idle and self._current == self.candidates[0] and self._batches <= self.queue:
            return  # the batches may have come from a full queue: go on measuring
        self.measured[self._current] = self._seconds / self._samples
        if self._queue and not (idle and self._current == self.candidates[0]):
            self._switch(self._queue.pop(0))
            return
        self.chosen = min(self.measured, key=lambda c: self.measured[c])
        assert self._round_start is not None
        self._hold_until = now + self.hold_factor * max(now - self._round_start, 1e-9)
        self._switch(self.chosen)

    def _new_round(self, now: float) -> None:
        self.chosen = None
        self.measured = {}
        self._queue = list(self.candidates)
        self._round_start = now
        self._switch(self._queue.pop(0))

    def _switch(self, threads: int) -> None:
        if threads != self._current:
            self.set_threads(threads)
            self._mark = None  # the next batch settles: it waited under the previous count
        self._current = threads
        self._seconds = self._waited = 0.0
        self._samples = self._batches = 0


@contextmanager
def tuned_threads(
    workers: int, device: torch.device, warmup: int = 0, queue: int = 0
) -> Iterator[ThreadTuner | None]:
    """A `ThreadTuner` between ``cores`` and ``cores − workers`` threads (tried in that order)
    when the model runs on the CPU beside decoding workers, None otherwise (nothing to
    choose), its first `warmup` batches untimed, `queue` the batches the loader holds ready;
    the process's thread count is restored afterwards."""
    before = torch.get_num_threads()
    cores = os.cpu_count() or 1
    frugal = max(1, cores - workers)
    tuner = None
    if device.type == "cpu" and workers > 0 and frugal != cores:
        tuner = ThreadTuner((cores, frugal), warmup=warmup, queue=queue)
    try:
        yield tuner
    finally:
        torch.set_num_threads(before)
