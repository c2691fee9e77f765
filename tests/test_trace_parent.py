"""Which trace each turn joins: the one its frame names (`trace` on `user_message` or
`tool_result`), else the one the connection's handshake named (`traceparent`); with tracing
off, none: a parent is read and nothing is passed on. And what a turn's span says once it
ends: the figures its `response_complete` or `cancelled` frame shows, its outcome, and for a
failed turn the code and message of its error frame."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.fakes.ollama import DEFAULT_MODEL, FakeOllama, Reply, ollama_call
from tests.fakes.otlp import Collector, Span
from tests.support import CLOCK, make_settings, running_service, tokens_of

HANDSHAKE_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
USER_TRACE = "0af7651916cd43dd8448eb211c80319c"
RESULT_TRACE = "5a1e3f0c9b8d4e2f8c7b6a5d4e3f2a1b"


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-00f067aa0ba902b7-01"


async def test_a_turn_joins_its_frames_trace_else_the_handshakes(
    fake_ollama: FakeOllama, collector: Collector
) -> None:
    fake_ollama.script(
        Reply(["One."]),
        Reply(["Two."]),
        Reply(["Checking."], tool_calls=[ollama_call("get_time", {"city": "Lisbon"})]),
        Reply(["Noon."]),
    )
    settings = make_settings(
        ollama_base_url=fake_ollama.url, otel_exporter_otlp_endpoint=collector.url
    )
    async with running_service(settings) as service:
        headers = {"traceparent": traceparent(HANDSHAKE_TRACE)}
        client = await service.connect(additional_headers=headers)
        await client.start()
        assert (await client.turn("First"))[-1]["type"] == "response_complete"
        await client.send(
            {"type": "user_message", "text": "Second", "trace": traceparent(USER_TRACE)}
        )
        await client.recv_until("response_complete")
        await client.send({"type": "start_session", "config": {"tools": [CLOCK]}})
        assert (await client.recv())["type"] == "session_configured"
        frames = await client.turn("Time in Lisbon?")
        [call] = next(f for f in frames if f["type"] == "tool_call")["calls"]
        await client.send(
            {
                "type": "tool_result",
                "results": [{"id": call["id"], "content": "12:00"}],
                "trace": traceparent(RESULT_TRACE),
            }
        )
        await client.recv_until("response_complete")
        await client.close()
    # the service's shutdown exports what its batch still held
    turns = sorted(collector.turns(), key=lambda span: span.start_ns)
    assert [t.trace_id for t in turns] == [
        HANDSHAKE_TRACE,
        USER_TRACE,
        HANDSHAKE_TRACE,
        RESULT_TRACE,
    ]


async def test_tracing_is_off_unless_configured(fake_ollama: FakeOllama) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url)
    assert settings.tracing() is None
    async with running_service(settings) as service:
        headers = {"traceparent": traceparent(HANDSHAKE_TRACE)}
        client = await service.connect(additional_headers=headers)
        await client.start()
        await client.send({"type": "user_message", "text": "Hi", "trace": traceparent(USER_TRACE)})
        await client.recv_until("response_complete")
        await client.close()
    assert "traceparent" not in fake_ollama.chats[0].headers


# What a turn's span says of how it ended (`TurnTrace.finish`).
ENDING = (
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
    "llm_service.prompt_tokens_cached",
    "llm_service.token_frames",
    "llm_service.history_trimmed_turns",
    "llm_service.time_to_first_token_ms",
    "llm_service.outcome",
    "error.type",
)


def ending(span: Span) -> dict[str, Any]:
    """The span's `ENDING` attributes (None where absent), its floats rounded as a stats
    frame rounds them."""
    found = {key: span.attributes.get(key) for key in ENDING}
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in found.items()}


def ending_of(stats: dict[str, Any], outcome: str, reasons: list[str] | None) -> dict[str, Any]:
    """What the span of a turn that ended with these stats must say."""
    return {
        "gen_ai.usage.input_tokens": stats["prompt_tokens"],
        "gen_ai.usage.output_tokens": stats["tokens_generated"],
        "gen_ai.response.finish_reasons": reasons,
        "llm_service.prompt_tokens_cached": stats.get("prompt_tokens_cached"),
        "llm_service.token_frames": stats["token_frames"],
        "llm_service.history_trimmed_turns": stats["history_trimmed_turns"],
        "llm_service.time_to_first_token_ms": stats["time_to_first_token_ms"],
        "llm_service.outcome": outcome,
        "error.type": None,
    }


async def test_a_turns_span_carries_the_figures_of_its_stats_frame(
    fake_ollama: FakeOllama, collector: Collector
) -> None:
    gate = asyncio.Event()
    fake_ollama.script(
        Reply(["Paris", " it", " is", "."], prompt_eval_cached_count=6),
        Reply(["Hm", "."], done_reason=""),  # an engine that gives no reason
        Reply(["One", " two", " three"], gate=gate, gate_at=2),
    )
    settings = make_settings(
        ollama_base_url=fake_ollama.url, otel_exporter_otlp_endpoint=collector.url
    )
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        stats: dict[str, dict[str, Any]] = {}
        for response_id in ("stop", "no-reason"):
            await client.send({"type": "user_message", "text": "Hi?", "response_id": response_id})
            stats[response_id] = (await client.recv_until("response_complete"))[-1]["stats"]
        await client.send({"type": "user_message", "text": "Count.", "response_id": "cut"})
        assert tokens_of([await client.recv(), await client.recv()]) == ["One", " two"]
        await client.send({"type": "cancel"})  # while the engine holds " three"
        stats["cut"] = (await client.recv_until("cancelled"))[-1]["stats"]
        await client.close()
    assert (stats["stop"]["done_reason"], stats["stop"]["prompt_tokens_cached"]) == ("stop", 6)
    assert stats["no-reason"]["done_reason"] == "" and stats["cut"]["token_frames"] == 2
    turns = {t.attributes["llm_service.response_id"]: t for t in collector.turns()}
    assert {k: ending(t) for k, t in turns.items()} == {
        "stop": ending_of(stats["stop"], "completed", ["stop"]),
        "no-reason": ending_of(stats["no-reason"], "completed", None),
        "cut": ending_of(stats["cut"], "cancelled", None),
    }
    assert [t.status for t in turns.values()] == [0, 0, 0]  # neither end is an error


async def test_a_failed_turns_span_records_the_code_and_message_of_its_error_frame(
    fake_ollama: FakeOllama, collector: Collector
) -> None:
    fake_ollama.script(Reply(["Once", " upon", " a"], error_after=2, error="runner crashed"))
    settings = make_settings(
        ollama_base_url=fake_ollama.url, otel_exporter_otlp_endpoint=collector.url
    )
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("Story?")
        await client.close()
    assert tokens_of(frames) == ["Once", " upon"]
    error = frames[-1]["error"]
    assert error["code"] == "upstream_error" and "runner crashed" in error["message"]
    [turn] = collector.turns()
    assert (turn.status, turn.status_message) == (2, error["message"])
    found = ending(turn)
    assert found.pop("gen_ai.usage.input_tokens") > 0  # the prompt as the service counted it
    assert found.pop("llm_service.time_to_first_token_ms") is not None
    assert found == {
        "gen_ai.usage.output_tokens": 2,  # no count from the engine: the frames sent
        "gen_ai.response.finish_reasons": None,
        "llm_service.prompt_tokens_cached": None,
        "llm_service.token_frames": 2,
        "llm_service.history_trimmed_turns": 0,
        "llm_service.outcome": "failed",
        "error.type": error["code"],
    }


@pytest.mark.slow
async def test_the_queue_span_is_the_wait_for_an_embedded_worker(collector: Collector) -> None:
    # One worker: the second turn's request starts only once the first reply has streamed.
    settings = make_settings(
        llm_backend="llamacpp", num_workers=1, otel_exporter_otlp_endpoint=collector.url
    )
    async with running_service(settings) as service:
        clients = [await service.connect() for _ in range(2)]
        for client in clients:
            await client.start()
        config = {"temperature": 0.0, "max_tokens": 24}
        for client in clients:
            await client.send({"type": "start_session", "config": config})
            assert (await client.recv())["type"] == "session_configured"
        for client in clients:
            await client.send({"type": "user_message", "text": "Name three colours."})
        for client in clients:
            await client.recv_until("response_complete", limit=120)
            await client.close()

    turns = collector.turns()
    assert len(turns) == 2
    spans = [collector.children(t) for t in turns]
    assert all(sorted(s) == ["turn.queue", "turn.stream", "turn.upstream"] for s in spans)
    first, second = sorted(spans, key=lambda s: s["turn.upstream"][0].start_ns)
    # the second waited in the queue while the first was streaming
    assert second["turn.queue"][0].end_ns > first["turn.stream"][0].start_ns
    assert {t.attributes["gen_ai.provider.name"] for t in turns} == {"llamacpp"}
    assert {t.attributes["llm_service.upstream"] for t in turns} == {"embedded"}


WHO = (
    "session.id",
    "gen_ai.conversation.id",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "llm_service.response_id",
)


async def test_a_turns_span_names_its_session_engine_and_model_and_its_request_is_its_child(
    fake_ollama: FakeOllama, collector: Collector
) -> None:
    settings = make_settings(
        ollama_base_url=fake_ollama.url, otel_exporter_otlp_endpoint=collector.url
    )
    async with running_service(settings) as service:
        client = await service.connect()
        session_id = await client.start()
        frames = await client.turn("Hello")
        assert frames[-1]["type"] == "response_complete"
        await client.close()
    [turn] = collector.turns()
    assert {k: turn.attributes[k] for k in WHO} == {
        "session.id": session_id,
        "gen_ai.conversation.id": session_id,
        "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": DEFAULT_MODEL,
        "llm_service.response_id": frames[-1]["response_id"],
    }
    [upstream] = collector.children(turn)["turn.upstream"]
    assert turn.attributes["llm_service.upstream"] == fake_ollama.url
    assert upstream.attributes["llm_service.upstream"] == fake_ollama.url
    sent = fake_ollama.chats[0].headers["traceparent"].split("-")
    assert sent[1:3] == [turn.trace_id, upstream.span_id]  # the engine's request is its child
