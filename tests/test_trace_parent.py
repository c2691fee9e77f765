"""Which trace each turn joins: the one its frame names (`trace` on `user_message` or
`tool_result`), else the one the connection's handshake named (`traceparent`); with tracing
off, none: a parent is read and nothing is passed on."""

from __future__ import annotations

from tests.fakes.ollama import FakeOllama, Reply, ollama_call
from tests.fakes.otlp import Collector
from tests.support import CLOCK, make_settings, running_service

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
