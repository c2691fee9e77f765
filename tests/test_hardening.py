"""What a closing tab, a stranger or a flood can do to the service: each bounded, each tested."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from pathlib import Path

import httpx
import pytest
import websockets

from llm_service.server import FRAME_MARGIN_BYTES
from tests.fakes.ollama import FakeOllama, Reply
from tests.process import service_process
from tests.support import (
    WS_HANDSHAKE,
    Client,
    RunningService,
    bound_socket,
    make_settings,
    metric,
    run_cli,
    running_service,
)

pytestmark = pytest.mark.slow

SECRET = "hunter2-Xq7"


async def drop_after_first_token(service: RunningService, abort: bool) -> None:
    """What a closing browser tab does: ask, read one token, go (cleanly, or with a reset)."""
    for _ in range(100):  # a socket just dropped may not have been counted out yet
        client = await service.connect()
        first = await client.recv()
        if first["type"] == "session_started":
            break
        assert first["error"]["code"] == "max_connections", first
        await client.ws.wait_closed()
    await client.send({"type": "user_message", "text": "Talk for a while."})
    frame = await client.recv(limit=10)
    assert frame["type"] == "token", frame
    if abort:
        client.ws.transport.abort()
    else:
        await client.close()


async def test_hundreds_of_dropped_sockets_leak_no_upstream_connection(
    fake_ollama: FakeOllama,
) -> None:
    # The engine's connection pool holds LLM_MAX_CONNECTIONS + 4: a few leaked slots would
    # make the full house below wait for the pool and fail.
    fake_ollama.default_reply = Reply(chunks=["tick "] * 400, delay=0.005)
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        llm_max_connections=24,
        llm_connect_timeout_s=2.0,
        llm_retry_attempts=1,
    )
    concurrency, rounds = 20, 15
    async with running_service(settings) as service:
        modes = itertools.cycle((False, True))

        async def worker() -> None:
            for _ in range(rounds):
                await drop_after_first_token(service, next(modes))

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 120)
        dropped = list(fake_ollama.chats)
        assert len(dropped) == concurrency * rounds
        # every dropped reply's engine request was closed, so the engine stopped generating
        waits = [asyncio.ensure_future(chat.closed.wait()) for chat in dropped]
        await asyncio.wait(waits, timeout=10)
        open_left = [chat for chat in dropped if not chat.closed.is_set()]
        for wait in waits:
            wait.cancel()
        assert not open_left, f"{len(open_left)} engine requests were never closed"
        assert all(chat.finished_at is None for chat in dropped), "no reply ran to its end"

        fake_ollama.default_reply = Reply(chunks=["fresh", " turn"])
        clients = [await service.connect() for _ in range(settings.llm_max_connections)]
        for client in clients:
            await client.start()
        frames = await asyncio.wait_for(
            asyncio.gather(*(client.turn("still there?", limit=20) for client in clients)), 30
        )
        assert [f[-1]["type"] for f in frames] == ["response_complete"] * len(clients)
        health = await service.get("/health")
        assert health.status_code == 200 and health.json()["circuit_breaker"]["state"] == "closed"
        for client in clients:
            await client.close()


async def test_credentials_in_the_engine_url_never_leave_the_process(tmp_path: Path) -> None:
    closed = bound_socket()  # bound, never listening: the engine is unreachable
    url = f"http://ops:{SECRET}@127.0.0.1:{closed.getsockname()[1]}"
    seen: list[str] = []
    try:
        async with service_process(
            tmp_path, LLM_BACKEND="ollama", OLLAMA_BASE_URL=url, LLM_RETRY_ATTEMPTS="1"
        ) as service:
            client = Client(await websockets.connect(service.ws_url))
            await client.start()
            frames = await client.turn("hello")
            assert frames[-1]["error"]["code"] == "upstream_unavailable"
            seen.append(frames[-1]["error"]["message"])
            async with httpx.AsyncClient(timeout=5) as http:
                for port in (service.port, service.monitoring_port):
                    health = await http.get(f"http://127.0.0.1:{port}/health")
                    assert health.status_code in (200, 503)
                    seen.append(health.text)
            await client.close()
        seen.append("".join(service.output))
        assert "turn_failed" in seen[-1]
        assert "ops:********@127.0.0.1" in seen[1], "the URL is shown, masked"
        code, out = await run_cli(tmp_path, "test", LLM_BACKEND="ollama", OLLAMA_BASE_URL=url)
        assert code == 1
        seen.append(out)
        code, out = await run_cli(
            tmp_path, "config", "--show", OLLAMA_BASE_URL=f"ftp://ops:{SECRET}@nowhere"
        )
        assert code == 2 and "OLLAMA_BASE_URL" in out
        seen.append(out)
    finally:
        closed.close()
    for text in seen:
        assert SECRET not in text, text


async def test_frames_are_bounded_before_they_are_buffered(fake_ollama: FakeOllama) -> None:
    limit = 4096
    settings = make_settings(
        ollama_base_url=fake_ollama.url, llm_max_message_bytes=limit, llm_ws_compression=True
    )
    just_over = {"type": "user_message", "text": "x" * (limit + 100)}
    far_over = {"type": "user_message", "text": "x" * (limit + FRAME_MARGIN_BYTES + 100)}
    async with running_service(settings) as service:
        for compression in (None, "deflate"):
            client = Client(await websockets.connect(service.ws_url, compression=compression))
            await client.start()
            # a little over the limit: read, answered, the socket stays usable
            await client.send(just_over)
            error = (await client.recv())["error"]
            assert error["code"] == "message_too_large" and error["recoverable"] is True
            assert (await client.turn("small"))[-1]["type"] == "response_complete"
            # far over it: refused from its header (compressed: once inflated past the cap)
            await client.send(far_over)
            with pytest.raises(websockets.ConnectionClosed):
                await client.recv()
            assert client.ws.close_code == 1009
        # a frame of a megabyte that deflates to a kilobyte is refused the same way
        bomb = Client(await websockets.connect(service.ws_url, compression="deflate"))
        await bomb.start()
        await bomb.send({"type": "user_message", "text": "a" * 1_000_000})
        with pytest.raises(websockets.ConnectionClosed):
            await bomb.recv()
        assert bomb.ws.close_code == 1009
        assert len(fake_ollama.chats) == 2


async def test_half_sent_requests_are_timed_out_and_bounded(fake_ollama: FakeOllama) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        llm_request_head_timeout_s=1.0,
        llm_max_pending_connections=20,
    )
    async with running_service(settings) as service:
        slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(b"GET /health HT")  # and nothing more
            slow.append((reader, writer))
        # a client that sends its head at once is served meanwhile
        health = await service.get("/health")
        assert health.status_code == 200
        # the 11 that waited longest were closed to make room (10 for the slow ones, 1 for
        # /health), the others once their time to send a head ran out
        closed = await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in slow)), 10)
        assert closed == [b""] * 30
        for _, writer in slow:
            writer.close()
        text = (await service.get("/metrics", monitoring=True)).text
        assert (
            metric(text, "llm_service_connections_rejected_total", 'reason="pending_evicted"') >= 11
        )
        assert metric(text, "llm_service_connections_rejected_total", 'reason="head_timeout"') >= 1
        # a kept-alive connection that stalls on its next request is closed the same way
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /hea")
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1
        writer.close()


@pytest.mark.parametrize("trusted", ["", "127.0.0.1"])
async def test_forwarded_addresses_are_believed_only_from_configured_proxies(
    fake_ollama: FakeOllama, trusted: str
) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        llm_max_connections_per_client=1,
        forwarded_allow_ips=trusted,
    )
    async with running_service(settings) as service:
        first = await service.connect(additional_headers={"X-Forwarded-For": "192.0.2.1"})
        await first.start()
        second = await service.connect(additional_headers={"X-Forwarded-For": "192.0.2.2"})
        frame = await second.recv()
        if trusted:  # behind a trusted proxy, these are two clients
            assert frame["type"] == "session_started"
        else:  # anyone can write the header: both are 127.0.0.1, which has its one socket
            assert frame["error"]["code"] == "max_connections_per_client"
        await first.close()
        await second.close()


async def test_api_docs_are_off_unless_asked_for(fake_ollama: FakeOllama) -> None:
    for docs, status in ((False, 404), (True, 200)):
        settings = make_settings(ollama_base_url=fake_ollama.url, llm_api_docs=docs)
        async with running_service(settings) as service:
            for path in ("/docs", "/openapi.json"):
                assert (await service.get(path)).status_code == status, path


async def test_a_ping_flood_from_a_peer_that_never_reads_holds_no_memory(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    pings = (b"\x89\xfd\x00\x00\x00\x00" + b"p" * 125) * 512  # masked pings, 125-byte payloads
    async with service_process(tmp_path, OLLAMA_BASE_URL=fake_ollama.url) as service:
        baseline = service.rss_bytes()
        writers = []
        for _ in range(2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
            sock.connect(("127.0.0.1", service.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(WS_HANDSHAKE)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 ")
            writers.append(writer)
        # A fixed amount, not a fixed time: a slow machine (or coverage) takes longer, and a
        # service that stopped reading would hold the drain until the generous deadline.
        offered = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(90):
                while offered < 48_000_000:  # as fast as the service reads them
                    for writer in writers:
                        writer.write(pings)
                        offered += len(pings)
                    await asyncio.gather(*(writer.drain() for writer in writers))
        growth = service.rss_bytes() - baseline
        for writer in writers:
            writer.transport.abort()
    # answered at once, each ping would have queued a pong: as many bytes as were offered
    assert offered >= 48_000_000, f"the service read only {offered / 1e6:.0f} MB of pings"
    assert growth < 16_000_000, (
        f"RSS grew {growth / 1e6:.0f} MB for {offered / 1e6:.0f} MB of pings"
    )
