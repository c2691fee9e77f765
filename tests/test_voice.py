"""Turns for voice pipelines: response ids, interrupt, truncate to what was heard, chunking.

The conversation-level tests drive `Conversation` with the in-memory fake backend (the rules,
and hypothesis over texts, splits and cut points); the rest run the real service over a
socket in front of the fake Ollama and check the frames as a voice client reads them.
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import aclosing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from llm_service.backends.base import StreamEnd, ToolCall
from llm_service.chunking import Chunker
from llm_service.conversation import (
    MAX_RESPONSE_ID,
    Chunking,
    Conversation,
    SessionConfig,
    Turn,
    TurnStats,
)
from llm_service.errors import InvalidMessage
from llm_service.metrics import Telemetry
from llm_service.protocol import messages
from tests.fakes.backend import FakeBackend, Scripted
from tests.fakes.ollama import FakeOllama, Reply
from tests.support import RunningService, make_settings, metric, tokens_of

MODES: list[Chunking] = ["none", "clause", "sentence"]


def conversation(backend: FakeBackend, chunking: Chunking = "none") -> Conversation:
    settings_ = make_settings()
    config = SessionConfig("", settings_.default_sampling(), chunking)
    return Conversation("s1", config, backend, 8192, Telemetry())


async def run(turn: Turn) -> tuple[list[str], TurnStats]:
    texts: list[str] = []
    async with aclosing(turn.stream()) as stream:
        async for item in stream:
            if isinstance(item, str):
                texts.append(item)
            else:
                return texts, item
    raise AssertionError("no stats")


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    return [p for p in pieces if p] or [text]


# -- the conversation's rules ----------------------------------------------------------------

replies = st.text(
    alphabet=st.sampled_from(list("abc XYZ.,;:!?…\n\"')(`。！？3🎉é")), min_size=1, max_size=300
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=replies, cuts=st.lists(st.integers(0, 300), max_size=25), mode=st.sampled_from(MODES))
def test_the_frames_of_any_split_concatenate_to_the_reply_in_every_mode(
    text: str, cuts: list[int], mode: Chunking
) -> None:
    async def check() -> None:
        backend = FakeBackend()
        backend.script.append(Scripted(split(text, cuts)))
        conv = conversation(backend, mode)
        frames, stats = await run(conv.start_turn("Speak."))
        assert "".join(frames) == text
        assert all(frames), "no frame is empty"
        assert conv.entries[-1].content == text and conv.entries[-1].status == "complete"
        assert stats.token_frames == len(frames)
        if mode == "none":
            assert stats.time_to_first_chunk_ms is None
        else:
            assert stats.time_to_first_chunk_ms is not None
            assert stats.time_to_first_chunk_ms >= (stats.time_to_first_token_ms or 0)

    asyncio.run(check())


@settings(max_examples=150, deadline=None)
@given(text=replies, heard=st.integers(0, 320))
def test_truncate_then_history_is_exactly_the_prefix_heard(text: str, heard: int) -> None:
    async def check() -> None:
        backend = FakeBackend(tokens_per_char=0.5)
        backend.script.extend([Scripted([text]), Scripted(["Next."])])
        conv = conversation(backend)
        turn = conv.start_turn("Tell me.", "r1")
        await run(turn)
        full_tokens = conv.entries[-1].tokens
        kept = conv.truncate("r1", heard)
        assert kept == min(heard, len(text))
        shown = messages(conv.messages())[-1]
        assert shown["content"] == text[:heard] and shown["response_id"] == "r1"
        assert shown["status"] == ("interrupted" if heard < len(text) else "complete")
        assert conv.entries[-1].tokens == (
            conv.count(text[:heard]) if heard < len(text) else full_tokens
        )
        await run(conv.start_turn("And?"))
        prompt = [(m.role, m.content) for m in backend.calls[-1].messages]
        assert prompt == [("user", "Tell me."), ("assistant", text[:heard]), ("user", "And?")]

    asyncio.run(check())


async def test_only_the_latest_reply_once_ended_can_be_truncated() -> None:
    gate = asyncio.Event()
    backend = FakeBackend()
    backend.script.extend([Scripted(["One."]), Scripted(["Two", " and more."], gate=gate)])
    conv = conversation(backend)
    with pytest.raises(InvalidMessage):
        conv.truncate("r1", 1)  # nothing said yet
    await run(conv.start_turn("First?", "r1"))
    turn = conv.start_turn("Second?", "r2")
    stream = turn.stream()
    assert await anext(stream) == "Two"
    with pytest.raises(InvalidMessage, match="still streaming"):
        conv.truncate("r2", 1)
    with pytest.raises(InvalidMessage, match="still streaming"):
        conv.truncate("r1", 1)
    gate.set()
    async for _ in stream:
        pass
    with pytest.raises(InvalidMessage, match="not the latest"):
        conv.truncate("r1", 1)  # an earlier reply
    assert conv.truncate("r2", 3) == 3
    assert [e.content for e in conv.entries] == ["First?", "One.", "Second?", "Two"]


async def test_with_chunking_tokens_generated_counts_the_engines_chunks() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["Hello", " there", ", my", " friend", "."]))
    conv = conversation(backend, "clause")
    frames, stats = await run(conv.start_turn("Hi"))
    assert frames == ["Hello there, my friend."]
    assert stats.tokens_generated == 5  # no count from the engine: its chunks, not our frames
    assert stats.token_frames == len(frames)


async def test_truncate_at_exactly_the_replys_length_cuts_nothing() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["Hello", " there."], StreamEnd(completion_tokens=9)))
    conv = conversation(backend)
    await run(conv.start_turn("Hi", "r1"))
    reply = conv.entries[-1]
    tokens = reply.tokens
    assert conv.truncate("r1", len("Hello there.")) == len("Hello there.")
    assert (reply.content, reply.status, reply.tokens) == ("Hello there.", "complete", tokens)


async def test_a_truncated_reply_with_calls_is_counted_again_with_its_calls() -> None:
    calls = (ToolCall("c1", "get_time", {"city": "Lisbon"}),)
    backend = FakeBackend(tokens_per_char=1.0)
    backend.script.append(Scripted(["Let me look that up."], calls=calls))
    conv = conversation(backend)
    await run(conv.start_turn("Time?", "r1"))
    assert conv.truncate("r1", 3) == 3
    reply = conv.entries[-1]
    assert (reply.content, reply.status, reply.tool_calls) == ("Let", "interrupted", calls)
    assert reply.tokens == conv.count("Let", calls) > conv.count("Let")


async def test_with_chunking_the_engines_end_and_calls_are_kept() -> None:
    calls = (ToolCall("c1", "get_time", {"city": "Lisbon"}),)
    end = StreamEnd(prompt_tokens=42, completion_tokens=7, done_reason="tool_calls")
    backend = FakeBackend()
    backend.script.append(Scripted(["Let me", " look."], end, calls=calls))
    conv = conversation(backend, "clause")
    turn = conv.start_turn("Time?")
    frames, stats = await run(turn)
    assert frames == ["Let me look."]
    assert (stats.done_reason, stats.tokens_generated, stats.prompt_tokens) == ("tool_calls", 7, 42)
    assert turn.calls == calls and conv.pending_calls == calls


async def test_with_chunking_the_gaps_between_tokens_fit_within_the_turn() -> None:
    chunks = ["One", " two", " three", " four", "."]
    backend = FakeBackend()
    backend.script.append(Scripted(chunks))
    conv = conversation(backend, "sentence")
    _, stats = await run(conv.start_turn("Count."))
    body = generate_latest(conv.telemetry.registry).decode()
    assert metric(body, "llm_service_inter_token_gap_seconds_count") == len(chunks) - 1
    gaps = metric(body, "llm_service_inter_token_gap_seconds_sum")
    assert gaps <= stats.processing_time_ms / 1000


async def test_with_chunking_the_stats_and_metrics_time_the_first_piece_and_token() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["Well, I", " think so. And", " more"]))
    conv = conversation(backend, "sentence")
    turn = conv.start_turn("Sure?")
    frames, stats = await run(turn)
    assert frames == ["Well, I think so. ", "And more"]
    assert (stats.tokens_generated, stats.token_frames) == (3, 2)
    assert turn.first_piece_at is not None and turn.first_token_at is not None
    assert stats.time_to_first_chunk_ms == (turn.first_piece_at - turn.started_at) * 1000
    assert stats.time_to_first_token_ms == (turn.first_token_at - turn.started_at) * 1000
    value = conv.telemetry.registry.get_sample_value
    assert value("llm_service_time_to_first_chunk_seconds_sum") == (
        stats.time_to_first_chunk_ms / 1000
    )
    assert value("llm_service_time_to_first_token_seconds_sum") == (
        stats.time_to_first_token_ms / 1000
    )


async def test_with_chunking_the_first_chunk_time_is_when_the_first_piece_went_out() -> None:
    gate = asyncio.Event()
    backend = FakeBackend()
    backend.script.append(Scripted(["Well, I think so. ", "And more"], gate=gate))
    conv = conversation(backend, "sentence")
    turn = conv.start_turn("Sure?")
    async with aclosing(turn.stream()) as stream:
        assert await anext(stream) == "Well, I think so. "
        handed_on_ms = (time.perf_counter() - turn.started_at) * 1000
        gate.set()
        assert await anext(stream) == "And more"  # the rest, flushed at the end
        stats = await anext(stream)
    assert isinstance(stats, TurnStats) and stats.time_to_first_chunk_ms is not None
    assert stats.time_to_first_chunk_ms <= handed_on_ms <= stats.processing_time_ms


async def held_then_cancelled(
    turn: Turn, backend: FakeBackend, wait_in_send: bool, handed_on: bool = True
) -> list[str]:
    """Stream `turn` in a task and cancel it as `cancel` does (the piece held is to be handed
    on), or as a socket gone does (`handed_on=False`): while it waits on the engine, or
    (`wait_in_send`) while its first piece is sent."""
    received: list[str] = []
    sending = asyncio.Event()

    async def consume() -> None:
        async with aclosing(turn.stream()) as stream:
            async for item in stream:
                assert isinstance(item, str)
                received.append(item)
                sending.set()
                await asyncio.Event().wait()  # a send that does not finish

    task = asyncio.create_task(consume())
    # the task runs until it waits on the engine's gate (or its send) before this wakes
    await asyncio.wait_for((sending if wait_in_send else backend.asked).wait(), 10)
    if handed_on:
        turn.flush_on_stop = True
    task.cancel()
    await asyncio.wait({task}, timeout=10)
    assert task.cancelled()
    return received


async def test_a_cancel_before_the_first_piece_hands_on_the_text_held() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["Well", " I think"], gate=asyncio.Event()))
    conv = conversation(backend, "sentence")
    turn = conv.start_turn("Directions?")
    assert await held_then_cancelled(turn, backend, wait_in_send=False) == []
    assert turn.engine_chunks == 1  # "Well" came and is held: no boundary yet
    assert turn.flushed == "Well"
    assert conv.entries[-1].content == "Well" and conv.entries[-1].status == "interrupted"


async def test_a_reply_stopped_with_nobody_to_hand_it_to_keeps_only_what_was_sent() -> None:
    """A socket gone or a session ended, not a cancel: the piece held is not sent, so it
    is not stored either."""
    backend = FakeBackend()
    backend.script.append(Scripted(["Well", " I think"], gate=asyncio.Event()))
    conv = conversation(backend, "sentence")
    turn = conv.start_turn("Directions?")
    assert await held_then_cancelled(turn, backend, wait_in_send=False, handed_on=False) == []
    assert turn.engine_chunks == 1 and turn.flushed == ""
    assert conv.entries == []


async def test_a_cancel_while_a_piece_is_being_sent_hands_on_nothing_more() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["Well, I think so. And then"]))
    conv = conversation(backend, "sentence")
    turn = conv.start_turn("Directions?")
    received = await held_then_cancelled(turn, backend, wait_in_send=True)
    assert received == ["Well, I think so. "]  # its send cut short: not delivered
    assert turn.flushed == "" and turn.parts == []
    assert conv.entries == []  # no text was handed on: the history is as it was


async def test_a_turn_without_a_response_id_gets_resp_and_32_hex_digits() -> None:
    conv = conversation(FakeBackend())
    made = {conv.start_turn("Hi").response_id for _ in range(2)}
    assert len(made) == 2
    assert all(re.fullmatch(r"resp_[0-9a-f]{32}", rid) for rid in made), made


# -- over the socket -----------------------------------------------------------------------


async def test_response_ids_are_the_clients_or_made_by_the_server(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(Reply(["Hi", "."]), Reply(["Again", "."]))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Hello", "response_id": "turn-1"})
    frames = await client.recv_until("response_complete")
    assert frames[-1]["response_id"] == "turn-1"
    assert all("response_id" not in f for f in frames[:-1]), "token frames stay as they were"

    frames = await client.turn("Hello again")
    made = frames[-1]["response_id"]
    assert isinstance(made, str) and 0 < len(made) <= MAX_RESPONSE_ID and made != "turn-1"
    history = await client.history(response_ids=True)
    assert [m.get("response_id") for m in history if m["role"] == "assistant"] == ["turn-1", made]
    await client.close()


@pytest.mark.parametrize(
    "frame",
    [
        {"response_id": "x" * (MAX_RESPONSE_ID + 1)},
        {"response_id": 7},
        {"response_id": ""},
        {"interrupt": "yes"},
    ],
)
async def test_a_bad_response_id_or_interrupt_is_an_invalid_message(
    service: RunningService, fake_ollama: FakeOllama, frame: dict[str, Any]
) -> None:
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Hello", **frame})
    answer = await client.recv()
    assert answer["type"] == "error" and answer["error"]["code"] == "invalid_message", answer
    assert fake_ollama.chats == []  # nothing started
    assert (await client.turn("Fine?"))[-1]["type"] == "response_complete"
    await client.close()


async def test_a_turns_errors_carry_its_response_id(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(
        Reply(["Once", " upon", " a"], error_after=2),
        Reply([f" w{i}" for i in range(40)], delay=0.02),
    )
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Story", "response_id": "failing"})
    frames = await client.recv_until("error")
    assert frames[-1]["error"]["code"] == "upstream_error"
    assert frames[-1]["response_id"] == "failing"

    await client.send({"type": "user_message", "text": "Count", "response_id": "long"})
    assert (await client.recv())["type"] == "token"
    await client.send({"type": "user_message", "text": "Too soon", "response_id": "refused"})
    refusal = await client.recv_until("error")
    assert refusal[-1]["error"]["code"] == "generation_in_progress"
    assert refusal[-1]["response_id"] == "refused"
    ended = await client.recv_until("response_complete")
    assert ended[-1]["response_id"] == "long"
    await client.close()


async def test_interrupt_cancels_the_reply_and_starts_the_new_turn_in_that_order(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(Reply([f" w{i}" for i in range(200)], delay=0.02), Reply(["New", " one."]))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Count.", "response_id": "old"})
    first = [await client.recv() for _ in range(3)]
    await client.send(
        {"type": "user_message", "text": "Stop, say hi.", "response_id": "new", "interrupt": True}
    )
    frames = first + await client.recv_until("response_complete")
    kinds = [f["type"] for f in frames]
    cut = kinds.index("cancelled")
    assert kinds[:cut] == ["token"] * cut  # the old reply's last tokens,
    assert frames[cut]["response_id"] == "old" and frames[cut]["success"] is True  # its end,
    assert tokens_of(frames[cut + 1 :]) == ["New", " one."]  # then the new reply alone
    assert frames[-1]["response_id"] == "new"
    assert "error" not in kinds  # no generation_in_progress

    assert fake_ollama.chats[0].closed_at is not None  # the old request closed upstream
    history = await client.history()
    old_text = "".join(tokens_of(frames[:cut]))
    assert history == [
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": old_text, "status": "interrupted"},
        {"role": "user", "content": "Stop, say hi."},
        {"role": "assistant", "content": "New one.", "status": "complete"},
    ]
    assert [m["content"] for m in fake_ollama.chats[1].messages] == [
        "Count.",
        old_text,
        "Stop, say hi.",
    ]
    await client.close()


async def test_interrupt_with_nothing_streaming_just_starts_the_turn(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Hi", "interrupt": True})
    frames = await client.recv_until("response_complete")
    assert [f["type"] for f in frames] == ["token"] * (len(frames) - 1) + ["response_complete"]
    await client.close()


async def test_truncate_cuts_the_reply_to_what_was_heard_and_the_next_prompt_has_only_that(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    reply = ["Sure", "! The", " capital", " of", " France", " is", " Paris", "."]
    fake_ollama.script(Reply(reply), Reply(["Yes", "."]))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Capital?", "response_id": "r1"})
    await client.recv_until("response_complete")
    await client.send({"type": "truncate", "response_id": "r1", "heard_chars": 11})
    answer = await client.recv()
    assert answer == {"type": "truncated", "response_id": "r1", "kept_chars": 11}
    history = await client.history()
    assert history[-1] == {"role": "assistant", "content": "Sure! The c", "status": "interrupted"}
    await client.turn("Really?")
    assert [m["content"] for m in fake_ollama.chats[1].messages] == [
        "Capital?",
        "Sure! The c",
        "Really?",
    ]
    await client.close()


async def test_truncate_past_the_end_keeps_everything(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(Reply(["Héllo", " 🎉"]))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Hi", "response_id": "r1"})
    await client.recv_until("response_complete")
    await client.send({"type": "truncate", "response_id": "r1", "heard_chars": 500})
    assert (await client.recv())["kept_chars"] == len("Héllo 🎉") == 7  # code points
    assert (await client.history())[-1] == {
        "role": "assistant",
        "content": "Héllo 🎉",
        "status": "complete",
    }
    await client.close()


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        ({"response_id": "other", "heard_chars": 2}, "not the latest"),
        ({"response_id": "r1", "heard_chars": -1}, "heard_chars"),
        ({"response_id": "r1", "heard_chars": "3"}, "heard_chars"),
        ({"response_id": "r1", "heard_chars": 1.5}, "heard_chars"),
        ({"response_id": "r1"}, "heard_chars"),
        ({"heard_chars": 2}, "response_id"),
    ],
)
async def test_a_truncate_that_cannot_apply_is_an_invalid_message_and_changes_nothing(
    service: RunningService, fake_ollama: FakeOllama, frame: dict[str, Any], why: str
) -> None:
    fake_ollama.script(Reply(["Hello", " there."]))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Hi", "response_id": "r1"})
    await client.recv_until("response_complete")
    await client.send({"type": "truncate", **frame})
    answer = await client.recv()
    assert answer["type"] == "error" and answer["error"]["code"] == "invalid_message", answer
    assert why in answer["error"]["message"]
    assert (await client.history())[-1]["content"] == "Hello there."
    await client.close()


async def test_truncate_while_the_reply_streams_is_refused(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(Reply([f" w{i}" for i in range(30)], delay=0.02))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "Count.", "response_id": "r1"})
    assert (await client.recv())["type"] == "token"
    await client.send({"type": "truncate", "response_id": "r1", "heard_chars": 2})
    frames = await client.recv_until("error")
    assert frames[-1]["error"]["code"] == "invalid_message"
    assert (await client.recv_until("response_complete"))[-1]["response_id"] == "r1"
    await client.close()


async def test_a_refused_truncate_says_exactly_why(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    gate = asyncio.Event()
    fake_ollama.script(Reply(["One."]), Reply(["Two", " and more."], gate=gate))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "First?", "response_id": "r1"})
    await client.recv_until("response_complete")
    await client.send({"type": "user_message", "text": "Second?", "response_id": "r2"})
    assert (await client.recv())["data"] == "Two"  # the rest waits for the gate
    await client.send({"type": "truncate", "response_id": "r2", "heard_chars": 1})
    streaming = await client.recv()
    gate.set()
    assert tokens_of(await client.recv_until("response_complete")) == [" and more."]
    await client.send({"type": "truncate", "response_id": "r1", "heard_chars": 1})
    earlier = await client.recv()
    assert [
        (f["type"], f["error"]["code"], f["error"]["message"]) for f in (streaming, earlier)
    ] == [
        (
            "error",
            "invalid_message",
            "a reply is still streaming: only the latest reply, once it has ended, "
            "can be truncated (send cancel first)",
        ),
        (
            "error",
            "invalid_message",
            "response_id 'r1' is not the latest reply; only the latest reply can be truncated",
        ),
    ]
    assert (await client.history())[-1]["content"] == "Two and more."
    await client.close()


async def test_clause_chunking_sends_whole_clauses_and_reports_the_first_ones_time(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    text = "Well, I think so. The answer, as far as I know, is forty-two! Anything else?"
    chunks = [text[i : i + 3] for i in range(0, len(text), 3)]
    fake_ollama.script(Reply(chunks))
    client = await service.connect()
    await client.start()
    await client.send({"type": "start_session", "config": {"chunking": "clause"}})
    configured = await client.recv()
    assert configured["config"]["chunking"] == "clause"
    frames = await client.turn("Question?")
    chunker = Chunker("clause")
    expected = [piece for chunk in chunks for piece in chunker.feed(chunk)]
    expected += [rest] if (rest := chunker.flush()) else []
    assert tokens_of(frames) == expected and len(expected) > 3
    assert "".join(tokens_of(frames)) == text
    stats = frames[-1]["stats"]
    assert stats["time_to_first_chunk_ms"] >= stats["time_to_first_token_ms"]
    assert stats["token_frames"] == len(expected)
    assert (await client.history())[-1]["content"] == text
    body = (await service.get("/metrics", monitoring=True)).text
    assert metric(body, "llm_service_time_to_first_chunk_seconds_count") == 1
    await client.close()


async def test_chunking_is_none_by_default_and_checked(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    client = await service.connect()
    await client.start()
    await client.send({"type": "start_session", "config": {}})
    assert (await client.recv())["config"]["chunking"] == "none"
    await client.send({"type": "start_session", "config": {"chunking": "words"}})
    answer = await client.recv()
    assert answer["type"] == "error" and answer["error"]["code"] == "invalid_config"
    assert "chunking" in answer["error"]["message"]
    frames = await client.turn("Hi")
    assert "time_to_first_chunk_ms" not in frames[-1]["stats"]
    await client.close()


async def test_cancel_with_chunking_flushes_the_piece_held_and_stores_what_was_sent(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    words = ["Well", " I", " think", " first,", " you", " take", " the", " long"] + [" on"] * 100
    fake_ollama.script(Reply(words, delay=0.03))
    client = await service.connect()
    await client.start()
    await client.send({"type": "start_session", "config": {"chunking": "sentence"}})
    await client.recv()
    await client.send({"type": "user_message", "text": "Directions?", "response_id": "d"})
    first = await client.recv()  # the first piece: a clause of a few words, heard sooner
    assert first["type"] == "token" and first["data"] == "Well I think first, ", first
    await asyncio.sleep(0.1)  # more words, no boundary: held
    await client.send({"type": "cancel"})
    frames = [first, *await client.recv_until("cancelled")]
    kinds = [f["type"] for f in frames]
    assert kinds == ["token"] * (len(frames) - 1) + ["cancelled"]
    assert len(frames) >= 3 and frames[-2]["data"].startswith("you take")  # the flush
    assert frames[-1]["response_id"] == "d"
    sent = "".join(tokens_of(frames))
    history = await client.history()
    assert history[-1] == {"role": "assistant", "content": sent, "status": "interrupted"}
    await client.close()
