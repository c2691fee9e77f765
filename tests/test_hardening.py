"""What a closing tab, a stranger or a flood can do to the service: each bounded, each tested."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.conftest import RunningService, make_settings, running_service
from tests.fakes.ollama import FakeOllama, Reply

pytestmark = pytest.mark.slow


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
