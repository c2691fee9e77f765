"""How a connection ends, with the service in the test process: for each way, the last frame,
the close code and reason the client reads, the error counted and the line logged."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import ClassVar

import pytest
import websockets
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from llm_service.errors import ServiceError, UpstreamUnauthorized
from tests.fakes.backend import FakeBackend, Scripted
from tests.fakes.ollama import FakeOllama, Reply
from tests.redis_server import RedisServer
from tests.support import (
    Client,
    RunningService,
    draining,
    fake_engine,
    make_settings,
    metric,
    poll,
    running_service,
)


async def errors_counted(service: RunningService, code: str) -> float:
    text = (await service.get("/metrics", monitoring=True)).text
    return metric(text, "llm_service_errors_total", f'code="{code}"')


async def closed(client: Client) -> tuple[int | None, str | None]:
    """Read what is left until the server's close; its code and reason."""
    _, code, reason = await client.read_to_close()
    return code, reason


async def test_a_refused_connection_names_its_refusal_in_the_close(
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_max_connections=1)
    async with running_service(settings) as service:
        first = await service.connect()
        await first.start()
        second = await service.connect()
        frame = await second.recv()
        assert frame["error"]["code"] == "max_connections"
        assert await closed(second) == (1013, "max_connections")
        assert await errors_counted(service, "max_connections") == 1
        await first.close()


async def test_an_idle_session_is_told_how_long_it_waited(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_session_idle_timeout_s=0.25)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        with capture_logs() as logs:
            error = (await client.recv())["error"]
            assert await closed(client) == (1000, "session_idle_timeout")
            await poll(lambda: no_connections(service))
        assert error["code"] == "session_idle_timeout" and error["recoverable"] is False
        assert error["message"] == (
            "no activity for 0.25 s; the socket is closed (LLM_SESSION_IDLE_TIMEOUT_S)"
        )
        assert await errors_counted(service, "session_idle_timeout") == 1
        ends = [e for e in logs if e["event"] == "session_closed"]
        assert [(e["reason"], e["turns"]) for e in ends] == [("session_idle_timeout", 0)]


async def no_connections(service: RunningService) -> bool:
    return bool((await service.get("/health")).json()["active_connections"] == 0)


async def test_an_idle_connection_is_closed_as_soon_as_the_drain_begins(
    fake_ollama: FakeOllama,
) -> None:
    release = asyncio.Event()
    fake_ollama.script(Reply(chunks=["one ", "two"], gate=release, gate_at=1))
    # a grace far longer than the test: the busy session keeps the drain going throughout
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_shutdown_grace_s=600)
    async with running_service(settings) as service:
        busy, idle = await service.connect(), await service.connect()
        await busy.start()
        await idle.start()
        await busy.send({"type": "user_message", "text": "Count."})
        assert (await busy.recv())["type"] == "token"
        shutdown = asyncio.create_task(service.runner.shutdown())
        try:
            error = (await idle.recv())["error"]
            assert error["code"] == "service_shutting_down" and error["recoverable"] is False
            assert await closed(idle) == (1001, "service_shutting_down")
            assert await draining(service) and not shutdown.done()
            release.set()
            assert (await busy.recv_until("response_complete"))[-1]["type"] == "response_complete"
            await asyncio.wait_for(shutdown, 10)
        finally:
            shutdown.cancel()


async def test_a_drain_that_begins_before_session_started_ends_the_connection_after_it(
    fake_ollama: FakeOllama, redis_server: RedisServer
) -> None:
    # The session is written to the shared store before its session_started goes out: with
    # the store held still, the drain begins while the connection is still being set up.
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_session_store=redis_server.url)
    async with running_service(settings) as service:
        assert redis_server.proc is not None
        client = await service.connect()
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            shutdown = asyncio.create_task(service.runner.shutdown())
            await poll(lambda: draining(service))
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        await client.start()
        error = (await client.recv())["error"]
        assert error["code"] == "service_shutting_down" and error["recoverable"] is False
        assert await closed(client) == (1001, "service_shutting_down")
        await asyncio.wait_for(shutdown, 10)


async def test_a_client_that_stops_reading_is_cut_off_and_its_close_is_bounded() -> None:
    # 2,000 frames of 16 KiB: far more than the kernel buffers on the way hold, so the
    # service's send blocks once the client stops reading
    backend = FakeBackend()
    backend.script.append(Scripted(["x" * 16383 + " "] * 2000))
    settings = make_settings(llm_send_timeout_s=0.3)
    async with running_service(settings, fake_engine(backend)) as service:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", service.port))
        client = Client(await websockets.connect(service.ws_url, sock=sock, max_size=None))
        await client.start()
        with capture_logs() as logs:
            await client.send({"type": "user_message", "text": "A long story, please."})
            # the client reads nothing until the service has given up on it, close and all
            await poll(lambda: no_connections(service), limit=10)
        assert backend.closed_streams == 1, "the engine request is closed"
        for entry in logs:
            entry.pop("duration_s", None)
        assert logs == [
            {"event": "client_not_reading", "blocked_s": 0.3, "log_level": "warning"},
            # the close frame too waits behind what the client does not read: bounded
            {"event": "close_not_delivered", "code": 1008, "log_level": "warning"},
            {
                "event": "session_closed",
                "reason": "client not reading for 0.3 s",
                "turns": 1,
                "log_level": "info",
            },
        ]
        # so the client reads the frames the kernel held, then the connection's end
        assert (await closed(client))[0] == 1006
        text = (await service.get("/metrics", monitoring=True)).text
        assert metric(text, "llm_service_connections_rejected_total", 'reason="send_timeout"') == 1


async def test_a_client_gone_before_its_session_started_is_a_disconnect(
    fake_ollama: FakeOllama, redis_server: RedisServer
) -> None:
    # with the store held still, the client goes while its session is being written
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_session_store=redis_server.url)
    async with running_service(settings) as service:
        assert redis_server.proc is not None
        with capture_logs(processors=[merge_contextvars]) as logs:
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
            try:
                client = await service.connect()
                await asyncio.sleep(0.2)  # the session is being written
                client.ws.transport.abort()
                await asyncio.sleep(0.2)  # the service's side of the socket sees it go
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            await poll(lambda: no_connections(service), limit=10)
        [closing] = [entry for entry in logs if entry["event"] == "session_closed"]
        assert closing["reason"] == "disconnect", logs
        assert closing["turns"] == 0


async def test_a_client_gone_while_its_frame_is_answered_is_a_disconnect(
    fake_ollama: FakeOllama, redis_server: RedisServer
) -> None:
    # end_session deletes the session from the store before it answers: with the store held
    # still, the client goes while its frame is being answered, and the answer finds it gone
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_session_store=redis_server.url)
    async with running_service(settings) as service:
        assert redis_server.proc is not None
        client = await service.connect()
        await client.start()
        with capture_logs(processors=[merge_contextvars]) as logs:
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
            try:
                await client.send({"type": "end_session"})
                await asyncio.sleep(0.2)  # read, and waiting on the store
                client.ws.transport.abort()
                await asyncio.sleep(0.2)  # the service's side of the socket sees it go
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            await poll(lambda: no_connections(service), limit=10)
        [closing] = [entry for entry in logs if entry["event"] == "session_closed"]
        assert closing["reason"] == "disconnect", logs


class NoEngineForThis(ServiceError):
    """A failure no turn on the connection can get past, with no close code of its own."""

    code = "upstream_error"
    recoverable: ClassVar[bool] = False


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (UpstreamUnauthorized("the engine refused the service's key"), "upstream_unauthorized"),
        (NoEngineForThis("nothing can serve this connection"), "upstream_error"),
    ],
)
async def test_a_failure_no_turn_can_get_past_ends_the_connection_with_1011(
    failure: ServiceError, code: str
) -> None:
    backend = FakeBackend()
    backend.script.append(Scripted([], error=failure))
    async with running_service(make_settings(), fake_engine(backend)) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "user_message", "text": "Hi"})
        error = (await client.recv_until("error"))[-1]["error"]
        assert error["code"] == code and error["recoverable"] is False
        assert await closed(client) == (1011, code)


async def test_a_sessions_lines_say_who_it_was_how_it_ended_and_how_long_it_took(
    service: RunningService,
) -> None:
    # The service runs in this process, on the same monotonic clock: each session's duration
    # lies within the span the client saw, from before it connected to after it was gone.
    spans = []
    with capture_logs(processors=[merge_contextvars]) as logs:  # with the bound session id
        began = time.monotonic()
        ending = await service.connect()
        ids = [await ending.start()]
        await ending.turn("Hi")
        await ending.send({"type": "end_session"})
        assert (await ending.recv())["type"] == "session_ended"
        assert (await closed(ending))[0] == 1000
        await poll(lambda: no_connections(service))
        spans.append(time.monotonic() - began)
        began = time.monotonic()
        dropped = await service.connect()
        ids.append(await dropped.start())
        await dropped.close()
        await poll(lambda: no_connections(service))
        spans.append(time.monotonic() - began)
    addresses = [f"127.0.0.1:{c.ws.local_address[1]}" for c in (ending, dropped)]
    started = [e for e in logs if e["event"] == "session_started"]
    assert [(e["session_id"], e["client"]) for e in started] == list(
        zip(ids, addresses, strict=True)
    )
    [turn] = [e for e in logs if e["event"] == "turn_completed"]
    assert turn["session_id"] == ids[0]
    ends = [e for e in logs if e["event"] == "session_closed"]
    assert [(e["session_id"], e["reason"], e["turns"]) for e in ends] == [
        (ids[0], "end_session", 1),
        (ids[1], "disconnect", 0),
    ]
    for end, span in zip(ends, spans, strict=True):
        assert 0 <= end["duration_s"] <= round(span, 3) + 0.001
        assert round(end["duration_s"], 3) == end["duration_s"]


async def test_a_binary_frame_is_refused_and_the_socket_goes_on(service: RunningService) -> None:
    client = await service.connect()
    await client.start()
    await client.send(b'{"type": "get_history"}')
    error = await client.recv()
    assert error["error"]["code"] == "invalid_message"
    assert error["error"]["message"] == "binary frames are not accepted; send JSON text"
    assert await client.history() == []
    await client.close()
