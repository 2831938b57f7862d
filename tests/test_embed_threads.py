"""The model's CPU thread count beside decoding workers: every core for a model-bound model,
the cores the workers leave for a small one, and never a function of timing."""

from __future__ import annotations

import os

import pytest
import torch

from curate.embedding.threads import GREEDY_PARAMETERS, model_threads, threads_beside


@pytest.mark.parametrize(
    ("workers", "parameters", "cores", "expected"),
    [
        (2, 151_000_000, 2, 2),  # ViT-B-32: model-bound, every core
        (2, 1_000_000, 2, 1),  # tiny: the workers' cores stay theirs, at least one thread
        (3, 1_000_000, 8, 5),
        (8, 1_000_000, 4, 1),
        (0, 1_000_000, 4, 4),  # decoding in this process: nothing to leave
        (2, GREEDY_PARAMETERS, 4, 4),
        (2, GREEDY_PARAMETERS - 1, 4, 2),
    ],
)
def test_thread_rule(workers: int, parameters: int, cores: int, expected: int) -> None:
    assert model_threads(workers, parameters, cores) == expected


def test_threads_beside_sets_and_restores_the_count() -> None:
    before = torch.get_num_threads()
    small = torch.nn.Linear(4, 4)
    cores = os.cpu_count() or 1
    with threads_beside(1, small, torch.device("cpu")) as threads:
        assert threads == torch.get_num_threads() == max(1, cores - 1)
    assert torch.get_num_threads() == before
    with threads_beside(1, small, torch.device("cuda")) as threads:
        assert threads == torch.get_num_threads() == before  # a GPU model: nothing to share
