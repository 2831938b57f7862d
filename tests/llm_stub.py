"""A scriptable stub of an OpenAI-compatible LLM server for tests (stdlib only).

``StubServer`` serves ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST
/v1/completions`` on 127.0.0.1 (a free port) from a background thread, one thread per connection
(HTTP/1.1 keep-alive). By default every completion is a short, deterministic paraphrase of the
caption found in the request (see ``extract_caption``); ``StubConfig`` injects latency and faults.

Faults are decided per completion request, in this order:

1. ``down``: 503 (every path, ``GET /v1/models`` included; no random draw);
2. ``api_key``: 401 without ``Authorization: Bearer <key>`` (every path; no random draw);
3. ``fail_first``: the first N completion requests since ``start()``, ``reset_counters()`` or the
   assignment of a new ``config`` object get ``fail_first_status`` (500 unless set), with a
   ``Retry-After: <retry_after>`` header when ``retry_after`` is set (no random draw);
4. one uniform draw ``u`` from ``random.Random(seed)`` (under a lock, so the sequence of outcomes
   by arrival order is deterministic) against the cumulative rates, in this order: drop, hang,
   error, rate_limit, malformed, refusal, boilerplate, echo, empty; otherwise a good reply.
   Rates should sum to at most 1; each is then the marginal fraction of its outcome.

With ``echo_headers`` every error body (401, 5xx, 429) quotes the request's headers, as some
servers and proxies do (``Authorization`` included).

A hung request sleeps ``hang_seconds`` and then answers a good reply, unless the client has gone
(timed out) by then. Sleeps end early when the server stops, so ``stop()`` never waits for them.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REFUSAL_TEXT = "I'm sorry, but I can't help with that."
BOILERPLATE_PREFIX = "Sure, here is a rewritten caption: "
MODEL_ID = "stub-model"

_TEMPLATES = (
    "a photo of {c}",
    "an image showing {c}",
    "{c}, in a picture",
    "a picture of {c}",
    "a close-up photo of {c}",
    "a snapshot of {c}",
)
_MAX_WORDS = 40  # keeps a reply well under CLIP's 77 tokens for ordinary captions

# Outcome names, as counted in ``StubServer.outcomes``.
OUTCOMES = (
    "down",
    "unauthorized",
    "fail_first",
    "drop",
    "hang",
    "error",
    "rate_limit",
    "malformed",
    "refusal",
    "boilerplate",
    "echo",
    "empty",
    "good",
)


@dataclass
class StubConfig:
    latency: float = 0.0  # seconds to sleep before answering every request
    error_rate: float = 0.0  # fraction answered with HTTP 500 (JSON error body)
    rate_limit_rate: float = 0.0  # fraction answered with HTTP 429 (+ "Retry-After: 0")
    malformed_rate: float = 0.0  # fraction answered 200 with invalid JSON / JSON without choices
    drop_rate: float = 0.0  # fraction where the connection is closed without any response
    hang_rate: float = 0.0  # fraction that sleep `hang_seconds` before answering
    hang_seconds: float = 5.0
    refusal_rate: float = 0.0  # fraction answered 200 with REFUSAL_TEXT
    boilerplate_rate: float = 0.0  # fraction answered 200 with BOILERPLATE_PREFIX + a good reply
    echo_rate: float = 0.0  # fraction answered with the original caption unchanged
    empty_rate: float = 0.0  # fraction answered with ""
    api_key: str | None = None  # when set, requests without "Authorization: Bearer <key>" get 401
    seed: int = 0  # seeds the fault draws
    fail_first: int = 0  # the first N completion requests get HTTP `fail_first_status`
    fail_first_status: int = 500
    retry_after: str | None = None  # Retry-After header value of the fail_first answers
    echo_headers: bool = False  # error bodies quote the request headers (Authorization too)
    down: bool = False  # every request gets HTTP 503
    reply: Callable[[str, dict], str] | None = (
        None  # (caption, body) -> good text; overrides default
    )


def extract_caption(body: dict) -> str:
    """The caption a request asks to rewrite.

    Chat: the ``content`` of the last message (text parts joined when it is a list of parts).
    Completions: the last non-blank line of ``prompt`` without its trailing ``=>``.
    """
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        last = messages[-1]
        content = last.get("content", "") if isinstance(last, dict) else ""
        if isinstance(content, list):
            parts = [p.get("text", "") for p in content if isinstance(p, dict)]
            return "".join(p for p in parts if isinstance(p, str))
        return content if isinstance(content, str) else ""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[-1] if prompt else ""
    if not isinstance(prompt, str):
        return ""
    lines = [line for line in prompt.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1].strip()
    if line.endswith("=>"):
        line = line[:-2]
    return line.strip()


def paraphrase(caption: str, k: int) -> str:
    """The ``k``-th deterministic single-line paraphrase of ``caption`` (distinct for each k)."""
    words = caption.split()[:_MAX_WORDS]
    c = " ".join(words).rstrip(".")
    if len(c) > 1 and c[0].isupper() and not c[1].isupper():
        c = c[0].lower() + c[1:]
    n = len(_TEMPLATES)
    text = _TEMPLATES[k % n].format(c=c)
    if k >= n:
        text += f" ({k // n})"
    return text


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, stub: StubServer) -> None:
        self.stub = stub
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can be slow.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        stub = self.stub
        thread = threading.Thread(
            target=self._run, args=(request, client_address), daemon=True, name="llm-stub-conn"
        )
        with stub._lock:
            stub._connections.add(request)
            stub._threads.add(thread)
        thread.start()

    def _run(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)  # closes the socket at the end
        finally:
            with self.stub._lock:
                self.stub._connections.discard(request)
                self.stub._threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) or self.stub._stopping.is_set():
            return  # the client went away (timeouts, drops) or we are stopping
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else Nagle + delayed ACKs add ~40 ms per keep-alive reply
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self._headers_buffer.append(b"\r\n" + data)  # headers and body in one write
        self.flush_headers()

    def _error(self, status: int, message: str, kind: str, headers: dict | None = None) -> None:
        if self.server.stub.config.echo_headers:
            message += f"; request headers: {dict(self.headers.items())}"
        self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _client_gone(self) -> bool:
        """Whether the client has closed its end (a timed-out client, after a hang)."""
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # open, nothing sent: still waiting for its answer
        except OSError:
            return True

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- verbs ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.server.stub._handle(self, "GET", None)

    def do_POST(self) -> None:
        raw = self._read_body()
        self.server.stub._handle(self, "POST", raw)


class StubServer:
    """The stub server; a context manager (``start()`` on enter, ``stop()`` on exit)."""

    def __init__(self, config: StubConfig | None = None) -> None:
        self.config = config if config is not None else StubConfig()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[Any] = set()
        self._threads: set[threading.Thread] = set()
        self._httpd: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self.url = ""
        self.port = 0
        self.reset_counters()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> StubServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self.reset_counters()
        self._httpd = _Server(self)
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="llm-stub-serve",
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()  # ends latency / hang sleeps
        httpd.shutdown()  # no new connections once serve_forever has returned
        if self._serve_thread is not None:
            self._serve_thread.join()
            self._serve_thread = None
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # wakes handlers blocked reading an idle keep-alive connection
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=10)
        httpd.server_close()

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- counters ------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        """Forget requests and counters; restart the fault sequence and ``fail_first``."""
        with self._lock:
            self.requests: list[dict] = []
            self.outcomes: Counter[str] = Counter()
            self.ok_responses = 0
            self.max_in_flight = 0
            self.in_flight = 0
            self._rng = random.Random(self.config.seed)
            self._seen_config = self.config
            self._completion_requests = 0
            self._per_caption: dict[str, int] = {}

    # -- request handling ----------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def _handle(self, h: _Handler, method: str, raw: bytes | None) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._dispatch(h, method, raw)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _dispatch(self, h: _Handler, method: str, raw: bytes | None) -> None:
        cfg = self.config
        path = h.path.split("?", 1)[0].rstrip("/")
        kind = {
            ("GET", "/v1/models"): "models",
            ("POST", "/v1/chat/completions"): "chat",
            ("POST", "/v1/completions"): "completions",
        }.get((method, path))
        body: dict | None = None
        if kind in ("chat", "completions"):
            try:
                body = json.loads(raw or b"")
            except ValueError:
                body = None
            if isinstance(body, dict):
                with self._lock:
                    self.requests.append(body)
        self._sleep(cfg.latency)
        if cfg.down:
            self._count("down")
            h._error(503, "stub server is down", "server_error")
            return
        if cfg.api_key is not None and h.headers.get("Authorization") != f"Bearer {cfg.api_key}":
            self._count("unauthorized")
            h._error(401, "invalid api key", "invalid_request_error")
            return
        if kind is None:
            h._error(404, f"no route for {method} {path}", "invalid_request_error")
            return
        if kind == "models":
            h._send(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})
            return
        if not isinstance(body, dict):
            h._error(400, "request body is not a JSON object", "invalid_request_error")
            return
        if kind == "chat" and not (isinstance(body.get("messages"), list) and body["messages"]):
            h._error(400, "messages must be a non-empty list", "invalid_request_error")
            return
        if kind == "completions" and not isinstance(body.get("prompt"), (str, list)):
            h._error(400, "prompt is required", "invalid_request_error")
            return
        outcome, number = self._draw(cfg)
        self._count(outcome)
        if outcome == "fail_first":
            extra = {"Retry-After": cfg.retry_after} if cfg.retry_after is not None else None
            status = cfg.fail_first_status
            h._error(status, "stub injected failure (fail_first)", "server_error", extra)
        elif outcome == "drop":
            h._drop()
        elif outcome == "error":
            h._error(500, "stub injected internal error", "server_error")
        elif outcome == "rate_limit":
            h._error(429, "stub rate limit", "rate_limit_error", {"Retry-After": "0"})
        elif outcome == "malformed":
            if number % 2 == 0:
                h._send(200, b'{"id": "stub", "object": "chat.completion", "choices": [')
            else:
                h._send(200, {"id": f"stub-{number}", "object": kind, "model": MODEL_ID})
        else:
            if outcome == "hang":
                self._sleep(cfg.hang_seconds)
                if h._client_gone():  # nobody to answer: do not count an ok response
                    h.close_connection = True
                    return
            self._complete(h, kind, body, outcome, number, cfg)

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1

    def _draw(self, cfg: StubConfig) -> tuple[str, int]:
        """(outcome, request number) for a completion request; see the module docstring."""
        with self._lock:
            if cfg is not self._seen_config:  # a new config object restarts the sequence
                self._seen_config = cfg
                self._rng = random.Random(cfg.seed)
                self._completion_requests = 0
            number = self._completion_requests
            self._completion_requests += 1
            if number < cfg.fail_first:
                return "fail_first", number
            u = self._rng.random()
        edge = 0.0
        for name, rate in (
            ("drop", cfg.drop_rate),
            ("hang", cfg.hang_rate),
            ("error", cfg.error_rate),
            ("rate_limit", cfg.rate_limit_rate),
            ("malformed", cfg.malformed_rate),
            ("refusal", cfg.refusal_rate),
            ("boilerplate", cfg.boilerplate_rate),
            ("echo", cfg.echo_rate),
            ("empty", cfg.empty_rate),
        ):
            edge += max(rate, 0.0)
            if u < edge:
                return name, number
        return "good", number

    def _good_text(self, caption: str, body: dict, index: int, cfg: StubConfig) -> str:
        if cfg.reply is not None:
            return cfg.reply(caption, body)
        seed = body.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            k = (seed + index) % (len(_TEMPLATES) * 1_000_000)
        else:
            with self._lock:
                k = self._per_caption.get(caption, 0)
                self._per_caption[caption] = k + 1
        return paraphrase(caption, k)

    def _complete(
        self, h: _Handler, kind: str, body: dict, outcome: str, number: int, cfg: StubConfig
    ) -> None:
        caption = extract_caption(body)
        n = body.get("n", 1)
        n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16 else 1
        texts = []
        for i in range(n):
            if outcome == "refusal":
                texts.append(REFUSAL_TEXT)
            elif outcome == "echo":
                texts.append(caption)
            elif outcome == "empty":
                texts.append("")
            else:
                good = self._good_text(caption, body, i, cfg)
                texts.append(BOILERPLATE_PREFIX + good if outcome == "boilerplate" else good)
        if kind == "chat":
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                for i, text in enumerate(texts)
            ]
            obj, prefix = "chat.completion", "chatcmpl"
        else:
            choices = [
                {"index": i, "text": text, "finish_reason": "stop", "logprobs": None}
                for i, text in enumerate(texts)
            ]
            obj, prefix = "text_completion", "cmpl"
        prompt_tokens = len(json.dumps(body.get("messages", body.get("prompt"))).split())
        completion_tokens = sum(len(t.split()) for t in texts)
        payload = {
            "id": f"{prefix}-stub-{number}",
            "object": obj,
            "created": int(time.time()),
            "model": body.get("model") or MODEL_ID,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        with self._lock:  # counted before the client can see the answer
            self.ok_responses += 1
        try:
            h._send(200, payload)
        except OSError:
            with self._lock:
                self.ok_responses -= 1
            raise
