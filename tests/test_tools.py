"""Tool calls: the model asks, the client answers, the reply goes on.

The conversation's rules with a fake backend (pending calls, results, abandoned calls, whole
turns trimmed), then the loop over real sockets against the fake Ollama and the fake
OpenAI-compatible engine: calls in one piece and in many, parallel calls, malformed ones.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from llm_service.backends import BackendChoice
from llm_service.backends.base import ChatMessage, ChatRequest, StreamItem, ToolCall, ToolCalls
from llm_service.conversation import (
    MESSAGE_OVERHEAD,
    Conversation,
    SessionConfig,
    ToolChoice,
    Turn,
)
from llm_service.errors import (
    ContextOverflow,
    InvalidConfig,
    InvalidMessage,
    MalformedToolCall,
    UpstreamError,
)
from llm_service.metrics import Telemetry
from llm_service.protocol import messages
from tests.fakes.backend import FakeBackend, Scripted
from tests.fakes.ollama import FakeOllama, Reply, ollama_call
from tests.fakes.openai import FakeOpenAI
from tests.fakes.openai import Reply as OpenAIReply
from tests.support import (
    CLOCK,
    Client,
    RunningService,
    make_settings,
    metric,
    running_service,
    tokens_of,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def conversation(backend: FakeBackend, window: int = 8192, max_tokens: int = 64) -> Conversation:
    sampling = make_settings().default_sampling().updated({"max_tokens": max_tokens})
    config = SessionConfig("Be brief.", sampling, tools=(CLOCK,))
    return Conversation("s1", config, backend, window, Telemetry())


async def run(turn: Turn) -> list[str]:
    texts: list[str] = []
    async with aclosing(turn.stream()) as stream:
        async for item in stream:
            if isinstance(item, str):
                texts.append(item)
    return texts


def call(call_id: str, city: str = "Lisbon") -> ToolCall:
    return ToolCall(call_id, "get_time", {"city": city})


def shape(prompt: Sequence[ChatMessage]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for m in prompt:
        if m.tool_calls:
            out.append((m.role, m.content, *(c.id for c in m.tool_calls)))
        elif m.role == "tool":
            out.append((m.role, m.content, m.tool_call_id or "", m.tool_name or ""))
        else:
            out.append((m.role, m.content))
    return out


# -- the conversation's rules --------------------------------------------------------------


async def test_calls_wait_for_results_then_the_follow_up_has_them_all() -> None:
    backend = FakeBackend()
    backend.script.extend(
        [Scripted(["Let me look."], calls=(call("c1"), call("c2", "Porto"))), Scripted(["Noon."])]
    )
    conv = conversation(backend)
    turn = conv.start_turn("What time is it in Lisbon and Porto?", "r1")
    assert await run(turn) == ["Let me look."]
    assert backend.calls[0].tools == (CLOCK,)
    assert conv.pending_calls == (call("c1"), call("c2", "Porto"))

    before = messages(conv.messages())
    for results, why in [
        ([("c1", "12:00")], "no result for the call 'c2'"),
        ([("c1", "12:00"), ("c2", "12:00"), ("c3", "?")], "no pending call has the id 'c3'"),
        ([("c1", "12:00"), ("c1", "12:00")], "more than one result"),
    ]:
        with pytest.raises(InvalidMessage, match=why):
            conv.answer_tools(results, None)
        assert messages(conv.messages()) == before  # nothing changed

    follow = conv.answer_tools([("c2", "12:01"), ("c1", "12:00")], "r2")
    assert follow.user is None and follow.response_id == "r2"
    assert await run(follow) == ["Noon."]
    assert shape(backend.calls[1].messages) == [
        ("system", "Be brief."),
        ("user", "What time is it in Lisbon and Porto?"),
        ("assistant", "Let me look.", "c1", "c2"),
        ("tool", "12:00", "c1", "get_time"),  # in the order of the calls
        ("tool", "12:01", "c2", "get_time"),
    ]
    still: tuple[ToolCall, ...] = conv.pending_calls
    assert still == ()
    history = messages(conv.messages())
    assert history[2]["tool_calls"] == [
        {"id": "c1", "name": "get_time", "arguments": {"city": "Lisbon"}},
        {"id": "c2", "name": "get_time", "arguments": {"city": "Porto"}},
    ]
    assert history[3] == {
        "role": "tool",
        "content": "12:00",
        "tool_call_id": "c1",
        "name": "get_time",
    }
    assert history[-1] == {
        "role": "assistant", "content": "Noon.", "status": "complete", "response_id": "r2"
    }  # fmt: skip
    with pytest.raises(InvalidMessage, match="no tool call is waiting"):
        conv.answer_tools([("c1", "again")], None)


async def test_a_user_message_answers_pending_calls_as_cancelled() -> None:
    backend = FakeBackend()
    backend.script.extend([Scripted([], calls=(call("c1"),)), Scripted(["Sure."])])
    conv = conversation(backend)
    assert await run(conv.start_turn("Time in Lisbon?")) == []
    assert conv.entries[-1].tool_calls  # a reply of calls alone is kept
    await run(conv.start_turn("Never mind, hello."))
    assert shape(backend.calls[1].messages)[2:] == [
        ("assistant", "", "c1"),
        ("tool", "cancelled", "c1", "get_time"),
        ("user", "Never mind, hello."),
    ]
    body = generate_latest(conv.telemetry.registry).decode()
    assert metric(body, "llm_service_tool_calls_total", 'outcome="called"') == 1
    assert metric(body, "llm_service_tool_calls_total", 'outcome="cancelled"') == 1


async def test_a_tool_result_that_cannot_apply_says_exactly_why_and_changes_nothing() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted(["Let me look."], calls=(call("c1"), call("c2", "Porto"))))
    conv = conversation(backend)
    with pytest.raises(InvalidMessage) as nothing_waits:
        conv.answer_tools([("c1", "12:00")], None)
    assert nothing_waits.value.message == "tool_result: no tool call is waiting for a result"
    await run(conv.start_turn("Time in Lisbon and Porto?"))
    before = messages(conv.messages())
    long_id = "k" * 100  # the message shows the first 64 characters of an id
    nope = {"type": "function", "function": {"name": "nope"}}
    answers = [("c1", "12:00"), ("c2", "12:01")]
    for results, choice, why in [
        ([("c1", "12:00"), ("c1", "12:00")], None, "tool_result: a call has more than one result"),
        (
            [("c1", "12:00"), (long_id, "?")],
            None,
            f"tool_result: no pending call has the id {'k' * 64!r}",
        ),
        ([("c2", "12:01")], None, "tool_result: no result for the call 'c1'"),
        (answers, nope, "tool_choice: no tool of the session is named 'nope'"),
    ]:
        with pytest.raises(InvalidMessage) as refused:
            conv.answer_tools(results, None, choice)
        assert refused.value.message == why
        assert messages(conv.messages()) == before and conv.current is None
    assert conv.pending_calls == (call("c1"), call("c2", "Porto"))


async def test_results_too_big_for_the_window_are_refused_and_leave_the_calls_pending() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted([], calls=(call("c1"), call("c2", "Porto"))))
    conv = conversation(backend, window=600)
    await run(conv.start_turn("Time in Lisbon and Porto?"))
    before = messages(conv.messages())
    with pytest.raises(ContextOverflow):
        conv.answer_tools([("c1", "12:00"), ("c2", "x" * 4000)], None)
    assert messages(conv.messages()) == before  # neither result stayed
    assert conv.pending_calls == (call("c1"), call("c2", "Porto"))
    backend.script.append(Scripted(["Noon."]))
    assert await run(conv.answer_tools([("c1", "12:00"), ("c2", "12:00")], None)) == ["Noon."]


async def test_each_call_a_tool_result_answers_is_counted() -> None:
    backend = FakeBackend()
    backend.script.extend([Scripted([], calls=(call("c1"), call("c2", "Porto"))), Scripted(["Ok"])])
    conv = conversation(backend)
    await run(conv.start_turn("Time in Lisbon and Porto?"))
    await run(conv.answer_tools([("c1", "12:00"), ("c2", "12:00")], None))
    body = generate_latest(conv.telemetry.registry).decode()
    assert metric(body, "llm_service_tool_calls_total", 'outcome="answered"') == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    turns=st.lists(
        st.tuples(st.integers(1, 200), st.integers(0, 3), st.integers(1, 200)),
        min_size=1,
        max_size=8,
    ),
    window=st.integers(300, 1200),
)
def test_trimming_drops_whole_turns_and_never_parts_a_call_from_its_results(
    turns: list[tuple[int, int, int]], window: int
) -> None:
    """Turns of random sizes, some with calls, in a small window: every prompt starts its
    history with a user message, and every call in it is followed by its results."""

    async def check() -> None:
        backend = FakeBackend()
        conv = conversation(backend, window=window, max_tokens=32)
        for n, (asked, calls, answer) in enumerate(turns):
            made = tuple(call(f"c{n}-{i}") for i in range(calls))
            backend.script.append(Scripted(["a" * answer], calls=made))
            try:
                turn = conv.start_turn("q" * asked)
            except Exception:
                continue  # a message too big for the window: refused, nothing changed
            await run(turn)
            if made:
                backend.script.append(Scripted(["done"]))
                try:
                    follow = conv.answer_tools([(c.id, "r" * answer) for c in made], None)
                except Exception:
                    await run(conv.start_turn("x"))  # the results cannot fit: abandon them
                    continue
                await run(follow)
        for request in backend.calls:
            prompt = list(request.messages)
            assert prompt[0].role == "system"
            assert prompt[1].role == "user", shape(prompt)
            for i, message in enumerate(prompt):
                if message.tool_calls:
                    answered = [
                        m.tool_call_id for m in prompt[i + 1 : i + 1 + len(message.tool_calls)]
                    ]
                    assert answered == [c.id for c in message.tool_calls], shape(prompt)

    asyncio.run(check())


async def test_the_tools_count_against_the_context_budget() -> None:
    backend = FakeBackend()
    with_tools = conversation(backend)
    plain = Conversation(
        "s2", SessionConfig("Be brief.", with_tools.config.sampling), backend, 8192, Telemetry()
    )
    assert with_tools.tools_tokens > 20 and plain.tools_tokens == 0
    gap = with_tools.start_turn("Hi").prompt_tokens - plain.start_turn("Hi").prompt_tokens
    assert gap == with_tools.tools_tokens


def test_a_tool_choice_the_tools_cannot_meet_is_an_invalid_config_in_words() -> None:
    with_clock = conversation(FakeBackend()).config
    plain = SessionConfig("", with_clock.sampling)
    nope: ToolChoice = {"type": "function", "function": {"name": "nope"}}
    cases: list[tuple[SessionConfig, ToolChoice, str]] = [
        (plain, "required", "tool_choice: 'required' needs tools"),
        (with_clock, nope, "tool_choice: no tool of the session is named 'nope'"),
    ]
    for config, choice, why in cases:
        with pytest.raises(InvalidConfig) as refused:
            config.updated(None, {}, 8192, tool_choice=choice)
        assert refused.value.message == why
    named: ToolChoice = {"type": "function", "function": {"name": "get_time"}}
    assert with_clock.updated(None, {}, 8192, tool_choice=named).tool_choice == named
    given_tools = plain.updated(None, {}, 8192, tools=[CLOCK], tool_choice="required")
    assert (given_tools.tools, given_tools.tool_choice) == ((CLOCK,), "required")


async def test_abandoned_calls_are_each_counted_and_stay_pending_if_the_message_cannot_fit() -> (
    None
):
    backend = FakeBackend()
    backend.script.extend([Scripted([], calls=(call("c1"), call("c2", "Porto"))), Scripted(["Hi"])])
    conv = conversation(backend, window=600)
    await run(conv.start_turn("Time in Lisbon and Porto?"))
    value = conv.telemetry.registry.get_sample_value
    assert value("llm_service_tool_calls_total", {"outcome": "called"}) == 2
    before = messages(conv.messages())
    with pytest.raises(ContextOverflow):
        conv.start_turn("x" * 4000)
    assert messages(conv.messages()) == before  # no "cancelled" result stayed
    assert conv.pending_calls == (call("c1"), call("c2", "Porto"))
    assert value("llm_service_tool_calls_total", {"outcome": "cancelled"}) == 0
    await run(conv.start_turn("Never mind."))
    assert value("llm_service_tool_calls_total", {"outcome": "cancelled"}) == 2
    assert [(e.role, e.content, e.tool_call_id) for e in conv.entries[2:4]] == [
        ("tool", "cancelled", "c1"),
        ("tool", "cancelled", "c2"),
    ]


async def test_results_too_big_for_the_window_are_refused_in_words() -> None:
    backend = FakeBackend()
    backend.script.append(Scripted([], calls=(call("c1"),)))
    conv = conversation(backend, window=600)
    await run(conv.start_turn("Time in Lisbon?"))
    with pytest.raises(ContextOverflow) as refused:
        conv.answer_tools([("c1", "x" * 4000)], None)
    # 600 - max_tokens 64 - the reply's primer 3
    assert refused.value.message == (
        "the turn with its tool results, the system prompt and the tools need more than the "
        "533 tokens the context window (600) leaves beside max_tokens (64)"
    )


async def test_a_reply_with_calls_is_counted_with_its_calls_as_json() -> None:
    backend = FakeBackend(tokens_per_char=1.0)
    backend.script.append(Scripted(["Let me look."], calls=(call("c1"),)))
    conv = conversation(backend)
    size = len("Let me look." + '[["c1","get_time",{"city":"Lisbon"}]]') + MESSAGE_OVERHEAD
    assert conv.count("Let me look.", (call("c1"),)) == size
    await run(conv.start_turn("Time?"))
    assert conv.entries[-1].tokens == size


async def test_a_follow_up_to_results_may_drop_every_turn_before_its_own() -> None:
    backend = FakeBackend(tokens_per_char=1.0)
    conv = conversation(backend, window=1000)  # a budget of 1000 - 64 - 3 = 933
    for i in range(2):  # 100 tokens each
        backend.script.append(Scripted(["r" * 46]))
        await run(conv.start_turn(f"{i}" * 46))
    backend.script.append(Scripted([], calls=(call("c1"),)))
    await run(conv.start_turn("Time?"))
    # the tools and the system prompt 203, the old turns 200, this turn 50 + the result 504:
    # 957 is full, and even with both old turns gone 757 is above the goal (933 - 250)
    follow = conv.answer_tools([("c1", "x" * 500)], None)
    assert follow.dropped_turns == 2
    assert [m.role for m in follow.prompt] == ["system", "user", "assistant", "tool"]
    assert follow.prompt[1].content == "Time?"


class CallsThenFailure(FakeBackend):
    """An engine that sends text and calls, then fails before its reply ends."""

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        self.calls.append(request)
        yield "Checking."
        yield ToolCalls((call("c1"),))
        raise UpstreamError("gone")


async def test_calls_of_a_reply_that_then_fails_are_not_kept_or_counted() -> None:
    conv = conversation(CallsThenFailure())
    with pytest.raises(UpstreamError):
        await run(conv.start_turn("Time?"))
    assert conv.pending_calls == () and conv.entries[-1].tool_calls == ()
    assert (conv.entries[-1].content, conv.entries[-1].status) == ("Checking.", "incomplete")
    value = conv.telemetry.registry.get_sample_value
    assert value("llm_service_tool_calls_total", {"outcome": "called"}) == 0


async def test_a_malformed_call_ends_the_turn_as_failed_and_is_counted_once() -> None:
    backend = FakeBackend()
    bad = MalformedToolCall("the fake engine sent a tool call without a function name")
    backend.script.append(Scripted(["Hm"], error=bad))
    conv = conversation(backend)
    turn = conv.start_turn("Time?")
    with pytest.raises(MalformedToolCall):
        await run(turn)
    assert turn.error is bad
    value = conv.telemetry.registry.get_sample_value
    assert value("llm_service_tool_calls_total", {"outcome": "malformed"}) == 1
    assert value("llm_service_turns_total", {"outcome": "failed"}) == 1


# -- over real sockets: Ollama -------------------------------------------------------------


async def configured(client: Client, tools: list[dict[str, Any]]) -> dict[str, Any]:
    await client.start()
    await client.send({"type": "start_session", "config": {"tools": tools}})
    answer = await client.recv()
    assert answer["type"] == "session_configured", answer
    return answer


async def test_the_loop_on_ollama_call_result_follow_up(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(
        Reply(["Checking", "."], tool_calls=[ollama_call("get_time", {"city": "Lisbon"})]),
        Reply(["It is", " noon."]),
    )
    client = await service.connect()
    answer = await configured(client, [CLOCK])
    assert answer["config"]["tools"] == [CLOCK]
    await client.send({"type": "user_message", "text": "Time in Lisbon?", "response_id": "r1"})
    frames = await client.recv_until("response_complete")
    assert [f["type"] for f in frames] == ["token", "token", "tool_call", "response_complete"]
    calls = frames[2]["calls"]
    assert frames[2]["response_id"] == "r1"
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", {"city": "Lisbon"})]
    assert calls[0]["id"].startswith("call_")  # Ollama gave none: the service made one
    assert frames[-1]["stats"]["done_reason"] == "tool_calls"
    assert fake_ollama.chats[0].body["tools"] == [CLOCK]

    await client.send(
        {"type": "tool_result", "results": [{"id": calls[0]["id"], "content": "12:00"}]}
    )
    frames = await client.recv_until("response_complete")
    assert tokens_of(frames) == ["It is", " noon."]
    follow_id = frames[-1]["response_id"]
    assert follow_id not in ("r1", None)
    sent = fake_ollama.chats[1].messages
    assert sent[-2:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": calls[0]["id"],
                    "function": {"name": "get_time", "arguments": {"city": "Lisbon"}},
                }
            ],
        },
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
    ]
    history = await client.history(response_ids=True)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[1]["tool_calls"] == calls and history[1]["response_id"] == "r1"
    assert history[3]["response_id"] == follow_id
    body = (await service.get("/metrics", monitoring=True)).text
    assert metric(body, "llm_service_tool_calls_total", 'outcome="called"') == 1
    assert metric(body, "llm_service_tool_calls_total", 'outcome="answered"') == 1
    await client.close()


async def test_parallel_calls_in_lines_of_their_own_make_one_frame(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(
        Reply(
            [],
            tool_calls=[
                {"id": "a", **ollama_call("get_time", {"city": "Lisbon"})},
                {"id": "b", **ollama_call("get_weather", '{"city": "Porto"}')},
            ],
            tool_calls_apart=True,
        ),
        Reply(["Noon and sun."]),
    )
    client = await service.connect()
    await configured(client, [CLOCK, WEATHER])
    frames = await client.turn("Time in Lisbon, weather in Porto?")
    assert [f["type"] for f in frames] == ["tool_call", "response_complete"]
    assert frames[0]["calls"] == [
        {"id": "a", "name": "get_time", "arguments": {"city": "Lisbon"}},
        {"id": "b", "name": "get_weather", "arguments": {"city": "Porto"}},  # text parsed
    ]
    await client.send(
        {
            "type": "tool_result",
            "response_id": "after-tools",
            "results": [{"id": "b", "content": {"sky": "sun"}}, {"id": "a", "content": "12:00"}],
        }
    )
    frames = await client.recv_until("response_complete")
    assert frames[-1]["response_id"] == "after-tools"
    sent = fake_ollama.chats[1].messages
    assert sent[-2:] == [
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
        {"role": "tool", "content": '{"sky":"sun"}', "tool_name": "get_weather"},
    ]
    await client.close()


@pytest.mark.parametrize(
    "bad",
    [
        ollama_call("get_time", "{not json"),
        ollama_call("get_time", "[1, 2]"),
        ollama_call("", {}),
        {"nothing": "here"},
    ],
)
async def test_a_malformed_call_is_upstream_error_and_leaves_history_as_it_was(
    service: RunningService, fake_ollama: FakeOllama, bad: dict[str, Any]
) -> None:
    fake_ollama.script(Reply(["Hm"], tool_calls=[bad]), Reply(["Fine."]))
    client = await service.connect()
    await configured(client, [CLOCK])
    frames = await client.turn("Time?")
    assert frames[-1]["type"] == "error", frames
    assert frames[-1]["error"]["code"] == "upstream_error"
    history = await client.history()
    assert history == [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "Hm", "status": "incomplete"},
    ]
    assert tokens_of(await client.turn("Again?")) == ["Fine."]  # no dangling call
    body = (await service.get("/metrics", monitoring=True)).text
    assert metric(body, "llm_service_tool_calls_total", 'outcome="malformed"') == 1
    assert len(fake_ollama.chats) == 2  # not tried on another engine: the model misspoke
    await client.close()


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        ({"results": [{"id": "x", "content": "1"}]}, "no tool call is waiting"),
        ({"results": []}, "a list of 1 to"),
        ({"results": [{"id": "x"}]}, "has no 'content'"),
        ({"results": [{"id": 3, "content": "1"}]}, "string field 'id'"),
        ({"results": "x"}, "a list of 1 to"),
    ],
)
async def test_a_tool_result_that_cannot_apply_is_an_invalid_message(
    service: RunningService, frame: dict[str, Any], why: str
) -> None:
    client = await service.connect()
    await client.start()
    await client.send({"type": "tool_result", **frame})
    answer = await client.recv()
    assert answer["type"] == "error" and answer["error"]["code"] == "invalid_message"
    assert why in answer["error"]["message"]
    assert await client.history() == []
    await client.close()


async def test_results_for_unknown_or_missing_calls_change_nothing(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    fake_ollama.script(Reply([], tool_calls=[{"id": "t1", **ollama_call("get_time", {})}]))
    client = await service.connect()
    await configured(client, [CLOCK])
    await client.turn("Time?")
    before = await client.history()
    for n, results in enumerate(
        ([{"id": "t2", "content": "?"}], [{"id": "t1", "content": "?"}] * 2)
    ):
        await client.send({"type": "tool_result", "results": results, "response_id": f"f{n}"})
        answer = await client.recv()
        assert answer["error"]["code"] == "invalid_message", answer
        assert answer["response_id"] == f"f{n}"  # the refusal names the reply it refused
        assert await client.history() == before
    assert len(fake_ollama.chats) == 1
    await client.close()


@pytest.mark.parametrize(
    "tools",
    [
        [{"type": "function", "function": {"name": "has space"}}],
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
        [
            {"type": "function", "function": {"name": "f"}},
            {"type": "function", "function": {"name": "f"}},
        ],
        [{"type": "code_interpreter", "function": {"name": "f"}}],
        [{"type": "function"}],
        "get_time",
    ],
)
async def test_bad_tools_are_an_invalid_config(service: RunningService, tools: Any) -> None:
    client = await service.connect()
    await client.start()
    await client.send({"type": "start_session", "config": {"tools": tools}})
    answer = await client.recv()
    assert answer["type"] == "error" and answer["error"]["code"] == "invalid_config", answer
    assert "tools" in answer["error"]["message"]
    await client.close()


class NoTools(FakeBackend):
    name = "llamacpp"
    calls_tools = False


async def no_tools(settings: Any) -> BackendChoice:
    return BackendChoice((NoTools(),), "a test", None)


async def test_an_engine_whose_model_does_not_call_tools_says_so() -> None:
    async with running_service(make_settings(), no_tools) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "start_session", "config": {"tools": [CLOCK]}})
        answer = await client.recv()
        assert answer["error"]["code"] == "invalid_config"
        assert answer["error"]["message"] == (
            "tools: the llamacpp engine does not call tools (the embedded engine's packaged "
            "SmolLM2-135M was not trained to); use LLM_BACKEND=ollama or openai with a model "
            "that does"
        )
        await client.close()


# -- over real sockets: an OpenAI-compatible engine ----------------------------------------


@pytest.fixture
async def openai_fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as engine:
        yield engine


async def test_the_loop_on_an_openai_compatible_engine_with_calls_in_pieces(
    openai_fake: FakeOpenAI,
) -> None:
    arguments = json.dumps({"city": "Lisbon", "note": "x" * 60})  # many argument fragments
    openai_fake.script(
        OpenAIReply(
            chunks=["One", " moment."],
            tool_calls=[
                {"id": "call_a", "name": "get_time", "arguments": arguments},
                {"id": "call_b", "name": "get_weather", "arguments": '{"city": "Porto"}'},
            ],
        ),
        OpenAIReply(chunks=["Noon", ", sunny."]),
    )
    settings = make_settings(
        llm_backend="openai", openai_base_url=openai_fake.url, llm_model="smollm2"
    )
    async with running_service(settings) as service:
        client = await service.connect()
        await configured(client, [CLOCK, WEATHER])
        frames = await client.turn("Time in Lisbon, weather in Porto?")
        assert tokens_of(frames) == ["One", " moment."]
        assert frames[-2]["calls"] == [
            {"id": "call_a", "name": "get_time", "arguments": json.loads(arguments)},
            {"id": "call_b", "name": "get_weather", "arguments": {"city": "Porto"}},
        ]
        assert frames[-1]["stats"]["done_reason"] == "tool_calls"
        assert openai_fake.chats[0].body["tools"] == [CLOCK, WEATHER]
        await client.send(
            {
                "type": "tool_result",
                "results": [
                    {"id": "call_a", "content": "12:00"},
                    {"id": "call_b", "content": "sun"},
                ],
            }
        )
        frames = await client.recv_until("response_complete")
        assert tokens_of(frames) == ["Noon", ", sunny."]
        sent = openai_fake.chats[1].messages
        assistant = sent[-3]
        assert assistant["role"] == "assistant" and assistant["content"] == "One moment."
        assert [
            (c["id"], c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in assistant["tool_calls"]
        ] == [
            ("call_a", "function", "get_time", json.loads(arguments)),
            ("call_b", "function", "get_weather", {"city": "Porto"}),
        ]
        assert sent[-2:] == [
            {"role": "tool", "tool_call_id": "call_a", "content": "12:00"},
            {"role": "tool", "tool_call_id": "call_b", "content": "sun"},
        ]
        await client.close()


async def test_malformed_arguments_from_an_openai_compatible_engine(
    openai_fake: FakeOpenAI,
) -> None:
    openai_fake.script(
        OpenAIReply(chunks=[], tool_calls=[{"name": "get_time", "arguments": '{"city": "Lis'}]),
        OpenAIReply(chunks=["Hello."]),
    )
    settings = make_settings(
        llm_backend="openai", openai_base_url=openai_fake.url, llm_model="smollm2"
    )
    async with running_service(settings) as service:
        client = await service.connect()
        await configured(client, [CLOCK])
        frames = await client.turn("Time?")
        assert frames[-1]["error"]["code"] == "upstream_error"
        assert "not valid JSON" in frames[-1]["error"]["message"]
        assert await client.history() == []  # no text, no call: as it was
        assert tokens_of(await client.turn("Hi")) == ["Hello."]
        await client.close()


# -- tool_choice ---------------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
FORCED = {"type": "function", "function": {"name": "get_time"}}


async def test_tool_choice_for_the_session_and_for_one_reply(openai_fake: FakeOpenAI) -> None:
    """The session's choice goes with every turn (none when "auto", the engines' default);
    a user_message or tool_result may set one for its own reply."""
    openai_fake.script(
        OpenAIReply(chunks=[], tool_calls=[{"id": "k", "name": "get_time", "arguments": "{}"}]),
        OpenAIReply(chunks=["Noon."]),
        OpenAIReply(chunks=["Hi."]),
    )
    settings = make_settings(
        llm_backend="openai", openai_base_url=openai_fake.url, llm_model="smollm2"
    )
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        await client.send(
            {"type": "start_session", "config": {"tools": [CLOCK], "tool_choice": FORCED}}
        )
        assert (await client.recv())["config"]["tool_choice"] == FORCED
        await client.turn("Time?")
        await client.send(
            {
                "type": "tool_result",
                "results": [{"id": "k", "content": "12"}],
                "tool_choice": "none",
            }
        )
        await client.recv_until("response_complete")
        await client.send({"type": "user_message", "text": "Hi", "tool_choice": "auto"})
        await client.recv_until("response_complete")
        assert [c.body.get("tool_choice") for c in openai_fake.chats] == [FORCED, "none", None]
        await client.close()


@pytest.mark.parametrize(
    ("config", "frame"),
    [
        (
            {"tools": [CLOCK], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            None,
        ),
        ({"tool_choice": "required"}, None),
        ({"tools": [CLOCK], "tool_choice": "sometimes"}, None),
        ({"tools": [CLOCK]}, {"type": "function", "function": {"name": "nope"}}),
        ({"tools": [CLOCK]}, "always"),
    ],
)
async def test_a_tool_choice_that_cannot_apply_is_refused(
    service: RunningService, fake_ollama: FakeOllama, config: dict[str, Any], frame: Any
) -> None:
    client = await service.connect()
    await client.start()
    await client.send({"type": "start_session", "config": config})
    answer = await client.recv()
    if frame is None:
        assert answer["type"] == "error" and answer["error"]["code"] == "invalid_config", answer
        assert "tool_choice" in answer["error"]["message"]
    else:
        assert answer["type"] == "session_configured"
        await client.send({"type": "user_message", "text": "Hi", "tool_choice": frame})
        answer = await client.recv()
        assert answer["error"]["code"] == "invalid_message", answer
        assert "tool_choice" in answer["error"]["message"]
        assert fake_ollama.chats == []
    await client.close()


async def test_on_ollama_tool_choice_none_leaves_the_tools_out(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    client = await service.connect()
    await configured(client, [CLOCK])
    await client.send({"type": "user_message", "text": "Hi", "tool_choice": "none"})
    await client.recv_until("response_complete")
    await client.turn("Hi again")
    assert ["tools" in c.body for c in fake_ollama.chats] == [False, True]
    await client.close()


async def test_a_result_sent_as_soon_as_the_call_arrives_is_taken(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    """A client may answer on the `tool_call` frame, before that reply's `response_complete`."""
    fake_ollama.script(
        Reply(["Checking."], tool_calls=[{"id": "q", **ollama_call("get_time", {})}]),
        Reply(["Noon."]),
    )
    client = await service.connect()
    await configured(client, [CLOCK])
    await client.send({"type": "user_message", "text": "Time?"})
    await client.recv_until("tool_call")
    await client.send({"type": "tool_result", "results": [{"id": "q", "content": "12:00"}]})
    frames = await client.recv_until("response_complete")
    assert frames[-1]["stats"]["done_reason"] == "tool_calls"  # the first reply's end
    frames = await client.recv_until(("response_complete", "error"))
    assert tokens_of(frames) == ["Noon."], frames
    await client.close()


async def test_the_readme_example_answers_get_time(
    service: RunningService, fake_ollama: FakeOllama
) -> None:
    """The README's tool client, run as a user would run it, against the service."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (example,) = [b for b in blocks if "GET_TIME =" in b]
    code = example.replace("ws://localhost:8000/ws/llm", service.ws_url)
    zone = {"zone": "Europe/Lisbon"}
    fake_ollama.script(
        Reply(["Let me see."], tool_calls=[ollama_call("get_time", zone)]),
        Reply(["It is", " time."]),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode() == "Let me see.It is time.\n"
    assert fake_ollama.chats[0].body["tools"][0]["function"]["name"] == "get_time"
    result = fake_ollama.chats[1].messages[-1]
    assert result["role"] == "tool" and result["tool_name"] == "get_time"
    assert re.fullmatch(r"\d\d:\d\d", result["content"]), result
