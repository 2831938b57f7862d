"""The OpenAI-compatible stub server used by the `curate rewrite` tests behaves as scripted."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest
from llm_stub import (
    BOILERPLATE_PREFIX,
    REFUSAL_TEXT,
    StubConfig,
    StubServer,
    extract_caption,
    paraphrase,
)

CAPTION = "A brown dog running on the beach."


def chat_body(caption: str = CAPTION, **extra: object) -> dict:
    return {
        "model": "stub-model",
        "messages": [
            {"role": "system", "content": "Rewrite the caption."},
            {"role": "user", "content": caption},
        ],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 64,
        **extra,
    }


def chat(client: httpx.Client, stub: StubServer, caption: str = CAPTION, **extra: object):
    return client.post(f"{stub.url}/chat/completions", json=chat_body(caption, **extra))


def chat_text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


@pytest.fixture
def client():
    with httpx.Client(timeout=5.0) as c:
        yield c


def test_extract_caption() -> None:
    assert extract_caption(chat_body("a cat")) == "a cat"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a cat"}]}]}
    assert extract_caption(parts) == "a cat"
    prompt = "Rewrite each caption.\nold caption => new caption\n  a red car =>  \n"
    assert extract_caption({"prompt": prompt}) == "a red car"
    assert extract_caption({}) == ""


def test_paraphrases_are_distinct_short_and_single_line() -> None:
    texts = [paraphrase("A dog\non the beach.", k) for k in range(20)]
    assert len(set(texts)) == 20
    assert all("\n" not in t and "dog on the beach" in t for t in texts)
    assert paraphrase("A dog", 0) != "A dog"
    long = paraphrase(" ".join(["word"] * 200), 7)
    assert len(long.split()) < 50


def test_models_and_unknown_path(stub: StubServer, client: httpx.Client) -> None:
    r = client.get(f"{stub.url}/models")
    assert r.status_code == 200
    assert r.json() == {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}
    r = client.post(f"{stub.url}/embeddings", json={"input": "x"})
    assert r.status_code == 404
    assert "error" in r.json()
    r = client.post(f"{stub.url}/chat/completions", content=b"not json")
    assert r.status_code == 400


def test_chat_good_reply(stub: StubServer, client: httpx.Client) -> None:
    r = chat(client, stub)
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "stub-model"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    first = chat_text(r)
    second = chat_text(chat(client, stub))  # no seed: a per-caption counter picks the template
    assert first != CAPTION and second != CAPTION and first != second
    assert "dog running on the beach" in first
    # With a seed, the reply depends on the seed only.
    a, b = (chat_text(chat(client, stub, seed=s)) for s in (11, 12))
    assert a != b
    assert chat_text(chat(client, stub, seed=11)) == a
    r = chat(client, stub, n=3, seed=5)
    assert len({c["message"]["content"] for c in r.json()["choices"]}) == 3
    assert stub.ok_responses == 6
    assert len(stub.requests) == 6
    assert stub.requests[0]["messages"][-1]["content"] == CAPTION


def test_completions_good_reply(stub: StubServer, client: httpx.Client) -> None:
    body = {"model": "m", "prompt": "Rewrite.\nx => y\na red car =>", "max_tokens": 32}
    r = client.post(f"{stub.url}/completions", json=body)
    assert r.status_code == 200
    data = r.json()
    text = data["choices"][0]["text"]
    assert data["choices"][0]["finish_reason"] == "stop"
    assert "a red car" in text and text != "a red car"
    assert stub.ok_responses == 1


def test_reply_override(stub: StubServer, client: httpx.Client) -> None:
    stub.config.reply = lambda caption, body: caption.upper()
    assert chat_text(chat(client, stub, "a cat")) == "A CAT"
    stub.config.boilerplate_rate = 1.0
    assert chat_text(chat(client, stub, "a cat")) == BOILERPLATE_PREFIX + "A CAT"


@pytest.mark.parametrize(
    ("field", "status", "text"),
    [
        ("refusal_rate", 200, REFUSAL_TEXT),
        ("echo_rate", 200, CAPTION),
        ("empty_rate", 200, ""),
        ("error_rate", 500, None),
        ("rate_limit_rate", 429, None),
    ],
)
def test_fault_kinds(
    stub: StubServer, client: httpx.Client, field: str, status: int, text: str | None
) -> None:
    setattr(stub.config, field, 1.0)
    r = chat(client, stub)
    assert r.status_code == status
    if text is not None:
        assert chat_text(r) == text
        assert stub.ok_responses == 1
    else:
        assert "error" in r.json()
        assert stub.ok_responses == 0
    if status == 429:
        assert r.headers["Retry-After"] == "0"
    assert len(stub.requests) == 1


def test_boilerplate(stub: StubServer, client: httpx.Client) -> None:
    stub.config.boilerplate_rate = 1.0
    text = chat_text(chat(client, stub))
    assert text.startswith(BOILERPLATE_PREFIX)
    assert "dog running on the beach" in text[len(BOILERPLATE_PREFIX) :]


def test_malformed(stub: StubServer, client: httpx.Client) -> None:
    stub.config.malformed_rate = 1.0
    bodies = [chat(client, stub) for _ in range(2)]
    assert all(r.status_code == 200 for r in bodies)
    with pytest.raises(ValueError):
        json.loads(bodies[0].content)
    assert "choices" not in bodies[1].json()
    assert stub.ok_responses == 0


def test_drop(stub: StubServer, client: httpx.Client) -> None:
    stub.config.drop_rate = 1.0
    with pytest.raises(httpx.TransportError):
        chat(client, stub)
    stub.config.drop_rate = 0.0
    assert chat(client, stub).status_code == 200  # the client reconnects
    assert len(stub.requests) == 2
    assert stub.outcomes["drop"] == 1


def test_hang(stub: StubServer) -> None:
    stub.config.hang_rate = 1.0
    stub.config.hang_seconds = 30.0  # stop() cuts the sleep short
    with httpx.Client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        chat(c, stub)
    assert stub.outcomes["hang"] == 1


def test_down_fail_first_and_api_key(stub: StubServer, client: httpx.Client) -> None:
    stub.config.down = True
    assert chat(client, stub).status_code == 503
    assert client.get(f"{stub.url}/models").status_code == 503
    stub.config.down = False

    stub.config = StubConfig(fail_first=2)  # a new config object restarts fail_first
    assert [chat(client, stub).status_code for _ in range(3)] == [500, 500, 200]

    stub.config.api_key = "sekret"
    assert chat(client, stub).status_code == 401
    assert client.get(f"{stub.url}/models").status_code == 401
    r = client.post(
        f"{stub.url}/chat/completions",
        json=chat_body(),
        headers={"Authorization": "Bearer sekret"},
    )
    assert r.status_code == 200
    assert len(stub.requests) == 6  # every parsed completion body, faults included


def test_fault_sequence_is_seeded(stub: StubServer, client: httpx.Client) -> None:
    stub.config = StubConfig(error_rate=0.3, rate_limit_rate=0.2, empty_rate=0.2, seed=7)

    def run() -> list[tuple[int, str]]:
        out = []
        for _ in range(30):
            r = chat(client, stub)
            out.append((r.status_code, chat_text(r) if r.status_code == 200 else ""))
        return out

    first = run()
    stub.reset_counters()
    assert run() == first
    assert {status for status, _ in first} == {200, 429, 500}
    assert any(status == 200 and text == "" for status, text in first)
    stub.config.seed = 8
    stub.reset_counters()
    assert run() != first


@pytest.mark.parametrize("concurrency", [64, 128])
def test_concurrent_requests(stub: StubServer, concurrency: int) -> None:
    stub.config.latency = 0.5

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as c:
            url = f"{stub.url}/chat/completions"
            jobs = [c.post(url, json=chat_body(f"caption {i}")) for i in range(concurrency)]
            return await asyncio.gather(*jobs)

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    assert stub.ok_responses == concurrency
    # Tests never assert wall times: the high-water mark shows the requests overlapped.
    assert stub.max_in_flight >= (concurrency * 3) // 4
    stub.reset_counters()
    assert stub.max_in_flight == 0 and stub.requests == [] and stub.ok_responses == 0


def test_stop_leaves_nothing_behind() -> None:
    before = set(threading.enumerate())
    stub = StubServer(StubConfig(hang_seconds=30.0))
    stub.start()
    port = stub.port
    with httpx.Client(timeout=5.0) as c:
        for _ in range(3):  # keep-alive: one connection, idle in the pool when we stop
            assert chat(c, stub).status_code == 200
        stub.config.hang_rate = 1.0
        with httpx.Client(timeout=0.2) as quick, pytest.raises(httpx.ReadTimeout):
            chat(quick, stub)  # its handler is still sleeping when we stop
        stub.stop()
        stub.stop()  # idempotent
        assert set(threading.enumerate()) <= before
        with pytest.raises(httpx.TransportError):
            chat(c, stub)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
