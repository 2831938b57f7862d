"""`curate rewrite` against a stub OpenAI-compatible server and the rules backend.

Every input uid must end with its N valid rewrites or a recorded reason, outputs are joined by
uid, injected faults are survived, a killed run loses at most the requests in flight, and
requests really run concurrently.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import polars as pl
import pytest
from clikit import run_cli
from llm_stub import BOILERPLATE_PREFIX, REFUSAL_TEXT, StubConfig, StubServer
from shardkit import make_image_bytes, make_shard, sample_members, write_tar

from curate.errors import InputError
from curate.rewriting.backends import OpenAIBackend, RulesBackend
from curate.rewriting.engine import EngineOptions, RewriteAborted
from curate.rewriting.prompts import load_prompts
from curate.rewriting.stage import CACHE_DIR, REWRITES_DIR, RewriteOptions, rewrite_source
from curate.rewriting.validate import check_rewrite

FAST = EngineOptions(concurrency=16, backoff=0.001, max_backoff=0.01, max_retries=8)
PATIENT = EngineOptions(
    concurrency=16, backoff=0.001, max_backoff=0.01, max_retries=12, max_invalid=8
)


def make_pool(folder: Path, shards: int = 2, per_shard: int = 15) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        make_shard(
            folder / f"{s:05d}.tar",
            per_shard,
            shard_index=s,
            caption_fn=lambda i, s=s: f"a small dog number {s}-{i} on the grass",
        )
    return shards * per_shard


def read_rewrites(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted((out / REWRITES_DIR).glob("*.parquet"))])


def openai_backend(stub: StubServer, **kwargs: object) -> OpenAIBackend:
    options = {"timeout": 5.0, "concurrency": 16, **kwargs}
    return OpenAIBackend(stub.url, "stub-model", load_prompts(), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_every_uid_gets_its_rewrites(tmp_path: Path, api: str) -> None:
    n = make_pool(tmp_path / "shards")
    with StubServer() as stub:
        report = rewrite_source(
            str(tmp_path / "shards"),
            openai_backend(stub, api=api),
            load_prompts(),
            tmp_path / "out",
            RewriteOptions(num_rewrites=3, engine=FAST),
        )
        assert len(stub.requests) == 3 * n
    table = read_rewrites(tmp_path / "out")
    assert table.height == n and report.ok == n and report.rewrites == 3 * n
    for caption, rewrites in table.select("caption", "rewrites").iter_rows():
        assert len(rewrites) == 3 and len(set(rewrites)) == 3
        assert all(check_rewrite(caption, r) is None for r in rewrites)
    assert set(table["prompt_version"]) == {load_prompts().version}
    assert set(table["model"]) == {"stub-model"}


def test_faults_are_survived_and_every_sample_accounted(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    n = make_pool(folder, shards=2, per_shard=20)
    image = make_image_bytes("jpg", "RGB", (8, 8), seed=0)
    bad = sample_members("000090000", image=image, caption="  ")
    bad += sample_members("000090001", image=None, caption="no image here")
    bad += sample_members("000090002", image=image, caption="a cat on a sofa")
    write_tar(folder / "00009.tar", bad)
    config = StubConfig(
        error_rate=0.1,
        rate_limit_rate=0.1,
        malformed_rate=0.05,
        drop_rate=0.05,
        refusal_rate=0.05,
        boilerplate_rate=0.05,
        echo_rate=0.05,
        empty_rate=0.05,
        seed=3,
    )
    with StubServer(config) as stub:
        report = rewrite_source(
            str(folder),
            openai_backend(stub),
            load_prompts(),
            tmp_path / "out",
            RewriteOptions(num_rewrites=2, engine=PATIENT),
        )
        outcomes = stub.outcomes
    for kind in ("error", "rate_limit", "malformed", "drop", "refusal", "boilerplate", "echo"):
        assert outcomes[kind] > 0, kind
    table = read_rewrites(tmp_path / "out")
    assert table.height == n + 3 == report.samples
    by_key = {row["key"]: row for row in table.to_dicts()}
    assert by_key["000090000"]["status"] == "failed"
    assert by_key["000090000"]["error"].startswith("empty_caption")
    assert by_key["000090001"]["error"].startswith("missing_image")
    assert report.samples_failed == 2
    usable = table.filter(pl.col("reasons").list.len() > 0)
    # Every usable sample has 2 rewrites or a reason for each missing one; no bad text got in.
    for row in usable.to_dicts():
        assert len(row["rewrites"]) + sum(r is not None for r in row["reasons"]) == 2
        for text in row["rewrites"]:
            assert text != row["caption"] and REFUSAL_TEXT not in text
            assert not text.startswith(BOILERPLATE_PREFIX.strip()) and "\n" not in text
    assert report.ok + report.partial + report.failed + report.samples_failed == report.samples
    # About 0.31 of the answers are invalid: 9 in a row (P ≈ 3e-5 per job) would fail a job.
    assert report.ok >= n - 1


def test_invalid_outputs_end_as_recorded_failures(tmp_path: Path) -> None:
    n = make_pool(tmp_path / "shards", shards=1, per_shard=4)
    with StubServer(StubConfig(refusal_rate=1.0)) as stub:
        report = rewrite_source(
            str(tmp_path / "shards"),
            openai_backend(stub),
            load_prompts(),
            tmp_path / "out",
            RewriteOptions(num_rewrites=2, engine=EngineOptions(max_invalid=2)),
        )
        assert len(stub.requests) == n * 2 * 3  # first try + 2 retries per rewrite
    table = read_rewrites(tmp_path / "out")
    assert table["status"].to_list() == ["failed"] * n
    assert report.reasons == {"invalid: refusal": 2 * n}
    # Invalid results are cached: a rerun sends nothing.
    with StubServer() as stub:
        again = rewrite_source(
            str(tmp_path / "shards"),
            openai_backend(stub),
            load_prompts(),
            tmp_path / "out",
            RewriteOptions(num_rewrites=2, engine=EngineOptions(max_invalid=2)),
        )
        assert stub.requests == [] and again.cached == 2 * n


def test_timeouts_are_retried(tmp_path: Path) -> None:
    n = make_pool(tmp_path / "shards", shards=1, per_shard=6)
    with StubServer(StubConfig(hang_rate=0.3, hang_seconds=3.0, seed=1)) as stub:
        report = rewrite_source(
            str(tmp_path / "shards"),
            openai_backend(stub, timeout=0.3),
            load_prompts(),
            tmp_path / "out",
            RewriteOptions(num_rewrites=2, engine=FAST),
        )
        assert stub.outcomes["hang"] > 0
    assert report.ok == n


def test_requests_run_concurrently(tmp_path: Path) -> None:
    make_pool(tmp_path / "shards", shards=1, per_shard=32)
    with StubServer(StubConfig(latency=0.2)) as stub:
        rewrite_source(
            str(tmp_path / "shards"),
            openai_backend(stub),
            load_prompts(),
            tmp_path / "out",
            RewriteOptions(num_rewrites=2, engine=EngineOptions(concurrency=16)),
        )
        assert 12 <= stub.max_in_flight <= 16


def test_changing_prompts_or_sampling_makes_new_requests(tmp_path: Path) -> None:
    n = make_pool(tmp_path / "shards", shards=1, per_shard=3)
    source = str(tmp_path / "shards")
    with StubServer() as stub:
        for options in (RewriteOptions(num_rewrites=1), RewriteOptions(num_rewrites=2)):
            rewrite_source(source, openai_backend(stub), load_prompts(), tmp_path / "o", options)
        assert len(stub.requests) == n * 2  # index 0 was cached for the second run
        stub.reset_counters()
        from curate.rewriting.backends import SamplingParams

        hotter = RewriteOptions(num_rewrites=2, params=SamplingParams(temperature=1.2))
        backend = openai_backend(stub, params=hotter.params)
        rewrite_source(source, backend, load_prompts(), tmp_path / "o", hotter)
        assert len(stub.requests) == n * 2
        assert {r["temperature"] for r in stub.requests} == {1.2}


def test_unreachable_server_stops_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_pool(tmp_path / "shards", shards=1, per_shard=10)
    with StubServer() as stub:
        url = stub.url  # a port that is closed once the stub stops
    code, _, err = run_cli(
        [
            "rewrite", str(tmp_path / "shards"), "--base-url", url, "--model", "m",
            "-o", str(tmp_path / "out"), "--no-progress", "--timeout", "1",
        ],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert "has succeeded" in err and len(err.strip().splitlines()) == 1


def test_high_error_rate_and_auth_errors_stop(tmp_path: Path) -> None:
    make_pool(tmp_path / "shards", shards=1, per_shard=40)
    source = str(tmp_path / "shards")
    with (
        StubServer(StubConfig(error_rate=0.9, seed=2)) as stub,
        pytest.raises(RewriteAborted, match="failed"),
    ):
        rewrite_source(
            source,
            openai_backend(stub),
            load_prompts(),
            tmp_path / "a",
            RewriteOptions(num_rewrites=2, engine=FAST),
        )
    with (
        StubServer(StubConfig(api_key="secret-key")) as stub,
        pytest.raises(RewriteAborted, match="http_401"),
    ):
        rewrite_source(
            source,
            openai_backend(stub, api_key_env="CURATE_TEST_NO_SUCH_KEY"),
            load_prompts(),
            tmp_path / "b",
            RewriteOptions(num_rewrites=1),
        )


def test_api_key_is_sent_and_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_pool(tmp_path / "shards", shards=1, per_shard=3)
    monkeypatch.setenv("CURATE_TEST_KEY", "sk-very-secret-123")
    with StubServer(StubConfig(api_key="sk-very-secret-123")) as stub:
        report = rewrite_source(
            str(tmp_path / "shards"),
            openai_backend(stub, api_key_env="CURATE_TEST_KEY"),
            load_prompts(),
            tmp_path / "out",
            RewriteOptions(num_rewrites=1),
        )
    assert report.ok == 3
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"sk-very-secret-123" not in path.read_bytes(), path


def test_missing_server_options_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_pool(tmp_path / "shards", shards=1, per_shard=2)
    code, _, err = run_cli(["rewrite", str(tmp_path / "shards")], capsys)
    assert code == 2 and "--base-url" in err
    code, _, err = run_cli(["rewrite", str(tmp_path / "shards"), "--backend", "vllm"], capsys)
    assert code == 2 and "needs --model" in err
    with pytest.raises(InputError):
        OpenAIBackend("localhost:8000", "m", load_prompts())


def test_rules_backend_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from curate.demo.synthetic import generate_shards

    generate_shards(tmp_path / "shards", num_samples=120, samples_per_shard=60, seed=0)
    for name in ("a", "b"):
        code, out, err = run_cli(
            [
                "rewrite", str(tmp_path / "shards"), "--backend", "rules",
                "-o", str(tmp_path / name), "--no-progress",
            ],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        assert "curate rewrite" in out
    a, b = read_rewrites(tmp_path / "a"), read_rewrites(tmp_path / "b")
    assert a.equals(b)
    usable = a.filter(pl.col("reasons").list.len() > 0)
    assert (usable["status"] == "ok").all() and usable.height > 100
    assert isinstance(RulesBackend().identity(), str)


# --- kill and resume, through the real CLI in a subprocess ----------------------------------------


def test_killed_run_resumes_without_resending(tmp_path: Path) -> None:
    n = make_pool(tmp_path / "shards", shards=2, per_shard=40)
    total = n * 2
    out = tmp_path / "out"
    with StubServer(StubConfig(latency=0.05)) as stub:
        command = [
            sys.executable, "-m", "curate", "rewrite", str(tmp_path / "shards"),
            "--base-url", stub.url, "--model", "stub-model", "--num-rewrites", "2",
            "--concurrency", "8", "-o", str(out), "--no-progress",
        ]  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while stub.ok_responses < total // 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        first = stub.ok_responses
        assert 0 < first < total
        assert list((out / CACHE_DIR).glob("*.sqlite"))
        stub.reset_counters()
        stub.config = StubConfig()
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        second = len(stub.requests)
    # At most the requests in flight at the kill (concurrency 8) are sent twice.
    assert total - first <= second <= total - first + 8
    table = read_rewrites(out)
    assert table.height == n and (table["status"] == "ok").all()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_write_adds_rewrites_to_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import webdataset as wds

    from curate.demo.synthetic import generate_shards
    from curate.io.uid_files import write_datacomp_npy

    generate_shards(tmp_path / "shards", num_samples=60, samples_per_shard=30, seed=1)
    code, _, err = run_cli(
        [
            "rewrite", str(tmp_path / "shards"), "--backend", "rules", "--num-rewrites", "3",
            "-o", str(tmp_path / "rw"), "--no-progress",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    table = read_rewrites(tmp_path / "rw")
    usable = table.filter(pl.col("status") == "ok")
    write_datacomp_npy(tmp_path / "subset.npy", table["uid"].to_list())
    code, out, err = run_cli(
        [
            "write", str(tmp_path / "shards"), "--subset", str(tmp_path / "subset.npy"),
            "--rewrites", str(tmp_path / "rw"), "-o", str(tmp_path / "curated"), "--no-progress",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "uids with rewrites.json" in out
    expected = {row["key"]: row["rewrites"] for row in usable.to_dicts()}
    seen = {}
    tars = sorted(str(p) for p in (tmp_path / "curated").glob("*.tar"))
    for sample in wds.WebDataset(tars, shardshuffle=False):
        if "rewrites.json" in sample:
            payload = json.loads(sample["rewrites.json"])
            seen[sample["__key__"]] = payload["rewrites"]
            assert payload["prompt_version"] == table["prompt_version"][0]
    assert seen == expected and len(seen) == usable.height > 0


def test_cli_demo_data_against_a_faulty_stub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from curate.demo.synthetic import generate_shards

    demo = generate_shards(tmp_path / "shards", num_samples=120, samples_per_shard=40, seed=2)
    config = StubConfig(
        error_rate=0.1, rate_limit_rate=0.05, drop_rate=0.05, refusal_rate=0.05, seed=4
    )
    with StubServer(config) as stub:
        code, out, err = run_cli(
            [
                "rewrite", str(tmp_path / "shards"), "--base-url", stub.url,
                "--model", "stub-model", "--num-rewrites", "2", "--max-invalid", "8",
                "--max-retries", "12", "-o", str(tmp_path / "rw"), "--no-progress",
            ],
            capsys,
        )  # fmt: skip
        assert stub.outcomes["error"] > 0 and stub.outcomes["drop"] > 0
    assert code == 0, err
    table = read_rewrites(tmp_path / "rw")
    assert table.height == demo.num_samples
    unusable = table.filter(pl.col("reasons").list.len() == 0)
    assert (unusable["status"] == "failed").all() and unusable["error"].is_not_null().all()
    usable = table.filter(pl.col("reasons").list.len() == 2)
    assert usable.height + unusable.height == table.height
    assert (usable["status"] == "ok").sum() >= usable.height - 1
    assert "curate rewrite" in out


# --- in-process vLLM, with a stand-in module (vLLM itself needs a GPU and model weights) ---------


class _FakeOutput:
    def __init__(self, text: str) -> None:
        self.outputs = [type("Completion", (), {"text": text})()]


class _FakeLLM:
    batches: ClassVar[list[int]] = []

    def __init__(self, model: str, seed: int, **kwargs: object) -> None:
        self.model = model

    def chat(self, conversations: list[list[dict[str, str]]], params: list) -> list[_FakeOutput]:
        _FakeLLM.batches.append(len(conversations))
        return [
            _FakeOutput(f"an image showing {c[-1]['content']} ({p.kwargs['seed']})")
            for c, p in zip(conversations, params, strict=True)
        ]


class _FakeSamplingParams:
    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs


def test_vllm_backend_batches_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from curate.rewriting.backends import VLLMBackend

    fake = types.ModuleType("vllm")
    fake.LLM = _FakeLLM  # type: ignore[attr-defined]
    fake.SamplingParams = _FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    _FakeLLM.batches = []
    n = make_pool(tmp_path / "shards", shards=1, per_shard=20)
    backend = VLLMBackend("some/model", load_prompts())
    report = rewrite_source(
        str(tmp_path / "shards"),
        backend,
        load_prompts(),
        tmp_path / "out",
        RewriteOptions(num_rewrites=2, engine=EngineOptions(concurrency=16)),
    )
    assert report.ok == n and report.model == "some/model"
    assert sum(_FakeLLM.batches) == 2 * n and max(_FakeLLM.batches) > 1


def test_vllm_backend_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from curate.rewriting.backends import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(InputError, match=r"curate\[vllm\]"):
        VLLMBackend("some/model", load_prompts())
