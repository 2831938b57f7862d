"""`curate rewrite` against hostile inputs and servers (issue 13).

Repeated uids and changed captions never get another caption's rewrite; a huge answer neither
makes tokenizing quadratic nor stalls the other requests; Retry-After is honoured (delays are
recorded through an injected sleep, never timed); the API key is in no message or file; numeric
options out of range are refused with one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import polars as pl
import pytest
from clikit import run_cli
from llm_stub import StubConfig, StubServer, extract_caption, paraphrase
from shardkit import make_shard

from curate.cli import app as cli_app
from curate.errors import InputError
from curate.rewriting import backends, validate
from curate.rewriting.backends import OpenAIBackend, RulesBackend, SamplingParams
from curate.rewriting.cache import CachedResult, RequestCache
from curate.rewriting.engine import EngineOptions, Job, RewriteAborted, run_jobs_async
from curate.rewriting.prompts import load_prompts
from curate.rewriting.stage import (
    LEGACY_CACHE_FILE,
    REWRITES_DIR,
    RewriteOptions,
    _setting,
    rewrite_source,
)
from curate.rewriting.validate import MAX_CLIP_TOKENS, check_rewrite, clip_token_count

FAST = EngineOptions(concurrency=8, backoff=0.001, max_backoff=0.01, max_retries=4)


def read_rewrites(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted((out / REWRITES_DIR).glob("*.parquet"))])


def openai_backend(stub: StubServer, **kwargs: object) -> OpenAIBackend:
    options = {"timeout": 5.0, "concurrency": 16, **kwargs}
    return OpenAIBackend(stub.url, "stub-model", load_prompts(), **options)  # type: ignore[arg-type]


def folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def uid(n: int) -> str:
    return f"{n:032x}"


def rewrites_belong_to_captions(table: pl.DataFrame) -> bool:
    """The stub's paraphrases quote the caption (first letter lowered)."""
    for caption, rewrites in table.select("caption", "rewrites").iter_rows():
        core = caption[0].lower() + caption[1:]
        if any(core not in r for r in rewrites):
            return False
    return True


# --- 1. repeated uids and changed captions ---------------------------------------------------


def test_repeated_uids_are_marked_duplicate_first_occurrence_wins(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    first = ["a little girl eating ice cream", "a red automobile parked on a street", "a cat"]
    second = ["a blue boat on a lake", "an old man reading", "two birds on a wire"]
    make_shard(shards / "00000.tar", 3, caption_fn=first.__getitem__, uid_fn=lambda i: uid(i))
    # 00001: its first sample repeats uid 1 of 00000; its last repeats its own middle uid.
    uids_b = [uid(1), uid(7), uid(7)]
    make_shard(
        shards / "00001.tar",
        3,
        shard_index=1,
        caption_fn=second.__getitem__,
        uid_fn=uids_b.__getitem__,
    )
    with StubServer() as stub:
        report = rewrite_source(
            str(shards),
            openai_backend(stub),
            load_prompts(),
            tmp_path / "out",
            RewriteOptions(num_rewrites=2, engine=FAST),
        )
        asked = {extract_caption(body) for body in stub.requests}
    table = read_rewrites(tmp_path / "out")
    assert table.height == 6 == report.samples
    rows = table.to_dicts()
    statuses = [row["status"] for row in rows]
    assert statuses == ["ok", "ok", "ok", "failed", "ok", "failed"]
    for row in (rows[3], rows[5]):
        assert row["error"].startswith("duplicate_uid:") and row["rewrites"] == []
        assert row["reasons"] == []
    assert "earlier unit (00000)" in rows[3]["error"] and "earlier in the unit" in rows[5]["error"]
    # Units are independent: a repeat in a later unit is sent (the reduce fails it afterwards);
    # a repeat within a unit never is.
    assert asked == set(first) | {"a blue boat on a lake", "an old man reading"}
    assert rewrites_belong_to_captions(table.filter(pl.col("status") == "ok"))
    assert report.samples_failed == 2 and report.ok == 4


def test_repeated_uids_in_tables_ignore_case(tmp_path: Path) -> None:
    table = pl.DataFrame(
        {"uid": ["ab" * 16, "AB" * 16, "cd" * 16], "caption": ["a dog", "a cat", "a cow"]}
    )
    table.write_parquet(tmp_path / "t.parquet")
    report = rewrite_source(
        str(tmp_path / "t.parquet"),
        RulesBackend(),
        load_prompts(),
        tmp_path / "out",
        RewriteOptions(num_rewrites=1),
    )
    got = read_rewrites(tmp_path / "out")
    assert got["status"].to_list() == ["ok", "failed", "ok"]
    assert got["error"][1].startswith("duplicate_uid:")
    assert report.samples_failed == 1


def test_changed_caption_under_same_uid_is_asked_again(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    uids = [uid(i) for i in range(3)]
    pl.DataFrame({"uid": uids, "caption": ["a red automobile", "a dog", "a cow"]}).write_parquet(
        path
    )
    options = RewriteOptions(num_rewrites=2, engine=FAST)
    with StubServer() as stub:
        rewrite_source(str(path), openai_backend(stub), load_prompts(), tmp_path / "o", options)
        assert len(stub.requests) == 6
        stub.reset_counters()
        changed = ["a little girl eating ice cream", "a dog", "a cow"]
        pl.DataFrame({"uid": uids, "caption": changed}).write_parquet(path)
        report = rewrite_source(
            str(path), openai_backend(stub), load_prompts(), tmp_path / "o", options
        )
        assert [extract_caption(b) for b in stub.requests] == [changed[0]] * 2
    assert report.cached == 4 and report.requests_sent == 2
    table = read_rewrites(tmp_path / "o")
    assert (table["status"] == "ok").all() and rewrites_belong_to_captions(table)


def test_cache_rows_of_the_old_key_format_are_misses(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pl.DataFrame({"uid": [uid(1)], "caption": ["a little girl eating ice cream"]}).write_parquet(
        path
    )
    options = RewriteOptions(num_rewrites=1)
    backend = RulesBackend()
    setting = _setting(backend, load_prompts(), options)
    # The key before captions were part of it: setting, uid and index only.
    old = hashlib.blake2b(f"{setting}\x00{uid(1)}\x000".encode(), digest_size=16).hexdigest()
    out = tmp_path / "out"
    out.mkdir()
    cache = RequestCache(out / LEGACY_CACHE_FILE)
    cache.put(old, CachedResult("a red automobile parked on a street", None, 1))
    cache.close()
    report = rewrite_source(str(path), backend, load_prompts(), out, options)
    assert report.cached == 0 and report.requests_sent == 1
    (rewrite,) = read_rewrites(out)["rewrites"][0]
    assert (
        "automobile" not in rewrite
        and check_rewrite("a little girl eating ice cream", rewrite) is None
    )


# --- 2. tokenizing: bounded work, same verdict, off the event loop -------------------------------


def _record_bpe(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Lengths of every piece handed to BPE; pieces over 4096 characters are not really run."""
    tokenizer = validate._clip_tokenizer()
    real = tokenizer.bpe
    seen: list[int] = []

    def bpe(token: str) -> str:
        seen.append(len(token))
        return real(token) if len(token) <= 4096 else "x</w>"  # the real one takes minutes

    monkeypatch.setattr(tokenizer, "bpe", bpe)
    return seen


def test_a_long_word_never_reaches_bpe(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _record_bpe(monkeypatch)
    rng = random.Random(0)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(120_000))
    assert check_rewrite("a dog", f"a dog {word}") == "too_long"
    assert clip_token_count(word, at_most=MAX_CLIP_TOKENS) > MAX_CLIP_TOKENS
    assert max(seen) <= 32 * MAX_CLIP_TOKENS  # a piece BPE may see holds at most 75 tokens


def test_many_words_stop_counting_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _record_bpe(monkeypatch)
    assert check_rewrite("a dog", "a dog " + "running " * 200_000) == "too_long"
    assert len(seen) <= MAX_CLIP_TOKENS + 1


def _texts() -> list[str]:
    """Mixed texts around the limit, and words near the longest one BPE may still see."""
    rng = random.Random(13)
    parts = [
        "dog", "a", "photo", "of", "the", "&amp;", "&lt;b&gt;", "Café", "東京", "😀", "42", ",",
        "...", "don't", "\u3000", "\u00a0", "  ", "\t", "Ã©", "\x00", "<start_of_text>", "'s",
        "supercalifragilistic", "x" * 40, "ab" * 150,
    ]  # fmt: skip
    texts = []
    for _ in range(400):
        pieces = [rng.choice(parts) for _ in range(rng.randint(1, 110))]
        texts.append(rng.choice([" ", "", "  "]).join(pieces))
    for n in (74, 75, 76):
        texts += ["dog " * n, "&amp; " * n, "\u3000".join(["cat"] * n), "ab" * (16 * n)]
    for size in (2399, 2400, 2401):  # 32 * 75 bytes: the longest word that could still fit
        word = "".join(rng.choice("abcdefghij") for _ in range(size))
        texts += [word, f"a dog {word}", "z" * size]
    return texts


def test_capped_count_gives_the_full_tokenizers_verdict() -> None:
    tokenizer = validate._clip_tokenizer()
    for text in _texts():
        exact = len(tokenizer.encode(text))
        capped = clip_token_count(text, at_most=MAX_CLIP_TOKENS)
        if exact <= MAX_CLIP_TOKENS:
            assert capped == exact, text[:80]
        else:
            assert capped > MAX_CLIP_TOKENS, text[:80]
        assert clip_token_count(text) == exact


def test_validation_runs_off_the_event_loop(tmp_path: Path) -> None:
    threads: list[int] = []

    def validator(original: str, text: str) -> str | None:
        threads.append(threading.get_ident())
        return None

    jobs = [Job(f"k{i}", uid(i), 0, f"a dog number {i}") for i in range(4)]
    cache = RequestCache(tmp_path / "c.sqlite")
    results = asyncio.run(
        run_jobs_async(jobs, RulesBackend(), cache, FAST, where="rules", validator=validator)
    )
    cache.close()
    assert len(results) == 4 and len(threads) == 4
    assert threading.get_ident() not in threads  # asyncio.run's loop runs in this thread


def test_a_huge_answer_does_not_time_out_the_others(tmp_path: Path) -> None:
    captions = [f"a small dog number {i} on the grass" for i in range(12)]
    captions[5] = "a giraffe eating leaves"
    make_shard(folder(tmp_path / "shards") / "00000.tar", 12, caption_fn=captions.__getitem__)
    huge = "word " * 1_000_000  # 5 MB

    def reply(caption: str, body: dict) -> str:
        return huge if "giraffe" in caption else paraphrase(caption, body["seed"])

    with StubServer(StubConfig(reply=reply, latency=0.1)) as stub:
        report = rewrite_source(
            str(tmp_path / "shards"),
            openai_backend(stub, timeout=5.0),
            load_prompts(),
            tmp_path / "out",
            RewriteOptions(
                num_rewrites=2,
                engine=EngineOptions(concurrency=8, max_retries=0, max_invalid=0),
            ),
        )
    table = read_rewrites(tmp_path / "out")
    giraffe = table.filter(pl.col("caption") == captions[5]).row(0, named=True)
    assert giraffe["status"] == "failed" and giraffe["reasons"] == ["invalid: too_long"] * 2
    assert report.ok == 11 and report.reasons == {"invalid: too_long": 2}


# --- 3. Retry-After -------------------------------------------------------------------------------


def _run_engine(
    tmp_path: Path, stub: StubServer, jobs: int, options: EngineOptions, *, wait: bool = True
) -> tuple[dict, list[float]]:
    """Results and the delays asked of `sleep`; with `wait` false the delays are only recorded
    (fine for one job; with many, a job that never waits would take every 429 itself)."""
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(seconds if wait else 0)

    todo = [Job(f"k{i}", uid(i), 0, f"a dog number {i}") for i in range(jobs)]
    cache = RequestCache(tmp_path / "c.sqlite")
    backend = openai_backend(stub, concurrency=options.concurrency)

    async def main() -> dict:
        try:
            return await run_jobs_async(todo, backend, cache, options, where=stub.url, sleep=sleep)
        finally:
            await backend.aclose()

    try:
        return asyncio.run(main()), sleeps
    finally:
        cache.close()


@pytest.mark.parametrize(
    ("status", "seconds", "fail_first", "options"),
    [
        (429, 1, 20, EngineOptions(concurrency=10, backoff=0.001, max_backoff=0.01)),
        (429, 3, 64, EngineOptions()),  # the case: defaults, a server asking for 3 s
        (503, 1, 10, EngineOptions(concurrency=10, backoff=0.001, max_backoff=0.01)),
    ],
)
def test_retry_after_seconds_is_honoured(
    tmp_path: Path, status: int, seconds: int, fail_first: int, options: EngineOptions
) -> None:
    jobs = options.concurrency
    config = StubConfig(fail_first=fail_first, fail_first_status=status, retry_after=str(seconds))
    with StubServer(config) as stub:
        results, sleeps = _run_engine(tmp_path, stub, jobs, options)
        assert len(stub.requests) == jobs + fail_first
    assert all(r.text is not None for r in results.values()) and len(results) == jobs
    assert len(sleeps) == fail_first
    # at least what the server asked; more only by the usual jittered backoff
    assert all(seconds <= s <= max(seconds, options.max_backoff) for s in sleeps)


def test_retry_after_http_date_and_cap(tmp_path: Path) -> None:
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    options = EngineOptions(concurrency=1, backoff=0.001, max_backoff=0.01)
    with StubServer(StubConfig(fail_first=1, fail_first_status=429, retry_after=when)) as stub:
        _, sleeps = _run_engine(tmp_path, stub, 1, options, wait=False)
    assert len(sleeps) == 1 and 20 <= sleeps[0] <= 30
    capped = EngineOptions(concurrency=1, backoff=0.001, max_backoff=0.01, max_retry_after=5)
    with StubServer(StubConfig(fail_first=2, fail_first_status=429, retry_after="3600")) as stub:
        _, sleeps = _run_engine(tmp_path / "b", stub, 1, capped, wait=False)
    assert sleeps == [5.0, 5.0]


def test_retry_after_still_spends_the_retry_budget(tmp_path: Path) -> None:
    options = EngineOptions(concurrency=25, backoff=0.001, max_backoff=0.01, max_retries=2)
    config = StubConfig(fail_first=10_000, fail_first_status=429, retry_after="1")
    with StubServer(config) as stub, pytest.raises(RewriteAborted, match="has succeeded"):
        _run_engine(tmp_path, stub, 25, options)
    assert len(stub.requests) <= 25 * 3  # each job: one try and two retries at most


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert backends.parse_retry_after("0", now=now) == 0.0
    assert backends.parse_retry_after(" 12 ", now=now) == 12.0
    assert backends.parse_retry_after("Thu, 02 Jan 2025 03:04:15 GMT", now=now) == 10.0
    assert (
        backends.parse_retry_after("Thu, 02 Jan 2025 03:00:00 GMT", now=now) == 0.0
    )  # in the past
    for bad in ("", "-1", "soon", "inf", "nan", "1e3", "Thu, 99 Foo 2025"):
        assert backends.parse_retry_after(bad, now=now) is None, bad


# --- 4. the API key is in no message, file or log ---------------------------------------------

KEY = "zq7RkV9pW2mXs4tL8cN1-secret"


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize(
    ("config", "code_text"),
    [
        (StubConfig(api_key="another-key", echo_headers=True), "http_401"),
        (StubConfig(error_rate=1.0, echo_headers=True), "http_500"),
    ],
)
def test_api_key_is_redacted_from_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    config: StubConfig,
    code_text: str,
    debug: bool,
) -> None:
    make_shard(folder(tmp_path / "shards") / "00000.tar", 30)
    monkeypatch.setenv("CURATE_TEST_KEY", KEY)
    monkeypatch.setitem(cli_app._state, "debug", False)  # --debug sticks in this process
    out = tmp_path / "out"
    with StubServer(config) as stub:
        code, stdout, stderr = run_cli(
            [
                *(["--debug"] if debug else []),
                "rewrite", str(tmp_path / "shards"), "--base-url", stub.url, "--model", "m",
                "--api-key-env", "CURATE_TEST_KEY", "--max-retries", "1", "-o", str(out),
                "--no-progress",
            ],
            capsys,
        )  # fmt: skip
        assert stub.outcomes["unauthorized" if code_text == "http_401" else "error"] > 0
    assert code == 2 and code_text in stderr
    # the echoed headers are there, the Authorization value redacted
    assert "request headers" in stderr and "'Authorization': '<redacted>'" in stderr
    texts = [stdout, stderr] + [
        p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()
    ]
    for text in texts:
        assert KEY[:8] not in text


def test_redact_secrets() -> None:
    text = (
        "headers: {'Authorization': 'Bearer zq7RkV9p', 'X': 'y'} authorization=Basic dXNlcjpw "
        'and "authorization": "Token abc123" and bare zq7RkV9p'
    )
    got = backends.redact_secrets(text, ["zq7RkV9p"])
    for secret in ("zq7RkV9p", "dXNlcjpw", "abc123"):
        assert secret not in got
    assert "'X': 'y'" in got and "headers:" in got


def test_key_cut_by_the_short_message_is_still_redacted(tmp_path: Path) -> None:
    """The body is redacted before it is shortened, so no prefix of the key survives."""
    for pad in range(180, 205):
        body = "x" * pad + KEY + " tail"
        assert KEY[:4] not in backends.error_detail(body, [KEY])


# --- 5. numeric options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--timeout", "0"),
        ("--timeout", "-1"),
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--max-error-rate", "5"),
        ("--max-error-rate", "-0.1"),
        ("--max-error-rate", "nan"),
        ("--temperature", "-1"),
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--top-p", "nan"),
        ("--concurrency", "0"),
        ("--max-tokens", "0"),
        ("--num-rewrites", "0"),
        ("--max-retries", "-1"),
        ("--max-invalid", "-1"),
    ],
)
def test_out_of_range_options_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    make_shard(folder(tmp_path / "shards") / "00000.tar", 2)
    out = tmp_path / "out"
    code, _, err = run_cli(
        [
            "rewrite", str(tmp_path / "shards"), "--backend", "rules", "-o", str(out),
            "--no-progress", flag, value,
        ],
        capsys,
    )  # fmt: skip
    assert code == 2 and flag in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before any work


def test_library_refuses_out_of_range_settings() -> None:
    with pytest.raises(InputError, match="--temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InputError, match="--top-p"):
        SamplingParams(top_p=0)
    with pytest.raises(InputError, match="--max-tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InputError, match="--max-error-rate"):
        EngineOptions(max_error_rate=5)
    with pytest.raises(InputError, match="--concurrency"):
        EngineOptions(concurrency=0)
    with pytest.raises(InputError, match="max_retry_after"):
        EngineOptions(max_retry_after=-1)
    with pytest.raises(InputError, match="--num-rewrites"):
        RewriteOptions(num_rewrites=0)
    with pytest.raises(InputError, match="--timeout"):
        OpenAIBackend("http://localhost:1/v1", "m", load_prompts(), timeout=0)
    SamplingParams(temperature=0, top_p=1)  # greedy decoding is fine
    EngineOptions(max_error_rate=0, max_retries=0, max_invalid=0)
