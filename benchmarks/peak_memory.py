"""Peak resident memory of one block of code, for the benchmarks (Linux first, portable after).

On Linux the high-water mark is reset through /proc/self/clear_refs and read from VmHWM, so a
block's own peak is seen even when the process peaked earlier; elsewhere the ru_maxrss
difference is used, which can only show a block that raises the process's all-time peak.
"""

from __future__ import annotations

import gc
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def status_kb(field: str) -> int | None:
    """A /proc/self/status field in kB (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


@dataclass
class PeakRss:
    base_mb: float | None = None  # RSS before the block
    retained_mb: float | None = None  # RSS after the block (and a collection), minus base
    peak_increase_mb: float = 0.0  # peak during the block, minus base
    ru_maxrss_increase_mb: float = 0.0


@contextmanager
def peak_rss() -> Iterator[PeakRss]:
    """Measure the block; the fields are filled in when it ends."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    base_kb = status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = PeakRss()
    yield out
    out.ru_maxrss_increase_mb = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
    ) / 1024
    hwm_kb = status_kb("VmHWM")
    gc.collect()
    after_kb = status_kb("VmRSS")
    out.peak_increase_mb = out.ru_maxrss_increase_mb
    if base_kb is not None:
        out.base_mb = base_kb / 1024
        if after_kb is not None:
            out.retained_mb = (after_kb - base_kb) / 1024
        if hwm_reset and hwm_kb is not None:
            out.peak_increase_mb = (hwm_kb - base_kb) / 1024
