"""Traces over OTLP/HTTP: the spans of a turn, a cancelled turn and a failed one, received by a
real OTLP/HTTP endpoint on 127.0.0.1, and the trace carried on to the engine's request."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.fakes.ollama import FakeOllama, Reply
from tests.fakes.openai import FakeOpenAI
from tests.fakes.otlp import Collector
from tests.support import Client, make_settings, running_service, tokens_of

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


def traced(fake: FakeOllama, collector: Collector, **overrides: Any) -> Any:
    # OTEL_EXPORTER_OTLP_ENDPOINT's form: the service adds /v1/traces
    return make_settings(
        ollama_base_url=fake.url, otel_exporter_otlp_endpoint=collector.url, **overrides
    )


async def test_a_turn_is_four_spans_in_the_clients_trace_carried_to_the_engine(
    fake_ollama: FakeOllama, collector: Collector
) -> None:
    fake_ollama.script(Reply(chunks=["Paris", " it", " is", "."], first_delay=0.02))
    async with running_service(traced(fake_ollama, collector)) as service:
        client = await service.connect()
        session_id = await client.start()
        await client.send({"type": "user_message", "text": "Capital?", "trace": TRACEPARENT})
        frames = await client.recv_until("response_complete")
        assert tokens_of(frames) == ["Paris", " it", " is", "."]
        response_id = frames[-1]["response_id"]
        stats = frames[-1]["stats"]
        await client.close()
    # the service's shutdown exports what its batch still held

    [turn] = collector.turns()
    assert turn.trace_id == CLIENT_TRACE
    assert turn.parent_id == CLIENT_SPAN
    assert turn.kind == 2  # SERVER
    assert turn.status == 0
    children = collector.children(turn)
    assert sorted(children) == ["turn.queue", "turn.stream", "turn.upstream"]
    assert all(len(spans) == 1 for spans in children.values())
    queue, upstream, stream = (
        children[n][0] for n in ("turn.queue", "turn.upstream", "turn.stream")
    )
    assert upstream.kind == 3  # CLIENT
    assert all(s.trace_id == CLIENT_TRACE for s in (queue, upstream, stream))
    # in order, and within the turn: queue, then the request up to its first token, then the rest
    assert turn.start_ns <= queue.start_ns <= queue.end_ns <= upstream.start_ns
    assert upstream.start_ns <= upstream.end_ns <= stream.start_ns <= stream.end_ns <= turn.end_ns
    assert turn.attributes == {
        "session.id": session_id,
        "gen_ai.conversation.id": session_id,
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": "llama3.2:1b",
        "gen_ai.usage.input_tokens": stats["prompt_tokens"],
        "gen_ai.usage.output_tokens": stats["tokens_generated"],
        "gen_ai.response.finish_reasons": ["stop"],
        "llm_service.response_id": response_id,
        "llm_service.upstream": fake_ollama.url,
        "llm_service.outcome": "completed",
        "llm_service.token_frames": 4,
        "llm_service.history_trimmed_turns": 0,
        "llm_service.time_to_first_token_ms": turn.attributes["llm_service.time_to_first_token_ms"],
    }
    assert turn.attributes["gen_ai.usage.input_tokens"] > 0
    assert upstream.attributes == {
        "llm_service.upstream": fake_ollama.url,
        "llm_service.attempt": 1,
    }
    assert collector.resource["service.name"] == "fasttalk-llm-service"
    # the engine's request continues the trace, as a child of the upstream span
    [chat] = fake_ollama.chats
    assert chat.headers["traceparent"] == f"00-{CLIENT_TRACE}-{upstream.span_id}-01"


async def test_a_cancelled_turn_ends_its_spans_when_the_engine_request_is_closed(
    fake_ollama: FakeOllama, collector: Collector
) -> None:
    fake_ollama.script(Reply(chunks=["word "] * 400, delay=0.01))
    async with running_service(traced(fake_ollama, collector)) as service:
        client = await service.connect()
        await client.start()
        await client.send({"type": "user_message", "text": "Talk."})
        for _ in range(3):
            assert (await client.recv())["type"] == "token"
        await client.send({"type": "cancel"})
        cancelled = (await client.recv_until("cancelled"))[-1]
        await client.close()
        # the engine request is closed before `cancelled` is sent, and the spans with it
        assert fake_ollama.chats[0].closed.is_set()

    [turn] = collector.turns()
    assert turn.parent_id == ""  # no client trace: a trace of its own
    assert turn.attributes["llm_service.outcome"] == "cancelled"
    assert turn.attributes["llm_service.token_frames"] == cancelled["stats"]["token_frames"]
    assert turn.status == 0  # a cancel is not an error
    children = collector.children(turn)
    assert sorted(children) == ["turn.queue", "turn.stream", "turn.upstream"]
    assert children["turn.stream"][0].end_ns <= turn.end_ns
    assert fake_ollama.chats[0].headers["traceparent"].split("-")[1] == turn.trace_id


async def test_a_failed_turn_is_an_error_span_with_one_upstream_span_per_attempt(
    fake_ollama: FakeOllama, collector: Collector
) -> None:
    busy = "server busy, please try again. maximum pending requests exceeded"
    fake_ollama.script(*[Reply(status=503, error=busy)] * 2)
    settings = traced(fake_ollama, collector, llm_retry_attempts=2)
    async with running_service(settings) as service:
        client = await service.connect(additional_headers={"traceparent": TRACEPARENT})
        await client.start()
        await client.send({"type": "user_message", "text": "Hello?"})
        error = (await client.recv_until("error"))[-1]
        assert error["error"]["code"] == "upstream_unavailable"
        await client.close()

    [turn] = collector.turns()
    assert turn.trace_id == CLIENT_TRACE  # the handshake's traceparent, for every turn
    assert turn.status == 2
    assert turn.attributes["error.type"] == "upstream_unavailable"
    assert turn.attributes["llm_service.outcome"] == "failed"
    children = collector.children(turn)
    assert sorted(children) == ["turn.queue", "turn.upstream"]  # no token: no stream span
    attempts = sorted(children["turn.upstream"], key=lambda s: s.start_ns)
    assert [s.attributes["llm_service.attempt"] for s in attempts] == [1, 2]
    assert all(s.status == 2 for s in attempts)
    # each attempt's request carried its own span as the parent
    sent = [c.headers["traceparent"].split("-")[2] for c in fake_ollama.chats]
    assert sent == [s.span_id for s in attempts]


async def test_a_bad_trace_field_is_refused_and_the_session_goes_on(
    fake_ollama: FakeOllama, collector: Collector
) -> None:
    async with running_service(traced(fake_ollama, collector)) as service:
        client = await service.connect()
        await client.start()
        for bad in (
            "not-a-traceparent",
            f"00-{'0' * 32}-{CLIENT_SPAN}-01",
            42,
            {"traceparent": TRACEPARENT, "tracestate": "x" * 600},
        ):
            await client.send({"type": "user_message", "text": "Hi", "trace": bad})
            error = await client.recv()
            assert error["type"] == "error"
            assert error["error"]["code"] == "invalid_message"
            assert "traceparent" in error["error"]["message"]
        state = "vendor=abc"
        await client.send(
            {
                "type": "user_message",
                "text": "Hi",
                "trace": {"traceparent": TRACEPARENT, "tracestate": state},
            }
        )
        assert (await client.recv_until("response_complete"))[-1]["type"] == "response_complete"
        await client.close()
    assert len(fake_ollama.chats) == 1
    assert fake_ollama.chats[0].headers["tracestate"] == state
    assert [t.trace_id for t in collector.turns()] == [CLIENT_TRACE]


def test_the_otel_variables_choose_the_traces_url() -> None:
    base = make_settings(otel_exporter_otlp_endpoint="http://collector:4318/").tracing()
    assert base is not None and base.endpoint == "http://collector:4318/v1/traces"
    exact = make_settings(
        otel_exporter_otlp_endpoint="http://collector:4318",
        otel_exporter_otlp_traces_endpoint="http://other:4318/custom",
    ).tracing()
    assert exact is not None and exact.endpoint == "http://other:4318/custom"
    for off in ({"otel_sdk_disabled": True}, {"otel_traces_exporter": "none"}):
        assert make_settings(otel_exporter_otlp_endpoint="http://c:4318", **off).tracing() is None


async def recv_all(client: Client, until: str) -> list[dict[str, Any]]:
    return await asyncio.wait_for(client.recv_until(until), 10)


async def test_the_hot_path_sends_every_token_with_tracing_on(
    fake_ollama: FakeOllama, collector: Collector
) -> None:
    chunks = [f"t{i} " for i in range(200)]
    fake_ollama.script(Reply(chunks=chunks))
    async with running_service(traced(fake_ollama, collector)) as service:
        client: Client = await service.connect()
        await client.start()
        await client.send({"type": "user_message", "text": "Count."})
        frames = await recv_all(client, "response_complete")
        assert tokens_of(frames) == chunks
        await client.close()
    # no span per token: one turn, three children
    assert len(collector.spans) == 4


async def test_an_openai_compatible_engine_gets_the_traceparent(collector: Collector) -> None:
    # vLLM reads `traceparent` and makes its request spans children of it
    async with FakeOpenAI() as engine:
        settings = make_settings(
            llm_backend="openai",
            openai_base_url=engine.url,
            llm_model="smollm2",
            otel_exporter_otlp_traces_endpoint=collector.url + "/v1/traces",
        )
        async with running_service(settings) as service:
            client = await service.connect()
            await client.start()
            await client.send({"type": "user_message", "text": "Hi", "trace": TRACEPARENT})
            await client.recv_until("response_complete")
            await client.close()
        [chat] = engine.chats
    [turn] = collector.turns()
    [upstream] = collector.children(turn)["turn.upstream"]
    assert turn.attributes["gen_ai.provider.name"] == "openai"
    assert chat.headers["traceparent"] == f"00-{CLIENT_TRACE}-{upstream.span_id}-01"
