"""The bounded-memory balance reduce against the whole-pool computation it replaces.

The oracle reads every match file into one frame and applies the published rule with the
in-memory functions (`pool_errors`, `matches_csr`, `keep_probabilities`, `draws.draw_subset`,
which sorts the whole pool at once); the reduce under test scans compact arrays, ranks classes
a piece at a time and decides a unit at a time. Small search chunks force many pieces.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate.balancing import reduce
from curate.balancing.draws import DrawRule, class_ranks, draw_subset
from curate.balancing.metadata import load_metadata, save_metadata
from curate.balancing.sampling import draw_bits, keep_probabilities
from curate.balancing.stage import (
    DECISIONS_TABLE,
    MATCHES_DIR,
    SUBSET_NPY,
    BalanceSpec,
    balance,
    matches_csr,
    pool_errors,
)
from curate.io import uid_files

CONCEPTS = [f"concept{i}" for i in range(30)]


def write_tables(folder: Path, seed: int, units: int = 4, rows: int = 300) -> None:
    """Caption tables with repeats across tables, bad and upper-case uids, empty captions."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.2 for k in range(len(CONCEPTS))]
    folder.mkdir(parents=True)
    seen: list[str] = []
    for u in range(units):
        table = []
        for i in range(rows):
            r = rng.random()
            if r < 0.05 and seen:
                uid = rng.choice(seen).upper() if rng.random() < 0.5 else rng.choice(seen)
            elif r < 0.08:
                uid = rng.choice(["zz" * 16, "abc", ""])
            else:
                uid = hashlib.blake2b(f"{seed}-{u}-{i}".encode(), digest_size=16).hexdigest()
                seen.append(uid)
            picked = rng.choices(CONCEPTS, weights, k=rng.choice((0, 1, 1, 1, 2, 3)))
            caption = "my " + " and ".join(picked) if rng.random() > 0.03 else "  "
            table.append({"uid": uid, "caption": caption, "key": f"{u}-{i}"})
        pl.DataFrame(table).write_parquet(folder / f"part{u}.parquet")


def oracle_kept(out: Path, spec: BalanceSpec, t: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept mask, keep probabilities) of the whole pool, computed in memory."""
    files = sorted((out / MATCHES_DIR).glob("*.parquet"))
    frame = pl.concat([pl.read_parquet(f) for f in files])
    uid, errors = pool_errors(frame)
    ok = errors.is_null().to_numpy()
    offsets, entry_ids = matches_csr(frame["entry_ids"], ok)
    counts = np.bincount(entry_ids, minlength=len(CONCEPTS) + 1)
    probability = keep_probabilities(offsets, entry_ids, counts, t)
    matched = ok & (np.diff(offsets) > 0)
    kept = draw_subset(
        probability, uid.to_arrow(), matched, spec.seed, spec.draw, offsets, entry_ids
    )
    return kept, np.where(ok, probability, np.nan)


@pytest.mark.parametrize(
    "spec",
    [
        BalanceSpec(t=12.0, seed=3),
        BalanceSpec(seed=5),  # t from the tail share
        BalanceSpec(target_size=250, seed=1),
        BalanceSpec(t=20.0, seed=2, draw=DrawRule.independent),
    ],
    ids=["t", "tail", "size", "independent"],
)
def test_reduce_equals_the_whole_pool_computation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: BalanceSpec
) -> None:
    monkeypatch.setattr(uid_files, "_SEARCH_ROWS", 17)  # many chunks
    monkeypatch.setattr(uid_files, "_PIECE_ROWS", 40)  # and many pieces
    write_tables(tmp_path / "tables", seed=spec.seed)
    meta_path = tmp_path / "meta.json"
    save_metadata(meta_path, [*CONCEPTS, "never,matches"])
    # Match files are one per table, in table order: the pool order of the reduce.
    report = balance(str(tmp_path / "tables"), load_metadata(meta_path), tmp_path / "out", spec)
    sample = report.sample
    assert sample is not None
    decisions = pl.read_parquet(tmp_path / "out" / DECISIONS_TABLE)
    kept, probability = oracle_kept(tmp_path / "out", spec, sample.t)
    assert (decisions["status"] == "kept").to_numpy().tolist() == kept.tolist()
    np.testing.assert_array_equal(decisions["keep_prob"].to_numpy(), probability)
    assert sample.kept == int(kept.sum()) and 0 < sample.kept < decisions.height
    assert sample.failures.get("duplicate_uid", 0) > 0 and sample.failures.get("bad_uid", 0) > 0
    kept_uids = decisions.filter(pl.col("status") == "kept")["uid"]
    written = uid_files.read_uid_file(tmp_path / "out" / SUBSET_NPY)
    assert written.uids == sorted(kept_uids.to_list())  # DataComp order: sorted


def test_class_ranks_follow_the_draw_order_within_each_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(uid_files, "_SEARCH_ROWS", 5)
    monkeypatch.setattr(uid_files, "_PIECE_ROWS", 30)
    rng = np.random.default_rng(0)
    n = 400
    key = rng.integers(0, 12, n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    hi = rng.integers(0, 2**63, n, dtype=np.uint64)
    lo = rng.integers(0, 2**63, n, dtype=np.uint64)
    hi[1::7], lo[1::7] = hi[0], lo[0]  # equal uids: equal draws, the tie order is the uid's
    lo[2::11] = lo[2] + np.uint64(1)
    hi[2::11] = hi[2]
    eligible = rng.random(n) < 0.8
    ranks = class_ranks(key, eligible, hi, lo, seed=9)
    bits = draw_bits(hi, lo, 9)
    for value in np.unique(key):
        members = [i for i in range(n) if key[i] == value and eligible[i]]
        ordered = sorted(members, key=lambda i: (int(bits[i]), int(hi[i]), int(lo[i])))
        for rank, row in enumerate(ordered):
            assert ranks[row] == rank
    assert (ranks[~eligible] == 0).all()


def test_reduce_state_is_arrays_without_python_objects(tmp_path: Path) -> None:
    """The scan's per-row state is a handful of fixed-width arrays: 17 bytes a row and 8 per
    matched row here."""
    write_tables(tmp_path / "tables", seed=4, units=2, rows=50)
    meta_path = tmp_path / "meta.json"
    save_metadata(meta_path, CONCEPTS)
    out = tmp_path / "out"
    balance(str(tmp_path / "tables"), load_metadata(meta_path), out, BalanceSpec(t=5.0))
    files = sorted((out / MATCHES_DIR).glob("*.parquet"))
    scan = reduce.scan_pool(files, len(CONCEPTS), class_key=True, keep_matches=False)
    arrays = [scan.flags, scan.hi, scan.lo, scan.class_key]
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays)
    keyed = int(scan.keyed().sum())
    assert 0 < keyed < scan.rows
    assert sum(a.nbytes for a in arrays) == 17 * scan.rows + 8 * keyed  # type: ignore[union-attr]
