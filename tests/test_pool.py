"""Engines in a pool: session affinity, failover before the first token, a breaker and a health
probe per upstream, and `/health` and `/metrics` naming each upstream by its masked URL. Over
real sockets against several fake engines, except the rendezvous-hashing unit tests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import pytest

from llm_service.backends.pool import EnginePool, Homes, RetryPolicy, Upstream
from llm_service.breaker import CircuitBreaker
from llm_service.metrics import Telemetry
from tests.fakes.backend import FakeBackend
from tests.fakes.ollama import FakeOllama, Reply
from tests.fakes.openai import FakeOpenAI
from tests.support import (
    Client,
    RunningService,
    make_settings,
    metric,
    poll,
    running_service,
    tokens_of,
)

pytestmark = pytest.mark.slow

HELLO = ["Hello", ",", " world", "!"]  # the fakes' default reply
Fake = FakeOllama | FakeOpenAI
F = TypeVar("F", FakeOllama, FakeOpenAI)


@contextlib.asynccontextmanager
async def fake_ollamas(count: int) -> AsyncIterator[list[FakeOllama]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(FakeOllama()) for _ in range(count)]


def pool_settings(fakes: Sequence[FakeOllama], **overrides: Any) -> Any:
    return make_settings(ollama_base_url=",".join(f.url for f in fakes), **overrides)


def asked(fake: Fake) -> list[str]:
    """The last user message of each chat request the fake received, in order."""
    return [str(chat.messages[-1]["content"]) for chat in fake.chats]


def served_by(fakes: Sequence[F], text: str) -> list[F]:
    return [fake for fake in fakes if text in asked(fake)]


async def session(service: RunningService) -> Client:
    client = await service.connect()
    await client.start()
    return client


async def completes(client: Client, text: str) -> list[dict[str, Any]]:
    frames = await client.turn(text)
    assert frames[-1]["type"] == "response_complete", frames
    return frames


async def own_upstream(client: Client, fakes: Sequence[F], text: str) -> F:
    """The upstream that serves a healthy pool's turn for this session."""
    await completes(client, text)
    found = served_by(fakes, text)
    assert len(found) == 1, found
    return found[0]


async def metrics(service: RunningService) -> str:
    return (await service.get("/metrics", monitoring=True)).text


def upstream(url: str) -> str:
    return f'upstream="{url}"'


# --- routing: rendezvous hashing with bounded loads, unit tests of the pool's choice ---------


def pool_of(labels: Sequence[str], max_inflight: int = 0) -> EnginePool:
    upstreams = [Upstream(FakeBackend(), label, CircuitBreaker(5, 15.0)) for label in labels]
    return EnginePool(upstreams, RetryPolicy(), Telemetry(), max_inflight=max_inflight)


def choose(pool: EnginePool, key: str) -> Upstream | None:
    return pool._next(pool._ranked(key), set())


def owners(pool: EnginePool, keys: Sequence[str]) -> dict[str, str]:
    chosen = {key: choose(pool, key) for key in keys}
    return {key: u.label for key, u in chosen.items() if u is not None}


KEYS = [f"session-{i:04d}" for i in range(1000)]
ENGINES = ["http://engine-a:11434", "http://engine-b:11434", "http://engine-c:11434"]


def test_adding_an_upstream_moves_keys_only_to_it() -> None:
    before = owners(pool_of(ENGINES), KEYS)
    new = "http://engine-d:11434"
    after = owners(pool_of([*ENGINES, new]), KEYS)
    assert len(before) == len(after) == len(KEYS)
    moved = [key for key in KEYS if after[key] != before[key]]
    to_new = [key for key in moved if after[key] == new]
    assert 200 < len(to_new) <= 263  # about a quarter of the keys, at most the bound
    assert len(moved) - len(to_new) < 50, "few keys move between the old upstreams"
    assert min(Counter(before.values()).values()) > 300  # about a third each before


@pytest.mark.parametrize("count", [2, 3, 4])
def test_sessions_spread_within_a_few_percent_of_even(count: int) -> None:
    """200 sessions (uuid4 ids, drawn from a seeded generator so the test is repeatable):
    no upstream holds more than the bound, 5% over an even share, and none falls 15% short
    in any of 20 draws; hashing alone misses that in about half the draws on 4 upstreams."""
    labels = [f"http://engine-{i}:11434" for i in range(count)]
    bound = math.ceil(1.05 * 200 / count)
    for draw in range(20):
        rng = random.Random(draw)
        keys = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(200)]
        pool = pool_of(labels)
        shares = Counter(owners(pool, keys).values())
        assert max(shares.values()) <= bound, (draw, shares)
        assert min(shares[label] for label in labels) >= 0.85 * 200 / count, (draw, shares)
        assert pool.homes.counts == {label: shares[label] for label in labels}
        again = owners(pool, keys)  # a session's next turns: the same home
        assert Counter(again.values()) == shares


def test_a_session_idle_past_the_limit_is_placed_afresh_and_uncounted() -> None:
    now = [0.0]
    homes = Homes(["a", "b"], idle_s=10.0, clock=lambda: now[0])
    assert homes.home("s1", ["a", "b"]) == "a"
    assert homes.home("s2", ["a", "b"]) == "a"  # the bound: ceil(1.05 * 2 / 2) = 2
    assert homes.home("s3", ["a", "b"]) == "b"  # a holds 2 of 3, its bound ceil(1.575) = 2
    now[0] = 6.0
    assert homes.home("s1", ["a", "b"]) == "a"  # a turn keeps the home, and its time
    now[0] = 12.0  # s2 and s3 idle for 12 s: forgotten
    assert homes.home("s4", ["b", "a"]) == "b"
    assert len(homes) == 2 and homes.counts == {"a": 1, "b": 1}
    assert homes.home("s3", ["a", "b"]) == "a"  # placed afresh: a has room again


def test_removing_an_upstream_moves_only_its_keys() -> None:
    before = owners(pool_of(ENGINES), KEYS)
    gone = ENGINES[1]
    after = owners(pool_of([ENGINES[0], ENGINES[2]]), KEYS)
    stayed = [key for key in KEYS if before[key] != gone]
    assert sum(after[key] != before[key] for key in stayed) < 50, "few others move"
    orphans = [key for key in KEYS if before[key] == gone]
    assert {after[key] for key in orphans} == {ENGINES[0], ENGINES[2]}  # spread, not piled


def test_routing_skips_busy_unhealthy_and_open_upstreams() -> None:
    pool = pool_of(ENGINES, max_inflight=1)
    key = KEYS[0]
    own = choose(pool, key)
    assert own is not None
    others = [u for u in pool.upstreams if u is not own]
    own.inflight = 1  # at the limit: the least busy other one
    others[0].inflight = 3
    assert choose(pool, key) is others[1]
    own.inflight = 0
    own.healthy = False
    assert choose(pool, key) in others
    for u in pool.upstreams:
        u.healthy = False  # none healthy: tried anyway, the session's own first
    assert choose(pool, key) is own
    for u in pool.upstreams:
        for _ in range(u.breaker.failure_threshold):
            u.breaker.record_failure()
    assert all(u.breaker.state == "open" for u in pool.upstreams)
    assert choose(pool, key) is None
    assert pool._next(pool._ranked(key), set(pool.upstreams)) is None


# --- over real sockets -----------------------------------------------------------------------


async def test_each_session_sticks_to_one_upstream_and_sessions_spread() -> None:
    async with (
        fake_ollamas(3) as fakes,
        running_service(pool_settings(fakes, llm_max_connections=64)) as service,
    ):
        gate = asyncio.Semaphore(20)

        async def converse(index: int) -> None:
            async with gate:
                client = await session(service)
                for turn in range(3):
                    frames = await completes(client, f"session {index} turn {turn}")
                    assert tokens_of(frames) == HELLO
                await client.close()

        await asyncio.gather(*(converse(i) for i in range(60)))
    where: dict[int, set[int]] = {}
    for number, fake in enumerate(fakes):
        for text in asked(fake):
            where.setdefault(int(text.split()[1]), set()).add(number)
    assert sorted(where) == list(range(60))
    assert all(len(found) == 1 for found in where.values()), where
    sessions = Counter(next(iter(found)) for found in where.values())
    # bounded loads: none holds more than ceil(1.05 * 60 / 3) = 21, so none fewer than 18
    assert all(18 <= sessions[number] <= 21 for number in range(3)), sessions
    assert [len(fake.chats) for fake in fakes] == [3 * sessions[n] for n in range(3)]


async def test_refused_upstream_fails_over_opens_its_breaker_and_rejoins_after_a_probe() -> None:
    async with fake_ollamas(2) as (dead, alive):
        settings = pool_settings(
            (dead, alive),
            llm_upstream_probe_interval_s=0.5,
            circuit_breaker_failure_threshold=1,
            circuit_breaker_recovery_timeout=1.0,
        )
        async with running_service(settings) as service:
            clients = [await session(service) for _ in range(20)]
            # Just after a background probe: the turns below reach the pool before the next
            # one marks `dead` unhealthy, so the sessions it owns try it and fail over.
            probes = dead.hits.get("/api/tags", 0)

            async def probed() -> bool:
                return dead.hits.get("/api/tags", 0) > probes

            await poll(probed, 3.0)
            await dead.refuse()
            for turn in ("first", "second"):
                texts = [f"{turn} {i}" for i in range(20)]
                await asyncio.gather(
                    *(completes(c, t) for c, t in zip(clients, texts, strict=True))
                )
                assert all(served_by((dead, alive), text) == [alive] for text in texts)
            assert dead.chats == []

            health = await service.get("/health")
            assert health.status_code == 200
            body = health.json()
            assert body["circuit_breaker"] == {"state": "closed", "open": 1, "upstreams": 2}
            down, up = body["upstreams"]
            assert (down["url"], down["healthy"]) == (dead.url, False)
            assert down["circuit_breaker"]["state"] == "open"
            assert (up["healthy"], up["circuit_breaker"]["state"]) == (True, "closed")
            text = await metrics(service)
            failed = metric(
                text,
                "llm_service_upstream_requests_total",
                f'outcome="upstream_unavailable",{upstream(dead.url)}',
            )
            assert failed >= 1
            assert metric(text, "llm_service_upstream_retries_total", upstream(alive.url)) == failed
            assert metric(text, "llm_service_circuit_state", upstream(dead.url)) == 2

            await dead.accept()

            async def rejoined() -> bool:  # the gauge is read, not probed: the prober's doing
                up = metric(await metrics(service), "llm_service_upstream_up", upstream(dead.url))
                return up == 1

            await poll(rejoined, 5.0)

            async def admits_a_trial() -> bool:  # its breaker lets one chat through again
                down = (await service.get("/health")).json()["upstreams"][0]
                return bool(down["healthy"] and down["circuit_breaker"]["retry_after_ms"] == 0)

            await poll(admits_a_trial, 5.0)
            newcomers = [await session(service) for _ in range(20)]
            texts = [f"new {i}" for i in range(20)]
            await asyncio.gather(*(completes(c, t) for c, t in zip(newcomers, texts, strict=True)))
            assert 0 < len(dead.chats) < 20, "it serves its share of sessions again"
            assert sorted(asked(dead) + asked(alive)[40:]) == sorted(texts)
            for client in clients + newcomers:
                await client.close()


async def test_busy_503_before_streaming_fails_over_and_is_counted_as_a_retry() -> None:
    async with fake_ollamas(2) as fakes, running_service(pool_settings(fakes)) as service:
        client = await session(service)
        own = await own_upstream(client, fakes, "one")
        other = next(f for f in fakes if f is not own)
        own.script(Reply(status=503, error="server busy, please try again."))
        frames = await completes(client, "two")
        assert tokens_of(frames) == HELLO
        assert asked(own) == ["one", "two"] and asked(other) == ["two"]
        text = await metrics(service)
        assert metric(text, "llm_service_upstream_retries_total", upstream(other.url)) == 1
        assert metric(text, "llm_service_upstream_retries_total") == 1
        assert (
            metric(
                text,
                "llm_service_upstream_requests_total",
                f'outcome="upstream_unavailable",{upstream(own.url)}',
            )
            == 1
        )
        await completes(client, "three")
        assert asked(own)[-1] == "three", "one failure does not move the session"
        await client.close()


async def test_no_failover_once_a_token_was_sent() -> None:
    async with fake_ollamas(2) as fakes, running_service(pool_settings(fakes)) as service:
        client = await session(service)
        own = await own_upstream(client, fakes, "one")
        other = next(f for f in fakes if f is not own)
        own.script(Reply(chunks=["a", "b", "c"], drop_after=2))
        frames = await client.turn("two")
        assert [f["type"] for f in frames] == ["token", "token", "error"]
        assert tokens_of(frames) == ["a", "b"]
        assert frames[-1]["error"]["code"] == "upstream_error"
        assert asked(own) == ["one", "two"]
        assert other.chats == [], "a turn that streamed a token is never tried elsewhere"
        history = await client.history()
        assert history[-2:] == [
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": "ab", "status": "incomplete"},
        ]
        await client.close()


async def test_a_session_whose_upstream_is_at_max_inflight_goes_to_another() -> None:
    async with (
        fake_ollamas(2) as fakes,
        running_service(pool_settings(fakes, llm_upstream_max_inflight=1)) as service,
    ):
        by_upstream: dict[int, list[Client]] = {}
        for i in range(3):  # three sessions over two upstreams: two share one
            client = await session(service)
            found = await own_upstream(client, fakes, f"probe {i}")
            by_upstream.setdefault(fakes.index(found), []).append(client)
        number, (first, second) = next(
            (n, group[:2]) for n, group in by_upstream.items() if len(group) >= 2
        )
        own, other = fakes[number], fakes[1 - number]
        seen = len(own.chats), len(other.chats)

        own.script(Reply(chunks=["slow", " reply"], stall_after=1))
        await first.send({"type": "user_message", "text": "overlap 1"})
        assert (await first.recv())["data"] == "slow"  # streaming on its upstream
        text = await metrics(service)
        assert metric(text, "llm_service_upstream_in_flight", upstream(own.url)) == 1
        frames = await completes(second, "overlap 2")
        assert tokens_of(frames) == HELLO
        assert asked(own)[seen[0] :] == ["overlap 1"]
        assert asked(other)[seen[1] :] == ["overlap 2"]

        await first.send({"type": "cancel"})
        assert (await first.recv_until("cancelled"))[-1]["success"] is True
        await completes(second, "alone again")
        assert asked(own)[-1] == "alone again", "back on its own upstream once it has room"
        await first.close()
        await second.close()


async def test_health_lists_the_upstreams_and_is_healthy_while_one_answers() -> None:
    async with (
        fake_ollamas(2) as (first, second),
        running_service(pool_settings((first, second))) as service,
    ):
        health = await service.get("/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "healthy"
        assert [u["url"] for u in body["upstreams"]] == [first.url, second.url]
        for entry in body["upstreams"]:
            assert set(entry) == {
                "url", "healthy", "detail", "in_flight", "sessions", "circuit_breaker"
            }  # fmt: skip
            assert (entry["healthy"], entry["in_flight"]) == (True, 0)
        assert body["circuit_breaker"] == {"state": "closed", "open": 0, "upstreams": 2}

        await first.refuse()
        health = await service.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "healthy"
        assert [u["healthy"] for u in health.json()["upstreams"]] == [False, True]

        await second.refuse()
        health = await service.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy"
        assert [u["healthy"] for u in health.json()["upstreams"]] == [False, False]


async def test_metrics_label_each_upstream_by_its_url_with_credentials_masked() -> None:
    async with fake_ollamas(2) as (guarded, plain):
        secret_url = f"http://user:secret@127.0.0.1:{guarded.port}"
        masked = f"http://user:********@127.0.0.1:{guarded.port}"
        settings = make_settings(ollama_base_url=f"{secret_url},{plain.url}")
        async with running_service(settings) as service:
            for i in range(40):  # new sessions until each upstream has served one
                if guarded.chats and plain.chats:
                    break
                client = await session(service)
                await completes(client, f"hello {i}")
                await client.close()
            assert guarded.chats and plain.chats
            auth = "Basic " + base64.b64encode(b"user:secret").decode()
            assert guarded.chats[0].headers.get("Authorization") == auth  # still used

            text = await metrics(service)
            for label, fake in ((masked, guarded), (plain.url, plain)):
                assert metric(
                    text,
                    "llm_service_upstream_requests_total",
                    f'outcome="success",{upstream(label)}',
                ) == len(fake.chats)
                assert metric(text, "llm_service_upstream_up", upstream(label)) == 1
                assert metric(text, "llm_service_circuit_state", upstream(label)) == 0
                assert metric(text, "llm_service_upstream_in_flight", upstream(label)) == 0
            health = await service.get("/health")
            assert [u["url"] for u in health.json()["upstreams"]] == [masked, plain.url]
            assert "secret" not in text
            assert "secret" not in health.text


async def test_an_openai_pool_serves_and_fails_over() -> None:
    async with FakeOpenAI() as first, FakeOpenAI() as second:
        fakes = (first, second)
        settings = make_settings(
            llm_backend="openai", openai_base_url=f"{first.url},{second.url}", llm_model="smollm2"
        )
        async with running_service(settings) as service:
            client = await session(service)
            own = await own_upstream(client, fakes, "one")
            other = next(f for f in fakes if f is not own)
            await own.refuse()
            frames = await completes(client, "two")
            assert tokens_of(frames) == HELLO
            assert asked(other) == ["two"] and asked(own) == ["one"]
            health = (await service.get("/health")).json()
            assert [u["url"] for u in health["upstreams"]] == [first.url, second.url]
            text = await metrics(service)
            assert metric(text, "llm_service_upstream_retries_total", upstream(other.url)) == 1
            await client.close()


async def test_a_probe_does_not_close_a_breaker_that_failing_chats_opened() -> None:
    # an engine that answers its probe but fails every chat (out of GPU memory, say)
    async with fake_ollamas(2) as (sick, well):
        sick.default_reply = Reply(status=500, error="CUDA error: out of memory")
        settings = pool_settings(
            (sick, well), circuit_breaker_failure_threshold=1, circuit_breaker_recovery_timeout=60
        )
        async with running_service(settings) as service:
            for i in range(30):  # new sessions until one's own upstream is the sick one
                client = await session(service)
                frames = await client.turn(f"hi {i}")
                assert frames[-1]["type"] == "response_complete"  # failed over to `well`
                await client.close()
                if sick.chats:
                    break
            assert asked(sick) == [f"hi {i}"]
            for _ in range(3):  # each /health probes every upstream
                health = (await service.get("/health")).json()
            assert health["upstreams"][0]["circuit_breaker"]["state"] == "open"
