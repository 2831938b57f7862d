"""Range checks for rewrite settings: one line naming the option, before any work is done."""

from __future__ import annotations

import math

from curate.errors import InputError

__all__ = ["require_range"]


def require_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise `InputError` unless `value` is a finite number (an int when `integer`) within
    [low, high] (low excluded when `low_open`). `name` is the option as the user wrote it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, int)
    if ok:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise InputError(f"{name} must be {_describe(low, high, low_open, integer)}, got {value!r}")


def _describe(low: float | None, high: float | None, low_open: bool, integer: bool) -> str:
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} <= {high:g}"
    return f"a finite {kind.split()[-1]}"
