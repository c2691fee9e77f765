"""Sessions that outlive a socket, with the memory store: seq, resume, replay, grace, expiry."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from structlog.testing import capture_logs

from tests.fakes.ollama import FakeOllama, Reply
from tests.process import service_process
from tests.support import (
    Client,
    RunningService,
    make_settings,
    poll,
    running_service,
    tokens_of,
)

pytestmark = pytest.mark.slow

WORDS = [f"w{i} " for i in range(40)]


def resumable(fake: FakeOllama, **overrides: Any) -> Any:
    return make_settings(ollama_base_url=fake.url, **overrides)


async def test_session_started_carries_a_resume_token_and_seq_zero(
    service: RunningService,
) -> None:
    client = await service.connect()
    frame = orjson.loads(await client.ws.recv())
    assert frame["type"] == "session_started" and frame["seq"] == 0
    token = frame["resume_token"]
    assert isinstance(token, str) and len(token) >= 22  # at least 128 bits, URL-safe
    assert token != frame["session_id"]
    await client.close()


async def test_resume_between_turns_continues_the_conversation(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(Reply(chunks=["Paris", "."]), Reply(chunks=["Rome", "."]))
    first = await service.connect()
    session_id = await first.start()
    token = first.resume_token
    assert token is not None
    await first.turn("Capital of France?")
    seen = first.last_seq
    await first.close()

    second = await service.connect()
    fresh = await second.start()
    assert fresh != session_id
    resumed = await second.resume(session_id, token, seen)
    assert resumed == {
        "type": "session_resumed",
        "session_id": session_id,
        "seq": seen,
        "replayed": 0,
        "generating": False,
    }
    frames = await second.turn("And of Italy?")
    assert tokens_of(frames) == ["Rome", "."]
    assert fake_ollama.chats[1].messages == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    await second.close()


@pytest.mark.parametrize("drop_after", [1, 7, 25, 39])
async def test_a_reply_goes_on_through_a_dropped_socket_and_is_replayed_exactly(
    fake_ollama: FakeOllama, drop_after: int
) -> None:
    fake_ollama.script(Reply(chunks=WORDS, delay=0.01))
    async with running_service(resumable(fake_ollama, llm_resume_grace_s=10)) as service:
        first = await service.connect()
        session_id = await first.start()
        await first.send({"type": "user_message", "text": "count"})
        before = [await first.recv() for _ in range(drop_after)]
        seen = first.last_seq
        first.ws.transport.abort()  # the phone changed networks

        second = await service.connect()
        await second.start()
        assert first.resume_token is not None
        with capture_logs() as logs:
            resumed = await second.resume(session_id, first.resume_token, seen)
            assert resumed["type"] == "session_resumed" and resumed["seq"] >= seen
            rest = await second.recv_until("response_complete")
        assert resumed["replayed"] == resumed["seq"] - seen
        said = [e for e in logs if e["event"] == "session_resumed"]
        assert said == [
            {
                "event": "session_resumed",
                "session_id": session_id,
                "replayed": resumed["replayed"],
                "gap": False,
                "log_level": "info",
            }
        ]
        # every frame once, in order: the client's seq check passed on both sockets
        assert tokens_of(before) + tokens_of(rest) == WORDS
        history = await second.history()
        assert history[-1] == {"role": "assistant", "content": "".join(WORDS), "status": "complete"}
        await second.close()


async def test_frames_made_while_the_replay_is_sent_follow_it_in_order(
    fake_ollama: FakeOllama,
) -> None:
    # 24 frames of 1 MiB: more than the kernel buffers between the service and a client that
    # reads slowly hold, so the replay waits on the client while the reply goes on
    big = [f"{i:02d}" + "x" * (2**20 - 2) for i in range(24)]
    rest = [f" r{i}" for i in range(8)]
    release = asyncio.Event()
    fake_ollama.script(Reply(chunks=big + rest, gate=release, gate_at=len(big)))
    async with running_service(resumable(fake_ollama, llm_resume_grace_s=30)) as service:
        first = await service.connect(max_size=None)
        session_id = await first.start()
        await first.send({"type": "user_message", "text": "count"})
        assert tokens_of([await first.recv()]) == big[:1]
        seen = first.last_seq
        first.ws.transport.abort()
        upstream = await fake_ollama.wait_chats(1)
        await poll_until(lambda: upstream.chunks_sent == len(big))

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", service.port))
        ws = await websockets.connect(service.ws_url, sock=sock, max_size=None, max_queue=1)
        second = Client(ws)
        await second.start()
        assert first.resume_token is not None
        resumed = await second.resume(session_id, first.resume_token, seen)
        assert resumed["generating"] is True and resumed["seq"] - resumed["replayed"] == seen
        release.set()  # the rest of the reply is made while the replay waits on the client

        async def upstream_done() -> bool:
            health = (await service.get("/health")).json()
            return bool(health["upstreams"][0]["in_flight"] == 0)

        await poll(upstream_done, limit=10)
        frames = await second.recv_until("response_complete", limit=30)
        # each frame once, in order (the client checks every seq), the replay's then the rest
        assert tokens_of(frames) == big[1:] + rest
        await second.close()


async def poll_until(check: Callable[[], bool], limit: float = 10.0) -> None:
    async def checked() -> bool:
        return check()

    await poll(checked, limit)


async def test_without_grace_a_dropped_reply_is_cancelled_and_stored_interrupted(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(Reply(chunks=WORDS, delay=0.02))
    first = await service.connect()
    session_id = await first.start()
    await first.send({"type": "user_message", "text": "count"})
    before = [await first.recv() for _ in range(3)]
    first.ws.transport.abort()
    await fake_ollama.chats[0].wait_closed(limit=2)  # cancelled at once: the default

    second = await service.connect()
    await second.start()
    assert first.resume_token is not None
    resumed = await second.resume(session_id, first.resume_token, first.last_seq)
    assert resumed["generating"] is False
    replayed = [await second.recv() for _ in range(resumed["replayed"])]
    sent = "".join(tokens_of(before) + tokens_of(replayed))
    history = await second.history()
    assert history[-1] == {"role": "assistant", "content": sent, "status": "interrupted"}
    await second.close()


async def test_a_wrong_token_or_an_unknown_session_is_not_found_and_the_socket_still_works(
    service: RunningService,
) -> None:
    owner = await service.connect()
    session_id = await owner.start()
    for target, token in ((session_id, "not-the-token"), ("no-such-session", "x" * 43)):
        other = await service.connect()
        await other.start()
        error = await other.resume(target, token, 0)
        assert error["type"] == "error" and error["error"]["code"] == "session_not_found"
        assert error["error"]["recoverable"] is True
        assert (await other.turn("still mine?"))[-1]["type"] == "response_complete"
        await other.close()
    await owner.close()


async def test_an_ended_session_cannot_be_resumed(service: RunningService) -> None:
    first = await service.connect()
    session_id = await first.start()
    await first.send({"type": "end_session"})
    await first.recv_until("session_ended")
    second = await service.connect()
    await second.start()
    assert first.resume_token is not None
    error = await second.resume(session_id, first.resume_token, first.last_seq)
    assert error["error"]["code"] == "session_not_found"
    await second.close()


async def test_resume_on_a_new_socket_closes_the_old_one(service: RunningService) -> None:
    first = await service.connect()
    session_id = await first.start()
    second = await service.connect()
    await second.start()
    assert first.resume_token is not None
    resumed = await second.resume(session_id, first.resume_token, first.last_seq)
    assert resumed["type"] == "session_resumed"
    await asyncio.wait_for(first.ws.wait_closed(), 5)
    assert (first.ws.close_code, first.ws.close_reason) == (1000, "resumed")
    assert (await second.turn("here now"))[-1]["type"] == "response_complete"
    await second.close()


async def test_frames_no_longer_held_are_a_resume_gap(fake_ollama: FakeOllama) -> None:
    fake_ollama.script(Reply(chunks=WORDS))
    settings = resumable(fake_ollama, llm_resume_buffer_frames=16)
    async with running_service(settings) as service:
        first = await service.connect()
        session_id = await first.start()
        await first.turn("count")  # 40 tokens: more than the 16 frames kept
        second = await service.connect()
        await second.start()
        assert first.resume_token is not None
        with capture_logs() as logs:
            resumed = await second.resume(session_id, first.resume_token, 0)
            assert resumed["type"] == "session_resumed" and resumed["replayed"] == 0
            gap = await second.recv()
        assert gap["error"]["code"] == "resume_gap" and gap["error"]["recoverable"] is True
        assert gap["error"]["message"] == (
            "frames after seq 0 are no longer held; the session is attached: "
            "resynchronise with get_history"
        )
        said = [e for e in logs if e["event"] == "session_resumed"]
        assert said == [
            {
                "event": "session_resumed",
                "session_id": session_id,
                "replayed": 0,
                "gap": True,
                "log_level": "info",
            }
        ]
        history = await second.history()  # attached all the same: resynchronise
        assert history[-1]["content"] == "".join(WORDS)
        await second.close()


async def test_a_gone_client_never_costs_more_than_the_buffer(fake_ollama: FakeOllama) -> None:
    fake_ollama.script(Reply(chunks=["x "] * 500, delay=0.01))
    settings = resumable(fake_ollama, llm_resume_grace_s=30, llm_resume_buffer_frames=16)
    async with running_service(settings) as service:
        first = await service.connect()
        session_id = await first.start()
        await first.send({"type": "user_message", "text": "go on and on"})
        assert (await first.recv())["type"] == "token"
        first.ws.transport.abort()
        await fake_ollama.chats[0].wait_closed(limit=5)  # stopped, 16 frames past the client
        assert fake_ollama.chats[0].chunks_sent < 500
        second = await service.connect()
        await second.start()
        assert first.resume_token is not None
        resumed = await second.resume(session_id, first.resume_token, first.last_seq)
        assert resumed["generating"] is False and resumed["replayed"] <= 16
        await second.send({"type": "get_history"})
        history = (await second.recv_until("history"))[-1]["messages"]  # after the replay
        assert history[-1]["status"] == "interrupted"
        # what was stored is what was streamed: the token the client read, the frames the
        # dead socket may still have taken, and at most the 16 the log holds
        assert history[-1]["content"].count("x ") <= 1 + 2 + 16
        await second.close()


async def test_when_the_grace_ends_with_no_socket_the_reply_is_cancelled(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.script(Reply(chunks=WORDS, delay=0.1))
    async with running_service(resumable(fake_ollama, llm_resume_grace_s=0.3)) as service:
        first = await service.connect()
        await first.start()
        await first.send({"type": "user_message", "text": "count"})
        assert (await first.recv())["type"] == "token"
        first.ws.transport.abort()
        upstream = fake_ollama.chats[0]
        await upstream.wait_closed(limit=5)
        assert upstream.finished_at is None and upstream.chunks_sent < len(WORDS)


async def test_a_detached_session_expires_after_its_ttl(fake_ollama: FakeOllama) -> None:
    async with running_service(resumable(fake_ollama, llm_session_ttl_s=0.3)) as service:
        first = await service.connect()
        session_id = await first.start()
        await first.close()
        await asyncio.sleep(1.0)  # the TTL itself is what is tested: three of them
        second = await service.connect()
        await second.start()
        assert first.resume_token is not None
        error = await second.resume(session_id, first.resume_token, first.last_seq)
        assert error["error"]["code"] == "session_not_found"
        await second.close()


async def test_resume_is_only_a_first_frame(service: RunningService) -> None:
    first = await service.connect()
    session_id = await first.start()
    second = await service.connect()
    await second.start()
    await second.turn("hello")
    assert first.resume_token is not None
    error = await second.resume(session_id, first.resume_token, 0)
    assert error["error"] == {
        "code": "invalid_message",
        "message": "resume must be the first frame on a new connection",
        "severity": "low",
        "recoverable": True,
    }
    await first.close()
    await second.close()


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "resume"},
        {"type": "resume", "session_id": 5, "resume_token": "t", "last_seq": 0},
        {"type": "resume", "session_id": "s", "resume_token": None, "last_seq": 0},
        {"type": "resume", "session_id": "s", "resume_token": "t", "last_seq": "0"},
        {"type": "resume", "session_id": "s", "resume_token": "t", "last_seq": -2},
        {"type": "resume", "session_id": "s", "resume_token": "t", "last_seq": True},
        {"type": "resume", "session_id": "s" * 500, "resume_token": "t", "last_seq": 0},
    ],
)
async def test_malformed_resume_frames_are_invalid_messages(
    service: RunningService, frame: dict[str, Any]
) -> None:
    client = await service.connect()
    await client.start()
    await client.send(frame)
    error = await client.recv()
    assert error["error"]["code"] == "invalid_message"
    assert (await client.turn("fine?"))[-1]["type"] == "response_complete"
    await client.close()


async def test_the_resume_token_never_reaches_the_logs(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    async with service_process(
        tmp_path, OLLAMA_BASE_URL=fake_ollama.url, LOG_LEVEL="DEBUG"
    ) as service:
        first = Client(await websockets.connect(service.ws_url))
        session_id = await first.start()
        await first.turn("hi")
        await first.close()
        second = Client(await websockets.connect(service.ws_url))
        await second.start()
        assert first.resume_token is not None
        resumed = await second.resume(session_id, first.resume_token, first.last_seq)
        assert resumed["type"] == "session_resumed"
        await second.close()
    log = "".join(service.output)
    assert "session_resumed" in log
    assert first.resume_token not in log
