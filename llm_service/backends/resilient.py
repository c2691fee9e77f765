"""Resilience around any backend: the circuit breaker, retries, and per-attempt accounting.

`ResilientBackend` is itself an `LLMBackend`. Each attempt first asks the breaker; a turn that
arrives while it is open fails at once with `circuit_open` and the engine is not called. Only
the wait for the first item of a stream is retried, and only on transient failures
(`upstream_unavailable`: connection refused or reset, 429, 502, 503 busy, 504), with
exponential backoff and full jitter, bounded in attempts and in total time: once a chunk has
been produced nothing is retried, so no client ever sees a token twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from llm_service.backends.base import (
    ChatRequest,
    EngineStatus,
    LLMBackend,
    StreamItem,
    finish_closing,
)
from llm_service.breaker import CircuitBreaker
from llm_service.errors import EngineError, UpstreamUnavailable
from llm_service.metrics import Telemetry


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 2.0
    deadline_s: float = 10.0


class ResilientBackend:
    """An `LLMBackend` that guards another with a circuit breaker and bounded retries."""

    def __init__(
        self,
        inner: LLMBackend,
        breaker: CircuitBreaker,
        retry: RetryPolicy,
        telemetry: Telemetry,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.model = inner.model
        self.context_limit = inner.context_limit
        self.breaker = breaker
        self._retry = retry
        self._telemetry = telemetry

    def count_tokens(self, text: str) -> int | None:
        return self.inner.count_tokens(text)

    async def status(self) -> EngineStatus:
        return await self.inner.status()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        first, stream = await self._open(request)
        async with aclosing(stream):
            try:
                yield first
                async for item in stream:
                    yield item
            except EngineError as exc:
                self._failed(exc)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                self._telemetry.upstream_request("cancelled")
                raise
        self._telemetry.upstream_request("success")

    async def _open(
        self, request: ChatRequest
    ) -> tuple[StreamItem, AsyncGenerator[StreamItem, None]]:
        """Start a stream and wait for its first item, retrying transient failures."""
        policy = self._retry
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.deadline_s),
            wait=wait_random_exponential(multiplier=policy.backoff_s, max=policy.max_backoff_s),
            retry=retry_if_exception_type(UpstreamUnavailable),
            reraise=True,
        )
        last: EngineError | None = None
        async for attempt in retrying:
            if last is not None:
                if self.breaker.state == "open":
                    raise last  # the breaker opened on this turn's own failures: report them
                self._telemetry.upstream_retried()
            with attempt:
                self.breaker.before_call()
                stream = self.inner.stream_chat(request)
                try:
                    first = await anext(stream)
                except EngineError as exc:
                    self._failed(exc)
                    last = exc
                    raise
                except BaseException:
                    self.breaker.record_abandoned()
                    self._telemetry.upstream_request("cancelled")
                    await finish_closing(stream.aclose())
                    raise
                self.breaker.record_success()
                return first, stream
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    def _failed(self, exc: EngineError) -> None:
        self._telemetry.upstream_request(exc.code)
        if exc.engine_fault:
            self.breaker.record_failure()
        else:
            self.breaker.record_abandoned()
