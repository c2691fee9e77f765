"""Bad input and engine failures over a real socket: the right error frame, and nothing lost."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import pytest

from tests.fakes.ollama import FakeOllama, Reply, fake_token_count
from tests.support import (
    ANY_ID,
    Client,
    RunningService,
    bound_socket,
    make_settings,
    running_service,
    tokens_of,
)


async def expect_error(client: Client, frame: Any, code: str) -> dict[str, Any]:
    await client.send(frame)
    answer = await client.recv()
    assert answer["type"] == "error", answer
    error: dict[str, Any] = answer["error"]
    assert error["code"] == code, error
    assert error["recoverable"] is True
    assert error["severity"] in ("low", "medium", "high", "critical")
    assert error["message"]
    return error


BAD_FRAMES = [
    ("not json at all", "invalid_json"),
    ('{"type": "user_message", "text": "unterminated', "invalid_json"),
    ("[1, 2, 3]", "invalid_message"),
    ('"just a string"', "invalid_message"),
    ("null", "invalid_message"),
    ({"text": "no type"}, "invalid_message"),
    ({"type": 7}, "invalid_message"),
    ({"type": "shout", "text": "hi"}, "invalid_message"),
    ({"type": "user_message"}, "invalid_message"),
    ({"type": "user_message", "text": 42}, "invalid_message"),
    ({"type": "user_message", "text": ""}, "invalid_message"),
    ({"type": "user_message", "text": "   "}, "invalid_message"),
    ({"type": "user_message", "text": ["a"]}, "invalid_message"),
    (b"\x00\x01binary", "invalid_message"),
    ({"type": "start_session", "config": "warm"}, "invalid_config"),
    ({"type": "start_session", "config": {"temperature": 3.5}}, "invalid_config"),
    ({"type": "start_session", "config": {"temperature": -0.1}}, "invalid_config"),
    ({"type": "start_session", "config": {"temperature": "hot"}}, "invalid_config"),
    ({"type": "start_session", "config": {"temperature": True}}, "invalid_config"),
    ({"type": "start_session", "config": {"max_tokens": 0}}, "invalid_config"),
    ({"type": "start_session", "config": {"max_tokens": 1.5}}, "invalid_config"),
    ({"type": "start_session", "config": {"max_tokens": 100000}}, "invalid_config"),
    ({"type": "start_session", "config": {"system_prompt": 5}}, "invalid_config"),
    ({"type": "start_session", "config": {"top_p": 1.5}}, "invalid_config"),
    ({"type": "start_session", "config": {"top_k": -1}}, "invalid_config"),
    ({"type": "start_session", "config": {"stop": "END"}}, "invalid_config"),
]


async def test_bad_frames_get_their_code_and_the_socket_keeps_working(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    client = await service.connect()
    await client.start()
    await client.send(
        {"type": "start_session", "config": {"system_prompt": "Be kind.", "temperature": 0.3}}
    )
    assert (await client.recv())["type"] == "session_configured"
    for frame, code in BAD_FRAMES:
        await expect_error(client, frame, code)
    frames = await client.turn("Still working?")
    assert frames[-1]["type"] == "response_complete"
    # the invalid configs changed nothing
    assert fake_ollama.chats[0].messages[0] == {"role": "system", "content": "Be kind."}
    assert fake_ollama.chats[0].options["temperature"] == 0.3
    stats = (await service.get("/stats")).json()
    by_code = stats["errors"]["by_category"]
    assert by_code["invalid_json"] == 2
    assert by_code["invalid_config"] == sum(1 for _, c in BAD_FRAMES if c == "invalid_config")
    await client.close()


async def test_unknown_fields_are_ignored(service: RunningService) -> None:
    client = await service.connect()
    await client.start()
    await client.send(
        {"type": "start_session", "extra": 1, "config": {"temperature": 0.1, "mood": "sunny"}}
    )
    configured = await client.recv()
    assert configured["type"] == "session_configured"
    assert "mood" not in configured["config"]
    await client.send({"type": "user_message", "text": "Hi", "lang": "en"})
    frames = await client.recv_until("response_complete")
    assert frames[-1]["type"] == "response_complete"
    await client.close()


async def test_oversized_frame_is_refused_and_the_socket_survives(
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_max_message_bytes=4096)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        big = {"type": "user_message", "text": "x" * 5000}
        await expect_error(client, big, "message_too_large")
        multibyte = {"type": "user_message", "text": "é" * 2100}  # 4200 bytes, 2100 chars
        await expect_error(client, multibyte, "message_too_large")
        frames = await client.turn("small")
        assert frames[-1]["type"] == "response_complete"
        assert len(fake_ollama.chats) == 1
        await client.close()


async def test_message_that_cannot_fit_the_context_gets_context_overflow(
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url, default_context_window=1024, default_max_tokens=256
    )
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        error = await expect_error(
            client, {"type": "user_message", "text": "word " * 1000}, "context_overflow"
        )
        assert "context window" in error["message"]
        assert fake_ollama.chats == []
        assert await client.history() == []
        frames = await client.turn("short one")
        assert frames[-1]["type"] == "response_complete"
        await client.close()


async def test_old_turns_are_dropped_to_fit_and_the_count_is_reported(
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url, default_context_window=512, default_max_tokens=128
    )
    fake_ollama.default_reply = Reply(chunks=["ok " * 20])
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "start_session", "config": {"system_prompt": "Sys."}})
        await client.recv()
        trimmed = []
        for i in range(12):
            frames = await client.turn(f"message {i} " + "pad " * 40)
            trimmed.append(frames[-1]["stats"]["history_trimmed_turns"])
        assert trimmed[0] == 0 and max(trimmed) >= 1
        last = fake_ollama.chats[-1].messages
        assert last[0] == {"role": "system", "content": "Sys."}
        assert last[-1]["content"].startswith("message 11 ")
        assert "message 0 " not in str(last)
        # the prompt sent fits the budget by the fake's own count
        assert fake_token_count(last) <= 512 - 128
        roles = [m["role"] for m in last[1:]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        await client.close()


FAILURES = [
    (Reply(status=500, error="llama runner process has terminated"), "upstream_error"),
    (Reply(status=502, error="bad gateway"), "upstream_unavailable"),
    (
        Reply(
            status=503, error="server busy, please try again.  maximum pending requests exceeded"
        ),
        "upstream_unavailable",
    ),
    (Reply(status=400, error="invalid options"), "upstream_error"),
]


@pytest.mark.parametrize(("reply", "code"), FAILURES, ids=[c for _, c in FAILURES])
async def test_http_errors_before_streaming_map_to_codes_and_leave_no_trace(
    service: RunningService, fake_ollama: FakeOllama, reply: Reply, code: str
) -> None:
    attempts = 3 if code == "upstream_unavailable" else 1  # transient failures are retried
    fake_ollama.script(Reply(chunks=["Fine."]), *[reply] * attempts, Reply(chunks=["Back."]))
    client = await service.connect()
    await client.start()
    await client.turn("one")
    frames = await client.turn("two")
    assert frames == [{"type": "error", "error": frames[0]["error"], "response_id": ANY_ID}]
    assert frames[0]["error"]["code"] == code
    assert frames[0]["error"]["recoverable"] is True
    assert [m["content"] for m in await client.history()] == ["one", "Fine."]
    frames = await client.turn("three")
    assert tokens_of(frames) == ["Back."]
    assert [m["content"] for m in fake_ollama.chats[-1].messages] == ["one", "Fine.", "three"]
    await client.close()


async def test_unknown_model_gets_model_not_found(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_model="nope:7b")
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("hi")
        error = frames[-1]["error"]
        assert error["code"] == "model_not_found"
        assert "nope:7b" in error["message"]
        assert await client.history() == []
        health = await service.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
        assert health.json()["ollama_connection"] is True
        await client.close()


@pytest.mark.parametrize("kind", ["error_after", "drop_after"])
async def test_failure_mid_stream_keeps_partial_reply_marked_incomplete(
    service: RunningService, fake_ollama: FakeOllama, kind: str
) -> None:
    chunks = ["Once", " upon", " a", " time", " there"]
    failure: dict[str, Any] = {kind: 3}
    fake_ollama.script(Reply(chunks=chunks, **failure), Reply(chunks=["Again."]))
    client = await service.connect()
    await client.start()
    frames = await client.turn("Tell a story")
    assert tokens_of(frames) == chunks[:3]
    assert frames[-1]["type"] == "error"
    assert frames[-1]["error"]["code"] == "upstream_error"
    assert frames[-1]["error"]["recoverable"] is True
    history = await client.history()
    assert history == [
        {"role": "user", "content": "Tell a story"},
        {"role": "assistant", "content": "Once upon a", "status": "incomplete"},
    ]
    frames = await client.turn("Try again")
    assert tokens_of(frames) == ["Again."]
    roles = [m["role"] for m in fake_ollama.chats[-1].messages]
    assert roles == ["user", "assistant", "user"]
    await client.close()


async def test_stalled_stream_times_out_and_upstream_is_closed(fake_ollama: FakeOllama) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url, llm_chunk_timeout_s=0.3, llm_first_token_timeout_s=1.0
    )
    fake_ollama.script(Reply(chunks=["a", "b", "c", "d"], stall_after=2))
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("stall please")
        assert tokens_of(frames) == ["a", "b"]
        assert frames[-1]["error"]["code"] == "timeout"
        assert "0.3" in frames[-1]["error"]["message"]
        await fake_ollama.chats[0].wait_closed(limit=1.0)
        await client.close()


async def test_no_first_chunk_times_out(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_first_token_timeout_s=0.3)
    fake_ollama.script(Reply(stall_after=0))
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("hello?")
        assert frames == [{"type": "error", "error": frames[0]["error"], "response_id": ANY_ID}]
        assert frames[0]["error"]["code"] == "timeout"
        assert await client.history() == []
        await client.close()


async def test_slow_stream_is_relayed_whole(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    chunks = [f"{i} " for i in range(15)]
    fake_ollama.script(Reply(chunks=chunks, delay=0.05, first_delay=0.2))
    client = await service.connect()
    await client.start()
    frames = await client.turn("slowly")
    assert tokens_of(frames) == chunks
    assert frames[-1]["stats"]["time_to_first_token_ms"] >= 200
    await client.close()


async def test_refused_connection_is_upstream_unavailable_then_recovers(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    client = await service.connect()
    await client.start()
    await fake_ollama.refuse()
    frames = await client.turn("anyone there?")
    assert frames[-1]["error"]["code"] == "upstream_unavailable"
    assert frames[-1]["error"]["recoverable"] is True
    health = await service.get("/health")
    assert health.status_code == 503
    assert health.json()["ollama_connection"] is False
    assert health.json()["status"] == "unhealthy"
    await fake_ollama.accept()
    frames = await client.turn("now?")
    assert frames[-1]["type"] == "response_complete"
    assert (await service.get("/health")).status_code == 200
    await client.close()


async def test_connect_timeout_is_a_timeout_error() -> None:
    # A listener whose accept queue is full drops new SYNs: connecting hangs until the timeout.
    listener = bound_socket()
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        queued.append(filler)
    settings = make_settings(ollama_base_url=f"http://127.0.0.1:{port}", llm_connect_timeout_s=0.3)
    try:
        async with running_service(settings) as service:
            client = await service.connect()
            await client.start()
            frames = await client.turn("hello?")
            assert frames[-1]["error"]["code"] == "timeout"
            # what happened, in words: the exception's repr stays in the log
            assert "did not accept the connection in time" in frames[-1]["error"]["message"]
            assert "ConnectTimeout" not in frames[-1]["error"]["message"]
            await client.close()
    finally:
        for sock in (*queued, listener):
            sock.close()


async def test_slow_model_load_hits_the_first_token_timeout(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_first_token_timeout_s=0.3)
    fake_ollama.script(Reply(header_delay=2.0))
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("hello?")
        assert frames[-1]["error"]["code"] == "timeout"
        await fake_ollama.chats[0].wait_closed(limit=1.0)
        await client.close()


async def test_missing_counters_fall_back_to_the_frame_count(
    fake_ollama: FakeOllama, service: RunningService
) -> None:
    fake_ollama.script(Reply(chunks=["one", " two"], omit_counts=True))
    client = await service.connect()
    await client.start()
    frames = await client.turn("hi")
    assert frames[-1]["type"] == "response_complete"
    assert frames[-1]["stats"]["tokens_generated"] == 2
    await client.close()


async def test_stream_ending_without_done_line_is_an_upstream_error(
    fake_ollama: FakeOllama, service: RunningService
) -> None:
    fake_ollama.script(Reply(chunks=["cut", " short"], omit_done=True))
    client = await service.connect()
    await client.start()
    frames = await client.turn("hi")
    assert tokens_of(frames) == ["cut", " short"]
    assert frames[-1]["error"]["code"] == "upstream_error"
    assert "done" in frames[-1]["error"]["message"]
    history = await client.history()
    assert history[-1]["status"] == "incomplete"
    await client.close()


async def test_a_config_typo_is_named_back_and_the_rest_applies(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    client = await service.connect()
    await client.start()
    await client.send(
        {"type": "start_session", "config": {"temprature": 0.1, "top_k": 7, "mood": "sunny"}}
    )
    configured = await client.recv()
    assert configured["type"] == "session_configured"
    assert configured["ignored_fields"] == ["temprature", "mood"]
    assert configured["config"]["temperature"] == 0.7 and configured["config"]["top_k"] == 7
    await client.turn("Hi")
    assert fake_ollama.chats[0].options["top_k"] == 7
    await client.send({"type": "start_session", "config": {"top_k": 8}})
    assert (await client.recv())["ignored_fields"] == []
    await client.close()
