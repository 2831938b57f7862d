"""write_subset: verbatim, deterministic, resumable WebDataset shards holding exactly a subset."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import shutil
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardkit import write_tar
from webdataset.tariterators import group_by_keys, tar_file_expander

from curate.demo.synthetic import generate_shards
from curate.errors import InputError
from curate.io.tar_index import index_shard
from curate.io.tar_writer import DeterministicTarWriter
from curate.io.uid_files import uids_to_pairs
from curate.writing import stage
from curate.writing.stage import SIDECAR_SCHEMA, WriteOptions, WriteReport, write_subset

TAR_NAME = re.compile(r"^\d{5}\.tar$")


@dataclass
class Inputs:
    """Input shards and what they hold, in input order."""

    folder: Path
    urls: list[str]
    uids: list[str]  # every sample's uid, input order
    key: dict[str, str]  # uid -> key (keys are unique across the shards)
    shard: dict[str, str]  # uid -> shard file name
    members: dict[str, dict[str, bytes]]  # key -> ext -> bytes


def _inputs(folder: Path) -> Inputs:
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    uids: list[str] = []
    key: dict[str, str] = {}
    shard: dict[str, str] = {}
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    for url in urls:
        for s in index_shard(url).samples:
            assert s.error is None
            uids.append(s.uid)
            key[s.uid] = s.key
            shard[s.uid] = Path(url).name
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                k, _, ext = m.name.partition(".")
                fobj = tf.extractfile(m)
                assert fobj is not None
                members[k][ext] = fobj.read()
    assert len(set(key.values())) == len(uids)
    return Inputs(folder, urls, uids, key, shard, dict(members))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """Realistic img2dataset-style shards (uids derived from shard and key): 3 x 40 samples."""
    folder = tmp_path_factory.mktemp("synth")
    generate_shards(folder, num_samples=120, samples_per_shard=40, image_size=24, seed=3)
    return _inputs(folder)


def _fixed_shards(folder: Path, n_shards: int, per_shard: int, seed: int = 0) -> None:
    """Shards whose samples all take the same tar bytes; each json carries a DataComp uid."""
    rng = np.random.default_rng(seed)
    for s in range(n_shards):
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            meta = {
                "uid": rng.bytes(16).hex(),
                "key": key,
                "url": f"http://example.test/{key}.jpg",
                "width": 8,
                "height": 6,
            }
            members += [
                (f"{key}.jpg", rng.bytes(300)),
                (f"{key}.txt", f" caption {key} ".encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ]
        write_tar(folder / f"{s:05d}.tar", members)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """4 x 50 samples of equal tar size, with DataComp uids in their json."""
    folder = tmp_path_factory.mktemp("fixed")
    _fixed_shards(folder, 4, 50)
    return _inputs(folder)


def _absent(n: int, seed: int) -> list[str]:
    """`n` distinct uids that no input shard holds."""
    rng = np.random.default_rng(seed)
    return [rng.bytes(16).hex() for _ in range(n)]


def _txt(path: Path, uids: list[str]) -> Path:
    path.write_text("".join(f"{u}\n" for u in uids))
    return path


def _parquet(path: Path, columns: dict[str, list[object]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _write(inputs: Inputs | list[str], subset: Path, out: Path, **kw: object) -> WriteReport:
    urls = inputs.urls if isinstance(inputs, Inputs) else inputs
    kw.setdefault("workers", 1)
    report = write_subset(urls, subset, out=out, options=WriteOptions(**kw))  # type: ignore[arg-type]
    _check_accounting(report)
    return report


def _check_accounting(report: WriteReport) -> None:
    assert report.subset_uids == (
        report.written_uids
        + report.missing_uids
        + sum(report.failed_uids.values())
        + report.zero_copies
    )


def _tars(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if TAR_NAME.match(p.name)) if out.is_dir() else []


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _wds(tars: list[Path]) -> list[dict[str, object]]:
    """The samples webdataset's own tar reader and grouping yield (``wds.WebDataset`` minus its
    opener, which leaves the files open for the garbage collector)."""
    samples: list[dict[str, object]] = []
    for tar in tars:
        with open(tar, "rb") as fh:
            samples += group_by_keys(tar_file_expander([{"url": str(tar), "stream": fh}]))
    return samples


def _samples(out: Path) -> list[dict[str, object]]:
    """Every sample of the output, read by webdataset, in shard order."""
    return _wds(_tars(out))


def _member_names(tar: Path) -> list[str]:
    with tarfile.open(tar) as tf:
        return tf.getnames()


def _keys(tar: Path) -> list[str]:
    return list(dict.fromkeys(n.partition(".")[0] for n in _member_names(tar)))


def _sidecar(out: Path, tar: Path) -> list[dict[str, object]]:
    return pq.read_table(out / f"{tar.stem}.parquet").to_pylist()


# --- 1. what comes out is exactly the subset, byte for byte -----------------------------------


def test_webdataset_reads_exactly_the_subset(synth: Inputs, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    chosen = [synth.uids[i] for i in sorted(rng.choice(len(synth.uids), 50, replace=False))]
    out = tmp_path / "out"
    report = _write(synth, _txt(tmp_path / "subset.txt", chosen), out, max_samples=16)
    assert report.written_uids == report.written_samples == 50
    assert report.missing_uids == 0 and report.failed_uids == {}
    assert report.not_selected == 70 and report.input_samples == 120

    samples = _samples(out)
    assert len(samples) == 50
    by_key = {synth.key[u]: u for u in chosen}
    assert {s["__key__"] for s in samples} == set(by_key)
    for s in samples:
        key = str(s["__key__"])
        exts = {k for k in s if not k.startswith("__")}
        assert exts == {"jpg", "txt", "json"}
        for ext in exts:
            assert s[ext] == synth.members[key][ext], (key, ext)
    uids = [row["uid"] for tar in _tars(out) for row in _sidecar(out, tar)]
    assert sorted(uids) == sorted(chosen)
    assert [p.name for p in _tars(out)] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert report.train_data == str(out / "{00000..00003}.tar")


# --- 2. determinism ----------------------------------------------------------------------------


def test_same_subset_gives_identical_bytes(synth: Inputs, tmp_path: Path) -> None:
    chosen = synth.uids[::2] + [synth.uids[1]] * 2  # one uid three times
    subset = tmp_path / "subset.npy"
    np.save(subset, uids_to_pairs(sorted(chosen)), allow_pickle=False)
    opts = {"max_samples": 9, "shuffle": True, "seed": 11, "duplicates": "repeat"}
    a = _write(synth, subset, tmp_path / "a", workers=1, **opts)
    b = _write(synth, subset, tmp_path / "b", workers=3, **opts)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a == files_b
    assert {"manifest.json", "sizes.json", "00000.tar", "00000.parquet", "00000_stats.json"} <= set(
        files_a
    )
    assert a.shards == b.shards == len(_tars(tmp_path / "a")) == 7
    assert a.written_samples == 62


# --- 3. kill and resume -------------------------------------------------------------------------


def _check_visible_shards_whole(out: Path) -> list[Path]:
    tars = _tars(out)
    for tar in tars:
        stats = json.loads((out / f"{tar.stem}_stats.json").read_text())
        data = tar.read_bytes()
        assert stats["curate"]["bytes"] == len(data)
        assert stats["curate"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert stats["count"] == len(_keys(tar)) == len(_sidecar(out, tar))
    leftovers = [p.name for p in out.iterdir() if ".tar" in p.name and p not in tars]
    assert leftovers == []
    return tars


def test_killed_write_leaves_whole_shards_and_resumes(
    fixed: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subset = _txt(tmp_path / "subset.txt", fixed.uids)
    opts = {"max_samples": 15, "shuffle": True, "seed": 5}
    clean = tmp_path / "clean"
    full = _write(fixed, subset, clean, **opts)
    assert full.shards == 14

    real = stage._copy_sample
    calls = 0

    def dying(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls > 40:  # in the middle of the third shard
            raise RuntimeError("killed")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(stage, "_copy_sample", dying)
        with pytest.raises(RuntimeError, match="killed"):
            _write(fixed, subset, out, **opts)
    tars = _check_visible_shards_whole(out)
    assert [p.name for p in tars] == ["00000.tar", "00001.tar"]
    assert not (out / "manifest.json").exists() and not (out / "sizes.json").exists()
    # A hard kill leaves atomic_path's temporary file behind.
    (out / ".00002.tar.0123abcd.tmp").write_bytes(b"partial")

    resumed = _write(fixed, subset, out, **opts)
    assert resumed.shards_skipped == 2 and resumed.shards_written == 12
    assert _files(out) == _files(clean)

    # Damaged outputs are written again; the intact ones are kept.
    tar1, tar3 = out / "00001.tar", out / "00003.tar"
    tar1.write_bytes(tar1.read_bytes()[:5000])
    tar3.write_bytes(tar3.read_bytes() + b"\0" * 10240)
    (out / "00005.tar").unlink()
    again = _write(fixed, subset, out, **opts)
    assert again.shards_written == 3 and again.shards_skipped == 11
    assert _files(out) == _files(clean)


def test_killed_between_stats_and_tar_rename(
    fixed: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new plan's stats record beside an old tar of the same size must not pass as done."""
    subset = _txt(tmp_path / "subset.txt", fixed.uids)
    out, clean = tmp_path / "out", tmp_path / "clean"
    _write(fixed, subset, out, max_samples=20, shuffle=True, seed=0)
    _write(fixed, subset, clean, max_samples=20, shuffle=True, seed=1)
    old = (out / "00000.tar").read_bytes()
    assert (
        len(old) == len((clean / "00000.tar").read_bytes())
        and old != (clean / "00000.tar").read_bytes()
    )

    real = stage.write_json_atomic

    def dies_after_stats(final: Path, payload: object) -> None:
        real(final, payload)
        if final.name.endswith("_stats.json"):
            raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(stage, "write_json_atomic", dies_after_stats)
        with pytest.raises(RuntimeError, match="killed"):
            _write(fixed, subset, out, max_samples=20, shuffle=True, seed=1)
    _check_visible_shards_whole(out)
    # The old run's manifest and sizes no longer describe the tars.
    assert not (out / "manifest.json").exists() and not (out / "sizes.json").exists()
    resumed = _write(fixed, subset, out, max_samples=20, shuffle=True, seed=1)
    assert resumed.shards_written >= 1
    assert _files(out) == _files(clean)


# --- 4. shard sizing ------------------------------------------------------------------------------


def _check_counts(out: Path, report: WriteReport) -> list[int]:
    counts = [len(_keys(t)) for t in _tars(out)]
    sizes = json.loads((out / "sizes.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert sizes == {t.name: c for t, c in zip(_tars(out), counts, strict=True)}
    assert [s["samples"] for s in manifest["shards"]] == counts
    assert [s["tar"] for s in manifest["shards"]] == [t.name for t in _tars(out)]
    assert [s["bytes"] for s in manifest["shards"]] == [t.stat().st_size for t in _tars(out)]
    assert manifest["samples"] == sum(counts) == report.written_samples
    assert report.bytes == sum(t.stat().st_size for t in _tars(out))
    return counts


def test_shards_cut_by_sample_count(synth: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = _write(synth, _txt(tmp_path / "s.txt", synth.uids[:50]), out, max_samples=7)
    assert _check_counts(out, report) == [7] * 7 + [1]
    assert report.shards == 8


@pytest.mark.parametrize("max_bytes", [2 * 10240, 3 * 10240, 3 * 10240 + 700, 5 * 10240 - 1])
def test_shards_cut_by_bytes(synth: Inputs, tmp_path: Path, max_bytes: int) -> None:
    out = tmp_path / "out"
    report = _write(synth, _txt(tmp_path / "s.txt", synth.uids), out, max_bytes=max_bytes)
    counts = _check_counts(out, report)
    assert sum(counts) == 120 and len(counts) > 1
    tars = _tars(out)
    for i, tar in enumerate(tars):
        assert tar.stat().st_size <= max_bytes or counts[i] == 1
    # Greedy: each shard plus the next shard's first sample would not have fit.
    for tar, following in itertools.pairwise(tars):
        buffer = io.BytesIO()
        writer = DeterministicTarWriter(buffer)
        first = _keys(following)[0]
        for path, only in ((tar, None), (following, first)):
            with tarfile.open(path) as tf:
                for m in tf.getmembers():
                    fobj = tf.extractfile(m)
                    assert fobj is not None
                    if only is None or m.name.partition(".")[0] == only:
                        writer.add(m.name, fobj.read())
        size, _ = writer.close()
        assert size > max_bytes


def test_sample_larger_than_max_bytes_gets_its_own_shard(synth: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = _write(synth, _txt(tmp_path / "s.txt", synth.uids[:5]), out, max_bytes=1000)
    assert _check_counts(out, report) == [1] * 5


def test_bad_size_limits_are_input_errors(synth: Inputs, tmp_path: Path) -> None:
    subset = _txt(tmp_path / "s.txt", synth.uids[:5])
    with pytest.raises(InputError):
        _write(synth, subset, tmp_path / "a", max_samples=0)
    with pytest.raises(InputError):
        _write(synth, subset, tmp_path / "b", max_bytes=0)
    assert _tars(tmp_path / "a") == _tars(tmp_path / "b") == []


# --- 5. order -------------------------------------------------------------------------------------


def _order(out: Path) -> list[str]:
    return [k for tar in _tars(out) for k in _keys(tar)]


def test_shuffle_and_input_order(synth: Inputs, tmp_path: Path) -> None:
    subset = _txt(tmp_path / "s.txt", synth.uids[::-1])  # the file's order does not matter
    keys_in_input_order = [synth.key[u] for u in synth.uids]

    _write(synth, subset, tmp_path / "plain", max_samples=25)
    assert _order(tmp_path / "plain") == keys_in_input_order

    _write(synth, subset, tmp_path / "s1", max_samples=25, shuffle=True, seed=1)
    _write(synth, subset, tmp_path / "s1b", max_samples=25, shuffle=True, seed=1)
    _write(synth, subset, tmp_path / "s2", max_samples=25, shuffle=True, seed=2)
    assert _files(tmp_path / "s1") == _files(tmp_path / "s1b")
    one, two = _order(tmp_path / "s1"), _order(tmp_path / "s2")
    assert sorted(one) == sorted(two) == sorted(keys_in_input_order)
    assert one != two and one != keys_in_input_order


# --- 6. repeats -----------------------------------------------------------------------------------


def _repeated_subset(fixed: Inputs) -> tuple[list[str], dict[str, int]]:
    uids = fixed.uids[:60]
    want = {u: 3 if i < 10 else 2 if i < 20 else 1 for i, u in enumerate(uids)}
    listed = [u for u in uids for _ in range(want[u])]
    return listed, want


def test_duplicate_uids_are_an_error_by_default(fixed: Inputs, tmp_path: Path) -> None:
    listed, _ = _repeated_subset(fixed)
    npy = tmp_path / "s.npy"
    np.save(npy, uids_to_pairs(sorted(listed)), allow_pickle=False)
    for subset in (_txt(tmp_path / "s.txt", listed), npy):
        with pytest.raises(InputError, match="more than once"):
            _write(fixed, subset, tmp_path / "out")
    assert _tars(tmp_path / "out") == []


def test_duplicates_once(fixed: Inputs, tmp_path: Path) -> None:
    listed, want = _repeated_subset(fixed)
    out = tmp_path / "out"
    report = _write(fixed, _txt(tmp_path / "s.txt", listed), out, duplicates="once")
    assert report.subset_rows == 90 and report.subset_uids == 60
    assert report.written_samples == report.written_uids == 60 and report.repeated_uids == 0
    keys = _order(out)
    assert sorted(keys) == sorted(fixed.key[u] for u in want)


@pytest.mark.parametrize("shuffle", [False, True])
def test_duplicates_repeat_spreads_copies(fixed: Inputs, tmp_path: Path, shuffle: bool) -> None:
    listed, want = _repeated_subset(fixed)
    npy = tmp_path / "s.npy"
    np.save(npy, uids_to_pairs(sorted(listed)), allow_pickle=False)
    out = tmp_path / "out"
    report = _write(fixed, npy, out, duplicates="repeat", max_samples=10, shuffle=shuffle, seed=3)
    assert report.written_samples == 90 and report.shards == 9
    assert report.repeated_uids == 20 and report.max_copies_in_one_shard == 1

    copies: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for tar in _tars(out):
        in_shard = Counter()
        rows = _sidecar(out, tar)
        jsons = {str(s["__key__"]): json.loads(s["json"]) for s in _wds([tar])}  # type: ignore[arg-type]
        for row in rows:
            uid = str(row["uid"])
            in_shard[uid] += 1
            assert jsons[str(row["key"])]["uid"] == uid  # the copy's json is the original
            copies[uid].append((str(row["key"]), int(row["copy"])))  # type: ignore[arg-type]
        assert max(in_shard.values()) == 1  # 3 copies <= 9 shards / 2: never two in a shard
    assert set(copies) == set(want)
    for uid, got in copies.items():
        key = fixed.key[uid]
        expected = [(key, 0)] + [(f"{key}_r{j}", j) for j in range(1, want[uid])]
        assert sorted(got, key=lambda x: x[1]) == expected


def test_repeats_column_weights(fixed: Inputs, tmp_path: Path) -> None:
    uids = fixed.uids
    absent = _absent(5, seed=9)
    weights = [0.5] * 120 + [2.5] * 30 + [1.0] * 30 + [0.0] * 20
    subset = _parquet(tmp_path / "s.parquet", {"uid": uids + absent, "w": weights + [0.0] * 5})
    out = tmp_path / "out"
    report = _write(fixed, subset, out, repeats_column="w", seed=4)
    got = Counter(str(row["uid"]) for tar in _tars(out) for row in _sidecar(out, tar))
    half = sum(1 for u in uids[:120] if got[u])
    assert all(got[u] <= 1 for u in uids[:120])
    assert 35 <= half <= 85  # Binomial(120, 0.5): mean 60, sd 5.5
    assert all(got[u] in (2, 3) for u in uids[120:150])
    assert 63 <= sum(got[u] for u in uids[120:150]) <= 87  # mean 75, sd 2.7
    assert all(got[u] == 1 for u in uids[150:180])
    assert not any(got[u] for u in uids[180:] + absent)
    assert report.missing_uids == 0  # zero-weight uids are not looked for
    assert report.zero_copies == 20 + 5 + (120 - half)
    assert report.written_samples == sum(got.values())

    again = _write(fixed, subset, tmp_path / "again", repeats_column="w", seed=4)
    assert _files(tmp_path / "again") == _files(out) and again.written_samples == sum(got.values())


def test_repeats_column_bad_values(fixed: Inputs, tmp_path: Path) -> None:
    uids = fixed.uids[:3]
    for bad in ([1.0, -0.5, 1.0], [1.0, float("nan"), 1.0], [1.0, float("inf"), 1.0]):
        subset = _parquet(tmp_path / "s.parquet", {"uid": uids, "w": bad})
        with pytest.raises(InputError, match="weights"):
            _write(fixed, subset, tmp_path / "out", repeats_column="w")
    subset = _parquet(tmp_path / "s.parquet", {"uid": uids, "w": [1.0, 1.0, 1.0]})
    with pytest.raises(InputError, match="column"):
        _write(fixed, subset, tmp_path / "out", repeats_column="nope")
    with pytest.raises(InputError, match="parquet"):
        _write(fixed, _txt(tmp_path / "s.txt", uids), tmp_path / "out", repeats_column="w")
    assert _tars(tmp_path / "out") == []


def test_repeats_column_with_repeated_rows(fixed: Inputs, tmp_path: Path) -> None:
    a, b = fixed.uids[:2]
    subset = _parquet(tmp_path / "s.parquet", {"uid": [a, b, a], "w": [0.0, 1.0, 3.0]})
    with pytest.raises(InputError, match="more than once"):
        _write(fixed, subset, tmp_path / "e", repeats_column="w")
    once = _write(fixed, subset, tmp_path / "once", repeats_column="w", duplicates="once")
    assert once.written_samples == 1 and once.zero_copies == 1  # a's first row says 0
    rep = _write(fixed, subset, tmp_path / "rep", repeats_column="w", duplicates="repeat")
    assert rep.written_samples == 4 and rep.zero_copies == 0  # a: 0 + 3, b: 1


# --- 7. bad input ---------------------------------------------------------------------------------


def test_missing_uids_are_counted_and_listed(fixed: Inputs, tmp_path: Path) -> None:
    absent = sorted(_absent(4, seed=1))
    out = tmp_path / "out"
    report = _write(fixed, _txt(tmp_path / "s.txt", fixed.uids[:10] + absent), out)
    assert report.missing_uids == 4 and report.written_uids == 10
    assert (out / "missing_uids.txt").read_text().split() == absent
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["accounting"]["missing_uids"] == 4
    # A later run that finds everything removes the list.
    _write(fixed, _txt(tmp_path / "t.txt", fixed.uids[:10]), out)
    assert not (out / "missing_uids.txt").exists()


def test_empty_or_entirely_missing_subset(fixed: Inputs, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="empty"):
        _write(fixed, empty, out)
    assert _tars(out) == []
    absent = _absent(3, seed=2)
    with pytest.raises(InputError, match="3 not in the shards"):
        _write(fixed, _txt(tmp_path / "s.txt", absent), out)
    assert _tars(out) == []


@pytest.mark.parametrize("where", ["after_json", "in_image"])
def test_truncated_input_shard(fixed: Inputs, tmp_path: Path, where: str) -> None:
    folder = tmp_path / "in"
    shutil.copytree(fixed.folder, folder)
    victim = folder / "00001.tar"
    with tarfile.open(victim) as tf:
        image, meta = tf.getmember("000010020.jpg"), tf.getmember("000010020.json")
    # Cut in the json's padding, the sample's uid is known and it fails as truncated; cut in
    # its image, its json (with the uid) is beyond the cut and the uid is missing.
    cut = meta.offset_data + meta.size if where == "after_json" else image.offset_data + 100
    victim.write_bytes(victim.read_bytes()[:cut])
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    out = tmp_path / "out"
    report = _write(urls, _txt(tmp_path / "s.txt", fixed.uids), out)
    in_victim = [u for u in fixed.uids if fixed.shard[u] == "00001.tar"]
    if where == "after_json":
        assert report.failed_uids == {"truncated_shard": 1}
        lost = in_victim[21:]
    else:
        assert report.failed_uids == {}
        lost = in_victim[20:]
    assert report.missing_uids == len(lost) and report.written_uids == 200 - 30
    assert list(report.truncated) == [str(victim)]
    assert (out / "missing_uids.txt").read_text().split() == sorted(lost)
    written = {str(s["__key__"]) for s in _samples(out)}
    assert written == {fixed.key[u] for u in fixed.uids} - {fixed.key[u] for u in in_victim[20:]}


def test_unopenable_input_shard(fixed: Inputs, tmp_path: Path) -> None:
    bad = tmp_path / "in" / "00009.tar"
    bad.parent.mkdir()
    bad.write_bytes(b"not a tar" * 100)
    out = tmp_path / "out"
    report = _write([*fixed.urls, str(bad)], _txt(tmp_path / "s.txt", fixed.uids[:20]), out)
    assert list(report.shard_errors) == [str(bad)]
    assert report.written_uids == 20 and report.input_shards == 5


def test_out_folder_checks(fixed: Inputs, tmp_path: Path) -> None:
    subset = _txt(tmp_path / "s.txt", fixed.uids[:10])
    with pytest.raises(InputError, match="folder of the input"):
        _write(fixed, subset, fixed.folder)
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"someone else's data")
    with pytest.raises(InputError, match="not written by curate write"):
        _write(fixed, subset, out)
    assert (out / "00000.tar").read_bytes() == b"someone else's data"
    report = _write(fixed, subset, out, overwrite=True)
    assert report.shards_written == 1
    assert [s["__key__"] for s in _samples(out)] == [fixed.key[u] for u in fixed.uids[:10]]
    # Our own outputs are not foreign: a rerun without overwrite skips them.
    assert _write(fixed, subset, out).shards_skipped == 1


# --- 8. sidecars, stats, manifest -----------------------------------------------------------------


def test_sidecar_stats_and_manifest(synth: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    chosen = synth.uids[5:45]
    report = _write(synth, _txt(tmp_path / "s.txt", chosen), out, max_samples=15)
    total = 0
    for tar in _tars(out):
        table = pq.read_table(out / f"{tar.stem}.parquet")
        assert table.schema.equals(SIDECAR_SCHEMA)
        rows = table.to_pylist()
        assert [r["key"] for r in rows] == _keys(tar)
        for row in rows:
            key = str(row["key"])
            original = synth.members[key]
            meta = json.loads(original["json"])
            assert row["uid"] in chosen and synth.key[str(row["uid"])] == key
            assert row["caption"] == original["txt"].decode()
            assert row["url"] == meta["url"]
            assert (row["width"], row["height"]) == (meta["width"], meta["height"])
            assert row["sha256"] == meta["sha256"]
            assert row["status"] == "success" and row["error_message"] is None
            assert row["source_shard"] == synth.shard[str(row["uid"])]
            assert row["source_key"] == key and row["copy"] == 0
        stats = json.loads((out / f"{tar.stem}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == len(rows) == stats["curate"]["samples"]
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        assert stats["status_dict"] == {"success": len(rows)}
        data = tar.read_bytes()
        assert stats["curate"]["bytes"] == len(data)
        assert stats["curate"]["sha256"] == hashlib.sha256(data).hexdigest()
        total += len(rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == total == 40 == sum(s["samples"] for s in manifest["shards"])
    assert manifest["accounting"]["written_samples"] == 40
    assert manifest["settings"]["max_samples"] == 15
    assert report.bytes == sum(s["bytes"] for s in manifest["shards"])


# --- 9. with_columns ------------------------------------------------------------------------------


def test_with_columns_adds_scores_member(fixed: Inputs, tmp_path: Path) -> None:
    uids = fixed.uids[:40]
    scores = [round(0.01 * i, 3) for i in range(40)]
    subset = _parquet(
        tmp_path / "s.parquet", {"uid": uids, "clip_score": scores, "rank": list(range(40))}
    )
    out = tmp_path / "out"
    max_bytes = 4 * 10240
    report = _write(fixed, subset, out, with_columns=["clip_score"], max_bytes=max_bytes)
    by_key = {fixed.key[u]: s for u, s in zip(uids, scores, strict=True)}
    samples = _samples(out)
    assert len(samples) == 40
    for s in samples:
        assert {k for k in s if not k.startswith("__")} == {"jpg", "txt", "json", "scores.json"}
        assert json.loads(s["scores.json"]) == {"clip_score": by_key[str(s["__key__"])]}
    for tar in _tars(out):
        assert tar.stat().st_size <= max_bytes
    assert report.shards == len(_tars(out)) > 1
    with pytest.raises(InputError, match="no column"):
        _write(fixed, subset, tmp_path / "x", with_columns=["absent"])
