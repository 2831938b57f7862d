"""Selection (top fractions, chains, --where, uid files, NormSim_2-D) against slow oracles.

Every oracle is plain Python (sorted lists, loops, float64 numpy for NormSim_2-D) written from
the documented rules, run on random tables with many ties; none calls curate's fast paths.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from resharder_oracle import assert_resharder_accepts

from curate.errors import InputError
from curate.io.uid_files import DATACOMP_DTYPE, write_datacomp_npy
from curate.selection.normsim_d import normsim2_d
from curate.selection.rules import Condition, TopStep, derived_columns, top_count, top_mask
from curate.selection.stage import PoolTable, SelectSpec, select_pool


def uid_of(i: int) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()


def one_line(exc: pytest.ExceptionInfo[Exception]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- the top rule --------------------------------------------------------------------------------


def oracle_top(values: list[float], fraction: float, base: int) -> list[bool]:
    """DataComp's get_threshold + `>=`, written out with a Python sort."""
    n = int(base * fraction)
    if n >= len(values):
        return [True] * len(values)
    threshold = sorted(values, reverse=True)[n]
    return [v >= threshold for v in values]


def random_fraction(rng: np.random.Generator) -> float:
    pick = rng.integers(0, 6)
    if pick == 0:
        return 1.0
    if pick == 1:  # fractions whose float product with N sits just under an integer
        return float(rng.choice([0.1, 0.2, 0.3, 0.7, 0.9, 0.29, 0.57]))
    return float(1.0 - rng.random())  # (0, 1]


def random_values(rng: np.random.Generator, n: int, ties: bool) -> np.ndarray:
    if ties:
        return rng.integers(0, int(rng.integers(1, 6)), n).astype(np.float64)
    return rng.standard_normal(n)


def test_top_rule_matches_brute_force_oracle() -> None:
    rng = np.random.default_rng(1234)
    exact_counts = 0
    for trial in range(600):
        size = int(rng.integers(1, 301))
        fraction = random_fraction(rng)
        ties = trial % 2 == 0
        values = random_values(rng, size, ties)
        n = top_count(fraction, size)
        assert n == int(size * fraction)
        keep, threshold = top_mask(values, n)
        expected = oracle_top(values.tolist(), fraction, size)
        assert keep.tolist() == expected, (trial, size, fraction)
        if n >= size:
            assert threshold is None
        else:
            assert threshold == sorted(values.tolist(), reverse=True)[n]
            if len(set(values.tolist())) == size:  # no ties: exactly n + 1 kept
                assert int(keep.sum()) == n + 1
                exact_counts += 1
    assert exact_counts > 100  # the no-tie branch really ran


def test_top_rule_float_product_like_datacomp() -> None:
    # 0.29 * 100 = 28.999999999999996 in floating point, so n = 28, not 29.
    assert top_count(0.29, 100) == int(100 * 0.29) == 28
    assert top_count(1.0, 7) == 7
    assert top_count(0.5, 1) == 0
    keep, threshold = top_mask(np.array([3.0, 3.0, 3.0, 1.0]), 0)
    assert keep.tolist() == [True, True, True, False]  # ties at the threshold all kept
    assert threshold == 3.0


# --- pool tables ---------------------------------------------------------------------------------


def random_pool(rng: np.random.Generator, size: int, *, null_scored: bool = False) -> pl.DataFrame:
    """A score table like `curate score` writes: mostly scored, some failed with null scores."""
    ties = bool(rng.integers(0, 2))
    a = random_values(rng, size, ties)
    b = random_values(rng, size, not ties)
    status = np.where(rng.random(size) < 0.85, "scored", "failed").tolist()
    rows: dict[str, list[Any]] = {
        "uid": [uid_of(i) for i in range(size)],
        "key": [f"{i:09d}" for i in range(size)],
        "shard": [f"{i // 50:05d}" for i in range(size)],
        "status": status,
        "error": [None if s == "scored" else "decode_error: truncated jpeg" for s in status],
        "a": [None if s != "scored" else float(v) for s, v in zip(status, a, strict=True)],
        "b": [None if s != "scored" else float(v) for s, v in zip(status, b, strict=True)],
    }
    if null_scored:  # a scored row can still lack one score
        for i in rng.choice(size, size=max(1, size // 20), replace=False):
            rows["b"][int(i)] = None
    return pl.DataFrame(
        rows,
        schema={
            "uid": pl.String,
            "key": pl.String,
            "shard": pl.String,
            "status": pl.String,
            "error": pl.String,
            "a": pl.Float64,
            "b": pl.Float64,
        },
    )


def write_pool(frame: pl.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)
    return path


def oracle_chain(
    rows: list[dict[str, Any]], steps: list[tuple[str, float, str | None]]
) -> tuple[set[str], list[tuple[int, int]]]:
    """Kept uids and (before, after) per reported step, by plain loops over the rows."""
    candidates = [r for r in rows if r["status"] == "scored"]
    pool = len(candidates)
    counts: list[tuple[int, int]] = []
    for column, fraction, base in steps:
        if any(r[column] is None for r in candidates):
            before = len(candidates)
            candidates = [r for r in candidates if r[column] is not None]
            counts.append((before, len(candidates)))
        size = pool if base in (None, "pool") else len(candidates)
        n = int(size * fraction)
        before = len(candidates)
        if n < len(candidates):
            threshold = sorted((r[column] for r in candidates), reverse=True)[n]
            candidates = [r for r in candidates if r[column] >= threshold]
        counts.append((before, len(candidates)))
    return {r["uid"] for r in candidates}, counts


CHAINS: list[list[tuple[str, float, str | None]]] = [
    [("a", 0.3, None), ("b", 0.2, "pool")],
    [("a", 0.3, None), ("b", 0.5, "remainder")],
    [("a", 0.5, "remainder")],
    [("b", 0.9, "pool"), ("a", 0.9, "pool"), ("b", 0.1, "remainder")],
    [("a", 1.0, None), ("b", 0.05, "pool")],
]


def kept_uids(out: Path) -> set[str]:
    return set(pl.read_parquet(out / "subset.parquet")["uid"].to_list())


@pytest.mark.parametrize("chain", range(len(CHAINS)))
def test_top_chain_matches_oracle(tmp_path: Path, chain: int) -> None:
    rng = np.random.default_rng(100 + chain)
    steps = CHAINS[chain]
    for trial in range(12):
        size = int(rng.integers(1, 250))
        frame = random_pool(rng, size, null_scored=trial % 3 == 0)
        source = write_pool(frame, tmp_path / f"pool{trial}.parquet")
        spec = SelectSpec(top=[TopStep(c, f, b) for c, f, b in steps])  # type: ignore[arg-type]
        out = tmp_path / f"out{chain}-{trial}"
        report = select_pool(source, spec, out=out)

        rows = frame.to_dicts()
        expected, counts = oracle_chain(rows, steps)
        assert kept_uids(out) == expected
        assert [(s.before, s.after) for s in report.steps] == counts
        scored = sum(r["status"] == "scored" for r in rows)
        assert (report.rows, report.pool, report.failed) == (size, scored, size - scored)
        assert report.failures == ({"decode_error": size - scored} if size > scored else {})
        assert report.selected == len(expected)
        top_labels = [s.step for s in report.steps if s.step.startswith("top ")]
        assert top_labels == [f"top {f:g} of {b or 'pool'} by {c}" for c, f, b in steps]


def test_scored_null_score_is_dropped_with_reason(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {"uid": [uid_of(i) for i in range(4)], "s": [1.0, None, float("nan"), 0.5]},
        schema={"uid": pl.String, "s": pl.Float64},
    )
    source = write_pool(frame, tmp_path / "p.parquet")
    report = select_pool(source, SelectSpec(top=[TopStep.parse("s:1")]), out=tmp_path / "o")
    assert kept_uids(tmp_path / "o") == {uid_of(0), uid_of(3)}
    first = report.steps[0]
    assert (first.step, first.before, first.after) == ("s is null", 4, 2)
    decisions = pl.read_parquet(tmp_path / "o" / "decisions.parquet")
    assert decisions["reason"].to_list() == [None, "s is null", "s is null", None]


# --- --where and derived columns -----------------------------------------------------------------

WORDS = ["cat", "a", "photo", "of", "Ünïcode", "数据", "x", "…", "\u200b"]  # \u200b: not a space
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u3000", "\xa0", "\x1c", "\x0b", "\u2028"]
SIDES = [None, 0, 1, 150, 199, 200, 201, 600, 601, 1000]


def random_caption(rng: np.random.Generator) -> str | None:
    pick = rng.integers(0, 10)
    if pick == 0:
        return None
    if pick == 1:
        return ""
    parts = [str(rng.choice(SPACES)) if rng.random() < 0.3 else ""]
    for _ in range(int(rng.integers(0, 6))):
        parts.append(str(rng.choice(WORDS)))
        parts.append(str(rng.choice(SPACES)))
    if rng.random() < 0.5:
        parts.pop()
    return "".join(parts)


def oracle_derived(caption: str | None, w: int | None, h: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "caption_words": None if caption is None else len(caption.split()),
        "caption_chars": None if caption is None else len(caption),
        "min_side": None,
        "max_side": None,
        "aspect_ratio": None,
        "pixels": None,
    }
    if w is not None and h is not None:
        lo, hi = min(w, h), max(w, h)
        out.update(min_side=lo, max_side=hi, pixels=w * h)
        out["aspect_ratio"] = hi / lo if lo > 0 else None
    return out


def random_meta(rng: np.random.Generator, size: int, prefix: str = "") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "uid": [uid_of(i) for i in range(size)],
            "caption": [random_caption(rng) for _ in range(size)],
            f"{prefix}width": [SIDES[int(i)] for i in rng.integers(0, len(SIDES), size)],
            f"{prefix}height": [SIDES[int(i)] for i in rng.integers(0, len(SIDES), size)],
            "clip": [
                None if rng.random() < 0.1 else float(v) for v in rng.integers(0, 4, size) / 4.0
            ],
        },
        schema={
            "uid": pl.String,
            "caption": pl.String,
            f"{prefix}width": pl.Int64,
            f"{prefix}height": pl.Int64,
            "clip": pl.Float64,
        },
    )


@pytest.mark.parametrize("prefix", ["", "original_"])
def test_derived_columns_match_python(prefix: str) -> None:
    rng = np.random.default_rng(7)
    frame = random_meta(rng, 400, prefix)
    derived = derived_columns(frame)
    for row in derived.to_dicts():
        expected = oracle_derived(row["caption"], row[f"{prefix}width"], row[f"{prefix}height"])
        for column, value in expected.items():
            got = row[column]
            if value is None or got is None:
                assert got is None and value is None, (column, row)
            else:
                assert got == pytest.approx(value, rel=1e-12), (column, row)


def test_derived_columns_from_text_and_absent_sources() -> None:
    frame = pl.DataFrame({"uid": [uid_of(0)], "text": ["two  words"]})
    derived = derived_columns(frame)
    assert derived["caption_words"].to_list() == [2]
    assert "min_side" not in derived.columns
    bare = pl.DataFrame({"uid": [uid_of(0)], "s": [1.0]})
    assert derived_columns(bare).columns == ["uid", "s"]


def oracle_condition(value: float | None, op: str, number: float) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return {
        ">": value > number,
        ">=": value >= number,
        "<": value < number,
        "<=": value <= number,
        "==": value == number,
        "!=": value != number,
    }[op]


BASIC_FILTER = ["caption_words > 2", "caption_chars > 5", "min_side >= 200", "aspect_ratio <= 3"]


def test_datacomp_basic_filter_matches_oracle(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    for trial in range(6):
        frame = random_meta(rng, int(rng.integers(50, 400)), "original_" if trial % 2 else "")
        source = write_pool(frame, tmp_path / f"meta{trial}.parquet")
        spec = SelectSpec(where=[Condition.parse(c) for c in BASIC_FILTER])
        out = tmp_path / f"basic{trial}"
        report = select_pool(source, spec, out=out)

        prefix = "original_" if trial % 2 else ""
        candidates = frame.to_dicts()
        counts = []
        for text in BASIC_FILTER:
            column, op, number = text.split()
            before = len(candidates)
            candidates = [
                r
                for r in candidates
                if oracle_condition(
                    oracle_derived(r["caption"], r[f"{prefix}width"], r[f"{prefix}height"])[column],
                    op,
                    float(number),
                )
            ]
            counts.append((before, len(candidates)))
        assert kept_uids(out) == {r["uid"] for r in candidates}
        assert [(s.before, s.after) for s in report.steps] == counts
        assert [s.step for s in report.steps] == [f"where {c}" for c in BASIC_FILTER]


def test_random_conditions_on_score_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    size = 300
    values = [
        None if rng.random() < 0.1 else float("nan") if rng.random() < 0.05 else float(v)
        for v in rng.integers(-3, 4, size) / 2.0
    ]
    ints = [None if rng.random() < 0.1 else int(v) for v in rng.integers(-3, 4, size)]
    frame = pl.DataFrame(
        {"uid": [uid_of(i) for i in range(size)], "s": values, "k": ints},
        schema={"uid": pl.String, "s": pl.Float64, "k": pl.Int64},
    )
    source = write_pool(frame, tmp_path / "s.parquet")
    rows = frame.to_dicts()
    for trial in range(30):
        conditions = []
        for _ in range(int(rng.integers(1, 3))):
            column = str(rng.choice(["s", "k"]))
            op = str(rng.choice([">", ">=", "<", "<=", "==", "!="]))
            number = float(rng.integers(-3, 4)) / 2.0
            spacing = " " if rng.random() < 0.5 else ""
            conditions.append(f"{column}{spacing}{op}{spacing}{number:g}")
        out = tmp_path / f"w{trial}"
        select_pool(source, SelectSpec(where=[Condition.parse(c) for c in conditions]), out=out)
        expected = set()
        for r in rows:
            ok = True
            for text in conditions:
                parsed = Condition.parse(text)
                ok = ok and oracle_condition(r[parsed.column], parsed.op, parsed.value)
            if ok:
                expected.add(r["uid"])
        assert kept_uids(out) == expected, conditions


# --- uid files, union and the decisions table ----------------------------------------------------


def pick(rng: np.random.Generator, rows: list[dict[str, Any]], p: float) -> list[str]:
    return [r["uid"] for r in rows if rng.random() < p]


def oracle_decisions(
    rows: list[dict[str, Any]], inter: set[str], excl: set[str], uni: set[str]
) -> tuple[dict[str, str], dict[str, str | None], dict[str, str]]:
    """Status, reason and kept_by per uid for intersect inter.npy, exclude excl.txt,
    where a > -0.5, top b:0.5:remainder, union uni.parquet: plain set logic in the documented
    order."""
    status: dict[str, str] = {}
    reason: dict[str, str | None] = {}
    kept_by: dict[str, str] = {}
    candidates = []
    for r in rows:
        if r["status"] != "scored":
            status[r["uid"]], reason[r["uid"]] = "failed", r["error"]
        else:
            candidates.append(r)
    steps: list[tuple[str, Any]] = [
        ("intersect inter.npy", lambda r: r["uid"] in inter),
        ("exclude excl.txt", lambda r: r["uid"] not in excl),
        ("where a > -0.5", lambda r: r["a"] > -0.5),
        ("top 0.5 of remainder by b", None),
    ]
    for label, test in steps:
        if test is None:  # the top step, over what is left now
            n = int(len(candidates) * 0.5)
            if n >= len(candidates):
                continue
            threshold = sorted((r["b"] for r in candidates), reverse=True)[n]
            test = lambda r, t=threshold: r["b"] >= t  # noqa: E731
        for r in candidates:
            if not test(r):
                status[r["uid"]], reason[r["uid"]] = "dropped", label
        candidates = [r for r in candidates if test(r)]
    for r in candidates:
        status[r["uid"]], reason[r["uid"]], kept_by[r["uid"]] = "kept", None, "criteria"
    for r in rows:
        if status[r["uid"]] == "dropped" and r["uid"] in uni:
            status[r["uid"]], reason[r["uid"]] = "kept", None
            kept_by[r["uid"]] = "union uni.parquet"
    return status, reason, kept_by


def test_intersect_exclude_union_and_decisions(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    for trial in range(6):
        size = int(rng.integers(20, 200))
        frame = random_pool(rng, size)
        source = write_pool(frame, tmp_path / f"pool{trial}.parquet")
        rows = frame.to_dicts()
        outside = [uid_of(10_000 + i) for i in range(5)]  # uids not in the pool

        inter = pick(rng, rows, 0.8) + outside[:2]
        excl = pick(rng, rows, 0.2) + outside[2:3]
        uni = pick(rng, rows, 0.15)
        uni += outside[3:]
        uni += [r["uid"] for r in rows if r["status"] != "scored"][:3]  # failed: never added

        folder = tmp_path / f"files{trial}"
        folder.mkdir()
        write_datacomp_npy(folder / "inter.npy", inter)
        excl_txt = "# excluded\n\n" + "\n".join(u.upper() for u in excl) + "\n"
        (folder / "excl.txt").write_text(excl_txt, encoding="utf-8")
        uni_rows = [u.upper() if k % 2 else u for k, u in enumerate(uni)]
        pl.DataFrame({"uid": uni_rows + uni_rows[:2]}).write_parquet(folder / "uni.parquet")

        spec = SelectSpec(
            intersect=[folder / "inter.npy"],
            exclude=[folder / "excl.txt"],
            where=[Condition.parse("a > -0.5")],
            top=[TopStep.parse("b:0.5:remainder")],
            union=[folder / "uni.parquet"],
        )
        out = tmp_path / f"sel{trial}"
        report = select_pool(source, spec, out=out)

        status, reason, kept_by = oracle_decisions(rows, set(inter), set(excl), set(uni))
        uni_set = set(uni)

        decisions = pl.read_parquet(out / "decisions.parquet")
        assert decisions.height == size  # every row exactly once
        assert decisions["uid"].to_list() == [r["uid"] for r in rows]
        assert decisions["key"].to_list() == [r["key"] for r in rows]
        assert decisions["shard"].to_list() == [r["shard"] for r in rows]
        statuses = decisions["status"].to_list()
        assert sum(statuses.count(k) for k in ("kept", "dropped", "failed")) == size
        for d in decisions.to_dicts():
            assert d["status"] == status[d["uid"]], d
            assert d["reason"] == reason[d["uid"]], d
            assert d["kept_by"] == kept_by.get(d["uid"]), d
        expected_kept = {u for u, s in status.items() if s == "kept"}
        assert kept_uids(out) == expected_kept
        assert report.selected == len(expected_kept)
        subset = pl.read_parquet(out / "subset.parquet")
        assert "status" not in subset.columns and "error" not in subset.columns
        assert {r["uid"]: r["kept_by"] for r in subset.to_dicts()} == {
            u: kept_by[u] for u in expected_kept
        }
        union_step = report.steps[-1]
        assert union_step.step == "union uni.parquet"
        assert union_step.after - union_step.before == sum(
            1 for b in kept_by.values() if b == "union uni.parquet"
        )
        absent = uni_set - {r["uid"] for r in rows if r["status"] == "scored"}
        assert (
            union_step.note == f"{len(absent)} uids of the file are not in the pool's scored rows"
        )


def test_pool_marks_bad_and_repeated_uids_failed(tmp_path: Path) -> None:
    uids = [uid_of(0), "not-a-uid", uid_of(1).upper(), uid_of(1), None, uid_of(2)]
    frame = pl.DataFrame(
        {
            "uid": uids,
            "status": ["scored", "scored", "scored", "scored", "scored", "skipped"],
            "s": [1.0, 2.0, 3.0, 4.0, 5.0, None],
        }
    )
    source = write_pool(frame, tmp_path / "p.parquet")
    report = select_pool(source, SelectSpec(), out=tmp_path / "o")
    decisions = pl.read_parquet(tmp_path / "o" / "decisions.parquet")
    assert decisions["status"].to_list() == [
        "kept",
        "failed",
        "kept",
        "failed",
        "failed",
        "failed",
    ]
    reasons = decisions["reason"].to_list()
    assert reasons[1].startswith("bad_uid") and reasons[4].startswith("bad_uid")
    assert reasons[3].startswith("duplicate_uid")
    assert reasons[5] == "status_skipped"
    assert report.failures == {"bad_uid": 2, "duplicate_uid": 1, "status_skipped": 1}
    assert kept_uids(tmp_path / "o") == {uid_of(0), uid_of(1)}


def test_pool_table_reads_a_folder_and_a_glob(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    parts = [random_pool(rng, 30), random_pool(rng, 20)]
    folder = tmp_path / "tables"
    for k, part in enumerate(parts):
        write_pool(part, folder / f"part{k}.parquet")
    (folder / "notes.txt").write_text("ignored", encoding="utf-8")
    whole = pl.concat(parts)
    by_folder = PoolTable.open(folder)
    assert by_folder.run is None
    assert by_folder.read().select(whole.columns).equals(whole)
    by_glob = PoolTable.open(str(folder / "part*.parquet"))
    assert by_glob.read().select(whole.columns).equals(whole)


# --- NormSim_2-D ---------------------------------------------------------------------------------


def oracle_normsim2_d(
    embeddings: np.ndarray, keep: int, rounds: int, sample_fraction: float, seed: int
) -> tuple[list[bool], np.ndarray, float]:
    """The docstring's procedure, literally, in float64; also the smallest relative score gap at
    any drop boundary (how close the comparison came to a tie)."""
    x = embeddings.astype(np.float64)
    rows = [x[i] / math.sqrt(float(x[i] @ x[i])) for i in range(x.shape[0])]
    n = len(rows)
    keep = max(0, min(keep, n))
    # The seeded initial sample: this is the one piece taken over as-is, since any other random
    # draw would be a different (equally valid) procedure.
    drawn = np.random.default_rng(seed).choice(
        n, size=max(1, math.ceil(sample_fraction * n)), replace=False
    )
    moment = sum(np.outer(rows[i], rows[i]) for i in sorted(int(j) for j in drawn))
    scores = np.zeros(n)
    remaining = list(range(n))
    chunk = math.ceil((n - keep) / rounds)
    gap = math.inf
    while len(remaining) > keep:
        current = {i: float(rows[i] @ moment @ rows[i]) for i in remaining}
        for i in remaining:
            scores[i] = current[i]
        drop = min(chunk, len(remaining) - keep)
        order = sorted(remaining, key=lambda i: (current[i], -i))
        if drop < len(order):
            a, b = current[order[drop - 1]], current[order[drop]]
            gap = min(gap, (b - a) / max(abs(b), 1e-12))
        dropped = set(order[:drop])
        remaining = [i for i in remaining if i not in dropped]
        if len(remaining) > keep:
            moment = sum(np.outer(rows[i], rows[i]) for i in remaining)
    if len(remaining) == n:
        for i in remaining:
            scores[i] = float(rows[i] @ moment @ rows[i])
    kept = set(remaining)
    return [i in kept for i in range(n)], scores, gap


def test_normsim2_d_matches_float64_oracle() -> None:
    rng = np.random.default_rng(31)
    checked = 0
    for trial in range(40):
        n = int(rng.integers(20, 201))
        d = int(rng.choice([4, 8, 16]))
        emb = rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, (n, 1))  # not unit norm
        emb = emb.astype(np.float16 if trial % 4 == 0 else np.float32)
        keep = int(rng.choice([0, 1, n // 3, n // 2, n - 1, n, n + 5]))
        rounds = int(rng.choice([1, 2, 3, 7, 10]))
        fraction = float(rng.choice([0.1, 0.25, 1.0]))
        seed = int(rng.integers(0, 1000))
        expected, expected_scores, gap = oracle_normsim2_d(emb, keep, rounds, fraction, seed)
        mask, scores = normsim2_d(emb, keep, rounds=rounds, sample_fraction=fraction, seed=seed)
        assert int(mask.sum()) == max(0, min(keep, n))
        assert scores.shape == (n,) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, expected_scores, rtol=2e-4, atol=1e-4)
        if gap < 1e-4:  # a near-tie: float32 may legitimately order it the other way
            continue
        assert mask.tolist() == expected, trial
        checked += 1
    assert checked >= 30


def test_normsim2_d_ties_drop_the_later_candidate() -> None:
    base = np.random.default_rng(3).standard_normal((3, 6))
    emb = np.concatenate([base, base, base]).astype(np.float32)  # rows 0,3,6 identical etc.
    mask, _ = normsim2_d(emb, 4, rounds=1, sample_fraction=1.0)
    expected, _, _ = oracle_normsim2_d(emb, 4, 1, 1.0, 0)
    assert mask.tolist() == expected
    # Among identical rows the earliest copies survive.
    for group in range(3):
        copies = mask[[group, group + 3, group + 6]].tolist()
        assert copies == sorted(copies, reverse=True)


def test_normsim2_d_seeding() -> None:
    emb = np.random.default_rng(8).standard_normal((200, 16)).astype(np.float32)
    first = normsim2_d(emb, 60, rounds=1, sample_fraction=0.1, seed=5)
    again = normsim2_d(emb, 60, rounds=1, sample_fraction=0.1, seed=5)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    others = [normsim2_d(emb, 60, rounds=1, sample_fraction=0.1, seed=s)[0] for s in range(6, 12)]
    assert any(not np.array_equal(first[0], other) for other in others)


def test_normsim2_d_argument_checks() -> None:
    emb = np.ones((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="rounds"):
        normsim2_d(emb, 1, rounds=0)
    with pytest.raises(ValueError, match="sample_fraction"):
        normsim2_d(emb, 1, sample_fraction=0.0)
    mask, scores = normsim2_d(np.zeros((0, 4), dtype=np.float32), 3)
    assert mask.shape == (0,) and scores.shape == (0,)


def test_normsim2_d_needs_a_run_folder(tmp_path: Path) -> None:
    source = write_pool(random_pool(np.random.default_rng(0), 10), tmp_path / "p.parquet")
    spec = SelectSpec(top=[TopStep.parse("normsim2_d:0.5")])
    with pytest.raises(InputError, match="run folder") as exc:
        select_pool(source, spec, out=tmp_path / "o")
    one_line(exc)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("negclip", "COLUMN:FRACTION"),
        (":0.3", "COLUMN:FRACTION"),
        ("a:0.3:pool:x", "COLUMN:FRACTION"),
        ("a:0.3:bogus", "'pool' or 'remainder'"),
        ("a:x", "not a number"),
        ("a:0", r"\(0, 1\]"),
        ("a:1.5", r"\(0, 1\]"),
        ("a:-0.2", r"\(0, 1\]"),
        ("a:nan", r"\(0, 1\]"),
    ],
)
def test_bad_top_spec(spec: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as exc:
        TopStep.parse(spec)
    assert spec in one_line(exc)


def test_top_spec_parses() -> None:
    assert TopStep.parse("negclip:0.3") == TopStep("negclip", 0.3, None)
    assert TopStep.parse("n:1:remainder") == TopStep("n", 1.0, "remainder")
    assert Condition.parse("  caption_words>2 ") == Condition("caption_words", ">", 2.0)
    assert Condition.parse("s <= -1e-3") == Condition("s", "<=", -0.001)


@pytest.mark.parametrize(
    "text", ["caption_words >> 2", "a > x", "2 > a", "a 3", "", "a > 1 2", "a = 1", "a-b > 1"]
)
def test_bad_where(text: str) -> None:
    with pytest.raises(InputError, match="--where") as exc:
        Condition.parse(text)
    one_line(exc)


@pytest.fixture
def pool_file(tmp_path: Path) -> Path:
    frame = random_pool(np.random.default_rng(9), 40).with_columns(pl.lit("a cat").alias("caption"))
    return write_pool(frame, tmp_path / "pool.parquet")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (SelectSpec(top=[TopStep("nope", 0.5)]), r"no column 'nope' \(numeric columns: a, b"),
        (SelectSpec(where=[Condition("nope", ">", 1.0)]), "no column 'nope'"),
        (SelectSpec(top=[TopStep("caption", 0.5)]), "'caption' is not numeric"),
        (SelectSpec(top=[TopStep("status", 0.5)]), "'status' is not numeric"),
        (SelectSpec(where=[Condition("min_side", ">=", 200.0)]), "needs caption or width"),
        (
            SelectSpec(where=[Condition("a", ">", 0.0)], top=[TopStep("b", 0.5)]),
            r"b:0.5:pool or b:0.5:remainder",
        ),
        (SelectSpec(top=[TopStep("a", 0.5), TopStep("b", 0.5)]), "restricted set"),
        (SelectSpec(top=[TopStep("a", 0.5), TopStep("b", 0.5, "pool")]), None),
    ],
)
def test_select_errors(
    tmp_path: Path, pool_file: Path, spec: SelectSpec, match: str | None
) -> None:
    if match is None:
        select_pool(pool_file, spec, out=tmp_path / "ok")
        return
    with pytest.raises(InputError, match=match) as exc:
        select_pool(pool_file, spec, out=tmp_path / "o")
    one_line(exc)
    assert not (tmp_path / "o" / "subset.npy").exists()


def test_restriction_by_uid_file_needs_a_base(tmp_path: Path, pool_file: Path) -> None:
    write_datacomp_npy(tmp_path / "keep.npy", [uid_of(1)])
    spec = SelectSpec(intersect=[tmp_path / "keep.npy"], top=[TopStep("a", 0.5)])
    with pytest.raises(InputError, match="pool or of the remainder"):
        select_pool(pool_file, spec, out=tmp_path / "o")


def test_table_without_uid_and_missing_source(tmp_path: Path) -> None:
    path = write_pool(pl.DataFrame({"key": ["a"], "s": [1.0]}), tmp_path / "nouid.parquet")
    with pytest.raises(InputError, match="no 'uid' column") as exc:
        select_pool(path, SelectSpec(), out=tmp_path / "o")
    one_line(exc)
    with pytest.raises(InputError, match="no pool table found") as exc:
        select_pool(tmp_path / "missing" / "*.parquet", SelectSpec(), out=tmp_path / "o")
    one_line(exc)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 nope")
    with pytest.raises(InputError, match="cannot read pool table") as exc:
        select_pool(broken, SelectSpec(), out=tmp_path / "o")


# --- outputs -------------------------------------------------------------------------------------


def test_outputs_are_datacomp_and_reproducible(tmp_path: Path) -> None:
    rng = np.random.default_rng(77)
    frame = random_pool(rng, 180)
    source = write_pool(frame, tmp_path / "pool.parquet")
    spec = SelectSpec(
        top=[TopStep.parse("a:0.4"), TopStep.parse("b:0.5:remainder")],
        where=[Condition.parse("b > -2")],
    )
    spec.top[0] = TopStep("a", 0.4, "pool")  # after --where every step states its base
    first = tmp_path / "first"
    report = select_pool(source, spec, out=first)

    kept = pl.read_parquet(first / "subset.parquet")["uid"].to_list()
    array = np.load(first / "subset.npy", allow_pickle=False)
    assert array.dtype == DATACOMP_DTYPE
    pairs = [(int(a), int(b)) for a, b in array.tolist()]
    assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs)
    assert [f"{a:016x}{b:016x}" for a, b in pairs] == sorted(kept)
    assert len(kept) == report.selected > 0
    pool_uids = frame["uid"].to_list()
    assert_resharder_accepts(first / "subset.npy", kept, [u for u in pool_uids if u not in kept])

    record = json.loads((first / "select.json").read_text(encoding="utf-8"))
    assert record["selected"] == report.selected
    assert record["rows"] == 180
    assert record["spec"]["top"][1] == {"column": "b", "fraction": 0.5, "base": "remainder"}
    assert [s["before"] for s in record["steps"]] == [s.before for s in report.steps]

    second = tmp_path / "second"
    select_pool(source, spec, out=second)
    select_pool(source, spec, out=first)  # rerun over an existing output folder
    for name in ("subset.npy", "decisions.parquet", "subset.parquet"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    first_json = json.loads((first / "select.json").read_text(encoding="utf-8"))
    second_json = json.loads((second / "select.json").read_text(encoding="utf-8"))
    first_json.pop("out"), second_json.pop("out")
    assert first_json == second_json
    assert sorted(p.name for p in first.iterdir()) == [
        ".curate",  # the stage's log only
        "decisions.parquet",
        "select.json",
        "subset.npy",
        "subset.parquet",
    ]
    log = (first / ".curate/select/logs/reduce.log").read_text(encoding="utf-8")
    assert log.count("select: finished") == 2 and '"after": 34' in log
