"""Sending rewrite requests: bounded concurrency, retries with backoff, validation, a breaker.

Every job (uid, rewrite index, caption) ends as a valid rewrite or a failure with a reason:

- transport trouble (429, 5xx, timeouts, dropped connections, malformed bodies) is retried up
  to `max_retries` times, waiting `backoff · 2^k` seconds (at most `max_backoff`) with full
  jitter; a job that still fails ends as ``failed: <code>`` and is not cached, so a rerun
  tries it again;
- a 429 or 5xx with ``Retry-After`` waits at least what the server asked, at most
  `max_retry_after` seconds (60 by default: a server asking for more is asked again then); the
  wait spends one retry like any other. Such an answer says the server is busy, not broken, so
  it does not count towards the breaker below unless it used up the job's last retry;
- an output that fails validation (empty, identical, multi-line, too long, refusal,
  boilerplate) is asked for again up to `max_invalid` times, then ends as ``invalid: <reason>``
  and is cached;
- a non-retryable error (401, 404, other 4xx) stops the run with one line, as does a server
  that stays unreachable or answers errors to more than `max_error_rate` of the last
  `error_window` requests.

Valid results and invalid ones are written to the cache as they finish. Cleaning and
validating an output (tokenizing it) runs in a worker thread, so a huge answer never holds up
the event loop and with it every other request in flight.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from curate.errors import CurateError
from curate.rewriting.backends import Backend, BackendError
from curate.rewriting.cache import CachedResult, RequestCache
from curate.rewriting.checks import require_range
from curate.rewriting.validate import check_rewrite, clean_output, warm_up

__all__ = ["EngineOptions", "Job", "RewriteAborted", "run_jobs_async"]


class RewriteAborted(CurateError):
    """The server is unreachable, refuses the requests, or fails too often to go on."""


@dataclass(frozen=True)
class Job:
    """One request to make: rewrite `index` of the caption of `uid`, cached under `key`."""

    key: str
    uid: str
    index: int
    caption: str


@dataclass(frozen=True)
class EngineOptions:
    """Concurrency, retry and stop settings."""

    concurrency: int = 64
    max_retries: int = 6
    max_invalid: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    error_window: int = 200
    max_error_rate: float = 0.5
    max_retry_after: float = 60.0  # longest wait a Retry-After header gets
    seed: int = 0  # jitter only; outputs never depend on it

    def __post_init__(self) -> None:
        require_range("--concurrency", self.concurrency, low=1, integer=True)
        require_range("--max-retries", self.max_retries, low=0, integer=True)
        require_range("--max-invalid", self.max_invalid, low=0, integer=True)
        require_range("--max-error-rate", self.max_error_rate, low=0, high=1)
        require_range("backoff", self.backoff, low=0)
        require_range("max_backoff", self.max_backoff, low=0)
        require_range("error_window", self.error_window, low=1, integer=True)
        require_range("max_retry_after", self.max_retry_after, low=0)


class _Breaker:
    """Recent request outcomes; trips when errors dominate or nothing ever got through."""

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.recent: deque[bool] = deque(maxlen=options.error_window)
        self.ever_ok = False
        self.last_error = ""

    def record(self, ok: bool, error: str = "") -> None:
        self.recent.append(ok)
        self.ever_ok = self.ever_ok or ok
        if not ok:
            self.last_error = error

    def check(self, url: str) -> None:
        n = len(self.recent)
        failures = n - sum(self.recent)
        if not self.ever_ok and failures >= min(20, self.options.error_window):
            raise RewriteAborted(
                f"no request to {url} has succeeded ({failures} tries); last error: "
                f"{self.last_error}"
            )
        if n >= min(50, self.options.error_window) and failures / n > self.options.max_error_rate:
            raise RewriteAborted(
                f"{failures} of the last {n} requests to {url} failed (over "
                f"{self.options.max_error_rate:.0%}); last error: {self.last_error}"
            )


Sleep = Callable[[float], Awaitable[None]]
Validator = Callable[[str, str], str | None]


def _retry_delay(
    options: EngineOptions, transport: int, retry_after: float | None, rng: random.Random
) -> float:
    """Seconds before retry number `transport`: jittered backoff, or at least what the server
    asked for (capped at `max_retry_after`)."""
    backoff = rng.uniform(0, min(options.max_backoff, options.backoff * 2 ** (transport - 1)))
    if retry_after is None:
        return backoff
    return max(min(retry_after, options.max_retry_after), backoff)


def _checked(validator: Validator, caption: str, raw: str) -> tuple[str, str | None]:
    """The cleaned output and its rejection reason (None when valid); CPU work for a thread."""
    text = clean_output(raw)
    return text, validator(caption, text)


async def _one_job(
    job: Job,
    backend: Backend,
    options: EngineOptions,
    breaker: _Breaker,
    rng: random.Random,
    validator: Validator,
    where: str,
    sleep: Sleep,
) -> tuple[CachedResult, bool]:
    """The result of one job and whether to cache it."""
    invalid = transport = attempts = 0
    last_reason = ""
    while True:
        attempts += 1
        try:
            raw = await backend.generate(job.caption, uid=job.uid, index=job.index, attempt=invalid)
        except BackendError as exc:
            if not exc.retryable:
                breaker.record(False, str(exc))
                raise RewriteAborted(f"{where} refused the request: {exc}") from exc
            transport += 1
            exhausted = transport > options.max_retries
            if exc.retry_after is None or exhausted:
                breaker.record(False, str(exc))
                breaker.check(where)
            if exhausted:
                return CachedResult(None, f"failed: {exc.code}", attempts), False
            await sleep(_retry_delay(options, transport, exc.retry_after, rng))
            continue
        breaker.record(True)
        text, reason = await asyncio.to_thread(_checked, validator, job.caption, raw)
        if reason is None:
            return CachedResult(text, None, attempts), True
        invalid += 1
        last_reason = reason
        if invalid > options.max_invalid:
            return CachedResult(None, f"invalid: {last_reason}", attempts), True


async def run_jobs_async(
    jobs: Sequence[Job],
    backend: Backend,
    cache: RequestCache,
    options: EngineOptions,
    *,
    where: str,
    on_done: Callable[[Job, CachedResult], None] | None = None,
    validator: Validator | None = None,
    sleep: Sleep = asyncio.sleep,
) -> dict[str, CachedResult]:
    """Run `jobs` against `backend` in the running event loop; results by job key. `sleep`
    waits between retries (tests pass one that records the delays)."""
    if not jobs:
        return {}
    check: Validator = check_rewrite if validator is None else validator
    if validator is None:
        await asyncio.to_thread(warm_up)  # before any request is in flight
    results: dict[str, CachedResult] = {}
    breaker = _Breaker(options)
    rng = random.Random(options.seed)
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            result, keep = await _one_job(job, backend, options, breaker, rng, check, where, sleep)
            if keep:
                cache.put(job.key, result)
            results[job.key] = result
            if on_done:
                on_done(job, result)

    workers = [asyncio.create_task(worker()) for _ in range(min(options.concurrency, len(jobs)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return results
