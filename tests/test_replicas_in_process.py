"""Two replicas in the test process sharing a real redis-server: a reply followed from the
replica generating it, seen by the one its client resumed on (tests/test_session_stores.py
runs replicas as processes of their own; these are the cases mutation runs must see)."""

from __future__ import annotations

import asyncio

import pytest
import websockets

from tests.fakes.ollama import FakeOllama, Reply
from tests.redis_server import RedisServer
from tests.support import make_settings, running_service, tokens_of

REPLY = [f" f{i}" for i in range(40)]  # 2 s


async def test_cancel_on_the_replica_following_a_reply_stops_it_where_it_streams(
    fake_ollama: FakeOllama, redis_server: RedisServer
) -> None:
    fake_ollama.script(Reply(REPLY, delay=0.05))
    settings = make_settings(
        ollama_base_url=fake_ollama.url,
        llm_session_store=redis_server.url,
        llm_resume_grace_s=10,
    )
    async with running_service(settings) as a, running_service(settings) as b:
        on_a = await a.connect()
        session_id = await on_a.start()
        await on_a.send({"type": "user_message", "text": "Count."})
        assert tokens_of([await on_a.recv(), await on_a.recv()]) == REPLY[:2]
        on_a.ws.transport.abort()  # the phone changed networks, and its replica

        on_b = await b.connect()
        await on_b.start()
        assert on_a.resume_token is not None
        resumed = await on_b.resume(session_id, on_a.resume_token, on_a.last_seq)
        assert resumed["type"] == "session_resumed" and resumed["generating"] is True
        await on_b.send({"type": "cancel"})
        frames = await on_b.recv_until("cancelled", limit=10)
        assert frames[-1]["success"] is True, frames[-1]
        await fake_ollama.chats[0].wait_closed(limit=5)  # on the replica generating it
        assert fake_ollama.chats[0].chunks_sent < len(REPLY)
        await asyncio.wait_for(on_b.close(), 5)


async def test_a_session_is_in_the_shared_store_before_its_session_started_goes_out(
    fake_ollama: FakeOllama, redis_server: RedisServer
) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_session_store=redis_server.url)
    async with running_service(settings) as a, running_service(settings) as b:
        on_a = await a.connect()
        session_id = await on_a.start()
        async with redis_server.client() as redis:
            assert await redis.exists(f"fasttalk:session:{session_id}") == 1
        on_b = await b.connect()
        await on_b.start()
        assert on_a.resume_token is not None
        answer = await on_b.resume(session_id, on_a.resume_token, on_a.last_seq)
        assert answer["type"] == "session_resumed" and answer["generating"] is False, answer
        with pytest.raises(websockets.ConnectionClosed):
            await on_a.recv()
        assert (on_a.ws.close_code, on_a.ws.close_reason) == (1000, "resumed")
        await on_b.close()
