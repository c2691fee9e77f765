"""The engine pool in-process, over fake engines (`LLMBackend`): the retry loop before the
first item (failover, rounds after a backoff, the attempt and deadline limits, breakers that
open on the way), what each upstream counts (replies in flight, its breaker, the requests by
outcome), the probe and its 2-second deadline, and what /health and /metrics read from it.
tests/test_pool.py drives pools over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import structlog

from llm_service.backends.base import (
    ChatMessage,
    ChatRequest,
    EngineStatus,
    StreamEnd,
    StreamItem,
)
from llm_service.backends.pool import EnginePool, Homes, RetryPolicy, Upstream
from llm_service.breaker import CircuitBreaker
from llm_service.errors import (
    CircuitOpen,
    EngineBusy,
    EngineError,
    ModelNotFound,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llm_service.metrics import Telemetry
from llm_service.sampling import SamplingParams
from tests.fakes.backend import FakeBackend, Scripted
from tests.support import FakeClock

FAST = RetryPolicy(attempts=3, backoff_s=0.001, max_backoff_s=0.002, deadline_s=10.0)


class Engine(FakeBackend):
    """A fake engine with its own label, a status the test sets, and a record of its close."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.answer = EngineStatus(reachable=True, detail=f"{label} ok", version="1",
                                   model_available=True)  # fmt: skip
        self.status_error: Exception | None = None
        self.closed = False
        self.probed: asyncio.Queue[None] = asyncio.Queue()  # an item a status() call

    async def status(self) -> EngineStatus:
        await super().status()
        self.probed.put_nowait(None)
        if self.status_error is not None:
            error, self.status_error = self.status_error, None
            raise error
        return self.answer

    async def aclose(self) -> None:
        self.closed = True


def failing(*errors: EngineError) -> list[Scripted]:
    return [Scripted([], error=error) for error in errors]


def pool_of(
    engines: Sequence[Engine],
    retry: RetryPolicy = FAST,
    *,
    threshold: int = 5,
    clock: FakeClock | None = None,
    **options: Any,
) -> EnginePool:
    clock = clock or FakeClock()
    upstreams = [Upstream(e, e.label, CircuitBreaker(threshold, 15.0, clock)) for e in engines]
    return EnginePool(upstreams, retry, Telemetry(), **options)


def request(affinity: str = "session-1") -> ChatRequest:
    return ChatRequest([ChatMessage("user", "hi")], SamplingParams(), 8192, affinity=affinity)


async def reply(pool: EnginePool, affinity: str = "session-1") -> list[StreamItem]:
    async with asyncio.timeout(10):
        return [item async for item in pool.stream_chat(request(affinity))]


def requests(pool: EnginePool, outcome: str, label: str) -> float:
    value = pool._telemetry.registry.get_sample_value(
        "llm_service_upstream_requests_total", {"outcome": outcome, "upstream": label}
    )
    return value or 0.0


def retries(pool: EnginePool, label: str) -> float:
    value = pool._telemetry.registry.get_sample_value(
        "llm_service_upstream_retries_total", {"upstream": label}
    )
    return value or 0.0


def gauge(pool: EnginePool, name: str, label: str) -> float | None:
    return pool._telemetry.registry.get_sample_value(f"llm_service_{name}", {"upstream": label})


def healthy(pool: EnginePool) -> list[bool]:
    return [u.healthy for u in pool.upstreams]


def two_engines(retry: RetryPolicy = FAST, **options: Any) -> tuple[EnginePool, Engine, Engine]:
    """A pool of engines a and b, and both in the order session-1 tries them."""
    pool = pool_of([Engine("a"), Engine("b")], retry, **options)
    own, other = in_order(pool)
    return pool, own, other


def in_order(pool: EnginePool, affinity: str = "session-1") -> list[Engine]:
    """The engines in the order this session tries them (its home first)."""
    return [u.backend for u in pool._ranked(affinity)]  # type: ignore[misc]


# --- the retry loop ---------------------------------------------------------------------------


async def test_a_transient_failure_on_every_upstream_is_tried_again_after_a_backoff() -> None:
    pool, own, other = two_engines()
    own.script.extend(failing(UpstreamUnavailable("refused")))
    other.script.extend(failing(UpstreamUnavailable("refused")))
    items = await reply(pool)
    assert items[0] == "ok" and isinstance(items[-1], StreamEnd)
    assert (len(own.calls), len(other.calls)) == (2, 1)  # own, other, then own again
    assert retries(pool, other.label) == 1 and retries(pool, own.label) == 1
    assert requests(pool, "upstream_unavailable", own.label) == 1
    assert requests(pool, "success", own.label) == 1
    assert [u.inflight for u in pool.upstreams] == [0, 0]


async def test_attempts_bound_the_calls_to_the_engines() -> None:
    engine = Engine("a")
    pool = pool_of([engine], RetryPolicy(attempts=3, backoff_s=0.001, max_backoff_s=0.002))
    engine.script.extend(failing(*(UpstreamUnavailable(f"refused {i}") for i in range(5))))
    with pytest.raises(UpstreamUnavailable, match="refused 2"):
        await reply(pool)
    assert len(engine.calls) == 3
    assert retries(pool, "a") == 2
    assert pool.upstreams[0].inflight == 0


async def test_one_attempt_means_no_failover() -> None:
    pool, own, other = two_engines(RetryPolicy(attempts=1))
    own.script.extend(failing(UpstreamUnavailable("refused")))
    with pytest.raises(UpstreamUnavailable):
        await reply(pool)
    assert (len(own.calls), len(other.calls)) == (1, 0)


@pytest.mark.parametrize(
    "error", [UpstreamTimeout("slow"), UpstreamError("500"), ModelNotFound("no such model")]
)
async def test_a_failure_another_engine_may_not_share_fails_over_once_and_no_more(
    error: EngineError,
) -> None:
    """Not transient: each upstream is tried once, then the last failure is the answer."""
    pool, own, other = two_engines()
    own.script.extend(failing(error))
    other.script.extend(failing(type(error)("the other one failed too")))
    with pytest.raises(type(error), match="the other one"):
        await reply(pool)
    assert (len(own.calls), len(other.calls)) == (1, 1)
    assert retries(pool, other.label) == 1


async def test_one_transient_failure_in_a_round_earns_the_round_a_retry() -> None:
    pool, own, other = two_engines()
    own.script.extend(failing(UpstreamUnavailable("refused")))
    other.script.extend(failing(UpstreamTimeout("slow")))
    assert (await reply(pool))[0] == "ok"
    assert (len(own.calls), len(other.calls)) == (2, 1)


@pytest.mark.parametrize("error", [UpstreamRejected("400: bad request"), EngineBusy("queue")])
async def test_refused_requests_are_not_failed_over_and_busy_ones_are(error: EngineError) -> None:
    pool, own, other = two_engines()
    own.script.extend(failing(error))
    if isinstance(error, UpstreamRejected):
        with pytest.raises(UpstreamRejected):
            await reply(pool)
        assert len(other.calls) == 0
    else:
        assert (await reply(pool))[0] == "ok"
        assert len(other.calls) == 1


async def test_the_backoff_is_capped() -> None:
    """backoff_s alone would wait far past the deadline, so only the cap lets the retry run."""
    engine = Engine("a")
    pool = pool_of([engine], RetryPolicy(attempts=3, backoff_s=1e6, max_backoff_s=0.01))
    engine.script.extend(failing(UpstreamUnavailable("refused")))
    assert (await reply(pool))[0] == "ok"
    assert len(engine.calls) == 2


def test_the_backoff_doubles_each_round_up_to_its_cap() -> None:
    policy = RetryPolicy(backoff_s=0.25, max_backoff_s=2.0)
    assert [policy.backoff(rounds) for rounds in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


async def test_each_round_of_retries_waits_below_a_doubled_bound() -> None:
    bounds: list[tuple[float, float]] = []

    def jitter(low: float, high: float) -> float:
        bounds.append((low, high))
        return 0.0

    engine = Engine("a")
    policy = RetryPolicy(attempts=5, backoff_s=1.0, max_backoff_s=100.0)
    pool = pool_of([engine], policy, jitter=jitter)
    engine.script.extend(failing(*(UpstreamUnavailable("refused") for _ in range(3))))
    assert (await reply(pool))[0] == "ok"
    assert bounds == [(0.0, 1.0), (0.0, 2.0), (0.0, 4.0)]


async def test_a_backoff_that_would_end_past_the_deadline_is_not_waited() -> None:
    """The wait drawn (1,000 s) would end past the 1 s deadline: the turn fails at once with
    the engine's error instead of sleeping (past the test's 10 s limit)."""
    engine = Engine("a")
    policy = RetryPolicy(attempts=3, backoff_s=1000.0, max_backoff_s=1000.0, deadline_s=1.0)
    pool = pool_of([engine], policy, jitter=lambda low, high: high)
    engine.script.extend(failing(UpstreamUnavailable("refused")))
    with pytest.raises(UpstreamUnavailable):
        await reply(pool)
    assert len(engine.calls) == 1


async def test_no_retry_waits_past_the_deadline() -> None:
    engine = Engine("a")
    policy = RetryPolicy(attempts=100, backoff_s=0.02, max_backoff_s=0.02, deadline_s=0.2)
    pool = pool_of([engine], policy)
    engine.script.extend(failing(*(UpstreamUnavailable("refused") for _ in range(100))))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamUnavailable):
        await reply(pool)
    assert loop.time() - started < 0.2 + 0.05 + 1.0  # the deadline, one backoff, slack
    assert 1 < len(engine.calls) < 100


async def test_a_failure_after_the_deadline_ends_the_turn_with_it() -> None:
    """The deadline has passed when the first upstream fails: the second is not tried."""
    pool, own, other = two_engines(RetryPolicy(attempts=3, deadline_s=0.05))
    slow = asyncio.Event()
    own.script.append(Scripted([], error=UpstreamTimeout("slow"), before=slow))
    asyncio.get_running_loop().call_later(0.1, slow.set)
    with pytest.raises(UpstreamTimeout):
        await reply(pool)
    assert len(other.calls) == 0


async def test_a_breaker_that_opens_during_the_retries_stops_them() -> None:
    engine = Engine("a")
    pool = pool_of([engine], threshold=1)
    engine.script.extend(failing(UpstreamUnavailable("refused"), UpstreamUnavailable("again")))
    with pytest.raises(UpstreamUnavailable, match="refused"):
        await reply(pool)
    assert len(engine.calls) == 1
    assert pool.upstreams[0].breaker.state == "open"
    with pytest.raises(CircuitOpen):  # the next turn does not reach the engine
        await reply(pool)
    assert len(engine.calls) == 1


async def test_with_every_breaker_open_a_turn_fails_at_once_saying_when_to_try() -> None:
    clock = FakeClock()
    engines = [Engine("a"), Engine("b")]
    pool = pool_of(engines, threshold=1, clock=clock)
    for upstream in pool.upstreams:
        upstream.breaker.record_failure()
        clock.now += 5.0  # a opened 10 s before now, b 5 s (recovery: 15 s)
    with pytest.raises(CircuitOpen, match="every engine failed repeatedly") as caught:
        await reply(pool)
    assert caught.value.retry_after_ms == 5000  # the sooner of the two
    assert "5000 ms" in str(caught.value)
    assert all(len(e.calls) == 0 for e in engines)
    assert pool.all_open()
    single = pool_of([Engine("c")], threshold=1, clock=clock)
    single.upstreams[0].breaker.record_failure()
    clock.now += 15.0  # due: the half-open probe goes through
    assert (await reply(single))[0] == "ok"
    single.upstreams[0].breaker.record_failure()
    with pytest.raises(CircuitOpen, match="the engine failed") as caught:
        await reply(single)
    assert caught.value.retry_after_ms == 15000


async def test_a_breaker_whose_wait_is_over_rounds_up_to_one_ms() -> None:
    clock = FakeClock()
    pool = pool_of([Engine("a")], threshold=1, clock=clock)
    pool.upstreams[0].breaker.record_failure()
    clock.now += 14.9999
    with pytest.raises(CircuitOpen) as caught:
        await reply(pool)
    assert caught.value.retry_after_ms == 1


# --- what an upstream counts --------------------------------------------------------------------


async def test_an_engine_fault_counts_against_the_breaker_and_a_busy_engine_does_not() -> None:
    engine = Engine("a")
    pool = pool_of([engine], RetryPolicy(attempts=1))
    breaker = pool.upstreams[0].breaker
    engine.script.extend(failing(UpstreamUnavailable("refused"), EngineBusy("queue full")))
    with pytest.raises(UpstreamUnavailable):
        await reply(pool)
    assert breaker.failures == 1
    with pytest.raises(EngineBusy):
        await reply(pool)
    assert breaker.failures == 1 and breaker.admits()
    assert requests(pool, "upstream_unavailable", "a") == 2
    assert pool.upstreams[0].inflight == 0


async def test_a_success_resets_the_breakers_count() -> None:
    engine = Engine("a")
    pool = pool_of([engine], RetryPolicy(attempts=1))
    engine.script.extend(failing(UpstreamUnavailable("refused")))
    with pytest.raises(UpstreamUnavailable):
        await reply(pool)
    await reply(pool)
    assert pool.upstreams[0].breaker.failures == 0


async def test_a_failure_mid_stream_is_counted_and_not_retried() -> None:
    pool, own, other = two_engines()
    own.script.append(Scripted(["Hel"], error=UpstreamError("engine crashed")))
    seen: list[StreamItem] = []
    with pytest.raises(UpstreamError):
        async for item in pool.stream_chat(request()):
            seen.append(item)
    assert seen == ["Hel"] and len(other.calls) == 0
    assert requests(pool, "upstream_error", own.label) == 1
    assert requests(pool, "success", own.label) == 0
    assert pool._by_label[own.label].breaker.failures == 1
    assert [u.inflight for u in pool.upstreams] == [0, 0]


async def test_each_reply_counts_in_flight_until_it_is_closed() -> None:
    engine = Engine("a")
    pool = pool_of([engine])
    gate = asyncio.Event()
    engine.script.append(Scripted(["one", "two"], gate=gate))
    engine.script.append(Scripted(["uno", "dos"], gate=gate))
    stream = pool.stream_chat(request())
    assert await anext(stream) == "one"
    assert pool.upstreams[0].inflight == 1
    second = pool.stream_chat(request("session-2"))
    assert await anext(second) == "uno"
    assert pool.upstreams[0].inflight == 2
    assert gauge(pool, "upstream_in_flight", "a") == 2
    await stream.aclose()  # the client went away
    assert pool.upstreams[0].inflight == 1
    await second.aclose()
    assert pool.upstreams[0].inflight == 0
    assert engine.closed_streams == 2
    assert requests(pool, "cancelled", "a") == 2
    assert requests(pool, "success", "a") == 0


async def test_a_turn_cancelled_before_the_first_item_closes_the_engines_stream() -> None:
    engine = Engine("a")
    pool = pool_of([engine])
    engine.script.append(Scripted(["late"], before=asyncio.Event()))  # never answers
    task = asyncio.create_task(reply(pool))
    await asyncio.wait_for(engine.asked.wait(), 5)
    assert pool.upstreams[0].inflight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.closed_streams == 1
    assert pool.upstreams[0].inflight == 0
    assert requests(pool, "cancelled", "a") == 1
    breaker = pool.upstreams[0].breaker
    assert breaker.failures == 0 and breaker.admits()


async def test_a_half_open_breaker_admits_one_probe_and_others_go_elsewhere() -> None:
    clock = FakeClock()
    pool, own, other = two_engines(threshold=1, clock=clock)
    home = pool._by_label[own.label]
    home.breaker.record_failure()
    clock.now += 15.0  # due for a probe
    gate = asyncio.Event()
    own.script.append(Scripted(["probe"], before=gate))
    probe = asyncio.create_task(reply(pool))
    await asyncio.wait_for(own.asked.wait(), 5)
    assert home.breaker.snapshot()["state"] == "half_open"
    assert (await reply(pool))[0] == "ok"  # the same session's next turn, while probing
    assert len(other.calls) == 1
    gate.set()
    assert (await probe)[0] == "probe"
    assert home.breaker.snapshot()["state"] == "closed"


# --- routing ----------------------------------------------------------------------------------


def test_a_session_is_forgotten_the_moment_it_has_been_idle_for_the_limit() -> None:
    clock = FakeClock()
    homes = Homes(["a", "b"], idle_s=10.0, clock=clock)
    homes.home("s1", ["a", "b"])
    clock.now += 5.0
    homes.home("s2", ["b", "a"])
    assert len(homes) == 2
    clock.now += 5.0  # s1: idle for exactly 10 s (whole numbers: exact in floating point)
    homes.home("s2", ["b", "a"])
    assert len(homes) == 1 and homes.counts == {"a": 0, "b": 1}


def test_the_least_busy_upstream_serves_when_the_own_one_cannot_and_ties_go_by_rank() -> None:
    engines = [Engine(label) for label in "abcd"]
    pool = pool_of(engines)
    ranked = pool._ranked("session-1")
    own = ranked[0]
    own.healthy = False
    assert pool._next(ranked, set()) is ranked[1]  # all at 0 in flight: the next in rank
    ranked[1].inflight = 2
    ranked[2].inflight = 1
    ranked[3].inflight = 1
    assert pool._next(ranked, set()) is ranked[2]
    assert pool._next(ranked, {ranked[2]}) is ranked[3]


def test_a_request_without_a_session_follows_the_rendezvous_order_and_is_not_homed() -> None:
    pool = pool_of([Engine(label) for label in "abc"])
    first = pool._ranked("")
    assert pool._ranked("") == first
    assert len(pool.homes) == 0 and sum(pool.homes.counts.values()) == 0
    pool._ranked("session-1")
    assert len(pool.homes) == 1 and sum(pool.homes.counts.values()) == 1


def test_a_pool_reads_as_its_first_engine_and_calls_tools_only_if_all_can() -> None:
    a, b = Engine("a"), Engine("b")
    b.calls_tools = False
    a.model = "m1"
    a.context_limit = 4096
    a.sampling_defaults = {"temperature": 0.6}
    pool = pool_of([a, b])
    assert (pool.name, pool.model, pool.label) == ("fake", "m1", "2 upstreams")
    assert pool.calls_tools is False
    assert pool.context_limit == 4096 and pool.sampling_defaults == {"temperature": 0.6}
    assert pool_of([a]).label == "a" and pool_of([a]).calls_tools is True
    c = Engine("c")
    c._tokens_per_char = 0.5
    assert pool_of([c, a]).count_tokens("abcd") == 2
    assert pool_of([a, c]).count_tokens("abcd") is None


def test_health_and_metrics_read_each_upstreams_state() -> None:
    pool = pool_of([Engine("a"), Engine("b")], threshold=1)
    a, b = pool.upstreams
    assert [s["detail"] for s in pool.snapshot()] == ["not probed yet"] * 2
    pool._ranked("session-1")
    a.breaker.record_failure()
    b.healthy = False
    b.inflight = 2
    assert pool.breaker_snapshot() == {"state": "closed", "open": 1, "upstreams": 2}
    assert not pool.all_open()
    snapshot = {s["url"]: s for s in pool.snapshot()}
    assert sum(s["sessions"] for s in snapshot.values()) == 1
    assert snapshot["b"]["healthy"] is False and snapshot["b"]["in_flight"] == 2
    assert snapshot["a"]["circuit_breaker"]["state"] == "open"
    assert gauge(pool, "circuit_state", "a") == 2 and gauge(pool, "circuit_state", "b") == 0
    assert gauge(pool, "upstream_up", "a") == 1 and gauge(pool, "upstream_up", "b") == 0
    assert gauge(pool, "upstream_in_flight", "b") == 2
    b.breaker.record_failure()
    assert pool.breaker_snapshot()["state"] == "open" and pool.all_open()
    single = pool_of([Engine("c")])
    assert single.breaker_snapshot() == single.upstreams[0].breaker.snapshot()


# --- probes -------------------------------------------------------------------------------------


async def test_a_pool_answers_while_one_upstream_does() -> None:
    a, b = Engine("a"), Engine("b")
    b.answer = EngineStatus(reachable=False, detail="b: connection refused")
    pool = pool_of([a, b])
    status = await pool.status()
    assert status.reachable and status.detail == "1 of 2 upstreams answer"
    assert status.version == "1" and status.model_available is True
    assert healthy(pool) == [True, False]
    assert pool.upstreams[1].detail == "b: connection refused"
    a.answer = EngineStatus(reachable=True, detail="a", version="2", model_available=False)
    status = await pool.status()
    assert status.reachable and status.model_available is False and status.version == "2"
    assert healthy(pool) == [False, False]  # a answers, but without the model
    a.answer = EngineStatus(reachable=True, detail="a", model_available=None)
    status = await pool.status()
    assert status.model_available is None and healthy(pool) == [True, False]  # unknown: routed
    a.answer = b.answer
    status = await pool.status()
    assert not status.reachable and status.version is None and status.model_available is None
    assert status.detail == "0 of 2 upstreams answer"


async def test_a_single_engines_status_is_its_own() -> None:
    a = Engine("a")
    assert await pool_of([a]).status() == a.answer


async def test_a_probe_that_does_not_answer_in_two_seconds_marks_the_upstream_down() -> None:
    a, b = Engine("a"), Engine("b")
    b.status_gate = asyncio.Event()  # never set
    pool = pool_of([a, b])
    async with asyncio.timeout(6):
        status = await pool.status()
    assert status.detail == "1 of 2 upstreams answer"
    assert pool.upstreams[1].healthy is False
    assert pool.upstreams[1].detail == "b did not answer within 2 s"


async def test_the_background_probe_runs_on_through_a_failure_and_stops_on_close() -> None:
    a, b = Engine("a"), Engine("b")
    a.status_error = RuntimeError("a bug in a probe")
    pool = pool_of([a, b], probe_interval_s=0.01)
    b.answer = EngineStatus(reachable=False, detail="down")
    with structlog.testing.capture_logs() as logs:
        pool.start()
        pool.start()  # once only
        async with asyncio.timeout(5):
            for _ in range(3):  # the first probe failed, the next ones ran
                await a.probed.get()
            await b.probed.get()
        await pool.aclose()
    assert healthy(pool) == [True, False]
    assert [entry["event"] for entry in logs].count("upstream_probe_failed") == 1
    calls = a.status_calls
    await asyncio.sleep(0.05)
    assert a.status_calls == calls  # stopped
    assert a.closed and b.closed


async def test_closing_a_pool_that_never_probed_closes_its_engines() -> None:
    a = Engine("a")
    await pool_of([a]).aclose()
    assert a.closed and a.status_calls == 0
