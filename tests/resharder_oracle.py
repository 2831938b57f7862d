"""DataComp's resharder as an oracle: how it loads a subset file and finds a uid in it.

Written from the resharder's documented behaviour (`load_subset` and the per-sample lookup in
`resharder.py`): a file starting with the ``.npy`` magic is ``np.load``-ed with ``mmap_mode="r"``
and must have dtype exactly ``np.dtype("u8,u8")``; any other file is memory-mapped as raw
``u8,u8`` records. A sample's uid (32 hex characters from its json) becomes
``divmod(int(uid, 16), 2**64)``, and its count is the width of the ``searchsorted`` range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RESHARDER_DTYPE = np.dtype("u8,u8")


def load_subset(path: Path) -> np.ndarray:
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic == b"\x93NUMPY":
        subset = np.load(path, mmap_mode="r")
        assert subset.dtype == RESHARDER_DTYPE, subset.dtype  # the resharder's own assertion
        return subset
    return np.memmap(path, RESHARDER_DTYPE, mode="r")


def resharder_count(subset: np.ndarray, uid: str) -> int:
    key = np.array([divmod(int(uid, 16), 2**64)], RESHARDER_DTYPE)[0]
    return int(np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left"))


def assert_resharder_accepts(path: Path, members: list[str], others: list[str] = ()) -> None:
    """The resharder loads `path`, finds every uid of `members` once and none of `others`."""
    subset = load_subset(Path(path))
    assert len(subset) == len(set(members))
    for uid in members:
        assert resharder_count(subset, uid) == 1, uid
    for uid in others:
        assert resharder_count(subset, uid) == 0, uid
