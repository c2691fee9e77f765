"""Access control and abuse limits over real sockets: keys, origins, limits, idle sessions."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import structlog.testing
import websockets
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from llm_service.errors import RateLimited, Unauthorized
from llm_service.security import Access, AuthThrottle, Presented, presented_key
from tests.fakes.ollama import FakeOllama, Reply
from tests.process import service_process
from tests.support import (
    WS_HANDSHAKE,
    Client,
    FakeClock,
    RunningService,
    make_settings,
    metric,
    poll,
    running_service,
    tokens_of,
)

KEY = "ft-secret-7Qw9zX"
OTHER_KEY = "ft-second-key-3"


async def refused(client: Client, code: str, close_code: int) -> dict[str, Any]:
    frame = await client.recv()
    assert frame["type"] == "error" and frame["error"]["code"] == code, frame
    await asyncio.wait_for(client.ws.wait_closed(), 2)
    assert client.ws.close_code == close_code
    error: dict[str, Any] = frame["error"]
    return error


@pytest.fixture
async def keyed(fake_ollama: FakeOllama) -> Any:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_api_key=f"{KEY}, {OTHER_KEY}")
    async with running_service(settings) as service:
        yield service


async def refused_at_handshake(url: str, **kwargs: Any) -> dict[str, Any]:
    """Connect expecting HTTP 401 instead of a WebSocket; return the error of its body."""
    with pytest.raises(InvalidStatus) as caught:
        await websockets.connect(url, **kwargs)
    response = caught.value.response
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error: dict[str, Any] = orjson.loads(response.body)["error"]
    assert error["code"] == "unauthorized" and error["recoverable"] is False
    return error


async def test_missing_or_wrong_key_is_refused_before_any_session(keyed: RunningService) -> None:
    for kwargs in (
        {},
        {"additional_headers": {"Authorization": "Bearer nope"}},
        {"additional_headers": {"Authorization": f"Basic {KEY}"}},
    ):
        error = await refused_at_handshake(keyed.ws_url, **kwargs)
        assert KEY not in error["message"]
    await refused_at_handshake(keyed.ws_url + "?token=nope")
    stats = (await keyed.get_with_key("/stats", KEY)).json()
    assert stats["connections"]["total_connections"] == 0
    text = (await keyed.get("/metrics", monitoring=True)).text
    assert metric(text, "llm_service_auth_failures_total", 'endpoint="ws"') == 4
    assert metric(text, "llm_service_connections_rejected_total", 'reason="unauthorized"') == 4


@pytest.mark.parametrize("place", ["header", "query", "subprotocol"])
async def test_right_key_is_accepted_in_each_place(keyed: RunningService, place: str) -> None:
    if place == "header":
        ws = await websockets.connect(
            keyed.ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}
        )
    elif place == "query":
        ws = await websockets.connect(f"{keyed.ws_url}?token={OTHER_KEY}")
    else:
        ws = await websockets.connect(
            keyed.ws_url,
            subprotocols=[Subprotocol("fasttalk"), Subprotocol(f"bearer.{KEY}")],
        )
        assert ws.subprotocol == "fasttalk"
    client = Client(ws)
    await client.start()
    frames = await client.turn("hello")
    assert frames[-1]["type"] == "response_complete"
    await client.close()


async def test_stats_needs_the_key_and_health_and_metrics_stay_open(keyed: RunningService) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        missing = await http.get(keyed.http + "/stats")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "unauthorized"
        wrong = await http.get(keyed.http + "/stats", headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401
        right = await http.get(keyed.http + "/stats", headers={"Authorization": f"Bearer {KEY}"})
        assert right.status_code == 200
        assert KEY not in right.text
        assert (await http.get(keyed.http + "/health")).status_code == 200
        assert (await http.get(keyed.monitoring + "/metrics")).status_code == 200
        assert (await http.get(keyed.monitoring + "/health")).status_code == 200
    text = (await keyed.get("/metrics", monitoring=True)).text
    assert metric(text, "llm_service_auth_failures_total", 'endpoint="stats"') == 2


async def test_foreign_origin_is_refused(fake_ollama: FakeOllama) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        llm_allowed_origins="https://chat.example.com, http://localhost:3000",
    )
    async with running_service(settings) as service:
        with pytest.raises(InvalidStatus) as caught:
            await websockets.connect(service.ws_url, origin="https://evil.example")  # type: ignore[arg-type]
        assert caught.value.response.status_code == 403
        for origin in ("https://chat.example.com", "http://localhost:3000/", None):
            ws = await websockets.connect(service.ws_url, origin=origin)  # type: ignore[arg-type]
            client = Client(ws)
            await client.start()
            await client.close()
        text = (await service.get("/metrics", monitoring=True)).text
        assert metric(text, "llm_service_connections_rejected_total", 'reason="origin"') == 1


async def test_long_message_and_rate_limit_have_their_codes(fake_ollama: FakeOllama) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        llm_max_user_message_chars=50,
        llm_rate_limit_turns_per_minute=2,
    )
    async with running_service(settings) as service:
        client, other = await service.connect(), await service.connect()
        await client.start()
        await other.start()
        frames = await client.turn("x" * 51)
        assert frames[-1]["error"]["code"] == "message_too_long"
        assert frames[-1]["error"]["recoverable"] is True
        for _ in range(2):
            assert (await client.turn("hi"))[-1]["type"] == "response_complete"
        frames = await client.turn("one more")
        error = frames[-1]["error"]
        assert error["code"] == "rate_limited" and error["recoverable"] is True
        assert 0 < error["retry_after_ms"] <= 60_000
        assert (await other.turn("my own budget"))[-1]["type"] == "response_complete"
        assert len(fake_ollama.chats) == 3
        await client.close()
        await other.close()


async def test_history_is_capped_at_max_history_turns(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_max_history_turns=2)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        for i in range(4):
            fake_ollama.script(Reply(chunks=[f"r{i}"]))
            await client.turn(f"u{i}")
        sent = [m["content"] for m in fake_ollama.chats[-1].messages]
        assert sent == ["u2", "r2", "u3"]
        frames = await client.turn("u4")
        assert frames[-1]["stats"]["history_trimmed_turns"] == 1
        await client.close()


async def test_idle_session_is_closed_with_a_reason(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_session_idle_timeout_s=0.5)
    fake_ollama.script(Reply(chunks=["slow"] * 10, delay=0.1))  # a 1 s reply is not idleness
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("take your time")
        assert tokens_of(frames) == ["slow"] * 10
        error = await refused(client, "session_idle_timeout", 1000)
        assert error["recoverable"] is False


async def test_connections_per_client_address_are_limited(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_max_connections_per_client=2)
    async with running_service(settings) as service:
        first, second = await service.connect(), await service.connect()
        await first.start()
        await second.start()
        third = await service.connect()
        await refused(third, "max_connections_per_client", 1013)
        assert (await first.turn("still fine"))[-1]["type"] == "response_complete"
        await second.close()

        async def one_left() -> bool:
            return bool((await service.get("/health")).json()["active_connections"] == 1)

        await poll(one_left)
        fourth = await service.connect()
        frame = await fourth.recv()
        assert frame["type"] == "session_started"
        await first.close()
        await fourth.close()


async def test_key_never_reaches_logs_stats_or_config(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    quoted = "ft-it's-9Lm2"  # a key uvicorn's log line quotes around
    prompt, reply = "PROMPT-7Hq2 tell me", ["REPLY-4Zk8", " done"]
    fake_ollama.default_reply = Reply(chunks=reply)
    async with service_process(
        tmp_path,
        OLLAMA_BASE_URL=fake_ollama.url,
        LLM_API_KEY=f"{KEY},{quoted}",
        LOG_LEVEL="DEBUG",
    ) as service:
        attempts: list[dict[str, Any]] = [
            {"uri": f"{service.ws_url}?token={KEY}"},
            {"uri": f"{service.ws_url}?tok%65n={quote(quoted)}"},  # Starlette decodes the name
            {"uri": service.ws_url, "additional_headers": {"Authorization": f"Bearer {KEY}"}},
            {"uri": service.ws_url, "subprotocols": ["fasttalk", f"bearer.{quoted}"]},
            {"uri": f"{service.ws_url}?token=wrong-{KEY}"},
        ]
        for attempt in attempts:
            try:
                client = Client(await websockets.connect(**attempt))
            except InvalidStatus as refused_early:
                assert refused_early.response.status_code == 401
                continue
            first = await client.recv()
            if first["type"] == "session_started":
                frames = await client.turn(prompt)
                assert tokens_of(frames) == reply
            await client.close()
        async with httpx.AsyncClient(timeout=5) as http:
            stats = await http.get(f"http://127.0.0.1:{service.port}/stats?token={KEY}")
            assert stats.status_code == 200 and KEY not in stats.text
        log = "".join(service.output)
    assert "/ws/llm?token=********" in log  # uvicorn's own request line, masked
    assert "/ws/llm?tok%65n=********" in log
    assert "auth_failed" in log
    assert "session_started" in log and "turn_completed" in log  # DEBUG logs the turns
    for secret in (KEY, quoted, quote(quoted), "PROMPT-7Hq2", "REPLY-4Zk8"):
        assert secret not in log, secret

    from tests.support import run_cli

    code, out = await run_cli(tmp_path, "config", "--show", LLM_API_KEY=KEY)
    assert code == 0 and KEY not in out and "LLM_API_KEY" in out


async def test_open_service_warns_at_start_up(tmp_path: Path, fake_ollama: FakeOllama) -> None:
    async with service_process(tmp_path, OLLAMA_BASE_URL=fake_ollama.url) as service:
        pass
    assert "access_open" in "".join(service.output)


async def test_a_refused_handshake_is_answered_and_closed_whatever_follows(
    keyed: RunningService,
) -> None:
    # A stranger completes no handshake: the 401 goes out and the socket is closed, so the
    # half a million one-byte fragments behind it are never parsed.
    client = await keyed.connect(additional_headers={"Authorization": f"Bearer {KEY}"})
    await client.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", keyed.port)
    writer.write(WS_HANDSHAKE)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 401 ")
    text_start = b"\x01\x81\x00\x00\x00\x00x"  # a masked text frame with fin unset
    fragment = b"\x00\x81\x00\x00\x00\x00x"  # a masked one-byte continuation
    rest = b""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        writer.write(text_start + fragment * 500_000)
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 10)  # to EOF: the server closed it
    assert b"HTTP/1.1 101" not in rest and len(rest) < 1024  # the 401's body, then nothing
    writer.close()
    frames = await client.turn("are you still with me?")
    assert frames[-1]["type"] == "response_complete"
    await client.close()


async def test_a_key_bearing_subprotocol_is_never_selected(keyed: RunningService) -> None:
    ws = await websockets.connect(
        keyed.ws_url,
        subprotocols=[Subprotocol(f"bearer.{KEY}")],
    )
    assert ws.subprotocol is None
    assert ws.response is not None
    assert KEY not in str(ws.response.headers)
    client = Client(ws)
    await client.start()
    await client.close()


async def test_failed_keys_are_throttled_per_address(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    async with service_process(
        tmp_path,
        OLLAMA_BASE_URL=fake_ollama.url,
        LLM_API_KEY=KEY,
        LLM_AUTH_FAILURES_PER_MINUTE="3",
    ) as service:
        for _ in range(3):
            await refused_at_handshake(f"{service.ws_url}?token=guess")
        for url in (f"{service.ws_url}?token=guess", f"{service.ws_url}?token={KEY}"):
            with pytest.raises(InvalidStatus) as caught:
                await websockets.connect(url)
            response = caught.value.response
            assert response.status_code == 429
            assert 1 <= int(response.headers["Retry-After"]) <= 60
            assert orjson.loads(response.body)["error"]["code"] == "rate_limited"
        async with httpx.AsyncClient(timeout=5) as http:
            stats = await http.get(
                f"http://127.0.0.1:{service.port}/stats", headers={"Authorization": f"Bearer {KEY}"}
            )
            assert stats.status_code == 429  # the same address, the same throttle
    lines = [line for line in service.output if '"auth_failed"' in line]
    assert len(lines) == 1, "failures are logged once per address per minute"


def test_auth_throttle_forgets_after_a_minute_and_bounds_its_memory() -> None:
    now = [0.0]
    throttle = AuthThrottle(2, clock=lambda: now[0])
    assert throttle.failed("a") is True
    assert throttle.failed("a") is False
    assert throttle.retry_after("a") == pytest.approx(60.0)
    assert throttle.retry_after("b") == 0.0
    now[0] = 59.0
    assert throttle.retry_after("a") == pytest.approx(1.0)
    now[0] = 60.0
    assert throttle.retry_after("a") == 0.0
    for i in range(10_000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._failures) <= 4096


async def test_only_turns_that_start_count_against_the_rate(fake_ollama: FakeOllama) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        llm_rate_limit_turns_per_minute=2,
        default_context_window=1024,
        default_max_tokens=512,
    )
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        for _ in range(3):  # refused before they start: they cost nothing
            frames = await client.turn("word " * 2000)
            assert frames[-1]["error"]["code"] == "context_overflow"
        for _ in range(2):
            assert (await client.turn("hi"))[-1]["type"] == "response_complete"
        assert (await client.turn("one more"))[-1]["error"]["code"] == "rate_limited"
        await client.close()


async def test_stats_count_sessions_in_all(service: RunningService) -> None:
    for _ in range(3):
        client = await service.connect()
        await client.start()
        await client.close()

    async def all_closed() -> bool:
        body = (await service.get("/stats")).json()["conversations"]
        return bool(body["active_sessions"] == 0 and body["total_sessions"] == 3)

    await poll(all_closed)


def test_a_throttled_address_waits_out_the_minute_of_its_oldest_counted_failure() -> None:
    clock = FakeClock(5000.0)  # a monotonic clock is rarely near 0
    throttle = AuthThrottle(2, clock=clock)
    throttle.failed("a")
    clock.now += 10
    throttle.failed("a")
    clock.now += 5
    assert throttle.retry_after("a") == pytest.approx(45.0)  # 60 s after the first
    clock.now += 45
    assert throttle.retry_after("a") == 0.0
    # a limit of one keeps the latest failure only
    single = AuthThrottle(1, clock=clock)
    single.failed("b")
    clock.now += 30
    single.failed("b")
    clock.now += 10
    assert single.retry_after("b") == pytest.approx(50.0)


def test_the_throttle_keeps_the_most_recent_4096_addresses() -> None:
    clock = FakeClock(5000.0)
    throttle = AuthThrottle(1, clock=clock)
    for i in range(4096):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    throttle.failed("192.0.2.1")  # one more: the address seen least recently goes
    assert throttle.retry_after("10.0.0.0") == 0.0
    assert throttle.retry_after("10.0.0.1") > 0
    assert throttle.retry_after("192.0.2.1") > 0


def test_where_a_key_is_found() -> None:
    def found(
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        subprotocols: tuple[str, ...] = (),
    ) -> Presented:
        return presented_key(headers or {}, query or {}, subprotocols)

    assert found({"authorization": "Bearer k1"}) == Presented("k1", "header")
    assert found({"authorization": "bearer  k1 "}) == Presented("k1", "header")  # 1*SP, any case
    assert found({"authorization": "Basic k1"}) == Presented(None, "none")
    assert found(query={"token": "k2"}) == Presented("k2", "query")
    assert found(subprotocols=("fasttalk", "bearer.k3")) == Presented("k3", "subprotocol")
    assert found() == Presented(None, "none")
    # the header first, then the query, then the subprotocol
    both = found({"authorization": "Bearer k1"}, {"token": "k2"}, ("bearer.k3",))
    assert both == Presented("k1", "header")


def test_keys_and_origins_compared_whole() -> None:
    assert Access([], []).key_ok(None) is True  # no keys: open
    access = Access(["k1", "k2"], ["https://app.example"])
    assert access.key_ok("k2") and not access.key_ok("k") and not access.key_ok(None)
    assert access.origin_ok("https://app.example/") and access.origin_ok(None)
    assert not access.origin_ok("https://app.exampleX")
    assert not access.origin_ok("https://app.example.evil")


def test_authenticate_refuses_a_throttled_address_without_reading_its_key() -> None:
    clock = FakeClock(5000.0)
    access = Access(["k1"], [], AuthThrottle(2, clock=clock))

    def attempt(client: str, key: str) -> object:
        headers = {"authorization": f"Bearer {key}"}
        return access.authenticate(client, "/ws/llm", headers, {})

    assert attempt("10.0.0.1", "k1") is None
    wrong = attempt("10.0.0.1", "wrong")
    assert isinstance(wrong, Unauthorized)
    assert str(wrong) == (
        "a valid API key is required (Authorization: Bearer, the token query parameter, "
        "or a bearer.<key> subprotocol)"
    )
    clock.now += 20
    assert isinstance(attempt("10.0.0.1", "wrong"), Unauthorized)
    clock.now += 0.5
    refused = attempt("10.0.0.1", "k1")  # the right key, but the address is throttled
    assert isinstance(refused, RateLimited)
    assert refused.retry_after_ms == 39_500  # a minute after its first counted failure
    assert str(refused) == (
        "too many failed API key attempts from this address; retry in 40 s "
        "(LLM_AUTH_FAILURES_PER_MINUTE)"
    )
    assert attempt("10.0.0.2", "k1") is None  # another address is not throttled
    clock.now += 39.5
    assert attempt("10.0.0.1", "k1") is None


def test_failures_are_logged_once_per_address_per_minute() -> None:
    clock = FakeClock(5000.0)
    access = Access(["k1"], [], AuthThrottle(10, clock=clock))
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            access.authenticate("10.0.0.1", "/ws/llm", {"authorization": "Bearer bad"}, {})
        access.authenticate("10.0.0.2", "/stats", {}, {})
    assert [(e["event"], e["endpoint"], e["client"], e["via"], e["reason"]) for e in logs] == [
        ("auth_failed", "/ws/llm", "10.0.0.1", "header", "wrong key"),
        ("auth_failed", "/stats", "10.0.0.2", "none", "missing key"),
    ]
    assert all(e["log_level"] == "warning" for e in logs)
    detail = "further failures from this address this minute are counted, not logged"
    assert all(e["detail"] == detail for e in logs)


def test_the_wait_of_a_throttled_address_is_never_0_ms() -> None:
    clock = FakeClock(5000.0)
    access = Access(["k1"], [], AuthThrottle(1, clock=clock))
    access.authenticate("10.0.0.1", "/ws/llm", {}, {})
    clock.now += 60 - 0.0004  # 0.4 ms left
    refused = access.authenticate("10.0.0.1", "/ws/llm", {}, {})
    assert isinstance(refused, RateLimited) and refused.retry_after_ms == 1


def test_at_most_30_refused_keys_are_logged_a_minute_across_addresses() -> None:
    clock = FakeClock(5000.0)
    access = Access(["k1"], [], AuthThrottle(10, clock=clock))
    with structlog.testing.capture_logs() as logs:
        for i in range(40):
            access.authenticate(f"10.0.0.{i}", "/ws/llm", {}, {})
    assert len(logs) == 30


def test_without_a_throttle_failed_keys_are_not_throttled() -> None:
    access = Access(["k1"], [])
    for _ in range(5):
        assert isinstance(access.authenticate("10.0.0.1", "/ws/llm", {}, {}), Unauthorized)
    assert access.authenticate("10.0.0.1", "/ws/llm", {"authorization": "Bearer k1"}, {}) is None
