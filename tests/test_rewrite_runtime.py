"""`curate rewrite` on the stage runtime (issue 14).

The unit tables are byte-identical in-process, on spawned processes, as a 3-task array and on a
real local Ray instance (skipped only where Ray is not installed); a run killed with SIGKILL at
random moments and rerun gives the same bytes without touching finished units' records; the
reduce fails uids repeated across units (and gives a row back when its earlier occurrence goes);
an unreadable shard is recorded while the others finish; the cache of earlier versions is read;
a server that is down stops workers with one line; the API key never travels or lands in a file.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import time
import types
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from clikit import run_cli
from llm_stub import StubConfig, StubServer
from shardkit import make_shard

from curate.rewriting.backends import OpenAIBackend, RulesBackend, VLLMBackend
from curate.rewriting.cache import CachedResult, RequestCache
from curate.rewriting.engine import EngineOptions
from curate.rewriting.prompts import load_prompts
from curate.rewriting.stage import (
    CACHE_DIR,
    EARLIER_UNIT,
    LEGACY_CACHE_FILE,
    REPORT_JSON,
    REWRITES_DIR,
    RewriteOptions,
    rewrite_source,
)

WORDS = ["dog", "cat", "car", "tree", "house", "woman", "man", "nurse", "engineer", "child"]
KEY = "sk-runtime-Zx81-secret"


def _uid(shard: int, i: int) -> str:
    """Unique per (shard, i), except: sample 0 of a later shard repeats sample 1 of the shard
    before (upper-cased on odd shards), and sample 5 repeats sample 4 of its own shard."""
    if shard > 0 and i == 0:
        uid = f"{(shard - 1) * 1000 + 1:032x}"
        return uid.upper() if shard % 2 else uid
    if i == 5:
        return f"{shard * 1000 + 4:032x}"
    return f"{shard * 1000 + i:032x}"


def _pool(folder: Path, shards: int, per_shard: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        make_shard(
            folder / f"{s:05d}.tar",
            per_shard,
            shard_index=s,
            uid_fn=lambda i, s=s: _uid(s, i),
            caption_fn=lambda i, s=s: f"a {WORDS[i % 10]} near a {WORDS[(i * 7 + s) % 10]} {s}-{i}",
        )
    return folder


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / REWRITES_DIR).glob("*.parquet"))}


def _mtimes(folder: Path, pattern: str = "*") -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob(pattern)} if folder.is_dir() else {}


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "rewrite", str(shards), "--backend", "rules", "--num-rewrites", "2", "-o", str(out),
        "--no-progress", *extra,
    ]  # fmt: skip


def _tables(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted((out / REWRITES_DIR).glob("*.parquet"))])


def _check_duplicates(out: Path) -> None:
    """Every repeat of a uid (lowercased) is failed; the first occurrence keeps its rewrites."""
    table = _tables(out).with_columns(pl.col("uid").str.to_lowercase().alias("lower"))
    first = table["lower"].is_first_distinct()
    repeats = table.filter(~first)
    assert repeats.height > 0
    assert (repeats["status"] == "failed").all()
    assert repeats["error"].str.starts_with("duplicate_uid:").all()
    assert (repeats["rewrites"].list.len() == 0).all()
    across = repeats.filter(pl.col("error").str.starts_with(EARLIER_UNIT))
    assert across.height > 0 and across["key"].str.ends_with("0000").all()
    assert (table.filter(first)["status"] == "ok").all()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pool(tmp_path_factory.mktemp("pool") / "shards", shards=7, per_shard=12)


def _json(code_out_err: tuple[int, str, str]) -> dict:
    code, out, err = code_out_err
    assert code == 0, err
    return json.loads(out)


# --- the same bytes on every executor -----------------------------------------------------------


def test_rewrite_is_byte_identical_on_every_executor(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inline = _json(run_cli(_args(pool, tmp_path / "inline", "--workers", "1", "--json"), capsys))
    reference = _files(tmp_path / "inline")
    assert len(reference) == 7 and inline["complete"] and inline["units"] == 7
    _check_duplicates(tmp_path / "inline")
    assert inline["samples_failed"] == 7 + 6  # same-unit repeats, then cross-unit ones
    assert inline["requests_sent"] == (7 * 12 - 7) * 2  # cross-unit repeats are sent

    procs = _json(run_cli(_args(pool, tmp_path / "procs", "--workers", "2", "--json"), capsys))
    assert _files(tmp_path / "procs") == reference
    assert list((tmp_path / "procs/.curate/rewrite/logs").glob("worker-*.log"))

    array = tmp_path / "array"
    for index in range(3):
        extra = ("--executor", "array", "--num-tasks", "3", "--task-index", str(index), "--json")
        task = _json(run_cli(_args(pool, array, *extra), capsys))
        assert task["complete"] is (index == 2), task  # the last task finds every unit done
        assert (array / REPORT_JSON).is_file() is (index == 2)
        if index == 0:
            assert task["pending_units"] == 7 - 3 and task["units"] == 3
    assert _files(array) == reference
    before = _mtimes(array / REWRITES_DIR)
    code, text, err = run_cli(_args(pool, array), capsys)  # the final call: all skipped
    assert code == 0, err
    assert "run now / from cache" in text and "0 / " in text
    assert _mtimes(array / REWRITES_DIR) == before  # the reduce changes nothing twice
    final = json.loads((array / REPORT_JSON).read_text())["report"]
    for name in ("units", "samples", "samples_failed", "ok", "partial", "failed", "rewrites"):
        assert final[name] == inline[name] == procs[name], name
    status = _json(run_cli(["status", str(array), "--json"], capsys))
    (stage,) = status["stages"]
    assert (stage["stage"], stage["units"], stage["done"], stage["pending"]) == ("rewrite", 7, 7, 0)


def test_an_array_task_before_the_others_says_the_reduce_is_pending(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text, err = run_cli(
        _args(pool, tmp_path / "o", "--executor", "array", "--num-tasks", "2", "--task-index", "1"),
        capsys,
    )
    assert code == 0, err
    assert "units are not done yet" in " ".join(text.split())
    assert not (tmp_path / "o" / REPORT_JSON).exists()
    # Before the reduce a repeated uid may still carry rewrites: write refuses the folder.
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(_tables(tmp_path / "o")["uid"].unique().to_list()) + "\n")
    args = ["write", str(pool), "--subset", str(subset), "--rewrites", str(tmp_path / "o")]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "w"), "--no-progress"], capsys)
    assert code == 2 and "rewrite run is not finished" in " ".join(err.split()), err


def test_rewrite_on_ray_is_byte_identical_and_stops_with_one_line(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    code, _, err = run_cli(_args(pool, tmp_path / "local"), capsys)
    assert code == 0, err
    with StubServer() as stub:
        closed = stub.url  # a port that is closed once the stub stops
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        code, _, err = run_cli(_args(pool, tmp_path / "ray", "--executor", "ray"), capsys)
        assert code == 0, err
        down, _, down_err = run_cli(
            [
                "rewrite", str(pool), "--base-url", closed, "--model", "m", "--timeout", "1",
                "-o", str(tmp_path / "down"), "--no-progress", "--executor", "ray",
            ],
            capsys,
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert list((tmp_path / "ray" / ".curate/rewrite/logs").glob("worker-*.log"))
    assert down == 2 and "has succeeded" in down_err, down_err
    assert len(down_err.strip().splitlines()) == 1 and "Traceback" not in down_err


# --- an OpenAI-compatible server from worker processes ----------------------------------------


def test_server_from_worker_processes_reads_the_key_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = _pool(tmp_path / "shards", shards=4, per_shard=8)
    monkeypatch.setenv("CURATE_TEST_KEY", KEY)  # spawned workers inherit the environment
    with StubServer(StubConfig(api_key=KEY)) as stub:

        def run(out: str, *extra: str) -> dict:
            args = [
                "rewrite", str(shards), "--base-url", stub.url, "--model", "stub-model",
                "--api-key-env", "CURATE_TEST_KEY", "--num-rewrites", "2",
                "-o", str(tmp_path / out), "--no-progress", "--json", *extra,
            ]  # fmt: skip
            return _json(run_cli(args, capsys))

        inline = run("inline")
        sent = len(stub.requests)
        procs = run("procs", "--workers", "3")
        assert len(stub.requests) == 2 * sent == 2 * inline["requests_sent"]
        assert stub.outcomes["unauthorized"] == 0
        backend = OpenAIBackend(
            stub.url, "stub-model", load_prompts(), api_key_env="CURATE_TEST_KEY"
        )
        rewrite_source(
            str(shards), backend, load_prompts(), tmp_path / "lib", RewriteOptions(num_rewrites=2)
        )
    assert procs["ok"] == inline["ok"] > 0
    assert _files(tmp_path / "procs") == _files(tmp_path / "inline") == _files(tmp_path / "lib")
    assert KEY.encode() not in pickle.dumps(backend)  # a used backend pickles without it
    for path in tmp_path.rglob("*"):
        if path.is_file() and "shards" not in path.parts:
            assert KEY[:10].encode() not in path.read_bytes(), path


def test_a_server_that_is_down_stops_every_worker_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = _pool(tmp_path / "shards", shards=6, per_shard=10)
    with StubServer() as stub:
        closed = stub.url
    start = time.monotonic()
    code, _, err = run_cli(
        [
            "rewrite", str(shards), "--base-url", closed, "--model", "m", "--timeout", "1",
            "-o", str(tmp_path / "out"), "--no-progress", "--workers", "2",
        ],
        capsys,
    )  # fmt: skip
    assert code == 2 and "has succeeded" in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - start < 60
    folder = tmp_path / "out" / ".curate" / "rewrite"
    assert not list(folder.glob("done/*.json")) and not list(folder.glob("aborted-*"))


# --- kill -9 ----------------------------------------------------------------------------------


def _visible_outputs_are_whole(out: Path) -> None:
    for path in (out / REWRITES_DIR).glob("*.parquet") if (out / REWRITES_DIR).is_dir() else []:
        pq.read_table(path)


def _first_table(out: Path, process: subprocess.Popen, deadline: float) -> None:
    """Wait until `out` has its first unit table (or the process ends)."""
    while time.monotonic() < deadline and process.poll() is None:
        if (out / REWRITES_DIR).is_dir() and any((out / REWRITES_DIR).glob("*.parquet")):
            return
        time.sleep(0.01)


def test_rewrite_survives_kill_9_at_random_moments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against the stub server (a little latency, so units take a while): half the moments fall
    anywhere in a run, half after its first table (while units finish, or in the reduce). The
    reruns run in this process (open_clip, which validation needs, is imported once here)."""
    shards = _pool(tmp_path / "shards", shards=10, per_shard=30)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with StubServer(StubConfig(latency=0.03)) as stub:

        def command(out: Path, *extra: str) -> list[str]:
            return [
                sys.executable, "-m", "curate", "rewrite", str(shards), "--base-url", stub.url,
                "--model", "stub-model", "--num-rewrites", "2", "--concurrency", "4",
                "-o", str(out), "--no-progress", *extra,
            ]  # fmt: skip

        def start(out: Path) -> subprocess.Popen:
            return subprocess.Popen(
                command(out, "--workers", "2"), env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

        reference = tmp_path / "reference"
        began = time.monotonic()
        process = start(reference)
        _first_table(reference, process, began + 120)
        first_table = time.monotonic() - began
        assert process.wait(timeout=120) == 0
        duration = time.monotonic() - began
        rng = random.Random(4321)
        kills = 0
        for trial in range(20):  # until 10 kills landed inside a run
            if kills == 10:
                break
            out = tmp_path / f"killed-{trial}"
            began = time.monotonic()
            process = start(out)
            if trial % 2:  # (a loaded machine may run faster than the reference did)
                _first_table(out, process, began + 120)
                time.sleep(rng.uniform(0, 0.8 * (duration - first_table)))
            else:
                time.sleep(rng.uniform(0.1, 0.9 * duration))
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the CLI and its workers, mid-flight
                kills += 1
            process.wait()
            _visible_outputs_are_whole(out)
            done = out / ".curate" / "rewrite" / "done"
            before = _mtimes(done, "*.json")
            code, _, err = run_cli(command(out)[3:], capsys)
            assert code == 0, err
            after = _mtimes(done, "*.json")
            assert len(after) == 10 and all(after[name] == t for name, t in before.items())
            assert _files(out) == _files(reference), f"trial {trial}"
            assert not list((out / REWRITES_DIR).glob(".*.tmp"))
    assert kills == 10  # the moments fell inside the runs
    _check_duplicates(reference)


# --- failures, the old cache, the reduce --------------------------------------------------------


def test_an_unreadable_shard_is_recorded_and_the_others_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = _pool(tmp_path / "shards", shards=4, per_shard=8)
    bad = shards / "00002.tar"
    good = bad.read_bytes()
    bad.write_bytes(b"")
    args = _args(shards, tmp_path / "out", "--workers", "2", "--json")
    code, text, err = run_cli(args, capsys)
    assert code == 1, err
    assert str(bad) in " ".join(err.split())
    report = json.loads(text)
    assert list(report["shard_errors"]) == [str(bad)] and report["complete"]
    assert report["units"] == 3 and report["samples"] == 24
    assert sorted(_files(tmp_path / "out")) == ["00000.parquet", "00001.parquet", "00003.parquet"]
    failed = json.loads((tmp_path / "out/.curate/rewrite/failed/00002.json").read_text())
    assert failed["source"] == str(bad)
    code, text, err = run_cli(["status", str(tmp_path / "out"), "--json"], capsys)
    assert code == 1 and list(json.loads(text)["stages"][0]["failed"]) == [str(bad)], err
    # Repaired, the shard is picked up; its sample 0 now comes before 00003's repeat of it.
    bad.write_bytes(good)
    report = _json(run_cli(args, capsys))
    assert report["units"] == 4 and report["shard_errors"] == {}
    assert report["requests_sent"] == (8 - 1) * 2
    fresh = _json(run_cli(_args(shards, tmp_path / "fresh", "--json"), capsys))
    assert _files(tmp_path / "out") == _files(tmp_path / "fresh")
    assert fresh["samples_failed"] == report["samples_failed"]


def test_the_cache_of_earlier_versions_is_read_not_written(tmp_path: Path) -> None:
    shards = _pool(tmp_path / "shards", shards=3, per_shard=6)
    options = RewriteOptions(num_rewrites=2, engine=EngineOptions(concurrency=4))
    with StubServer() as stub:

        def run(out: Path):
            backend = OpenAIBackend(stub.url, "stub-model", load_prompts(), timeout=5.0)
            return rewrite_source(str(shards), backend, load_prompts(), out, options)

        first = run(tmp_path / "new")
        # The folder of an earlier version: one cache.sqlite with every result, nothing else.
        rows: dict[str, CachedResult] = {}
        for path in sorted((tmp_path / "new" / CACHE_DIR).glob("*.sqlite")):
            db = sqlite3.connect(path)
            for key, text, reason, attempts in db.execute("SELECT * FROM results"):
                rows[key] = CachedResult(text, reason, attempts)
            db.close()
        old = tmp_path / "old"
        legacy = RequestCache(old / LEGACY_CACHE_FILE)
        legacy.put_many(rows.items())
        legacy.close()
        for extra in ("-wal", "-shm"):
            assert not (old / (LEGACY_CACHE_FILE + extra)).exists()
        stamp = (old / LEGACY_CACHE_FILE).stat().st_mtime_ns
        stub.reset_counters()
        again = run(old)
        assert stub.requests == [] and again.cached == first.requests_sent == len(rows)
        # Copied into the units' own files: without the old file nothing is sent either.
        (old / LEGACY_CACHE_FILE).rename(tmp_path / "moved.sqlite")
        for path in (old / REWRITES_DIR).glob("*.parquet"):
            path.unlink()
        third = run(old)
        assert stub.requests == [] and third.requests_sent == 0
    assert (tmp_path / "moved.sqlite").stat().st_mtime_ns == stamp
    assert _files(old) == _files(tmp_path / "new")


def test_the_reduce_gives_a_row_back_when_its_first_occurrence_goes(tmp_path: Path) -> None:
    tables = tmp_path / "tables"
    tables.mkdir()
    a, b, c, d = (f"{n:032x}" for n in (10, 11, 12, 13))
    pl.DataFrame({"uid": [a, b], "caption": ["a red car", "a small dog"]}).write_parquet(
        tables / "t0.parquet"
    )
    pl.DataFrame({"uid": [c, a.upper()], "caption": ["a cow", "a tall tree"]}).write_parquet(
        tables / "t1.parquet"
    )
    options = RewriteOptions(num_rewrites=2)

    def run(out: Path):
        return rewrite_source(str(tables), RulesBackend(), load_prompts(), out, options)

    run(tmp_path / "out")
    t1 = pl.read_parquet(tmp_path / "out" / REWRITES_DIR / "t1.parquet")
    assert t1["status"].to_list() == ["ok", "failed"]
    assert t1["error"][1] == f"{EARLIER_UNIT} (t0)" and t1["rewrites"].to_list()[1] == []
    # The uid leaves t0: t0 is redone, t1 is not, and its row gets its rewrites back from the
    # cache (nothing is sent for it).
    pl.DataFrame({"uid": [d, b], "caption": ["a red car", "a small dog"]}).write_parquet(
        tables / "t0.parquet"
    )
    done = tmp_path / "out" / ".curate" / "rewrite" / "done"
    t1_record = (done / "t1.json").stat().st_mtime_ns
    again = run(tmp_path / "out")
    assert again.requests_sent == 2 and again.samples_failed == 0 and again.ok == 4
    assert (done / "t1.json").stat().st_mtime_ns == t1_record
    run(tmp_path / "fresh")
    assert _files(tmp_path / "out") == _files(tmp_path / "fresh")
    before = _mtimes(tmp_path / "out" / REWRITES_DIR)
    run(tmp_path / "out")
    assert _mtimes(tmp_path / "out" / REWRITES_DIR) == before


def test_a_unit_with_transport_failures_is_redone_on_the_next_run(tmp_path: Path) -> None:
    shards = _pool(tmp_path / "shards", shards=2, per_shard=6)
    options = RewriteOptions(
        num_rewrites=1,
        engine=EngineOptions(concurrency=1, max_retries=0, max_error_rate=1.0, backoff=0),
    )
    # The first two requests fail for good (no retries): unit 00000 ends with two failed rows.
    with StubServer(StubConfig(fail_first=2)) as stub:
        backend = OpenAIBackend(stub.url, "stub-model", load_prompts(), timeout=5.0)
        first = rewrite_source(str(shards), backend, load_prompts(), tmp_path / "out", options)
        assert first.reasons == {"failed: http_500": 2} and first.partial + first.failed == 2
        done = tmp_path / "out" / ".curate" / "rewrite" / "done"
        kept = (done / "00001.json").stat().st_mtime_ns
        stub.reset_counters()
        stub.config = StubConfig()
        second = rewrite_source(str(shards), backend, load_prompts(), tmp_path / "out", options)
        assert len(stub.requests) == 2 == second.requests_sent
    assert second.reasons == {} and second.samples_failed == 1 + 1 + 1  # two same-unit, one across
    assert (done / "00001.json").stat().st_mtime_ns == kept


# --- in-process vLLM pickles without its model ----------------------------------------------------


class _FakeLLM:
    def __init__(self, model: str, seed: int, **kwargs: object) -> None:
        self.model = model

    def chat(self, conversations: list, params: list) -> list:
        return [
            types.SimpleNamespace(
                outputs=[types.SimpleNamespace(text=f"an image of {c[-1]['content']}")]
            )
            for c in conversations
        ]


def test_vllm_backend_loads_its_model_where_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("vllm")
    fake.LLM = _FakeLLM  # type: ignore[attr-defined]
    fake.SamplingParams = lambda **kwargs: kwargs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    shards = _pool(tmp_path / "shards", shards=1, per_shard=4)
    backend = VLLMBackend("some/model", load_prompts())
    assert backend._llm is None  # nothing loads until the first request
    report = rewrite_source(
        str(shards), backend, load_prompts(), tmp_path / "out", RewriteOptions(num_rewrites=1)
    )
    assert report.ok == 4 and backend._llm is not None
    clone = pickle.loads(pickle.dumps(backend))
    assert clone._llm is None and clone.model == "some/model"
    code, _, err = run_cli(
        ["rewrite", str(shards), "--backend", "vllm", "--model", "m", "--workers", "2"], capsys
    )
    assert code == 2 and "--workers 1" in err
