"""Random and malformed frames at a live socket: every one is answered, nothing breaks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_service.server import FRAME_MARGIN_BYTES
from tests.fakes.ollama import FakeOllama, Reply
from tests.support import Client, RunningService, tokens_of

KNOWN = [
    "start_session",
    "user_message",
    "tool_result",
    "truncate",
    "cancel",
    "end_session",
    "get_history",
    "resume",
]
# Answers that close the exchange for one client frame.
FINAL = {
    "error",
    "session_configured",
    "cancelled",
    "history",
    "response_complete",
    "session_ended",
    "truncated",
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
config_values = st.dictionaries(
    st.sampled_from(
        [
            "system_prompt",
            "temperature",
            "max_tokens",
            "top_p",
            "top_k",
            "seed",
            "stop",
            "repeat_penalty",
            "min_p",
            "chunking",
            "tools",
            "tool_choice",
            "other",
        ]
    ),
    json_values,
    max_size=4,
)
frame_objects = st.fixed_dictionaries(
    {"type": st.sampled_from(KNOWN) | st.text(max_size=20) | json_values},
    optional={
        "text": json_values | st.text(max_size=200),
        "config": config_values | json_values,
        "session_id": json_values | st.uuids().map(str),
        "resume_token": json_values | st.text(max_size=60),
        "last_seq": json_values | st.integers(-5, 10**6),
        "response_id": json_values | st.text(max_size=70),
        "interrupt": json_values,
        "tool_choice": json_values | st.sampled_from(["auto", "none", "required"]),
        "heard_chars": json_values | st.integers(-5, 10**6),
        "results": json_values
        | st.lists(st.fixed_dictionaries({"id": st.text(max_size=8), "content": json_values})),
        "extra": json_values,
    },
)


def big_message(size: int) -> str:
    return '{"type":"user_message","text":"' + "a" * size + '"}'


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


raw_frames = st.one_of(
    frame_objects.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=300),
    st.binary(max_size=300),
    st.integers(1, 3000).map(deep),
    # just over LLM_MAX_MESSAGE_BYTES (256 KiB): read and refused; far over it: the socket closes
    st.integers(262_200, 266_000).map(big_message),
    st.integers(300_000, 400_000).map(big_message),
)

FRAME_CAP = 256 * 1024 + FRAME_MARGIN_BYTES


async def exchange(client: Client, raw: str | bytes) -> list[dict[str, Any]]:
    """Send one frame; read until the frame that answers it."""
    await client.send(raw)
    return await client.recv_until(tuple(FINAL), limit=10)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(raw_frames, min_size=20, max_size=40))
async def test_random_frames_are_answered_and_a_neighbour_is_unaffected(
    service: RunningService, fake_ollama: FakeOllama, batch: list[str | bytes]
) -> None:
    fake_ollama.default_reply = Reply(chunks=["steady", " reply"])
    neighbour = await service.connect()
    await neighbour.start()
    client = await service.connect()
    await client.start()
    for raw in batch:
        if len(raw) > FRAME_CAP:
            # refused from its header: close 1009, and a new socket works
            await client.send(raw)
            with pytest.raises(websockets.ConnectionClosed):
                await client.recv_until(tuple(FINAL), limit=10)
            assert client.ws.close_code == 1009
            client = await service.connect()
            await client.start()
            continue
        frames = await exchange(client, raw)
        last = frames[-1]
        assert last["type"] in FINAL
        if last["type"] == "error":
            assert last["error"]["code"] in {
                "invalid_json",
                "invalid_message",
                "invalid_config",
                "message_too_large",
                "context_overflow",
                "generation_in_progress",
                "session_not_found",
            }, last
            assert last["error"]["recoverable"] is True
        if last["type"] == "session_ended":
            # frames after end_session: the socket is closed cleanly, a new one works
            await asyncio.wait_for(client.ws.wait_closed(), 2)
            assert client.ws.close_code == 1000
            with pytest.raises(websockets.ConnectionClosed):
                await client.send({"type": "user_message", "text": "too late"})
            client = await service.connect()
            await client.start()
    frames = await neighbour.turn("are you fine?")
    assert tokens_of(frames) == ["steady", " reply"]
    await neighbour.close()
    await client.close()
