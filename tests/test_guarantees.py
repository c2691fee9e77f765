"""Guarantees checked where they are kept, so that a one-line slip in the code fails a test.

Each test pins one promise of PROTOCOL.md or the README at its boundary: the engine connection
is closed by the time a stream's close returns, and before `cancelled` goes out; retries stop
once the circuit opens; a drain closes a session as soon as its reply ends and admits no new
one; limits hold exactly at their edge; counters count what happened; sampler settings reach
the engine; a bug ends a turn with `internal_error`, never the connection; the Ollama engine's
failures each have their code. The service runs on real sockets against the fake Ollama (or a
fake backend behind the `LLMBackend` Protocol); the layers below it are driven directly.

"Before the frame is sent" is checked at the moment the service hands the frame over, never by
arrival times: `FrameTap`, an ASGI middleware around the app, looks at the service's state as
each WebSocket frame passes through it, and the operating system says whether the service
still holds its socket to the engine (Linux's `/proc`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.testing import capture_logs

from llm_service.backends.base import ChatMessage, ChatRequest, StreamEnd, StreamItem
from llm_service.backends.http import Timeouts
from llm_service.backends.ollama import OllamaBackend
from llm_service.backends.pool import EnginePool, RetryPolicy, Upstream
from llm_service.breaker import CircuitBreaker
from llm_service.conversation import Conversation, SessionConfig, TurnLimits
from llm_service.errors import (
    MessageTooLarge,
    MessageTooLong,
    RateLimited,
    ServiceError,
    ServiceShuttingDown,
    UpstreamUnavailable,
)
from llm_service.health import EngineHealth
from llm_service.hub import Hub
from llm_service.metrics import Telemetry
from llm_service.protocol import UserMessage, parse_client_frame
from llm_service.sampling import SamplingParams
from llm_service.server import ServiceRunner
from llm_service.timing import SlidingWindow
from tests.fakes.backend import FakeBackend, Scripted
from tests.fakes.ollama import DEFAULT_MODEL, FakeOllama, Reply
from tests.support import (
    ANY_ID,
    WS_HANDSHAKE,
    FakeClock,
    RunningService,
    draining,
    fake_engine,
    make_settings,
    metric,
    poll,
    running_service,
    tokens_of,
)

LINUX_PROC = Path("/proc/net/tcp").exists() and Path("/proc/self/fd").is_dir()
needs_proc = pytest.mark.skipif(not LINUX_PROC, reason="reads this process's sockets in /proc")


# --- helpers -------------------------------------------------------------------------------


def connections_to(port: int) -> set[int]:
    """The local ports of the TCP sockets this process holds open to 127.0.0.1:`port`.

    A socket the process has closed is not among them, even while the kernel still finishes
    its shutdown (it then belongs to no file descriptor)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    with open("/proc/net/tcp") as table:
        next(table)  # the header
        for line in table:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(remote.rsplit(":", 1)[1], 16) == port and inode in inodes:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


class FrameTap:
    """ASGI middleware: `watch(frame)` sees each WebSocket text frame as the app sends it, before
    it goes to the socket."""

    def __init__(self, app: ASGIApp, watch: Callable[[dict[str, Any]], None]) -> None:
        self.app = app
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return

        async def tapped(message: Message) -> None:
            text = message.get("text") if message["type"] == "websocket.send" else None
            if text is not None:
                self.watch(orjson.loads(text))
            await send(message)

        await self.app(scope, receive, tapped)


def chat_request(text: str = "Hi") -> ChatRequest:
    return ChatRequest([ChatMessage("user", text)], SamplingParams(), 8192)


def conversation(backend: FakeBackend, limits: TurnLimits) -> Conversation:
    settings = make_settings()
    config = SessionConfig("", settings.default_sampling())
    return Conversation("s1", config, backend, 8192, Telemetry(), limits)


async def finish(conv: Conversation, text: str) -> None:
    """Run one turn of `conv` to its end."""
    stream = conv.start_turn(text).stream()
    async for _ in stream:
        pass


# --- the engine request is closed before `cancelled` ---------------------------------------


@needs_proc
async def test_closing_an_ollama_stream_closes_its_engine_connection_before_the_close_returns(
    fake_ollama: FakeOllama,
) -> None:
    # The stream is closed while it waits at a chunk its consumer has not asked past (the
    # consumer is busy sending it): no read is in progress that would close the response by
    # itself, so only the backend's own close does it, before `aclose()` returns.
    fake_ollama.script(Reply(chunks=["one ", "two ", "three ", "four"], stall_after=3))
    backend = OllamaBackend(fake_ollama.url, DEFAULT_MODEL)
    try:
        stream = backend.stream_chat(chat_request())
        assert await anext(stream) == "one "
        upstream = fake_ollama.chats[0]
        assert upstream.peer is not None
        assert upstream.peer[1] in connections_to(fake_ollama.port), "open while streaming"
        await stream.aclose()
        assert upstream.peer[1] not in connections_to(fake_ollama.port)
        await upstream.wait_closed(limit=5)
        assert upstream.finished_at is None
    finally:
        await backend.aclose()


@needs_proc
async def test_cancelled_goes_out_only_once_the_engine_request_is_closed(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.script(Reply(chunks=[f"w{i} " for i in range(10)], stall_after=3))
    runner: list[ServiceRunner] = []
    at_cancelled: list[tuple[int, bool]] = []  # (replies in flight, engine socket open)

    def watch(frame: dict[str, Any]) -> None:
        if frame["type"] == "cancelled":
            engines = runner[0].app.state.service.backend.snapshot()
            peer = fake_ollama.chats[0].peer
            assert peer is not None
            at_cancelled.append(
                (engines[0]["in_flight"], peer[1] in connections_to(fake_ollama.port))
            )

    def prepare(prepared: ServiceRunner) -> None:
        runner.append(prepared)
        prepared.app.add_middleware(FrameTap, watch=watch)

    settings = make_settings(ollama_base_url=fake_ollama.url)
    async with running_service(settings, prepare=prepare) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "user_message", "text": "Count.", "response_id": "r1"})
        assert tokens_of([await client.recv() for _ in range(3)]) == ["w0 ", "w1 ", "w2 "]
        peer = fake_ollama.chats[0].peer
        assert peer is not None and peer[1] in connections_to(fake_ollama.port)
        await client.send({"type": "cancel"})
        cancelled = (await client.recv_until("cancelled"))[-1]
        assert cancelled["success"] is True and cancelled["response_id"] == "r1"
        assert at_cancelled == [(0, False)], "the engine request was closed before `cancelled`"
        await fake_ollama.chats[0].wait_closed(limit=5)
        assert (await client.turn("Again."))[-1]["type"] == "response_complete"
        await client.close()


# --- the circuit breaker and the retries -----------------------------------------------------


async def test_retries_stop_once_the_circuit_opens_mid_turn() -> None:
    backend = FakeBackend()
    backend.script.extend(Scripted([], error=UpstreamUnavailable("busy")) for _ in range(10))
    breaker = CircuitBreaker(failure_threshold=2, recovery_timeout=3600)
    # ten attempts within an hour: only the open circuit can end the turn early
    retry = RetryPolicy(attempts=10, backoff_s=0.001, max_backoff_s=0.002, deadline_s=3600)
    pool = EnginePool([Upstream(backend, "fake", breaker)], retry, Telemetry())
    with pytest.raises(UpstreamUnavailable):
        async with asyncio.timeout(10):
            await anext(pool.stream_chat(chat_request()))
    assert len(backend.calls) == 2, "no engine call once the breaker is open"
    assert breaker.state == "open"


async def test_a_turn_whose_retries_open_the_circuit_fails_at_once_over_the_socket(
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        llm_retry_attempts=10,
        llm_retry_deadline_s=3600,
        circuit_breaker_failure_threshold=2,
        circuit_breaker_recovery_timeout=3600,
    )
    fake_ollama.default_reply = Reply(status=503, error="server busy")
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("anyone?")  # bounded by the receive timeout, not the hour
        assert frames[-1]["error"]["code"] == "upstream_unavailable"
        assert len(fake_ollama.chats) == 2
        frames = await client.turn("still?")
        assert frames[-1]["error"]["code"] == "circuit_open"
        assert len(fake_ollama.chats) == 2
        await client.close()


async def test_a_turn_cancelled_before_its_first_token_frees_the_half_open_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=10.0, clock=clock)
    breaker.before_call()
    breaker.record_failure()
    clock.now += 10.0  # the recovery timeout is over: the next call is the one probe
    backend = FakeBackend()
    backend.script.append(Scripted(["late"], before=asyncio.Event()))  # never answers
    pool = EnginePool([Upstream(backend, "fake", breaker)], RetryPolicy(), Telemetry())

    async def first_item() -> StreamItem:
        return await anext(pool.stream_chat(chat_request()))

    waiting = asyncio.create_task(first_item())
    await asyncio.wait_for(backend.asked.wait(), 5)
    assert breaker.state == "half_open" and not breaker.admits(), "the probe is in flight"
    assert pool.snapshot()[0]["in_flight"] == 1
    waiting.cancel()
    await asyncio.wait({waiting})
    assert waiting.cancelled()
    assert breaker.admits(), "an abandoned probe lets the next call probe"
    assert pool.snapshot()[0]["in_flight"] == 0
    assert backend.closed_streams == 1


@pytest.mark.parametrize(
    "reply",
    [Reply(stall_after=0), Reply(header_delay=600)],
    ids=["before-the-first-chunk", "before-the-headers"],
)
async def test_cancel_before_the_first_token_closes_the_engine_request(
    fake_ollama: FakeOllama, reply: Reply
) -> None:
    fake_ollama.script(reply)
    settings = make_settings(ollama_base_url=fake_ollama.url)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "user_message", "text": "Think hard.", "response_id": "r1"})
        upstream = await fake_ollama.wait_chats(1)
        await client.send({"type": "cancel"})
        cancelled = await client.recv()
        assert cancelled["type"] == "cancelled" and cancelled["success"] is True
        assert cancelled["stats"]["token_frames"] == 0
        await upstream.wait_closed(limit=5)
        health = (await service.get("/health")).json()
        assert health["upstreams"][0]["in_flight"] == 0
        assert health["circuit_breaker"]["consecutive_failures"] == 0
        text = (await service.get("/metrics", monitoring=True)).text
        assert metric(text, "llm_service_upstream_requests_total", 'outcome="cancelled"') == 1
        assert await client.history() == [], "a turn with no text leaves no trace"
        assert (await client.turn("Now answer."))[-1]["type"] == "response_complete"
        await client.close()


# --- the drain --------------------------------------------------------------------------------


async def test_a_reply_that_ends_during_the_drain_closes_its_session_at_once(
    fake_ollama: FakeOllama,
) -> None:
    release = asyncio.Event()
    fake_ollama.script(Reply(chunks=["one ", "two ", "three"], gate=release, gate_at=1))
    # a grace far longer than any wait here: only the reply's end can close the session
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_shutdown_grace_s=600)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "user_message", "text": "Count."})
        assert await client.recv() == {"type": "token", "data": "one "}
        shutdown = asyncio.create_task(service.runner.shutdown())
        try:
            await poll(lambda: draining(service), limit=10)
            release.set()
            frames = await client.recv_until("response_complete")
            assert tokens_of(frames) == ["two ", "three"]
            error = (await client.recv())["error"]
            assert error["code"] == "service_shutting_down" and error["recoverable"] is False
            await asyncio.wait_for(client.ws.wait_closed(), 5)
            assert client.ws.close_code == 1001
            await asyncio.wait_for(shutdown, 10)  # its last session gone, the drain is over
        finally:
            shutdown.cancel()


class Attachment:
    """A live connection as the hub sees it (the `hub.Attached` Protocol)."""

    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self.ended: list[ServiceError] = []

    def begin_drain(self, error: ServiceShuttingDown) -> None:
        self.draining.set()

    def end(self, error: ServiceError) -> None:
        self.ended.append(error)


async def test_the_hub_admits_no_connection_once_the_drain_has_begun() -> None:
    hub = Hub(max_connections=10, max_per_client=0, shutdown_grace_s=600)
    busy = Attachment()
    with hub.attached(busy, "10.0.0.1"):
        assert hub.admit("10.0.0.2") is None
        drain = asyncio.create_task(hub.drain(close_limit_s=1))
        await asyncio.wait_for(busy.draining.wait(), 5)
        refusal = hub.admit("10.0.0.2")
        assert isinstance(refusal, ServiceShuttingDown) and refusal.close_code == 1001
    await asyncio.wait_for(drain, 5)  # the last connection left: the drain ends
    assert busy.ended == []


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One WebSocket frame from the server (unmasked): its opcode and payload."""
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return head[0] & 0x0F, await reader.readexactly(length)


async def test_a_handshake_during_the_drain_gets_service_shutting_down(
    fake_ollama: FakeOllama,
) -> None:
    # The listening socket closes when the drain starts; a connection accepted before that
    # (here one kept alive after an HTTP request) may still ask for a WebSocket.
    release = asyncio.Event()
    fake_ollama.script(Reply(chunks=["one ", "two"], gate=release, gate_at=1))
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_shutdown_grace_s=600)
    async with running_service(settings) as service:
        busy = await service.connect()  # a reply in flight keeps the drain going
        await busy.start()
        await busy.send({"type": "user_message", "text": "Count."})
        assert (await busy.recv())["type"] == "token"
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        shutdown = asyncio.create_task(service.runner.shutdown())
        try:
            await poll(lambda: draining(service), limit=10)
            writer.write(WS_HANDSHAKE)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 ")
            opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
            assert opcode == 1
            frame = orjson.loads(payload)
            assert frame["type"] == "error", frame
            assert frame["error"]["code"] == "service_shutting_down"
            opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
            assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1001
            writer.close()
            text = (await service.get("/metrics", monitoring=True)).text
            assert metric(text, "llm_service_sessions_total") == 1, "no session for it"
            release.set()
            await busy.recv_until("response_complete")
            await asyncio.wait_for(shutdown, 10)
        finally:
            shutdown.cancel()


# --- limits at their edge -------------------------------------------------------------------


def test_the_turn_rate_window_is_one_minute() -> None:
    clock = FakeClock()
    window = SlidingWindow(2, clock=clock)
    assert window.admit() == 0 and window.admit() == 0
    clock.now += 59.0
    assert window.wait() == pytest.approx(1.0), "the first turn still counts after 59 s"
    clock.now += 1.0
    assert window.admit() == 0, "and no longer after 60 s"


async def test_a_rate_limited_turn_is_told_to_wait_out_the_minute() -> None:
    conv = conversation(FakeBackend(), TurnLimits(per_minute=2))
    for text in ("one", "two"):
        await finish(conv, text)
    with pytest.raises(RateLimited) as refused:
        conv.start_turn("three")
    # 60 s from the first turn, less the moments since: far more than half a minute is left
    assert refused.value.retry_after_ms is not None
    assert 30_000 < refused.value.retry_after_ms <= 60_000


@pytest.mark.parametrize("letter", ["x", "é", "語"])
async def test_a_message_exactly_at_the_character_limit_is_taken(letter: str) -> None:
    conv = conversation(FakeBackend(), TurnLimits(max_chars=10))
    await finish(conv, letter * 10)  # characters, not bytes
    with pytest.raises(MessageTooLong):
        conv.start_turn(letter * 11)
    assert conv.turns == 1


def frame_of(size: int, letter: str) -> str:
    """A `user_message` frame of exactly `size` bytes of UTF-8, its text mostly `letter`."""
    skeleton = orjson.dumps({"type": "user_message", "text": ""}).decode()
    room = size - len(skeleton.encode())
    width = len(letter.encode())
    text = letter * (room // width) + "x" * (room % width)
    frame = orjson.dumps({"type": "user_message", "text": text}).decode()
    assert len(frame.encode()) == size
    return frame


@pytest.mark.parametrize("letter", ["x", "é", "語", "🙂"])
def test_a_frame_exactly_at_the_byte_limit_is_read_and_one_byte_more_is_refused(
    letter: str,
) -> None:
    limit = 1024
    parsed = parse_client_frame(frame_of(limit, letter), limit)
    assert isinstance(parsed, UserMessage)
    with pytest.raises(MessageTooLarge):
        parse_client_frame(frame_of(limit + 1, letter), limit)


async def test_both_limits_hold_at_their_edge_over_the_socket(fake_ollama: FakeOllama) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url, llm_max_message_bytes=1024, llm_max_user_message_chars=50
    )
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        assert (await client.turn("y" * 50))[-1]["type"] == "response_complete"
        assert (await client.turn("y" * 51))[-1]["error"]["code"] == "message_too_long"
        fake_ollama.default_reply = Reply(chunks=["ok"])
        for size, answer in ((1024, "response_complete"), (1025, "error")):
            # a short message, padded out with a field the service ignores
            skeleton = orjson.dumps({"type": "user_message", "text": "hi", "note": ""})
            frame = {"type": "user_message", "text": "hi", "note": "n" * (size - len(skeleton))}
            assert len(orjson.dumps(frame)) == size
            await client.send(frame)
            frames = await client.recv_until(("response_complete", "error"))
            assert frames[-1]["type"] == answer, size
        assert frames[-1]["error"]["code"] == "message_too_large"
        assert len(fake_ollama.chats) == 2
        await client.close()


# --- what is counted ----------------------------------------------------------------------------


async def test_the_trimmed_turns_counter_adds_every_turn_dropped(fake_ollama: FakeOllama) -> None:
    # A 256-token window fills after about ten of these turns; a full window then drops a
    # block of several turns at once.
    settings = make_settings(
        ollama_base_url=fake_ollama.url, default_context_window=256, default_max_tokens=16
    )
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        trimmed = []
        for i in range(16):
            frames = await client.turn(f"{i:02d} " + "x" * 37)
            assert frames[-1]["type"] == "response_complete", frames[-1]
            trimmed.append(frames[-1]["stats"]["history_trimmed_turns"])
        assert max(trimmed) >= 2, f"no turn dropped several at once: {trimmed}"
        text = (await service.get("/metrics", monitoring=True)).text
        assert metric(text, "llm_service_history_trimmed_turns_total") == sum(trimmed)
        await client.close()


# --- deadlines ---------------------------------------------------------------------------------


async def test_time_the_consumer_spends_elsewhere_does_not_count_against_the_chunk_deadline(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.script(Reply(chunks=["one ", "two ", "three ", "four"]))
    backend = OllamaBackend(
        fake_ollama.url, DEFAULT_MODEL, timeouts=Timeouts(first_chunk=10.0, chunk=1.0)
    )
    try:
        stream = backend.stream_chat(chat_request())
        items: list[StreamItem] = [await anext(stream), await anext(stream)]
        # the consumer sends "two " to a slow client for two and a half chunk deadlines
        await asyncio.sleep(2.5)
        items += [item async for item in stream]
        assert items[:4] == ["one ", "two ", "three ", "four"]
        assert isinstance(items[4], StreamEnd)
    finally:
        await backend.aclose()


async def test_the_health_probe_is_cached_within_its_ttl_and_made_again_after_it() -> None:
    within = FakeBackend()
    health = EngineHealth(within, ttl_s=3600, telemetry=Telemetry())
    assert (await health.current()).reachable
    assert (await health.current()).reachable
    assert within.status_calls == 1
    past = FakeBackend()
    health = EngineHealth(past, ttl_s=0, telemetry=Telemetry())
    await health.current()
    await health.current()
    assert past.status_calls == 2


async def test_a_stalled_engine_probe_is_answered_as_unreachable_within_a_second() -> None:
    backend = FakeBackend()
    backend.status_gate = asyncio.Event()
    health = EngineHealth(backend, ttl_s=3600, telemetry=Telemetry())
    try:
        first, second = await asyncio.wait_for(
            asyncio.gather(health.current(), health.current()), 5
        )
        for status in (first, second):
            assert not status.reachable
            assert status.detail == "engine did not answer within 1 s"
        assert backend.status_calls == 1, "one probe in flight for every caller"
        backend.status_gate.set()
        assert (await asyncio.wait_for(health.current(), 5)).reachable
        assert backend.status_calls == 1, "the stalled probe's answer is the one used"
    finally:
        await health.aclose()


async def test_health_with_a_stalled_engine_answers_unhealthy(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url)
    async with running_service(settings) as service:
        assert (await service.get("/health")).status_code == 200
        fake_ollama.version_gate = asyncio.Event()  # /api/version answers nothing from now on
        response = await service.get("/health")  # within the client's 5 s
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unhealthy" and body["engine"]["reachable"] is False
        fake_ollama.version_gate.set()
        fake_ollama.version_gate = None
        await poll(lambda: _healthy(service), limit=10)


async def _healthy(service: RunningService) -> bool:
    return (await service.get("/health")).status_code == 200


async def test_a_session_streaming_a_long_reply_is_not_idle(fake_ollama: FakeOllama) -> None:
    release = asyncio.Event()
    fake_ollama.script(Reply(chunks=["before ", "after"], gate=release, gate_at=1))
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_session_idle_timeout_s=0.3)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "user_message", "text": "Take your time."})
        assert await client.recv() == {"type": "token", "data": "before "}
        # the reply waits for three idle timeouts, the client sends one frame meanwhile
        await asyncio.sleep(0.9)
        await client.send({"type": "get_history"})
        assert (await client.recv())["type"] == "history"
        await asyncio.sleep(0.9)
        release.set()
        frames = await client.recv_until("response_complete")
        assert tokens_of(frames) == ["after"]
        # once the reply is over, idleness counts again
        idle = await client.recv()
        assert idle["error"]["code"] == "session_idle_timeout"
        await asyncio.wait_for(client.ws.wait_closed(), 5)
        assert client.ws.close_code == 1000


# --- sampler settings reach the engine --------------------------------------------------------


async def test_every_sampler_setting_reaches_ollama_under_its_name(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    client = await service.connect()
    await client.start()
    await client.turn("defaults")
    unset = {"min_p", "presence_penalty", "frequency_penalty", "seed", "stop"}
    assert not unset & set(fake_ollama.chats[0].options), "unset ones are left to Ollama"
    config = {
        "temperature": 0.2,
        "max_tokens": 64,
        "top_p": 0.8,
        "top_k": 20,
        "repeat_penalty": 1.3,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "seed": 42,
        "stop": ["\n\n", "User:"],
    }
    await client.send({"type": "start_session", "config": config})
    assert (await client.recv())["type"] == "session_configured"
    assert (await client.turn("all of them"))[-1]["type"] == "response_complete"
    assert fake_ollama.chats[1].options == {
        "num_ctx": 8192,
        "temperature": 0.2,
        "num_predict": 64,
        "top_p": 0.8,
        "top_k": 20,
        "repeat_penalty": 1.3,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "seed": 42,
        "stop": ["\n\n", "User:"],
    }
    await client.close()


# --- a bug ends the turn, not the connection --------------------------------------------------


class Buggy(FakeBackend):
    """A backend with bugs: its prompt says where it fails."""

    def count_tokens(self, text: str) -> int | None:
        if text == "crash while counting":
            raise RuntimeError("a bug in the tokenizer")
        return None

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        prompt = request.messages[-1].content
        if prompt == "crash before the reply":
            raise KeyError("a bug before the first chunk")
        if prompt == "crash mid-reply":
            yield "partial "
            raise ZeroDivisionError("a bug mid-reply")
        async for item in super().stream_chat(request):
            yield item


async def test_a_bug_is_an_internal_error_and_the_connection_goes_on() -> None:
    backend = Buggy()
    settings = make_settings()
    async with running_service(settings, fake_engine(backend)) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "user_message", "text": "crash before the reply"})
        frame = await client.recv()
        assert frame["type"] == "error" and frame["error"]["code"] == "internal_error", frame
        assert frame["error"]["recoverable"] is True and frame["response_id"] == ANY_ID
        await client.send({"type": "user_message", "text": "crash mid-reply", "response_id": "r2"})
        frames = await client.recv_until("error")
        assert tokens_of(frames) == ["partial "]
        assert frames[-1]["response_id"] == "r2"
        assert frames[-1]["error"]["code"] == "internal_error"
        with capture_logs() as logs:
            await client.send({"type": "user_message", "text": "crash while counting"})
            frame = await client.recv()
        assert frame["type"] == "error" and frame["error"]["code"] == "internal_error", frame
        assert frame["error"]["message"] == "internal error: RuntimeError"  # no more said
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["frame_handling_failed"]
        assert (await client.turn("and now?"))[-1]["type"] == "response_complete"
        assert [(m["content"], m.get("status")) for m in await client.history()] == [
            ("crash mid-reply", None),
            ("partial ", "incomplete"),
            ("and now?", None),
            ("ok", "complete"),
        ]
        text = (await service.get("/metrics", monitoring=True)).text
        assert metric(text, "llm_service_errors_total", 'code="internal_error"') == 3
        await client.close()


# --- the Ollama engine's failures ---------------------------------------------------------------


async def test_a_line_that_is_not_json_is_an_upstream_error_and_closes_the_request(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(Reply(chunks=["one ", "two ", "three"], garbage_after=2))
    client = await service.connect()
    await client.start()
    frames = await client.turn("Hi")
    assert tokens_of(frames) == ["one ", "two "]
    error = frames[-1]["error"]
    assert error["code"] == "upstream_error" and "not a chat chunk" in error["message"]
    await fake_ollama.chats[0].wait_closed(limit=5)
    history = await client.history()
    assert history[-1] == {"role": "assistant", "content": "one two ", "status": "incomplete"}
    assert (await client.turn("Again"))[-1]["type"] == "response_complete"
    await client.close()


async def test_a_body_left_open_after_done_still_completes_the_reply(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    # The drain after the `done` line gives up after a second, far within the receive timeout
    # (the read timeout behind it is over two minutes).
    fake_ollama.script(Reply(chunks=["All", " done"], hold_open=True), Reply(chunks=["next"]))
    client = await service.connect()
    await client.start()
    frames = await client.turn("Hi")
    assert tokens_of(frames) == ["All", " done"]
    assert frames[-1]["type"] == "response_complete"
    assert frames[-1]["stats"]["done_reason"] == "stop"
    await fake_ollama.chats[0].wait_closed(limit=5)
    assert tokens_of(await client.turn("Again")) == ["next"]
    assert fake_ollama.chats[1].peer != fake_ollama.chats[0].peer, "not reused: it was closed"
    await client.close()


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, b"<html><body>Internal error</body></html>"), (400, b'["not", "an", "object"]')],
    ids=["html", "json-not-an-object"],
)
async def test_an_error_body_that_is_not_ollamas_is_quoted_in_the_error(
    service: RunningService, fake_ollama: FakeOllama, status: int, body: bytes
) -> None:
    fake_ollama.script(Reply(status=status, error_body=body))
    client = await service.connect()
    await client.start()
    frames = await client.turn("Hi")
    error = frames[-1]["error"]
    assert error["code"] == "upstream_error", error
    assert f"Ollama answered {status}: {body.decode()}" in error["message"]
    assert len(fake_ollama.chats) == 1
    assert (await client.turn("Again"))[-1]["type"] == "response_complete"
    await client.close()
