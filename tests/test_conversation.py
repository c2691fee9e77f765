"""Conversation rules with a fake backend: history, the context budget, interrupted turns."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import Any

import pytest

from llm_service.backends.base import StreamEnd
from llm_service.conversation import (
    MESSAGE_OVERHEAD,
    REPLY_PRIMER,
    TRIM_BLOCK,
    Conversation,
    Entry,
    SessionConfig,
    Turn,
    TurnLimits,
    TurnStats,
    estimate_tokens,
)
from llm_service.errors import (
    ContextOverflow,
    InvalidConfig,
    MessageTooLong,
    RateLimited,
    UpstreamError,
)
from llm_service.metrics import Telemetry
from llm_service.protocol import messages
from llm_service.timing import SlidingWindow
from tests.fakes.backend import FakeBackend, Scripted
from tests.support import CLOCK, FakeClock, make_settings


def defaults() -> SessionConfig:
    settings = make_settings()
    return SessionConfig(settings.default_system_prompt, settings.default_sampling())


def conversation(
    backend: FakeBackend,
    window: int = 8192,
    max_tokens: int = 256,
    system: str = "",
    limits: TurnLimits | None = None,
) -> Conversation:
    config = defaults().updated(system, {"max_tokens": max_tokens}, window)
    return Conversation("s1", config, backend, window, Telemetry(), limits or TurnLimits())


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


def test_estimate_is_a_quarter_token_a_character_and_half_a_token_an_extra_byte() -> None:
    # ceil(chars / 4), plus (extra UTF-8 bytes + 1) // 2
    assert [estimate_tokens(t) for t in ("a", "abcd", "abcde", "é", "éé", "🙂")] == [
        1,
        1,
        2,
        2,
        2,
        3,
    ]
    assert estimate_tokens("日本語のテキスト") == 2 + 8  # 8 characters, 16 extra bytes


async def test_stats_are_the_turns_own_timings_and_the_engines_account() -> None:
    backend = FakeBackend()
    end = StreamEnd(
        completion_tokens=9,
        prompt_tokens=30,
        done_reason="length",
        engine_tokens_per_second=41.5,
        prompt_cached_tokens=12,
    )
    backend.script.append(Scripted(["a", "b", "c"], end))
    conv = conversation(backend)
    turn = conv.start_turn("Hi")
    _, stats = await run(turn)
    assert turn.first_token_at is not None and turn.finished_at is not None
    elapsed = turn.finished_at - turn.started_at
    assert stats == TurnStats(
        tokens_generated=9,
        processing_time_ms=elapsed * 1000,
        tokens_per_second=9 / elapsed,
        time_to_first_token_ms=(turn.first_token_at - turn.started_at) * 1000,
        prompt_tokens=30,
        history_trimmed_turns=0,
        token_frames=3,
        done_reason="length",
        engine_tokens_per_second=41.5,
        time_to_first_chunk_ms=None,
        prompt_tokens_cached=12,
    )
    assert 0 < stats.time_to_first_token_ms <= stats.processing_time_ms  # type: ignore[operator]


async def test_without_the_engines_counts_the_stats_count_frames_and_the_planned_prompt() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["a", "b", "c", "d"]))
    conv = conversation(backend, system="Be brief.")
    _, stats = await run(conv.start_turn("Hi"))
    assert (stats.tokens_generated, stats.token_frames) == (4, 4)
    # "Be brief." 3 + 4, "Hi" 1 + 4, and the reply's primer 3
    assert stats.prompt_tokens == 15
    assert (stats.done_reason, stats.engine_tokens_per_second, stats.prompt_tokens_cached) == (
        None,
        None,
        None,
    )
    assert [e.tokens for e in conv.entries] == [5, 1 + 4]  # "abcd": counted, as no engine said


async def test_a_turn_reports_its_figures_to_the_metrics_as_its_stats_say() -> None:
    backend = FakeBackend()
    end = StreamEnd(completion_tokens=9, prompt_tokens=30, prompt_cached_tokens=12)
    backend.script.append(Scripted(["a", "b", "c"], end))
    conv = conversation(backend)
    _, stats = await run(conv.start_turn("Hi"))
    registry = conv.telemetry.registry
    value = registry.get_sample_value
    assert stats.time_to_first_token_ms is not None
    assert value("llm_service_turn_duration_seconds_sum") == stats.processing_time_ms / 1000
    assert value("llm_service_time_to_first_token_seconds_sum") == (
        stats.time_to_first_token_ms / 1000
    )
    assert value("llm_service_time_to_first_chunk_seconds_count") == 0
    assert value("llm_service_turns_total", {"outcome": "completed"}) == 1
    assert value("llm_service_tokens_generated_total") == 9
    assert value("llm_service_prompt_tokens_total") == 30
    assert value("llm_service_prompt_tokens_cached_total") == 12
    # the hot path's gaps: one fewer than the frames, each a positive time within the turn
    assert value("llm_service_inter_token_gap_seconds_count") == 2
    gaps = value("llm_service_inter_token_gap_seconds_sum")
    assert gaps is not None and 0 < gaps <= stats.processing_time_ms / 1000


def test_what_a_config_change_leaves_out_keeps_the_value_it_had() -> None:
    configured = defaults().updated(
        "Be brief.", {"temperature": 0.3}, 4096, "clause", [CLOCK], "required"
    )
    assert configured.updated(None, {}, 4096) == configured
    assert (configured.system_prompt, configured.tool_choice) == ("Be brief.", "required")


async def test_the_history_of_a_turn_in_flight_ends_with_its_reply_as_far_as_it_went() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["one ", "two ", "three"]))
    conv = conversation(backend, system="Be brief.")
    turn = conv.start_turn("count")
    async with aclosing(turn.stream()) as stream:
        # a chunk is delivered once the consumer asks for the next: "three" is still out
        assert [await anext(stream) for _ in range(3)] == ["one ", "two ", "three"]
        entries = conv.messages()
    assert [(e.role, e.content) for e in entries[:2]] == [
        ("system", "Be brief."),
        ("user", "count"),
    ]
    # not yet counted: a reply's tokens are known when it ends
    assert entries[2] == Entry("assistant", "one two ", 0, "streaming", turn.response_id)


async def test_what_comes_before_the_first_user_message_is_dropped_as_one_turn() -> None:
    """A history restored from a session store may begin with entries no user message asked
    for: once the window is full they go first, together, and the turn after them stays."""
    backend = FakeBackend()
    conv = conversation(backend, window=1000, max_tokens=100)
    conv.entries = [
        Entry("assistant", "Hello! I can help with your booking.", 400),
        Entry("assistant", "Ask me anything.", 400),
        Entry("user", "Is it Tuesday?", 100),
        Entry("assistant", "It is.", 100),
    ]
    assert (await run(conv.start_turn("And tomorrow?")))[1].history_trimmed_turns == 1
    assert [m.content for m in backend.calls[0].messages] == [
        "Is it Tuesday?",
        "It is.",
        "And tomorrow?",
    ]


async def test_a_prompt_of_exactly_the_budget_fits_without_a_system_prompt() -> None:
    """The budget is the window less max_tokens and the reply's primer; nothing else is
    counted when there is no system prompt."""
    backend = FakeBackend()
    conv = conversation(backend, window=1000, max_tokens=100)
    text = "And tomorrow?"
    budget = 1000 - 100 - REPLY_PRIMER
    conv.entries = [
        Entry("user", "Is it Tuesday?", 100),
        Entry("assistant", "It is.", budget - 100 - conv.count(text)),
    ]
    assert (await run(conv.start_turn(text)))[1].history_trimmed_turns == 0
    assert len(backend.calls[0].messages) == 3


async def test_a_full_window_frees_a_quarter_of_it_and_not_a_turn_more() -> None:
    """1001 tokens: the goal is the budget less 250, a whole number of tokens, and a history
    that reaches it exactly keeps the turn after."""
    backend = FakeBackend()
    conv = conversation(backend, window=1001, max_tokens=100)
    text = "And tomorrow?"
    goal = 1001 - 100 - REPLY_PRIMER - 1001 // TRIM_BLOCK
    conv.entries = [
        Entry("user", "Hi.", 300),
        Entry("assistant", "Hello.", 300),
        Entry("user", "Is it Tuesday?", 50),
        Entry("assistant", "It is.", goal - 50 - conv.count(text)),
    ]
    assert (await run(conv.start_turn(text)))[1].history_trimmed_turns == 1
    assert [m.content for m in backend.calls[0].messages] == ["Is it Tuesday?", "It is.", text]


async def test_a_turn_timed_at_zero_has_no_speed_rather_than_a_division_by_zero() -> None:
    """A clock too coarse to see the turn take time (perf_counter on some systems)."""
    backend = FakeBackend()
    backend.script.append(Scripted(["a", "b"]))
    conv = conversation(backend)
    turn = conv.start_turn("hi")
    await run(turn)
    turn.finished_at = turn.started_at
    stats = turn.stats()
    assert stats.tokens_generated == 2
    assert (stats.processing_time_ms, stats.tokens_per_second) == (0.0, 0.0)


async def test_the_session_summary_counts_turns_tokens_and_messages() -> None:
    backend = FakeBackend()
    backend.script.extend(
        [Scripted(["a", "b"], StreamEnd(completion_tokens=7)), Scripted(["c", "d", "e"])]
    )
    conv = conversation(backend, system="Be brief.")
    await run(conv.start_turn("one"))
    await run(conv.start_turn("two"))
    conv.started_at = time.monotonic() - 1.2344  # an age that is not a round figure
    summary = conv.summary()
    age = time.monotonic() - conv.started_at
    assert (summary.turns, summary.tokens_generated, summary.history_messages) == (2, 10, 5)
    assert 1.234 <= summary.duration_s <= round(age, 3)
    assert summary.duration_s == round(summary.duration_s, 3)


async def test_a_session_without_a_system_prompt_counts_only_its_turns_messages() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["a"]))
    conv = conversation(backend)
    await run(conv.start_turn("one"))
    assert conv.summary().history_messages == 2


def test_max_tokens_one_below_the_window_is_taken_and_at_it_refused_in_words() -> None:
    assert defaults().updated(None, {"max_tokens": 4095}, 4096).sampling.max_tokens == 4095
    with pytest.raises(InvalidConfig) as refused:
        defaults().updated(None, {"max_tokens": 4096}, 4096)
    assert refused.value.message == (
        "max_tokens (4096) must be smaller than the context window (4096), "
        "which must also hold the prompt"
    )


async def test_a_message_of_exactly_max_chars_is_taken_and_one_more_refused_in_words() -> None:
    conv = conversation(FakeBackend(), limits=TurnLimits(max_chars=10))
    await run(conv.start_turn("x" * 10))
    with pytest.raises(MessageTooLong) as refused:
        conv.start_turn("x" * 11)
    assert refused.value.message == "the message has 11 characters; the limit is 10"
    assert conv.turns == 1 and len(conv.entries) == 2


async def test_a_rate_limited_turn_is_told_in_words_and_milliseconds_when_to_retry() -> None:
    clock = FakeClock()
    conv = conversation(FakeBackend(), limits=TurnLimits(per_minute=2))
    conv._rate = SlidingWindow(2, clock=clock)
    for text in ("one", "two"):
        await run(conv.start_turn(text))
    clock.now += 17.4996  # 42.5004 s of the minute left
    with pytest.raises(RateLimited) as refused:
        conv.start_turn("three")
    assert refused.value.message == "at most 2 turns a minute on one connection; retry later"
    assert refused.value.retry_after_ms == 42_500
    clock.now += 42.5  # 0.4 ms left: rounds to 0, but a wait is never told as 0
    with pytest.raises(RateLimited) as refused:
        conv.start_turn("three")
    assert refused.value.retry_after_ms == 1
    clock.now += 0.001
    await run(conv.start_turn("three"))
    assert conv.turns == 3


async def test_a_message_that_exactly_fills_the_budget_fits_and_one_more_is_refused() -> None:
    backend = FakeBackend(tokens_per_char=1.0)
    conv = conversation(backend, window=600, max_tokens=100, system="sys")
    # the budget is 600 - 100 - 3 = 497: the system prompt takes 3 + 4, "x" * 486 takes 490
    with pytest.raises(ContextOverflow) as refused:
        conv.start_turn("x" * 487)
    assert refused.value.message == (
        "the message, the system prompt and the tools need more than the 497 tokens the "
        "context window (600) leaves beside max_tokens (100)"
    )
    assert conv.current is None and conv.turns == 0
    turn = conv.start_turn("x" * 486)
    assert turn.prompt_tokens == 497 + REPLY_PRIMER


async def history_of_turns(conv: Conversation, backend: FakeBackend, turns: int) -> None:
    """`turns` turns of 100 tokens each (a user message and a reply of 46 + 4)."""
    for i in range(turns):
        backend.script.append(Scripted(["r" * 46]))
        await run(conv.start_turn(f"{i}" * 46))


async def test_a_prompt_exactly_at_the_budget_drops_nothing() -> None:
    backend = FakeBackend(tokens_per_char=1.0)
    conv = conversation(backend, window=600, max_tokens=100, system="sys")
    await history_of_turns(conv, backend, 4)
    # 7 + 4 x 100 + (86 + 4) = 497: the budget, exactly
    turn = conv.start_turn("n" * 86)
    assert (turn.dropped, turn.dropped_turns, turn.prompt_tokens) == (0, 0, 497 + REPLY_PRIMER)


async def test_a_full_window_stops_dropping_once_exactly_a_quarter_of_it_is_free() -> None:
    backend = FakeBackend(tokens_per_char=1.0)
    conv = conversation(backend, window=600, max_tokens=100, system="sys")
    await history_of_turns(conv, backend, 5)
    # 7 + 500 + (36 + 4) = 547 > 497; the goal is 497 - 600 // 4 = 347, reached after two
    turn = conv.start_turn("n" * 36)
    assert (turn.dropped, turn.dropped_turns, turn.prompt_tokens) == (4, 2, 347 + REPLY_PRIMER)
    assert [m.content[0] for m in turn.prompt] == ["s", "2", "r", "3", "r", "4", "r", "n"]


async def test_a_history_cap_of_one_turn_sends_only_the_new_message() -> None:
    backend = FakeBackend()
    conv = conversation(backend, system="sys", limits=TurnLimits(max_history_turns=1))
    _, first = await run(conv.start_turn("one"))
    assert first.history_trimmed_turns == 0
    _, second = await run(conv.start_turn("two"))
    assert second.history_trimmed_turns == 1
    assert [(m.role, m.content) for m in backend.calls[1].messages] == [
        ("system", "sys"),
        ("user", "two"),
    ]


@pytest.mark.parametrize(("engine_says", "user_tokens"), [(11, 1), (10, 2 + MESSAGE_OVERHEAD)])
async def test_the_engines_prompt_count_corrects_the_message_only_to_a_positive_size(
    engine_says: int, user_tokens: int
) -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["ok"], StreamEnd(prompt_tokens=engine_says)))
    conv = conversation(backend, system="Be brief.")
    turn = conv.start_turn("Hi there")  # estimated 2 + 4; the rest of the prompt 7 + 3
    assert turn.prompt_tokens == 16
    await run(turn)
    assert conv.entries[0].tokens == user_tokens


async def test_a_failed_turn_keeps_its_error_and_counts_no_trimmed_turns() -> None:
    backend = FakeBackend(tokens_per_char=1.0)
    conv = conversation(backend, window=600, max_tokens=100, system="sys")
    await history_of_turns(conv, backend, 5)
    gone = UpstreamError("gone")
    backend.script.append(Scripted(["part"], error=gone))
    turn = conv.start_turn("5" * 46)
    assert turn.dropped_turns == 3
    with pytest.raises(UpstreamError):
        await run(turn)
    assert turn.error is gone
    value = conv.telemetry.registry.get_sample_value
    assert value("llm_service_turns_total", {"outcome": "failed"}) == 1
    assert value("llm_service_history_trimmed_turns_total") == 0
    assert history(conv)[-1] == {"role": "assistant", "content": "part", "status": "incomplete"}
