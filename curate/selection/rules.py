"""Selection rules: top fractions with DataComp semantics, `--where` conditions, derived columns.

Top fraction (DataComp's ``get_threshold``): with n = floor(N·f) computed in floating point, the
threshold is the value at 0-based position n of the candidates' scores sorted in descending order,
and every candidate with score >= threshold is kept. So without ties exactly n + 1 samples are
kept; ties at the threshold are all kept (never broken arbitrarily). When n >= the number of
candidates everything is kept.

In a chain, each top step ranks only the candidates still kept. Its count base is stated per step:
``pool`` (N = scored rows of the input table, the negCLIPLoss ∩ NormSim recipe's "top 20% of the
pool among those") or ``remainder`` (N = candidates still kept when the step runs).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from curate.errors import InputError

Base = Literal["pool", "remainder"]
BASES: tuple[Base, ...] = ("pool", "remainder")
NORMSIM2_D = "normsim2_d"

# Columns computed from the pool table when their sources exist (see `derived_columns`).
DERIVED = {
    "caption_words": "words in the caption (whitespace split, as DataComp's basic filter)",
    "caption_chars": "characters in the caption",
    "min_side": "min(width, height)",
    "max_side": "max(width, height)",
    "aspect_ratio": "max(width, height) / min(width, height)",
    "pixels": "width * height",
}

_OPS: dict[str, Callable[[pl.Expr, float], pl.Expr]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


def top_count(fraction: float, base_size: int) -> int:
    """n = floor(N·f) with the float product, exactly as DataComp's `int(len(df) * fraction)`."""
    return math.floor(base_size * fraction)


def top_threshold(values: np.ndarray, n: int) -> float | None:
    """The DataComp top rule's threshold over `values` (no NaNs): the value at 0-based position
    n in descending order (a partition, not a sort: one copy of `values`); None when n reaches
    every value (all are kept). Keep ``values >= threshold``."""
    if n >= values.size:
        return None
    values = np.partition(values, values.size - 1 - n)
    return float(values[values.size - 1 - n])


def top_mask(values: np.ndarray, n: int) -> tuple[np.ndarray, float | None]:
    """Keep mask and threshold for the DataComp top rule over `values` (no NaNs)."""
    threshold = top_threshold(values, n)
    if threshold is None:
        return np.ones(values.size, dtype=bool), None
    return values >= threshold, threshold


@dataclass(frozen=True)
class TopStep:
    """Keep the top `fraction` by `column`; the count is a fraction of the pool or remainder."""

    column: str
    fraction: float
    base: Base | None = None

    @classmethod
    def parse(cls, spec: str) -> TopStep:
        """`COLUMN:FRACTION[:pool|remainder]`, e.g. `negclip:0.3` or `normsim_inf:0.2:pool`."""
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise InputError(
                f"--top {spec!r}: expected COLUMN:FRACTION[:pool|remainder], e.g. negclip:0.3"
            )
        try:
            fraction = float(parts[1])
        except ValueError:
            raise InputError(f"--top {spec!r}: fraction {parts[1]!r} is not a number") from None
        if not 0.0 < fraction <= 1.0:
            raise InputError(f"--top {spec!r}: fraction must be in (0, 1], got {fraction}")
        base = parts[2] if len(parts) == 3 else None
        if base is not None and base not in BASES:
            raise InputError(f"--top {spec!r}: say 'pool' or 'remainder', not {base!r}")
        return cls(parts[0], fraction, base)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        base = self.base or "pool"
        return f"top {self.fraction:g} of {base} by {self.column}"


@dataclass(frozen=True)
class Condition:
    """`COLUMN OP VALUE` with OP one of > >= < <= == !=; null and NaN values fail the condition
    (polars orders NaN above every number, so `score > 0.5` would otherwise keep NaN)."""

    column: str
    op: str
    value: float

    @classmethod
    def parse(cls, spec: str) -> Condition:
        match = _CONDITION.match(spec)
        if match is None:
            raise InputError(
                f"--where {spec!r}: expected 'COLUMN OP NUMBER' (OP: > >= < <= == !=), "
                "e.g. 'caption_words > 2'"
            )
        column, op, raw = match.groups()
        try:
            value = float(raw)
        except ValueError:
            raise InputError(f"--where {spec!r}: {raw!r} is not a number") from None
        if math.isnan(value):
            raise InputError(f"--where {spec!r}: compare with a number, not NaN")
        return cls(column, op, value)

    @property
    def label(self) -> str:
        return f"where {self.column} {self.op} {self.value:g}"

    def expr(self) -> pl.Expr:
        column = pl.col(self.column).cast(pl.Float64)
        return (_OPS[self.op](column, self.value) & ~column.is_nan()).fill_null(False)


def derived_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """Add the `DERIVED` columns whose sources exist (`caption`/`text`; `width`/`height`, else
    `original_width`/`original_height`, as in DataComp metadata)."""
    names = set(frame.columns)
    caption = next((c for c in ("caption", "text") if c in names), None)
    exprs: list[pl.Expr] = []
    if caption is not None:
        text = pl.col(caption).cast(pl.String)
        # Runs of non-whitespace: Python's len(caption.split()) as in DataComp's basic filter.
        # Python's str.split() also splits on \x1c-\x1f, which the regex \s does not match.
        words = text.str.count_matches(r"[^\s\x1c-\x1f]+")
        exprs.append(words.cast(pl.Int64).alias("caption_words"))
        exprs.append(text.str.len_chars().cast(pl.Int64).alias("caption_chars"))
    size = next(
        (
            (w, h)
            for w, h in (("width", "height"), ("original_width", "original_height"))
            if {w, h} <= names
        ),
        None,
    )
    if size is not None:
        w, h = pl.col(size[0]).cast(pl.Float64), pl.col(size[1]).cast(pl.Float64)
        # min/max_horizontal skip nulls: an unknown side must make the size unknown, not the
        # other side (else a row with width null and height 300 gets min_side 300).
        known = w.is_not_null() & h.is_not_null()
        lo = pl.when(known).then(pl.min_horizontal(w, h))
        hi = pl.when(known).then(pl.max_horizontal(w, h))
        exprs += [
            lo.alias("min_side"),
            hi.alias("max_side"),
            pl.when(lo > 0).then(hi / lo).otherwise(None).alias("aspect_ratio"),
            (w * h).alias("pixels"),
        ]
    return frame.with_columns(exprs) if exprs else frame
