"""Engines in a pool: routing, a circuit breaker per engine, and failover before the first token.

`EnginePool` is itself an `LLMBackend`, so nothing above it knows whether one engine serves or
ten: a single engine is a pool of one. Each `Upstream` (an Ollama host, an OpenAI-compatible
server, the embedded engine) has its own `CircuitBreaker`, its count of replies in flight,
and a health flag that a background probe refreshes every `LLM_UPSTREAM_PROBE_INTERVAL_S`,
so a dead engine is skipped without a user paying its timeout, and rejoins once it answers.

Routing a turn: the session's own upstream (its home) while it is healthy, its breaker lets
calls through and it has fewer than `LLM_UPSTREAM_MAX_INFLIGHT` replies in flight (0: no
limit); otherwise the healthy upstream with the fewest replies in flight. A session's home is
chosen at its first turn by rendezvous hashing with bounded loads (`Homes`): the first
upstream in the session's own rendezvous order that holds no more than `1 + BALANCE` times an
even share of this process's active sessions. Hashing alone spreads sessions only as evenly
as chance does (200 sessions on 4 upstreams: one upstream 15% off an even share about half
the time); the bound keeps every share within a few percent, while adding or losing an
upstream still moves only about its share, and each session keeps its engine's prompt cache
warm. A home is kept while the session has turns, and forgotten `idle_s` after its last.

Only the wait for the first item of a stream is retried, so no client ever sees a token
twice. A failure there that another engine may not share (unreachable, busy, a timeout, an
engine error, a missing model) is tried on the next upstream at once; once every upstream
has been tried, a transient one (`upstream_unavailable`: refused, reset, 429, 502, 503 busy,
504) is tried again after a backoff with full jitter, within `LLM_RETRY_ATTEMPTS` attempts and
`LLM_RETRY_DEADLINE_S` in all. A turn that finds no breaker admitting a call fails at once
with `circuit_open`, and the engines are not called.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import structlog

from llm_service.backends.base import (
    ChatRequest,
    EngineStatus,
    LLMBackend,
    StreamItem,
    finish_closing,
)
from llm_service.breaker import CircuitBreaker
from llm_service.errors import (
    CircuitOpen,
    EngineError,
    MalformedToolCall,
    ModelNotFound,
    ServiceError,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llm_service.metrics import CIRCUIT_STATES, Telemetry, UpstreamGauges

log = structlog.get_logger("llm_service.pool")

PROBE_DEADLINE_S = 2.0
BALANCE = 0.05  # a home holds at most 5% more than an even share of the active sessions


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 2.0
    deadline_s: float = 10.0

    def backoff(self, rounds: int) -> float:
        """The longest wait after `rounds` rounds of retries (full jitter draws below it)."""
        return min(self.max_backoff_s, self.backoff_s * 2.0**rounds)


class Upstream:
    """One engine of a pool: its breaker, its replies in flight, its last probe."""

    def __init__(self, backend: LLMBackend, label: str, breaker: CircuitBreaker) -> None:
        self.backend = backend
        self.label = label  # its URL without credentials: metrics and /health name it so
        self.breaker = breaker
        self.inflight = 0
        self.healthy = True  # until a probe says otherwise
        self.detail = "not probed yet"

    def admits(self) -> bool:
        return self.breaker.admits()

    async def open(
        self, request: ChatRequest, telemetry: Telemetry
    ) -> tuple[StreamItem, AsyncGenerator[StreamItem, None]]:
        """Start a stream here and wait for its first item (counted in flight until closed)."""
        self.breaker.before_call()
        self.inflight += 1
        stream = self.backend.stream_chat(request)
        try:
            first = await anext(stream)
        except ServiceError as exc:
            self.inflight -= 1
            self.failed(exc, telemetry)
            raise
        except BaseException:
            self.inflight -= 1
            self.breaker.record_abandoned()
            telemetry.upstream_request("cancelled", self.label)
            await finish_closing(stream.aclose())
            raise
        self.breaker.record_success()
        return first, stream

    def failed(self, exc: ServiceError, telemetry: Telemetry) -> None:
        telemetry.upstream_request(exc.code, self.label)
        if isinstance(exc, EngineError) and exc.engine_fault:
            self.breaker.record_failure()
        else:
            self.breaker.record_abandoned()

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self.label,
            "healthy": self.healthy,
            "detail": self.detail,
            "in_flight": self.inflight,
            "circuit_breaker": self.breaker.snapshot(),
        }


class Homes:
    """Each active session's home upstream, by rendezvous hashing with bounded loads.

    A new session goes to the first upstream in its rendezvous order whose count of homed
    sessions is below `ceil((1 + BALANCE) * (sessions + 1) / upstreams)`; there always is
    one, since those bounds add up to more than the sessions. A session keeps its home while
    it has turns; `idle_s` after its last one, it is forgotten (and its upstream's count
    falls), so a session that comes back is placed again, usually where it was.
    """

    def __init__(
        self, labels: Sequence[str], idle_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._idle_s = idle_s
        self._clock = clock
        self._homes: OrderedDict[str, tuple[str, float]] = OrderedDict()  # least recent first
        self.counts = dict.fromkeys(labels, 0)

    def __len__(self) -> int:
        return len(self._homes)

    def home(self, affinity: str, ranked: Sequence[str]) -> str:
        """The home of the session `affinity`, whose rendezvous order is `ranked`."""
        now = self._clock()
        self._forget_idle(now)
        known = self._homes.pop(affinity, None)
        if known is not None:
            label = known[0]
        else:
            counts = self.counts
            bound = math.ceil((1 + BALANCE) * (len(self._homes) + 1) / len(counts))
            label = next(u for u in ranked if counts[u] < bound)
            counts[label] += 1
        self._homes[affinity] = (label, now)
        return label

    def _forget_idle(self, now: float) -> None:
        homes = self._homes
        while homes:
            affinity, (label, used) = next(iter(homes.items()))
            if now - used < self._idle_s:
                return
            del homes[affinity]
            self.counts[label] -= 1


class EnginePool:
    """An `LLMBackend` that routes each turn to one of its upstreams."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        retry: RetryPolicy,
        telemetry: Telemetry,
        *,
        max_inflight: int = 0,
        probe_interval_s: float = 10.0,
        session_idle_s: float = 900.0,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        assert upstreams, "a pool has at least one upstream"
        first = upstreams[0].backend
        self.upstreams = list(upstreams)
        self.name = first.name
        self.model = first.model
        self.label = first.label if len(upstreams) == 1 else f"{len(upstreams)} upstreams"
        self.context_limit = first.context_limit
        self.calls_tools = all(u.backend.calls_tools for u in upstreams)
        self.sampling_defaults = first.sampling_defaults
        self._retry = retry
        self._telemetry = telemetry
        self._max_inflight = max_inflight
        self._probe_interval_s = probe_interval_s
        self._jitter = jitter  # a wait between its two bounds: full jitter
        self._prober: asyncio.Task[None] | None = None
        self.homes = Homes([u.label for u in self.upstreams], session_idle_s)
        self._by_label = {u.label: u for u in self.upstreams}
        telemetry.watch_upstreams(self._gauges)

    def count_tokens(self, text: str) -> int | None:
        return self.upstreams[0].backend.count_tokens(text)

    def start(self) -> None:
        """Probe every upstream in the background from now on (until `aclose`)."""
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.wait({self._prober})
        for upstream in self.upstreams:
            await upstream.backend.aclose()

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        upstream, first, stream = await self._open(request)
        telemetry = self._telemetry
        try:
            async with aclosing(stream):
                try:
                    yield first
                    async for item in stream:
                        yield item
                except ServiceError as exc:
                    upstream.failed(exc, telemetry)
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    telemetry.upstream_request("cancelled", upstream.label)
                    raise
            telemetry.upstream_request("success", upstream.label)
        finally:
            upstream.inflight -= 1

    async def _open(
        self, request: ChatRequest
    ) -> tuple[Upstream, StreamItem, AsyncGenerator[StreamItem, None]]:
        """The first upstream that starts a stream, with its first item ready."""
        policy = self._retry
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + policy.deadline_s
        attempts = rounds = 0
        tried: set[Upstream] = set()
        last: EngineError | None = None
        transient = False  # one of this round's failures may pass if tried again later
        ranked = self._ranked(request.affinity)
        while True:
            upstream = self._next(ranked, tried)
            if last is not None and loop.time() >= give_up_at:
                raise last
            if upstream is None:  # every upstream tried, or none admits a call
                if last is None:
                    raise self._all_open()
                if not transient:  # (the attempt that used up the last one raised already)
                    raise last
                wait = self._jitter(0.0, policy.backoff(rounds))
                if loop.time() + wait > give_up_at:
                    raise last
                rounds += 1
                await asyncio.sleep(wait)
                tried.clear()
                transient = False
                continue
            tried.add(upstream)
            # `_next` hands out only an upstream whose breaker admits a call, and nothing runs
            # between that and `open`'s `before_call`: every attempt reaches its engine.
            try:
                if attempts:
                    self._telemetry.upstream_retried(upstream.label)
                attempts += 1
                return upstream, *await upstream.open(request, self._telemetry)
            except EngineError as exc:
                last = exc
                transient = transient or isinstance(exc, UpstreamUnavailable)
                if not _fails_over(exc) or attempts >= policy.attempts:
                    raise

    def _ranked(self, affinity: str) -> list[Upstream]:
        """The upstreams in the order a session tries them: its home, then its rendezvous
        order (a request with no session: the rendezvous order of the empty name)."""
        upstreams = self.upstreams
        if len(upstreams) == 1:
            return upstreams
        ranked = sorted(upstreams, key=lambda u: _rank(affinity, u.label), reverse=True)
        if not affinity:
            return ranked
        home = self._by_label[self.homes.home(affinity, [u.label for u in ranked])]
        return [home, *(u for u in ranked if u is not home)]

    def _next(self, ranked: list[Upstream], tried: set[Upstream]) -> Upstream | None:
        """The upstream to try next: the session's own while it serves, else the least busy."""
        own = ranked[0]
        open_ = [u for u in ranked if u not in tried and u.admits()]
        healthy = [u for u in open_ if u.healthy] or open_  # none healthy: try them anyway
        if not healthy:
            return None
        limit = self._max_inflight
        if own in healthy and (not limit or own.inflight < limit):
            return own
        return min(healthy, key=lambda u: u.inflight)  # ties go to the higher rank

    def _all_open(self) -> CircuitOpen:
        waits = [u.breaker.retry_after() for u in self.upstreams]
        wait_ms = max(1, round(min(waits) * 1000))
        engines = "the engine" if len(self.upstreams) == 1 else "every engine"
        return CircuitOpen(
            f"{engines} failed repeatedly; calls are paused (next try in {wait_ms} ms)",
            retry_after_ms=wait_ms,
        )

    async def status(self) -> EngineStatus:
        statuses = await self.probe()
        if len(statuses) == 1:
            return statuses[0]
        answering = [s for s in statuses if s.reachable]
        found = [s.model_available for s in answering if s.model_available is not None]
        return EngineStatus(
            reachable=bool(answering),
            detail=f"{len(answering)} of {len(statuses)} upstreams answer",
            version=answering[0].version if answering else None,
            model_available=True if any(found) else (False if found else None),
        )

    async def probe(self) -> list[EngineStatus]:
        """Ask every upstream how it is, at once; each one's health follows its answer."""
        return list(await asyncio.gather(*(self._probe(u) for u in self.upstreams)))

    async def _probe(self, upstream: Upstream) -> EngineStatus:
        try:
            async with asyncio.timeout(PROBE_DEADLINE_S):
                status = await upstream.backend.status()
        except TimeoutError:
            status = EngineStatus(
                reachable=False, detail=f"{upstream.label} did not answer within 2 s"
            )
        # A probe only says whether to route to the engine at all. Its breaker, opened by failed
        # chats, recovers through a chat of its own (after CIRCUIT_BREAKER_RECOVERY_TIMEOUT): an
        # engine can answer a probe and fail every chat (out of GPU memory, say).
        upstream.healthy = status.reachable and status.model_available is not False
        upstream.detail = status.detail
        return status

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval_s)
            try:
                await self.probe()
            except Exception:  # the background task's boundary: probing must go on
                log.exception("upstream_probe_failed")

    def all_open(self) -> bool:
        return all(u.breaker.state == "open" for u in self.upstreams)

    def breaker_snapshot(self) -> dict[str, Any]:
        """The breaker of a single engine; for a pool, how many of its breakers are open."""
        if len(self.upstreams) == 1:
            return self.upstreams[0].breaker.snapshot()
        opened = sum(u.breaker.state == "open" for u in self.upstreams)
        state = "open" if opened == len(self.upstreams) else "closed"
        return {"state": state, "open": opened, "upstreams": len(self.upstreams)}

    def snapshot(self) -> list[dict[str, Any]]:
        counts = self.homes.counts
        return [{**u.snapshot(), "sessions": counts[u.label]} for u in self.upstreams]

    def _gauges(self) -> list[UpstreamGauges]:
        return [
            UpstreamGauges(u.label, CIRCUIT_STATES[u.breaker.state], u.inflight, u.healthy)
            for u in self.upstreams
        ]


def _rank(affinity: str, label: str) -> int:
    """Rendezvous hashing: each (session, upstream) pair's weight; the highest wins."""
    digest = hashlib.blake2b(f"{affinity}\x00{label}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _fails_over(exc: EngineError) -> bool:
    """Whether another upstream might do better where this one failed."""
    if isinstance(exc, UpstreamRejected | MalformedToolCall):
        return False  # the request was refused, or the model misspoke: not the engine's fault
    return isinstance(exc, UpstreamUnavailable | UpstreamTimeout | UpstreamError | ModelNotFound)
