"""Conversations over a real socket against the fake Ollama: turns, history, cancel, disconnect."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.fakes.ollama import FakeOllama, Reply, fake_token_count, fake_tokens
from tests.support import (
    RunningService,
    make_settings,
    metric,
    poll,
    running_service,
    tokens_of,
)


async def test_two_turn_conversation_reaches_upstream_in_order(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    first = ["Paris", " is", " the", " capital", "."]
    second = ["About", " 2.1", " million", "."]
    fake_ollama.script(Reply(chunks=first), Reply(chunks=second, eval_count=11))
    client = await service.connect()
    session_id = await client.start()

    await client.send(
        {
            "type": "start_session",
            "config": {
                "system_prompt": "You are terse.",
                "temperature": 0.2,
                "max_tokens": 64,
                "top_p": 0.8,
                "top_k": 20,
            },
        }
    )
    configured = await client.recv()
    assert configured["type"] == "session_configured"
    assert configured["session_id"] == session_id
    assert configured["config"]["temperature"] == 0.2
    assert configured["config"]["max_tokens"] == 64

    frames = await client.turn("What is the capital of France?")
    assert tokens_of(frames) == first
    assert [f["type"] for f in frames] == ["token"] * len(first) + ["response_complete"]
    stats = frames[-1]["stats"]
    assert stats["tokens_generated"] == fake_tokens("".join(first))
    assert stats["token_frames"] == len(first)
    assert stats["processing_time_ms"] > 0
    assert stats["tokens_per_second"] > 0
    assert stats["time_to_first_token_ms"] >= 0
    assert stats["done_reason"] == "stop"
    assert stats["history_trimmed_turns"] == 0

    frames = await client.turn("And its population?")
    assert tokens_of(frames) == second
    assert frames[-1]["stats"]["tokens_generated"] == 11  # the engine's eval_count
    await client.send({"type": "get_history"})
    history = await client.recv()
    assert history["type"] == "history" and history["session_id"] == session_id

    request = fake_ollama.chats[1]
    assert request.messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "".join(first)},
        {"role": "user", "content": "And its population?"},
    ]
    assert frames[-1]["stats"]["prompt_tokens"] == fake_token_count(request.messages)
    assert request.body["model"] == "llama3.2:1b"
    assert request.body["stream"] is True
    assert request.body["keep_alive"] == "5m"
    options = request.options
    assert options["temperature"] == 0.2
    assert options["num_predict"] == 64
    assert options["num_ctx"] == 8192
    assert options["top_p"] == 0.8
    assert options["top_k"] == 20
    await client.close()


async def test_default_session_exists_on_connect(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    client = await service.connect()
    await client.start()
    frames = await client.turn("Hi")
    assert frames[-1]["type"] == "response_complete"
    options = fake_ollama.chats[0].options
    assert options["temperature"] == 0.7 and options["num_predict"] == 2048
    assert fake_ollama.chats[0].messages == [{"role": "user", "content": "Hi"}]
    await client.close()


async def test_cancel_mid_stream_stops_upstream_and_keeps_partial_reply(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    chunks = [f"w{i} " for i in range(200)]
    fake_ollama.script(Reply(chunks=chunks, delay=0.02), Reply(chunks=["Next", " turn"]))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Count slowly."})
    received: list[str] = []
    while len(received) < 3:
        frame = await client.recv()
        assert frame["type"] == "token"
        received.append(frame["data"])
    cancel_sent = time.perf_counter()
    await client.send({"type": "cancel"})
    after = await client.recv_until("cancelled")
    cancelled_at = time.perf_counter()
    cancelled = after[-1]
    assert cancelled["success"] is True
    # frames in flight when the server read the cancel still arrive; after that, at most one
    assert cancelled["stats"]["token_frames_after_cancel"] <= 1
    sent = received + tokens_of(after)
    assert cancelled["stats"]["token_frames"] == len(sent), "every frame sent came before"

    upstream = fake_ollama.chats[0]
    closed_at = await upstream.wait_closed(limit=0.5)
    assert cancel_sent < closed_at < cancelled_at, "the engine request closed before `cancelled`"
    assert upstream.finished_at is None

    history = await client.history()
    assert history[-1] == {"role": "assistant", "content": "".join(sent), "status": "interrupted"}
    assert history[-2] == {"role": "user", "content": "Count slowly."}

    frames = await client.turn("Go on.")
    assert tokens_of(frames) == ["Next", " turn"]
    assert fake_ollama.chats[1].messages[-2] == {"role": "assistant", "content": "".join(sent)}
    await client.close()


async def test_cancel_with_nothing_in_flight(service: RunningService) -> None:
    client = await service.connect()
    await client.start()
    await client.send({"type": "cancel"})
    assert await client.recv() == {"type": "cancelled", "success": False}
    frames = await client.turn("Still here?")
    assert frames[-1]["type"] == "response_complete"
    await client.close()


async def test_disconnect_mid_stream_closes_upstream_and_frees_the_session(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(Reply(chunks=["tick "] * 500, delay=0.02))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Talk for a while."})
    assert (await client.recv())["type"] == "token"
    gone = time.perf_counter()
    client.ws.transport.abort()
    upstream = await fake_ollama.wait_chats(1)
    closed_at = await upstream.wait_closed(limit=1.0)
    assert closed_at - gone < 1.0

    async def all_gone() -> bool:
        health = (await service.get("/health")).json()
        return bool(health["active_connections"] == 0 and health["active_sessions"] == 0)

    await poll(all_gone, limit=2.0)
    stats = (await service.get("/stats")).json()
    assert stats["connections"]["active_connections"] == 0
    assert stats["conversations"]["active_sessions"] == 0


async def test_user_message_during_generation_is_refused_and_stream_goes_on(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    chunks = [f"t{i}" for i in range(20)]
    fake_ollama.script(Reply(chunks=chunks, delay=0.01))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "First"})
    await client.send({"type": "user_message", "text": "Second"})
    frames = await client.recv_until("response_complete")
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "generation_in_progress"
    assert errors[0]["error"]["recoverable"] is True
    assert errors[0]["error"]["message"] == "a reply is still streaming; send cancel first"
    assert tokens_of(frames) == chunks
    assert len(fake_ollama.chats) == 1
    await client.close()


async def test_end_session_reports_and_closes_with_1000(service: RunningService) -> None:
    client = await service.connect()
    session_id = await client.start()
    await client.turn("Hello")
    await client.send({"type": "end_session"})
    ended = await client.recv()
    assert ended["type"] == "session_ended"
    assert ended["session_id"] == session_id
    assert ended["stats"]["turns"] == 1
    await asyncio.wait_for(client.ws.wait_closed(), 2)
    assert client.ws.close_code == 1000


@pytest.mark.parametrize(
    ("device", "expected", "absent"),
    [
        (
            {"compute_device": "cpu", "num_threads": 3},
            {"num_gpu": 0, "num_thread": 3},
            ["main_gpu"],
        ),
        ({"compute_device": "cuda", "gpu_device_id": 1}, {"main_gpu": 1}, ["num_gpu"]),
        ({}, {}, ["num_gpu", "main_gpu", "num_thread"]),
    ],
    ids=["cpu", "cuda", "unset"],
)
async def test_compute_device_reaches_ollama_options(
    fake_ollama: FakeOllama, device: dict[str, Any], expected: dict[str, int], absent: list[str]
) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, **device)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        await client.turn("hi")
        options = fake_ollama.chats[0].options
        assert {k: options[k] for k in expected} == expected
        assert not set(absent) & set(options)
        health = (await service.get("/health")).json()
        assert (health["device"] or {}).get("kind") == device.get("compute_device")
        await client.close()


async def test_engine_connection_is_reused_after_a_complete_reply_but_not_after_a_cancel(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(
        Reply(chunks=["a"]),
        Reply(chunks=["b"]),
        Reply(chunks=["c"] * 100, delay=0.02),
        Reply(chunks=["d"]),
    )
    client = await service.connect()
    await client.start()
    await client.turn("one")
    await client.turn("two")
    first, second = fake_ollama.chats
    assert first.peer == second.peer, "a reply read to its end leaves the connection reusable"
    await client.send({"type": "user_message", "text": "three"})
    assert (await client.recv())["type"] == "token"
    await client.send({"type": "cancel"})
    await client.recv_until("cancelled")
    await fake_ollama.chats[2].wait_closed(limit=1)
    await client.turn("four")
    assert fake_ollama.chats[3].peer != fake_ollama.chats[2].peer, "a cancel closes it"
    await client.close()


async def test_history_during_a_reply_shows_the_turn_so_far_as_streaming(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(Reply(chunks=["One", " two"], stall_after=1))  # then nothing more
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Count."})
    assert await client.recv() == {"type": "token", "data": "One"}
    assert (await client.history())[-2:] == [
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": "One", "status": "streaming"},
    ]
    await client.send({"type": "cancel"})
    await client.recv_until("cancelled")
    assert (await client.history())[-1] == {
        "role": "assistant",
        "content": "One",
        "status": "interrupted",
    }
    await client.close()


async def test_ollama_prompt_cache_count_reaches_stats_and_metrics(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    # Ollama 0.33+ sends prompt_eval_cached_count: of prompt_eval_count, the part it took
    # from its prompt cache; what it read is the difference.
    fake_ollama.script(
        Reply(chunks=["Hi", "."], prompt_eval_count=40),
        Reply(chunks=["Yes", "."], prompt_eval_count=52, prompt_eval_cached_count=44),
    )
    client = await service.connect()
    await client.start()
    first = (await client.turn("Hello"))[-1]["stats"]
    assert first["prompt_tokens"] == 40
    assert "prompt_tokens_cached" not in first  # an Ollama that does not say
    second = (await client.turn("Again?"))[-1]["stats"]
    assert second["prompt_tokens"] == 52
    assert second["prompt_tokens_cached"] == 44
    body = (await service.get("/metrics", monitoring=True)).text
    assert metric(body, "llm_service_prompt_tokens_total") == 92
    assert metric(body, "llm_service_prompt_tokens_cached_total") == 44
