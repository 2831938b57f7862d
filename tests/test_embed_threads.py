"""The CPU thread tuner of embedding: it keeps every core when the model hardly waits, and
otherwise measures each candidate and holds the faster."""

from __future__ import annotations

import os

import pytest
import torch

from curate.embedding.threads import ThreadTuner, tuned_threads


class FakeRun:
    """A fake clock: each batch waits `wait[threads]` and computes `forward[threads]` seconds
    per sample under each thread count."""

    def __init__(self, wait: dict[int, float], forward: dict[int, float]) -> None:
        self.wait, self.forward = wait, forward
        self.now = 0.0
        self.applied: list[int] = []  # every set_threads call

    def run(self, tuner: ThreadTuner, batches: int, samples: int = 10) -> list[int]:
        used = []
        for _ in range(batches):
            waiting = self.applied[-1] if self.applied else 2  # the count in force meanwhile
            self.now += self.wait[waiting] * samples
            n = tuner.start_batch()
            used.append(n)
            self.now += self.forward[n] * samples
            tuner.end_batch(samples)
        return used


def tuner_for(fake: FakeRun, candidates: tuple[int, ...] = (2, 1)) -> ThreadTuner:
    return ThreadTuner(
        candidates,
        set_threads=fake.applied.append,
        min_window=3.0,
        hold_factor=2.0,
        clock=lambda: fake.now,
    )


def test_keeps_every_core_when_the_model_does_not_wait() -> None:
    fake = FakeRun(wait={2: 0.0, 1: 0.0}, forward={2: 0.1, 1: 0.2})  # 1 s per batch on 2
    tuner = tuner_for(fake)
    used = fake.run(tuner, 30)
    assert set(used) == {2}  # never measured the frugal count
    assert fake.applied == [2]
    assert tuner.chosen == 2 and tuner.measured == pytest.approx({2: 0.1})


def test_measures_the_frugal_count_when_decoding_is_the_bottleneck() -> None:
    # With 2 threads the model steals the decoder's core: batches wait 0.3 s per sample.
    fake = FakeRun(wait={2: 0.3, 1: 0.1}, forward={2: 0.01, 1: 0.02})
    tuner = tuner_for(fake)
    used = fake.run(tuner, 12)
    assert used[:2] == [2, 2] and used[2:] == [1] * 10
    assert tuner.chosen == 1
    # Each window times whole batches under its own count: the first after a switch settles.
    assert tuner.measured == pytest.approx({2: 0.31, 1: 0.12})


def test_measures_again_after_the_hold_and_follows_a_change() -> None:
    fake = FakeRun(wait={2: 0.3, 1: 0.1}, forward={2: 0.01, 1: 0.02})
    tuner = tuner_for(fake)
    fake.run(tuner, 12)
    assert tuner.chosen == 1
    fake.wait, fake.forward = {2: 0.0, 1: 0.0}, {2: 0.1, 1: 0.3}  # now the model is the bottleneck
    used = fake.run(tuner, 40)
    assert tuner.chosen == 2 and used[-1] == 2
    assert fake.applied[:3] == [2, 1, 2]  # set only on a change


def test_one_candidate_never_switches() -> None:
    fake = FakeRun(wait={2: 0.5}, forward={2: 0.5})
    tuner = tuner_for(fake, (2, 2))
    assert fake.run(tuner, 20) == [2] * 20
    assert fake.applied == [2]
    with pytest.raises(ValueError, match="at least one"):
        ThreadTuner(())


def test_tuned_threads_only_on_cpu_with_workers_and_restores_the_count() -> None:
    before = torch.get_num_threads()
    with tuned_threads(0, torch.device("cpu")) as none:
        assert none is None
    with tuned_threads(1, torch.device("cuda")) as none:
        assert none is None
    cores = os.cpu_count() or 1
    with tuned_threads(1, torch.device("cpu")) as tuner:
        if cores == 1:  # nothing to choose: the frugal and the greedy count are both 1
            assert tuner is None
        else:
            assert tuner is not None and tuner.candidates == (cores, cores - 1)
        torch.set_num_threads(1)
    assert torch.get_num_threads() == before


def test_warmup_batches_are_not_timed() -> None:
    # The first two batches arrive after a long start (workers spawning): were they timed, the
    # model would look idle-bound and the frugal count would win.
    fake = FakeRun(wait={2: 0.0, 1: 0.0}, forward={2: 0.1, 1: 0.2})
    tuner = ThreadTuner(
        (2, 1), set_threads=fake.applied.append, min_window=3.0, hold_factor=2.0,
        clock=lambda: fake.now, warmup=2,
    )  # fmt: skip
    for _ in range(2):
        fake.now += 100.0  # a slow start
        assert tuner.start_batch() == 2
        fake.now += 1.0
        tuner.end_batch(10)
    used = fake.run(tuner, 5)  # 3 timed seconds close the window; the hold follows
    assert set(used) == {2} and tuner.chosen == 2
    assert tuner.measured == pytest.approx({2: 0.1})
