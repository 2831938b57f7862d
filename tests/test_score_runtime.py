"""Scoring on the stage runtime: clipscore and normsim as a map over shards (checked against slow
oracles), the negclip reduce; the same bytes locally, as array tasks with a later reduce and on
Ray; kill -9 at random moments then a rerun gives the same bytes and redoes only what was
unfinished."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from clikit import run_cli
from shardkit import make_shard

TINY = ["--model", "curate-tiny", "--pretrained", "none", "--no-progress"]
SPEED = ["--workers", "1", "--batch-size", "4"]
REPO = Path(__file__).resolve().parents[1]
DUPLICATE = f"{7:032x}"  # the uid of shard 0's sample 7, repeated in shard 2


def _uid(shard: int):
    def uid(i: int) -> str | None:
        if shard == 0 and i == 7:
            return DUPLICATE
        if shard == 2 and i == 3:
            return DUPLICATE
        return None

    return uid


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A pool of five shards (8..12 samples, one uid in two shards) and a two-shard target."""
    root = tmp_path_factory.mktemp("score-runtime")
    pool, target = root / "pool", root / "target"
    pool.mkdir()
    target.mkdir()
    for i in range(5):
        make_shard(pool / f"{i:05d}.tar", 8 + i, shard_index=i, uid_fn=_uid(i))
    for i in range(2):
        make_shard(target / f"t{i}.tar", 5, shard_index=10 + i)
    return pool, target


def _score(pool: Path, target: Path, run: Path, *extra: str, p: str = "inf") -> list[str]:
    return [
        "score", str(pool), "--out", str(run), "-m", "clipscore", "-m", "negclip",
        "-m", "normsim", "--target", str(target), "--normsim-p", p, "--negclip-batch", "8",
        "--negclip-k", "3", *TINY, *SPEED, *extra,
    ]  # fmt: skip


def _outputs(run: Path) -> dict[str, object]:
    """scores.parquet and every per-shard score table byte for byte, and scores.json but for
    the paths it names (the run's own and its target's)."""
    files: dict[str, object] = {
        f"shard_scores/{p.name}": p.read_bytes() for p in (run / "shard_scores").iterdir()
    }
    summary = json.loads((run / "scores.json").read_text())
    summary.pop("out")
    summary["params"]["normsim"].pop("target")
    return {**files, "scores.parquet": (run / "scores.parquet").read_bytes(), "json": summary}


@pytest.fixture(scope="module")
def reference(data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from curate.cli.app import main

    run = tmp_path_factory.mktemp("score-reference") / "run"
    with pytest.raises(SystemExit) as exc:
        main(_score(*data, run))
    assert exc.value.code == 0
    return run


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _embeddings(run: Path, stem: str) -> tuple[list[str | None], np.ndarray, np.ndarray]:
    """A shard's errors and its image / text embeddings (zeros on failed rows), as stored."""
    table = pq.read_table(run / "embeddings" / f"{stem}.parquet")
    errors = table.column("error").to_pylist()

    def matrix(column: str) -> np.ndarray:
        rows = table.column(column).to_pylist()
        dim = len(next(r for r in rows if r is not None))
        return np.array([r if r is not None else [0.0] * dim for r in rows], np.float64)

    return errors, matrix("image_emb"), matrix("text_emb")


def test_row_wise_scores_are_per_shard_and_match_slow_oracles(reference: Path) -> None:
    target = next((reference / "targets").iterdir())
    target_image = np.concatenate(
        [_embeddings(target, p.stem)[1] for p in sorted((target / "embeddings").glob("*.parquet"))]
    )
    target_image = _unit(target_image)
    parts = sorted((reference / "shard_scores").glob("*.parquet"))
    assert [p.stem for p in parts] == [f"{i:05d}" for i in range(5)]
    for part in parts:
        errors, image, text = _embeddings(reference, part.stem)
        table = pq.read_table(part)
        assert table.column_names == ["clipscore", "normsim_inf"]
        clip = table.column("clipscore").to_pylist()
        norm = table.column("normsim_inf").to_pylist()
        for i, error in enumerate(errors):
            if error is not None:
                assert clip[i] is None and norm[i] is None
                continue
            f, g = _unit(image[i : i + 1])[0], _unit(text[i : i + 1])[0]
            assert clip[i] == pytest.approx(float(f @ g), abs=1e-5)
            best = max(abs(float(f @ t)) for t in target_image)
            assert norm[i] == pytest.approx(best, abs=1e-5)


def test_the_reduce_masks_repeated_uids_and_keeps_the_map_values(reference: Path) -> None:
    scores = pq.read_table(reference / "scores.parquet").to_pylist()
    assert len(scores) == sum(8 + i for i in range(5))
    repeated = [r for r in scores if r["uid"] == DUPLICATE]
    assert [r["shard"] for r in repeated] == ["00000", "00002"]
    first, second = repeated
    assert first["status"] == "scored" and first["clipscore"] is not None
    assert second["status"] == "failed" and second["error"].startswith("duplicate_uid")
    assert second["clipscore"] is None and second["negclip"] is None
    part = pq.read_table(reference / "shard_scores" / "00002.parquet").column("clipscore")
    assert part[3].as_py() is not None  # the map scored it; the pool-level rule dropped it
    by_shard: dict[str, list[float | None]] = {}
    for row in scores:
        by_shard.setdefault(row["shard"], []).append(row["clipscore"])
    for stem, values in by_shard.items():
        mapped = pq.read_table(reference / "shard_scores" / f"{stem}.parquet")
        expected = mapped.column("clipscore").to_pylist()
        if stem == "00002":
            expected[3] = None
        assert values == expected
    assert [c for c in pq.read_schema(reference / "scores.parquet").names][-4:] == [
        "clipscore", "negclip", "normsim_inf", "status",
    ]  # fmt: skip


def test_array_tasks_then_the_reduce_give_the_local_bytes(
    data: tuple[Path, Path], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    for index in range(3):
        args = [*_score(*data, run), "--executor", "array", "--num-tasks", "3"]
        code, out, err = run_cli([*args, "--task-index", str(index), "--json"], capsys)
        assert code == 0, err
        report = json.loads(out)
        assert report["complete"] is False and report["task"].startswith(f"task-{index:05d}")
        assert not (run / "scores.parquet").exists()
    done = run / ".curate" / "score" / "done"
    # The target (two shards) is whole once task 1 embedded its share: tasks 1 and 2 scored
    # their units, task 0 left its own (00000, 00003) to the reduce.
    assert sorted(p.stem for p in done.iterdir()) == ["00001", "00002", "00004"]
    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    code, out, err = run_cli(_score(*data, run), capsys)
    assert code == 0, err
    assert _outputs(run) == _outputs(reference)
    after = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    assert len(after) == 5 and all(after[name] == t for name, t in before.items())

    code, out, err = run_cli(["status", str(run), "--json"], capsys)
    assert code == 0, err
    (stage,) = [s for s in json.loads(out)["stages"] if s["stage"] == "score"]
    assert stage["done"] == 5 and stage["failed"] == {}


def test_array_tasks_with_a_whole_target_score_their_share(
    data: tuple[Path, Path], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pool, _ = data
    target_run = next((reference / "targets").iterdir())  # an embedding run: whole already
    run = tmp_path / "run"
    for index in range(2):
        args = [*_score(pool, target_run, run), "--num-tasks", "2", "--task-index", str(index)]
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
    assert len(list((run / ".curate" / "score" / "done").iterdir())) == 5
    code, _, err = run_cli(_score(pool, target_run, run), capsys)
    assert code == 0, err
    assert _outputs(run) == _outputs(reference)


def test_another_target_or_norm_redoes_the_map_and_nothing_else(
    data: tuple[Path, Path], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    done = run / ".curate" / "score" / "done"
    embedded = {p.name: p.stat().st_mtime_ns for p in (run / ".curate/embed/done").iterdir()}
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    code, _, err = run_cli(_score(*data, run), capsys)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before  # nothing redone
    code, _, err = run_cli(_score(*data, run, p="2"), capsys)
    assert code == 0, err
    changed = {p.name: p.read_bytes() for p in done.iterdir()}
    assert all(changed[name] != record for name, record in before.items())
    assert pq.read_schema(run / "shard_scores" / "00000.parquet").names == [
        "clipscore", "normsim_2",
    ]  # fmt: skip
    assert embedded == {
        p.name: p.stat().st_mtime_ns for p in (run / ".curate/embed/done").iterdir()
    }


def test_an_unreadable_shard_fails_its_units_and_the_others_score(
    data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(data[0], pool)
    (pool / "00001.tar").write_bytes(b"this is not a tar file" * 40)
    run = tmp_path / "run"
    base = [
        "score", str(pool), "--out", str(run), "-m", "clipscore", *TINY, *SPEED,
        "--num-tasks", "2",
    ]  # fmt: skip
    for index in range(2):
        code, _, err = run_cli([*base, "--task-index", str(index)], capsys)
        assert code == (1 if index == 1 else 0), err
        if index == 1:
            assert "00001.tar" in err
    failed = run / ".curate" / "score" / "failed"
    assert [p.stem for p in failed.iterdir()] == ["00001"]
    code, out, err = run_cli([*base[:-2], "--json"], capsys)
    assert code == 1 and "00001.tar" in err
    report = json.loads(out)
    assert list(report["shard_errors"]) == [str(pool / "00001.tar")]
    assert report["read"] == 8 + 10 + 11 + 12


# --- Ray ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> object:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    paths = os.pathsep.join([str(REPO), str(Path(__file__).parent)])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": paths}},
    )
    yield ray
    ray.shutdown()


def test_ray_gives_the_local_bytes(
    ray_local: object,
    data: tuple[Path, Path],
    reference: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli([*_score(*data, run), "--executor", "ray"], capsys)
    assert code == 0, err
    assert _outputs(run) == _outputs(reference)
    assert list((run / ".curate" / "score" / "logs").glob("worker-*.log"))


# --- kill -9 ------------------------------------------------------------------------------------


def test_score_survives_kill_9_at_random_moments(
    data: tuple[Path, Path], reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def command(run: Path) -> list[str]:
        return [sys.executable, "-m", "curate", *_score(*data, run)]

    def started(process: subprocess.Popen[bytes], run: Path) -> float:
        while not (run / "run.json").exists() and process.poll() is None:
            time.sleep(0.01)
        return time.monotonic()

    probe = tmp_path / "probe"
    process = subprocess.Popen(command(probe), env=env, stderr=subprocess.PIPE)
    begun = started(process, probe)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    window = time.monotonic() - begun  # embedding, the target, the map and the reduce
    rng = random.Random(2468)
    kills = 0
    for trial in range(20):  # until 10 kills landed inside a run
        if kills == 10:
            break
        run = tmp_path / f"killed-{trial}"
        process = subprocess.Popen(
            command(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        started(process, run)
        time.sleep(rng.uniform(0.0, window))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
        for path in [run / "scores.parquet", *(run / "shard_scores").glob("*.parquet")]:
            if path.exists():
                pq.read_table(path)  # never a torn file under an output name
        done = run / ".curate" / "score" / "done"
        before = (
            {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")} if done.is_dir() else {}
        )
        code, _, err = run_cli(_score(*data, run), capsys)
        assert code == 0, err
        after = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
        assert len(after) == 5 and all(after[name] == t for name, t in before.items())
        assert _outputs(run) == _outputs(reference), f"trial {trial}"
        assert not [p for p in run.rglob("*.tmp") if "targets" not in p.parts]
    assert kills == 10
