"""Uid files (DataComp `.npy`, parquet, text) against the DataComp layout written out by hand.

The oracles build the expected (u0, u1) integers with Python's `int(hex, 16)` and sort plain
tuples; nothing here reuses curate's conversion code.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from resharder_oracle import assert_resharder_accepts

from curate.errors import InputError
from curate.io import uid_files
from curate.io.uid_files import (
    DATACOMP_DTYPE,
    first_occurrences,
    member_mask,
    pairs_to_uids,
    read_uid_file,
    read_uid_pairs,
    uid_pairs,
    uids_to_pairs,
    write_datacomp_npy,
    write_datacomp_pairs,
)


def random_uids(rng: np.random.Generator, n: int) -> list[str]:
    return ["".join(f"{b:02x}" for b in rng.integers(0, 256, 16)) for _ in range(n)]


def edge_uids() -> list[str]:
    """Extremes of both halves, including the uint64 high bit that int64 would flip negative."""
    return [
        "ff" * 16,
        "00" * 16,
        "80" + "00" * 15,
        "00" * 8 + "80" + "00" * 7,
        "7f" + "ff" * 7 + "00" * 8,
        "00" * 8 + "ff" * 8,
        "ff" * 8 + "00" * 8,
    ]


def one_line(exc: pytest.ExceptionInfo[InputError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- writing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_write_datacomp_npy_matches_hand_built_layout(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    uids = random_uids(rng, int(rng.integers(0, 60))) + edge_uids()
    # Pairs that share u0 and differ only in u1: the sort must order by u1 within u0.
    uids += ["ab" * 8 + f"{int(v):016x}" for v in rng.integers(0, 2**63, 5, dtype=np.uint64)]
    uids += [uids[i] for i in rng.integers(0, len(uids), 10)]  # repeats
    given = [u.upper() if k % 3 == 0 else u for k, u in enumerate(uids)]  # mixed case
    rng.shuffle(given)

    path = tmp_path / "sub" / "subset.npy"
    count = write_datacomp_npy(path, given)

    expected_pairs = sorted({(int(u[:16], 16), int(u[16:], 16)) for u in uids})
    assert count == len(expected_pairs)
    array = np.load(path, allow_pickle=False)
    # Exactly what DataComp's resharder asserts; numpy compares structured dtypes by field name.
    assert array.dtype == np.dtype("u8,u8")
    assert array.dtype.names == ("f0", "f1")
    assert array.dtype.descr == [("f0", "<u8"), ("f1", "<u8")]
    assert array.ndim == 1
    got_pairs = [(int(a), int(b)) for a, b in zip(array["f0"], array["f1"], strict=True)]
    assert got_pairs == expected_pairs  # sorted by (u0, u1), unique, exact 64-bit values
    outside = [u for u in random_uids(rng, 20) if u not in {x.lower() for x in uids}]
    assert_resharder_accepts(path, [u.lower() for u in uids], outside)
    assert np.isin(array, np.array(expected_pairs[:3], dtype="u8,u8")).sum() == min(3, count)

    back = read_uid_file(path)
    assert back.was_sorted
    assert back.duplicates == 0
    assert back.uids == sorted({u.lower() for u in uids})
    assert back.table is None


def test_write_handles_extreme_halves_exactly(tmp_path: Path) -> None:
    path = tmp_path / "edge.npy"
    write_datacomp_npy(path, edge_uids())
    array = np.load(path)
    by_uid = {f"{int(a):016x}{int(b):016x}": (int(a), int(b)) for a, b in array.tolist()}
    for uid in edge_uids():
        assert by_uid[uid] == (int(uid[:16], 16), int(uid[16:], 16))
    assert (2**64 - 1, 2**64 - 1) in by_uid.values()
    assert (0, 0) in by_uid.values()


def test_write_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.npy"
    assert write_datacomp_npy(path, []) == 0
    array = np.load(path)
    assert array.shape == (0,)
    assert array.dtype == DATACOMP_DTYPE
    assert read_uid_file(path).uids == []


@pytest.mark.parametrize("seed", range(5))
def test_pairs_round_trip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    uids = random_uids(rng, 40) + edge_uids()
    pairs = uids_to_pairs(uids)
    assert pairs.dtype == DATACOMP_DTYPE
    assert [(int(a), int(b)) for a, b in pairs.tolist()] == [
        (int(u[:16], 16), int(u[16:], 16)) for u in uids
    ]
    assert pairs_to_uids(pairs) == uids
    renamed = pairs.astype(np.dtype([("f0", "<u8"), ("f1", "<u8")]))
    assert pairs_to_uids(renamed) == uids


# --- reading .npy --------------------------------------------------------------------------------


def datacomp_style(pairs: list[tuple[int, int]]) -> np.ndarray:
    """What DataComp's own tools write: `np.array(..., dtype="u8,u8")`, fields f0/f1."""
    return np.array(pairs, dtype="u8,u8")


def oracle_sorted(pairs: list[tuple[int, int]]) -> bool:
    return all(pairs[i] <= pairs[i + 1] for i in range(len(pairs) - 1))


@pytest.mark.parametrize("seed", range(10))
def test_read_datacomp_f0_f1_file(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    uids = random_uids(rng, int(rng.integers(1, 30))) + edge_uids()
    # Shared u0 with varied u1, so the sortedness check must look at u1 when u0 ties.
    uids += ["12" * 8 + f"{int(v):016x}" for v in rng.integers(0, 2**63, 4, dtype=np.uint64)]
    uids += [uids[i] for i in rng.integers(0, len(uids), int(rng.integers(0, 5)))]
    # Even seeds: a sorted DataComp file (hex order is (u0, u1) order); odd: shuffled.
    uids = sorted(uids) if seed % 2 == 0 else [uids[i] for i in rng.permutation(len(uids))]
    pairs = [(int(u[:16], 16), int(u[16:], 16)) for u in uids]
    array = datacomp_style(pairs)
    assert array.dtype.names == ("f0", "f1")
    path = tmp_path / "datacomp.npy"
    np.save(path, array)

    got = read_uid_file(path)
    assert got.uids == uids  # file order kept, repeats kept
    assert got.was_sorted == oracle_sorted(pairs)
    assert got.duplicates == len(uids) - len(set(uids))
    assert got.repeated() == Counter({u: c for u, c in Counter(uids).items() if c > 1})


def test_read_unsorted_and_u1_only_unsorted(tmp_path: Path) -> None:
    path = tmp_path / "u.npy"
    np.save(path, datacomp_style([(5, 1), (2, 9)]))
    assert read_uid_file(path).was_sorted is False
    np.save(path, datacomp_style([(5, 2), (5, 1)]))  # u0 ties, u1 descends
    assert read_uid_file(path).was_sorted is False
    np.save(path, datacomp_style([(5, 1), (5, 1), (5, 2), (6, 0)]))
    got = read_uid_file(path)
    assert got.was_sorted is True
    assert got.duplicates == 1
    assert got.repeated() == Counter({f"{5:016x}{1:016x}": 2})


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(3, dtype=np.float64),
        np.zeros((3, 2), dtype=np.uint64),
        np.zeros(3, dtype=[("u0", "<i8"), ("u1", "<i8")]),
        np.zeros(3, dtype=[("u0", "<u4"), ("u1", "<u4")]),
        np.zeros(3, dtype=[("u0", "<u8"), ("u1", "<u8"), ("u2", "<u8")]),
        np.zeros(3, dtype=[("u0", "<u8")]),
        np.zeros((2, 2), dtype=[("u0", "<u8"), ("u1", "<u8")]),
        np.zeros(3, dtype=[("u0", ">u8"), ("u1", ">u8")]),
    ],
    ids=["float", "2d-uint", "signed", "uint32", "three-fields", "one-field", "2d-struct", "be"],
)
def test_wrong_npy_dtype(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(InputError, match="not a DataComp subset") as exc:
        read_uid_file(path)
    assert str(path) in one_line(exc)


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
@pytest.mark.parametrize("seed", range(4))
def test_read_raw_memmap_records(tmp_path: Path, suffix: str, seed: int) -> None:
    """DataComp also accepts a headerless memmap of 16-byte little-endian (u64, u64) records."""
    rng = np.random.default_rng(seed)
    uids = random_uids(rng, int(rng.integers(1, 40))) + edge_uids()
    uids = sorted(uids) if seed % 2 == 0 else uids
    raw = b"".join(
        int(u[:16], 16).to_bytes(8, "little") + int(u[16:], 16).to_bytes(8, "little") for u in uids
    )
    path = tmp_path / f"subset{suffix}"
    path.write_bytes(raw)
    got = read_uid_file(path)
    assert got.uids == uids
    assert got.was_sorted == (uids == sorted(uids))
    if seed % 2 == 0:
        assert_resharder_accepts(path, uids)  # the resharder reads the same file the same way


def test_unreadable_npy(tmp_path: Path) -> None:
    path = tmp_path / "garbage.npy"
    path.write_bytes(b"\x93NUMPY not numpy at all")
    with pytest.raises(InputError, match=r"not a readable \.npy") as exc:
        read_uid_file(path)
    one_line(exc)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(bytes(range(17)))
    with pytest.raises(InputError, match=r"not a multiple of 16\): saw 17 bytes") as exc:
        read_uid_file(odd)
    one_line(exc)
    text = tmp_path / "uids.npy"
    text.write_text("0123456789abcdef0123456789abcdef\n" * 2)  # 66 bytes
    with pytest.raises(InputError, match="saw 66 bytes") as exc:
        read_uid_file(text)
    one_line(exc)
    text.write_text("0123456789abcdef0123456789abcdef")  # 32 bytes: a multiple of 16
    with pytest.raises(InputError, match=r"looks like text.*\.txt") as exc:
        read_uid_file(text)
    one_line(exc)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array(["a", None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError) as exc:
        read_uid_file(objects)
    one_line(exc)


# --- reading text --------------------------------------------------------------------------------


def test_text_with_comments_blank_lines_and_case(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    uids = random_uids(rng, 6)
    lines = [
        "# a header comment",
        "",
        f"  {uids[0].upper()}  ",
        uids[1],
        "\t",
        f"   # indented comment {uids[5]}",
        uids[2].upper(),
        uids[0],
        uids[3] + "\r",
        "",
        uids[4],
    ]
    path = tmp_path / "keep.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = read_uid_file(path)
    assert got.uids == [uids[0], uids[1], uids[2], uids[0], uids[3], uids[4]]
    assert got.duplicates == 1
    assert got.repeated() == Counter({uids[0]: 2})
    assert got.was_sorted is True and got.table is None


@pytest.mark.parametrize(
    "bad", ["xyz", "ab" * 15, "ab" * 17, "g" * 32, "ab" * 8 + " " + "ab" * 8, "0x" + "ab" * 15]
)
def test_text_bad_line_names_its_line_number(tmp_path: Path, bad: str) -> None:
    good = random_uids(np.random.default_rng(1), 3)
    lines = ["# comment", good[0], "", good[1], bad, good[2]]  # bad is on line 5
    path = tmp_path / "uids.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(InputError, match=r"line 5\b") as exc:
        read_uid_file(path)
    message = one_line(exc)
    assert str(path) in message
    assert "32-hex" in message


def test_text_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"\xff\xfe\x00garbage\xe9")
    with pytest.raises(InputError, match="UTF-8") as exc:
        read_uid_file(path)
    one_line(exc)


# --- reading parquet and folders -----------------------------------------------------------------


def test_parquet_keeps_table_and_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    uids = random_uids(rng, 8)
    uids.append(uids[3].upper())
    path = tmp_path / "pick.parquet"
    pq.write_table(pa.table({"uid": uids, "score": list(range(len(uids)))}), path)
    got = read_uid_file(path)
    assert got.uids == [u.lower() for u in uids]
    assert got.duplicates == 1
    assert got.table is not None
    assert got.table.column("score").to_pylist() == list(range(len(uids)))


def test_parquet_without_uid_column(tmp_path: Path) -> None:
    path = tmp_path / "nouid.parquet"
    pq.write_table(pa.table({"key": ["a"], "score": [1.0]}), path)
    with pytest.raises(InputError, match="no 'uid' column") as exc:
        read_uid_file(path)
    message = one_line(exc)
    assert "key" in message and "score" in message  # lists what is there


def test_parquet_bad_uid_names_row(tmp_path: Path) -> None:
    good = random_uids(np.random.default_rng(3), 2)
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"uid": [good[0], good[1], None]}), path)
    with pytest.raises(InputError, match="row 2") as exc:
        read_uid_file(path)
    one_line(exc)


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="not a readable parquet") as exc:
        read_uid_file(path)
    one_line(exc)


def test_folder_means_its_subset_parquet(tmp_path: Path) -> None:
    uids = random_uids(np.random.default_rng(4), 5)
    folder = tmp_path / "selected"
    folder.mkdir()
    pq.write_table(pa.table({"uid": uids, "kept_by": ["criteria"] * 5}), folder / "subset.parquet")
    np.save(folder / "subset.npy", datacomp_style([(1, 2)]))  # not what a folder means
    got = read_uid_file(folder)
    assert got.uids == uids
    assert got.path.endswith("subset.parquet")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"without subset\.parquet") as exc:
        read_uid_file(empty)
    one_line(exc)


def test_missing_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as exc:
        read_uid_file(tmp_path / "nope.npy")
    one_line(exc)
    odd = tmp_path / "uids.json"
    odd.write_text("[]", encoding="utf-8")
    with pytest.raises(InputError, match="unknown uid file type") as exc:
        read_uid_file(odd)
    assert ".npy" in one_line(exc)


# --- compact uid columns (select's reduce) ------------------------------------------------------


def colliding_uids(rng: np.random.Generator, n: int) -> list[str]:
    """Random uids where many share their first 64 bits (forcing the lo comparisons) and many
    repeat whole, in random order; upper case now and then."""
    heads = random_uids(rng, max(1, n // 6))
    uids = []
    for _ in range(n):
        head = heads[int(rng.integers(len(heads)))][:16]
        tail = random_uids(rng, 1)[0][16:] if rng.random() < 0.6 else "0" * 15 + "1"
        uid = head + tail
        uids.append(uid.upper() if rng.random() < 0.1 else uid)
    return uids


def test_uid_pairs_match_int_parsing_and_flag_bad_values() -> None:
    rng = np.random.default_rng(11)
    good = random_uids(rng, 50)
    values = [*good, good[2].upper(), None, "xyz", good[0][:31], good[1] + "0", "g" * 32]
    hi, lo, valid = uid_pairs(pa.array(values))
    hex_digits = set("0123456789abcdefABCDEF")
    expected = [v is not None and len(v) == 32 and set(v) <= hex_digits for v in values]
    assert valid.tolist() == expected
    for i, v in enumerate(values):
        if v is not None and expected[i]:
            assert (int(hi[i]), int(lo[i])) == (int(v[:16], 16), int(v[16:], 16))
        else:
            assert hi[i] == 0 and lo[i] == 0
    hi, lo, valid = uid_pairs(pa.array([1, 2], type=pa.int64()))
    assert not valid.any()


@pytest.mark.parametrize("seed", range(5))
def test_first_occurrences_equal_a_set_walk(seed: int) -> None:
    rng = np.random.default_rng(seed)
    uids = colliding_uids(rng, 400)
    candidates = rng.random(len(uids)) < 0.8
    hi, lo, _ = uid_pairs(pa.array(uids))
    seen: set[str] = set()
    expected = []
    for uid, candidate in zip(uids, candidates, strict=True):
        first = bool(candidate) and uid.lower() not in seen
        if candidate:
            seen.add(uid.lower())
        expected.append(first)
    assert first_occurrences(hi, lo, candidates).tolist() == expected


@pytest.mark.parametrize("seed", range(5))
def test_member_mask_equals_set_membership(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    pool = colliding_uids(rng, 300)
    wanted = [u.lower() for u in rng.choice(pool, 80)] + random_uids(rng, 40) + [pool[0]] * 3
    where = rng.random(len(pool)) < 0.7
    hi, lo, _ = uid_pairs(pa.array(pool))
    w_hi, w_lo, _ = uid_pairs(pa.array(wanted))
    rows, found = member_mask(hi, lo, w_hi, w_lo, where)
    wanted_set = {u.lower() for u in wanted}
    assert rows.tolist() == [u.lower() in wanted_set for u in pool]
    present = {u.lower() for u, w in zip(pool, where, strict=True) if w}
    assert found.tolist() == [u in present for u in sorted(wanted_set)]
    s_hi, s_lo, _ = uid_pairs(pa.array(sorted(wanted_set)))  # a DataComp file's order
    sorted_rows, sorted_found = member_mask(hi, lo, s_hi, s_lo, where)
    assert (sorted_rows == rows).all() and (sorted_found == found).all()


def test_write_datacomp_pairs_writes_the_same_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    uids = colliding_uids(rng, 200)
    hi, lo, _ = uid_pairs(pa.array(uids))
    assert write_datacomp_pairs(tmp_path / "a.npy", hi, lo) == len({u.lower() for u in uids})
    # the oracle: Python ints of the hex halves, sorted tuples, saved by numpy itself
    expected = sorted({(int(u[:16], 16), int(u[16:], 16)) for u in uids})
    np.save(tmp_path / "b.npy", np.array(expected, dtype=DATACOMP_DTYPE), allow_pickle=False)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert write_datacomp_pairs(tmp_path / "e.npy", hi[:0], lo[:0]) == 0


def test_read_uid_pairs_equals_read_uid_file_for_every_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    uids = [*random_uids(rng, 30), "A" * 32]
    uids.append(uids[3])
    write_datacomp_npy(tmp_path / "s.npy", uids)
    pq.write_table(pa.table({"uid": uids}), tmp_path / "s.parquet")
    (tmp_path / "s.txt").write_text("uid\n" + "\n".join(uids) + "\n")
    write_datacomp_npy(tmp_path / "r.npy", uids)
    raw = np.load(tmp_path / "r.npy")
    raw.tofile(tmp_path / "s.bin")
    for name in ("s.npy", "s.parquet", "s.txt", "s.bin"):
        hi, lo = read_uid_pairs(tmp_path / name)
        expected = [(int(u[:16], 16), int(u[16:], 16)) for u in read_uid_file(tmp_path / name).uids]
        assert list(zip(hi.tolist(), lo.tolist(), strict=True)) == expected, name
    pq.write_table(pa.table({"uid": [uids[0], "nope"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="row 1 is not a 32-hex"):
        read_uid_pairs(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"id": [uids[0]]}), tmp_path / "nouid.parquet")
    with pytest.raises(InputError, match="no 'uid' column"):
        read_uid_pairs(tmp_path / "nouid.parquet")


@pytest.mark.parametrize("block", [1, 7, 33, 1 << 24])
@pytest.mark.parametrize("seed", range(4))
def test_text_pairs_read_in_blocks_equal_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, seed: int
) -> None:
    """Blocks cut anywhere (inside a uid, between \\r and \\n) give the lines of the whole file."""
    monkeypatch.setattr(uid_files, "_TEXT_BLOCK", block)
    rng = np.random.default_rng(seed)
    uids = random_uids(rng, 40)
    endings = ["\n", "\r\n", "\r", "\x0c", "\u2028"]
    lines = [] if seed % 2 else ["  # comment", "", "UID"]
    for u in uids:
        lines.append(f"  {u.upper() if rng.random() < 0.3 else u}\t")
        if rng.random() < 0.2:
            lines.append("#" + u)
    text = "".join(line + endings[int(rng.integers(len(endings)))] for line in lines)
    path = tmp_path / "uids.txt"
    path.write_bytes(text.encode("utf-8"))
    hi, lo = read_uid_pairs(path)
    assert list(zip(hi.tolist(), lo.tolist(), strict=True)) == [
        (int(u[:16], 16), int(u[16:], 16)) for u in uids
    ]
    assert [f"{h:016x}{v:016x}" for h, v in zip(hi.tolist(), lo.tolist(), strict=True)] == (
        read_uid_file(path).uids
    )
    bad_line = 1 + int(rng.integers(len(lines)))
    lines.insert(bad_line - 1, "ab" * 15)
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(InputError, match=rf"line {bad_line} is not a 32-hex"):
        read_uid_pairs(path)
    # Decoding errors: the same message as the whole-file reader (positions from the file
    # start), and before a bad line that comes earlier in the file.
    body = "\n".join(lines).encode()
    for broken in (body + b"\xff\n", "ключ\n".encode() + body[:40] + b"\xe9x", body + b"\xd0"):
        path.write_bytes(broken)
        with pytest.raises(InputError) as whole:
            read_uid_file(path)
        with pytest.raises(InputError) as blocks:
            read_uid_pairs(path)
        assert str(blocks.value) == str(whole.value)
        assert "not a readable UTF-8 text file" in str(blocks.value)
