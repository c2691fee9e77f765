"""Conversation rules with a fake backend: history, the context budget, interrupted turns."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any

import pytest

from llm_service.backends.base import StreamEnd
from llm_service.conversation import (
    MESSAGE_OVERHEAD,
    REPLY_PRIMER,
    Conversation,
    SessionConfig,
    Turn,
    TurnStats,
    estimate_tokens,
)
from llm_service.errors import ContextOverflow, InvalidConfig, UpstreamError
from llm_service.metrics import Telemetry
from llm_service.protocol import messages
from tests.fakes.backend import FakeBackend, Scripted
from tests.support import make_settings


def defaults() -> SessionConfig:
    settings = make_settings()
    return SessionConfig(settings.default_system_prompt, settings.default_sampling())


def conversation(
    backend: FakeBackend, window: int = 8192, max_tokens: int = 256, system: str = ""
) -> Conversation:
    config = defaults().updated(system, {"max_tokens": max_tokens}, window)
    return Conversation("s1", config, backend, window, Telemetry())


def history(conv: Conversation) -> list[dict[str, Any]]:
    """The history as `get_history` shows it, less the replies' ids (made per turn)."""
    return [{k: v for k, v in m.items() if k != "response_id"} for m in messages(conv.messages())]


async def run(turn: Turn) -> tuple[list[str], TurnStats]:
    texts: list[str] = []
    async with aclosing(turn.stream()) as stream:
        async for item in stream:
            if isinstance(item, str):
                texts.append(item)
            else:
                return texts, item
    raise AssertionError("no stats")


async def test_history_alternates_and_reply_is_stored_as_sent() -> None:
    backend = FakeBackend()
    backend.script.extend([Scripted(["Hel", "lo"]), Scripted(["Bye"])])
    conv = conversation(backend, system="Be brief.")
    texts, stats = await run(conv.start_turn("Hi"))
    assert texts == ["Hel", "lo"] and stats.token_frames == 2
    await run(conv.start_turn("Go"))
    assert history(conv) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "status": "complete"},
        {"role": "user", "content": "Go"},
        {"role": "assistant", "content": "Bye", "status": "complete"},
    ]
    request = backend.calls[1]
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.sampling.max_tokens == 256


async def test_engine_counts_replace_estimates() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["x" * 400], StreamEnd(completion_tokens=37, prompt_tokens=90)))
    conv = conversation(backend, system="S" * 40)
    turn = conv.start_turn("U" * 40)
    system_tokens = estimate_tokens("S" * 40) + MESSAGE_OVERHEAD
    _, stats = await run(turn)
    assert stats.tokens_generated == 37
    assert stats.prompt_tokens == 90
    user, reply = conv.entries
    assert reply.tokens == 37 + MESSAGE_OVERHEAD
    # the prompt's count, less what else it held, is the user message's true size
    assert user.tokens == 90 - REPLY_PRIMER - system_tokens


async def test_exact_tokenizer_counts_are_used() -> None:
    backend = FakeBackend(tokens_per_char=1.0)
    conv = conversation(backend)
    turn = conv.start_turn("abcdefghij")
    assert turn.user is not None and turn.user.tokens == 10 + MESSAGE_OVERHEAD


async def test_a_full_window_drops_a_block_of_whole_turns_and_keeps_the_prefix_after() -> None:
    backend = FakeBackend(tokens_per_char=1.0)
    conv = conversation(backend, window=600, max_tokens=100, system="sys")
    # each turn is 2 x 50 tokens; the budget is 600 - 100 - 3 = 497 (the system prompt 7,
    # the new message 50, old turns). Five turns fit: 7 + 50 + 400 = 457.
    trimmed = []
    for i in range(5):
        backend.script.append(Scripted(["r" * 46]))
        trimmed.append((await run(conv.start_turn(f"{i}" * 46)))[1].history_trimmed_turns)
    assert trimmed == [0] * 5 and len(conv.entries) == 10
    # The sixth would need 557: full. Turns go until a quarter of the window (150) is free
    # too, 557 - 3 x 100 = 257 <= 347: three at once, not one now and one every turn after.
    turn = conv.start_turn("5" * 46)
    assert turn.dropped == 6
    assert [m.content[0] for m in turn.prompt] == ["s", "3", "r", "4", "r", "5"]
    assert turn.prompt_tokens <= 497 + REPLY_PRIMER
    backend.script.append(Scripted(["r" * 46]))
    _, stats = await run(turn)
    assert stats.history_trimmed_turns == 3
    assert history(conv)[1]["content"][0] == "3"
    # The next two turns fit as they are: each prompt starts as the one before it did.
    for i in (6, 7):
        before = [(m.role, m.content) for m in backend.calls[-1].messages]
        backend.script.append(Scripted(["r" * 46]))
        _, stats = await run(conv.start_turn(f"{i}" * 46))
        now = [(m.role, m.content) for m in backend.calls[-1].messages]
        assert stats.history_trimmed_turns == 0 and now[: len(before)] == before
    _, stats = await run(conv.start_turn("8" * 46))  # full again: another block
    assert stats.history_trimmed_turns == 3


async def test_a_message_that_cannot_fit_is_refused_and_changes_nothing() -> None:
    backend = FakeBackend(tokens_per_char=1.0)
    conv = conversation(backend, window=600, max_tokens=100, system="sys")
    await run(conv.start_turn("hello"))
    before = history(conv)
    with pytest.raises(ContextOverflow):
        conv.start_turn("x" * 490)
    assert history(conv) == before


async def test_max_tokens_must_leave_room_for_a_prompt() -> None:
    with pytest.raises(InvalidConfig):
        defaults().updated(None, {"max_tokens": 4096}, 4096)


async def test_interrupted_turn_keeps_sent_text_marked() -> None:
    backend = FakeBackend()
    gate = asyncio.Event()
    backend.script.append(Scripted(["one ", "two ", "three"], gate=gate))
    conv = conversation(backend)
    turn = conv.start_turn("count")
    received: list[str] = []
    first = asyncio.Event()

    async def consume() -> None:
        async with aclosing(turn.stream()) as stream:
            async for item in stream:
                assert isinstance(item, str)
                received.append(item)
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2)
    task.cancel()
    await asyncio.wait({task})
    assert backend.closed_streams == 1
    assert history(conv) == [
        {"role": "user", "content": "count"},
        {"role": "assistant", "content": "one ", "status": "interrupted"},
    ]


async def test_failure_after_text_keeps_both_and_before_text_keeps_neither() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["part"], error=UpstreamError("gone")))
    backend.script.append(Scripted([], error=UpstreamError("gone")))
    conv = conversation(backend)
    with pytest.raises(UpstreamError):
        await run(conv.start_turn("first"))
    with pytest.raises(UpstreamError):
        await run(conv.start_turn("second"))
    assert history(conv) == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "part", "status": "incomplete"},
    ]


def test_estimate_is_generous_for_non_ascii() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd" * 10) == 10
    assert estimate_tokens("日本語のテキスト") >= 8
    assert estimate_tokens("é" * 8) > estimate_tokens("e" * 8)


def test_reset_starts_afresh_with_new_system_prompt() -> None:
    conv = conversation(FakeBackend(), system="old")
    user = conv.start_turn("x").user
    assert user is not None
    conv.entries.append(user)
    conv.reset(defaults().updated("new", {}, 8192))
    assert history(conv) == [{"role": "system", "content": "new"}]
