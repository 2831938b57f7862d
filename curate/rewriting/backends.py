"""Where rewrites come from: an OpenAI-compatible server, or the offline `rules` fallback.

A backend turns (caption, uid, rewrite index, attempt) into one raw output string. Failures
are `BackendError`s that say whether a retry can help (429, 5xx, timeouts, dropped or refused
connections, malformed bodies) or not (401, 404, other 4xx). Validation of the text is the
engine's job, not the backend's. A 429 or 5xx answer's ``Retry-After`` (seconds or an HTTP
date) travels with its error for the engine to honour.

The API key is sent as a Bearer token and never shown: every error detail taken from a server
(bodies, connection errors) has the key and any ``Authorization`` value or Bearer token in it
replaced by ``<redacted>`` before it is shortened, so no message, cached reason or log holds it.

Backends are plain data that pickle to the stage's worker processes and Ray workers: the HTTP
session is made in the worker's event loop, and the API key is read from its environment
variable (``--api-key-env``) where the requests are sent, never carried in the pickle, so the
variable must be set wherever workers run. vLLM's model loads on the first request of each
worker process.

In-process vLLM (`--backend vllm`, extra `curate[vllm]`) runs the model inside this process on
a GPU node: requests are gathered into batches for `vllm.LLM.chat` / `generate`. vLLM is
imported only when chosen.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp

from curate.errors import InputError
from curate.rewriting.checks import require_range
from curate.rewriting.prompts import PromptTemplate, build_chat_messages, build_completion_prompt
from curate.rewriting.rules import RULES_VERSION, rules_rewrite

__all__ = [
    "Backend",
    "BackendError",
    "OpenAIBackend",
    "RulesBackend",
    "SamplingParams",
    "VLLMBackend",
    "error_detail",
    "parse_retry_after",
    "redact_secrets",
]

REDACTED = "<redacted>"  # not [redacted]: the CLI prints messages as rich markup


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings sent with every request (LaCLIP-style defaults)."""

    temperature: float = 0.9
    top_p: float = 0.95
    max_tokens: int = 77  # LLM tokens; the CLIP token limit is enforced by validation

    def __post_init__(self) -> None:
        require_range("--temperature", self.temperature, low=0)
        require_range("--top-p", self.top_p, low=0, high=1, low_open=True)
        require_range("--max-tokens", self.max_tokens, low=1, integer=True)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class BackendError(Exception):
    """A request failed; `retryable` says whether trying again can help, `retry_after` how many
    seconds the server asked to wait first (None when it did not say)."""

    def __init__(
        self, code: str, detail: str, *, retryable: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


_DELTA_SECONDS = re.compile(r"\s*(\d+(?:\.\d+)?)\s*")


def parse_retry_after(value: str, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds (``"3"``; a decimal is taken
    too) or an HTTP date (a date in the past gives 0). None when it is neither."""
    match = _DELTA_SECONDS.fullmatch(value)
    if match:
        return float(match.group(1))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 850 / asctime forms carry no zone: HTTP dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


# An Authorization value as servers echo it (`Authorization: Bearer x`, `'authorization': 'x'`,
# `authorization=x`) up to a quote or separator, and any `Bearer <token>`.
_AUTHORIZATION = re.compile(r"(authorization[\"']?\s*[:=]\s*[\"']?)[^\"'\r\n,;}]*", re.IGNORECASE)
_BEARER = re.compile(r"(bearer\s+)[^\s\"',;}]+", re.IGNORECASE)


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret, Authorization value and Bearer token replaced by <redacted>."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _AUTHORIZATION.sub(lambda m: m.group(1) + REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def error_detail(text: str, secrets: Iterable[str], limit: int = 200) -> str:
    """A server's error text for a one-line message: redacted first, then shortened (so a key
    cut by the limit cannot leave a prefix behind)."""
    return " ".join(redact_secrets(text, secrets).split())[:limit]


class Backend(Protocol):
    """What the engine needs from a backend."""

    name: str
    model: str

    def identity(self) -> str:
        """What outputs depend on besides prompts and sampling (part of the cache key)."""
        ...

    async def generate(self, caption: str, *, uid: str, index: int, attempt: int) -> str: ...

    async def aclose(self) -> None: ...


def request_seed(seed: int, uid: str, index: int, attempt: int) -> int:
    """A per-request seed (servers such as vLLM honour it): stable for the same request."""
    digest = hashlib.blake2b(f"{seed}:{uid}:{index}:{attempt}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little") & 0x7FFFFFFF


class OpenAIBackend:
    """`/v1/chat/completions` (api="chat") or `/v1/completions` (api="completions")."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        template: PromptTemplate,
        *,
        api: str = "chat",
        params: SamplingParams | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        concurrency: int = 64,
        seed: int = 0,
    ) -> None:
        require_range("--timeout", timeout, low=0, low_open=True)
        require_range("--concurrency", concurrency, low=1, integer=True)
        if api not in ("chat", "completions"):
            raise InputError(f"--api must be chat or completions, got {api!r}")
        if not base_url.startswith(("http://", "https://")):
            raise InputError(f"--base-url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.template = template
        self.api = api
        self.params = params or SamplingParams()
        self.seed = seed
        self.api_key_env = api_key_env
        self.timeout = timeout
        self._concurrency = concurrency
        self._secrets: tuple[str, ...] = ()  # redacted from every error detail
        self._session: aiohttp.ClientSession | None = None  # made inside the event loop

    def __getstate__(self) -> dict[str, Any]:
        """No session and no key in a pickle: the worker makes its own and reads the key from
        its environment."""
        return {**self.__dict__, "_session": None, "_secrets": ()}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Content-Type": "application/json"}
            key = os.environ.get(self.api_key_env) if self.api_key_env else None
            self._secrets = (key,) if key else ()
            if key:
                headers["Authorization"] = f"Bearer {key}"  # never logged or written anywhere
            # aiohttp, not httpx: httpx's connection pool scans every connection per request
            # and fell to 0.34 of the ideal rate at 64 requests in flight.
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self._concurrency),
            )
        return self._session

    def identity(self) -> str:
        return f"openai:{self.api}:{self.model}"

    def _body(self, caption: str, uid: str, index: int, attempt: int) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": self.params.temperature,
            "top_p": self.params.top_p,
            "max_tokens": self.params.max_tokens,
            "seed": request_seed(self.seed, uid, index, attempt),
        }
        if self.api == "chat":
            body["messages"] = build_chat_messages(
                self.template, caption, uid=uid, index=index, seed=self.seed
            )
            return f"{self.base_url}/chat/completions", body
        body["prompt"] = build_completion_prompt(
            self.template, caption, uid=uid, index=index, seed=self.seed
        )
        body["stop"] = ["\n"]
        return f"{self.base_url}/completions", body

    async def generate(self, caption: str, *, uid: str, index: int, attempt: int) -> str:
        url, body = self._body(caption, uid, index, attempt)
        try:
            async with self._client().post(url, json=body) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                raw = await response.read()
        except asyncio.TimeoutError as exc:
            raise BackendError("timeout", "no answer in time", retryable=True) from exc
        except aiohttp.ClientError as exc:  # refused, reset, dropped mid-response
            detail = error_detail(str(exc) or type(exc).__name__, self._secrets)
            raise BackendError("connection", detail, retryable=True) from None
        text_body = raw.decode("utf-8", errors="replace")
        if status == 429 or status >= 500:
            raise BackendError(
                f"http_{status}",
                error_detail(text_body, self._secrets),
                retryable=True,
                retry_after=parse_retry_after(retry_after) if retry_after is not None else None,
            )
        if status >= 400:
            detail = error_detail(text_body, self._secrets)
            raise BackendError(f"http_{status}", detail, retryable=False)
        try:
            choice = json.loads(text_body)["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            detail = error_detail(text_body, self._secrets)
            raise BackendError("malformed", detail, retryable=True) from exc
        if not isinstance(text, str):
            raise BackendError("malformed", "completion text is not a string", retryable=True)
        return text

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class RulesBackend:
    """The offline fallback: word-level paraphrase from a small synonym table (weak)."""

    name = "rules"
    model = f"rules-{RULES_VERSION}"

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def identity(self) -> str:
        return self.model

    async def generate(self, caption: str, *, uid: str, index: int, attempt: int) -> str:
        # A retry after an invalid output asks for another variant.
        return rules_rewrite(caption, uid=uid, index=index + 1000 * attempt, seed=self.seed)

    async def aclose(self) -> None:
        return None


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise InputError(
            "--backend vllm needs vLLM here: pip install 'curate[vllm]' on a GPU node, or "
            "run `vllm serve MODEL` and use --backend openai --base-url http://HOST:8000/v1"
        ) from exc
    return vllm


class VLLMBackend:
    """vLLM in this process; concurrent `generate` calls are batched (up to `max_batch`)."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        template: PromptTemplate,
        *,
        api: str = "chat",
        params: SamplingParams | None = None,
        seed: int = 0,
        max_batch: int = 256,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        _import_vllm()
        self.model = model
        self.template = template
        self.api = api
        self.params = params or SamplingParams()
        self.seed = seed
        self.max_batch = max_batch
        self.engine_args = dict(engine_args or {})
        self._vllm: Any = None
        self._llm: Any = None  # loaded on the first request, in the process that sends it
        self._queue: list[tuple[Any, Any, asyncio.Future[str]]] = []
        self._flush: asyncio.Task[None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """The settings only: each worker process loads its own model."""
        return {**self.__dict__, "_vllm": None, "_llm": None, "_queue": [], "_flush": None}

    def _engine(self) -> Any:
        if self._llm is None:
            self._vllm = _import_vllm()
            self._llm = self._vllm.LLM(model=self.model, seed=self.seed, **self.engine_args)
        return self._llm

    def identity(self) -> str:
        return f"vllm:{self.api}:{self.model}"

    def _sampling(self, uid: str, index: int, attempt: int) -> Any:
        self._engine()
        return self._vllm.SamplingParams(
            temperature=self.params.temperature,
            top_p=self.params.top_p,
            max_tokens=self.params.max_tokens,
            seed=request_seed(self.seed, uid, index, attempt),
            stop=None if self.api == "chat" else ["\n"],
        )

    async def generate(self, caption: str, *, uid: str, index: int, attempt: int) -> str:
        if self.api == "chat":
            prompt: Any = build_chat_messages(
                self.template, caption, uid=uid, index=index, seed=self.seed
            )
        else:
            prompt = build_completion_prompt(
                self.template, caption, uid=uid, index=index, seed=self.seed
            )
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append((prompt, self._sampling(uid, index, attempt), future))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._run_batches())
        return await future

    async def _run_batches(self) -> None:
        await asyncio.sleep(0)  # let the other workers queue their requests
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            prompts = [p for p, _, _ in batch]
            sampling = [s for _, s, _ in batch]
            llm = self._engine()
            run = llm.chat if self.api == "chat" else llm.generate
            try:
                outputs = await asyncio.to_thread(run, prompts, sampling)
                texts = [out.outputs[0].text for out in outputs]
            except Exception as exc:  # a failed batch (e.g. out of GPU memory) stops the run
                error = BackendError("vllm", str(exc) or type(exc).__name__, retryable=False)
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, _, future), text in zip(batch, texts, strict=True):
                if not future.done():
                    future.set_result(text)

    async def aclose(self) -> None:
        if self._flush is not None:
            await asyncio.gather(self._flush, return_exceptions=True)
