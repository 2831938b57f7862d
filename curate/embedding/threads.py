"""How many CPU threads the model gets while decoding workers run beside it.

On a CPU two regimes want opposite settings. When the model is the bottleneck (ViT-B-32, 151M
parameters), it should use every core: the workers need little CPU (decoding is ~2% of its
work), and a model held to one thread of two ran at 0.6× a plain single-process loop. When
decoding is the bottleneck (the tiny and demo models, under 10M parameters), the model should
leave the workers their cores (``cores − workers`` threads): an oversubscribed machine decoded
~25% slower on 2 cores.

The choice is a pure function of the cores, the workers and the model's size, never of timing:
the thread count can move the last bits of an embedding (the tiny model at batch 7 differs
between 1 and 2 threads), and the same inputs must give the same bytes on every run. A timing
tuner (choosing while the batches stream) was tried and dropped for that reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["GREEDY_PARAMETERS", "model_threads", "threads_beside"]

GREEDY_PARAMETERS = 20_000_000  # from this size on a forward pass outweighs decoding a sample


def model_threads(workers: int, parameters: int, cores: int | None = None) -> int:
    """The model's CPU thread count beside `workers` decoding processes: every core for a
    model of `GREEDY_PARAMETERS` or more (model-bound), else the cores the workers leave."""
    cores = cores or os.cpu_count() or 1
    if workers <= 0 or parameters >= GREEDY_PARAMETERS:
        return cores
    return max(1, cores - workers)


@contextmanager
def threads_beside(workers: int, model: torch.nn.Module, device: torch.device) -> Iterator[int]:
    """Run the block with `model_threads` on CPU (the count is yielded; on CUDA nothing
    changes) and restore the process's thread count afterwards."""
    before = torch.get_num_threads()
    threads = before
    if device.type == "cpu" and workers > 0:
        parameters = sum(p.numel() for p in model.parameters())
        threads = model_threads(workers, parameters)
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
