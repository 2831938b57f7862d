"""Progress display for long stages (rich, on stderr; silent when disabled or not a terminal)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)


class StageProgress:
    """Counts shards (with a bar) and samples (with a rate) of one stage."""

    def __init__(self, progress: Progress, shard_task: TaskID) -> None:
        self._progress = progress
        self._task = shard_task
        self.samples = 0

    def advance_samples(self, n: int) -> None:
        self.samples += n
        self._progress.update(self._task, samples=self.samples)

    def advance_shard(self) -> None:
        self._progress.advance(self._task)

    def set_total_shards(self, total: int) -> None:
        self._progress.update(self._task, total=total)

    def set_description(self, description: str) -> None:
        """Name the step under way (for stages with pool-wide steps after the shards)."""
        self._progress.update(self._task, description=description)

    def set(self, shards_done: int, shards_total: int, samples: int) -> None:
        """Jump to absolute counts (for stages that learn their total late)."""
        self.samples = samples
        self._progress.update(
            self._task, completed=shards_done, total=shards_total, samples=samples
        )


@contextmanager
def progress_bar(
    description: str, *, total_shards: int | None, enabled: bool = True
) -> Iterator[StageProgress]:
    """A bar over shards with a running sample count and rate."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("shards"),
        TextColumn("{task.fields[samples]} samples"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr_console,
        disable=not enabled,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total_shards, samples=0)
        yield StageProgress(progress, task)


@contextmanager
def scoring_status(message: str, *, enabled: bool = True) -> Iterator[None]:
    """A spinner with elapsed time for pool-wide steps that have no natural unit to count."""
    if not enabled:
        yield
        return
    with stderr_console.status(f"[bold]{message}[/bold]"):
        yield
