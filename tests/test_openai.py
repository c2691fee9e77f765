"""LLM_BACKEND=openai over real sockets: the fake OpenAI-compatible engine's faults, and a real
server (llama-cpp-python's, serving the packaged model) holding a conversation."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_service.backends.llamacpp import packaged_model_path
from tests.fakes.openai import FakeOpenAI, Reply, fake_prompt_tokens, fake_tokens
from tests.process import free_port
from tests.support import RunningService, make_settings, running_service, tokens_of

pytestmark = pytest.mark.slow


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as engine:
        yield engine


def openai_settings(url: str, **overrides: Any) -> Any:
    values = {"llm_backend": "openai", "openai_base_url": url, "llm_model": "smollm2"}
    return make_settings(**{**values, **overrides})


@pytest.fixture
async def service(fake: FakeOpenAI) -> AsyncIterator[RunningService]:
    async with running_service(openai_settings(fake.url)) as running:
        yield running


async def test_a_conversation_streams_and_maps_every_setting(
    service: RunningService, fake: FakeOpenAI
) -> None:
    fake.script(Reply(chunks=["Paris", " is", " the", " capital", "."]))
    client = await service.connect()
    await client.start()
    await client.send(
        {
            "type": "start_session",
            "config": {
                "system_prompt": "Be brief.",
                "temperature": 0.2,
                "max_tokens": 64,
                "top_p": 0.8,
                "top_k": 20,
                "min_p": 0.05,
                "repeat_penalty": 1.2,
                "presence_penalty": 0.5,
                "frequency_penalty": 0.25,
                "seed": 7,
                "stop": ["\n\n"],
            },
        }
    )
    assert (await client.recv())["type"] == "session_configured"
    frames = await client.turn("What is the capital of France?")
    assert "".join(tokens_of(frames)) == "Paris is the capital."
    stats = frames[-1]["stats"]
    assert stats["tokens_generated"] == fake_tokens("Paris is the capital.")  # from usage
    assert stats["done_reason"] == "stop"
    body = fake.chats[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert stats["prompt_tokens"] == fake_prompt_tokens(body["messages"])
    sent = {k: body[k] for k in body if k not in ("model", "messages", "stream", "stream_options")}
    assert sent == {
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.8,
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.2,  # vLLM's name (OPENAI_SAMPLING_DIALECT=vllm)
        "stop": ["\n\n"],
    }
    await client.turn("And of Italy?")
    assert fake.chats[1].messages[-2] == {"role": "assistant", "content": "Paris is the capital."}
    await client.close()


@pytest.mark.parametrize(
    ("dialect", "expected"),
    [
        ("llamacpp", {"top_k": 40, "repeat_penalty": 1.1, "max_tokens": 2048}),
        ("openai", {"max_completion_tokens": 2048}),
    ],
)
async def test_the_dialect_names_the_extras(
    fake: FakeOpenAI, dialect: str, expected: dict[str, Any]
) -> None:
    settings = openai_settings(fake.url, openai_sampling_dialect=dialect)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        await client.turn("hi")
        body = fake.chats[0].body
        assert {k: body.get(k) for k in expected} == expected
        extras = {"top_k", "min_p", "repeat_penalty", "repetition_penalty", "max_tokens"}
        assert not (extras - set(expected)) & set(body)
        await client.close()


async def test_without_usage_the_frames_are_counted(
    service: RunningService, fake: FakeOpenAI
) -> None:
    fake.script(Reply(chunks=["a", "b", "c"], omit_usage=True, keepalive_comments=True))
    client = await service.connect()
    await client.start()
    frames = await client.turn("count")
    assert tokens_of(frames) == ["a", "b", "c"]
    assert frames[-1]["stats"]["tokens_generated"] == 3
    await client.close()


async def test_events_split_over_data_lines_are_joined(
    service: RunningService, fake: FakeOpenAI
) -> None:
    fake.script(Reply(chunks=["one", " two"], multiline=True))
    client = await service.connect()
    await client.start()
    assert tokens_of(await client.turn("go")) == ["one", " two"]
    await client.close()


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (Reply(status=500), "upstream_error"),
        (Reply(status=400, error="bad field"), "upstream_error"),
        (Reply(status=503), "upstream_unavailable"),
        (Reply(status=429), "upstream_unavailable"),
        (Reply(context_length_error=True), "context_overflow"),
    ],
    ids=["500", "400", "503", "429", "context-length"],
)
async def test_errors_before_streaming_map_to_codes(
    fake: FakeOpenAI, reply: Reply, code: str
) -> None:
    fake.default_reply = reply
    settings = openai_settings(fake.url, llm_retry_attempts=1)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("hi")
        assert frames[-1]["error"]["code"] == code, frames[-1]
        assert await client.history() == []
        await client.close()


async def test_unknown_model_is_model_not_found(fake: FakeOpenAI) -> None:
    async with running_service(openai_settings(fake.url, llm_model="nope")) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("hi")
        assert frames[-1]["error"]["code"] == "model_not_found"
        health = (await service.get("/health")).json()
        assert health["status"] == "degraded" and health["engine"]["model_available"] is False
        await client.close()


async def test_a_refused_key_is_a_configuration_error_that_ends_the_socket() -> None:
    async with FakeOpenAI(api_key="the-right-key") as engine:
        settings = openai_settings(engine.url, openai_api_key="a-wrong-key")
        async with running_service(settings) as service:
            client = await service.connect()
            await client.start()
            frames = await client.turn("hi")
            error = frames[-1]["error"]
            assert error["code"] == "upstream_unauthorized" and error["recoverable"] is False
            assert "OPENAI_API_KEY" in error["message"] and "a-wrong-key" not in error["message"]
            await asyncio.wait_for(client.ws.wait_closed(), 5)
            assert client.ws.close_code == 1011
            health = (await service.get("/health")).json()
            assert (
                health["status"] == "unhealthy" and "OPENAI_API_KEY" in health["engine"]["detail"]
            )
        settings = openai_settings(engine.url, openai_api_key="the-right-key")
        async with running_service(settings) as service:
            client = await service.connect()
            await client.start()
            assert (await client.turn("hi"))[-1]["type"] == "response_complete"
            assert engine.chats[-1].headers["Authorization"] == "Bearer the-right-key"
            await client.close()


@pytest.mark.parametrize(
    "fault",
    [{"error_after": 2}, {"drop_after": 2}, {"interrupted_after": 2}],
    ids=["in-band-error", "dropped", "done-without-finish-reason"],
)
async def test_failure_mid_stream_keeps_the_partial_reply_marked_incomplete(
    service: RunningService, fake: FakeOpenAI, fault: dict[str, Any]
) -> None:
    fake.script(Reply(chunks=["Once", " upon", " a", " time"], **fault))
    client = await service.connect()
    await client.start()
    frames = await client.turn("Tell a story")
    assert tokens_of(frames) == ["Once", " upon"]
    assert frames[-1]["error"]["code"] == "upstream_error"
    history = await client.history()
    assert history[-1] == {"role": "assistant", "content": "Once upon", "status": "incomplete"}
    await client.close()


async def test_a_finished_reply_without_done_is_complete(
    service: RunningService, fake: FakeOpenAI
) -> None:
    fake.script(Reply(chunks=["Once", " upon"], omit_done=True))  # finish_reason "stop" came
    client = await service.connect()
    await client.start()
    frames = await client.turn("story")
    assert frames[-1]["type"] == "response_complete"
    assert frames[-1]["stats"]["done_reason"] == "stop"
    await client.close()


async def test_cancel_closes_the_engine_request(service: RunningService, fake: FakeOpenAI) -> None:
    fake.script(Reply(chunks=["Once", " upon"], stall_after=1))
    client = await service.connect()
    await client.start()
    await client.send({"type": "user_message", "text": "story"})
    await client.recv_until("token")
    await client.send({"type": "cancel"})
    cancelled_at = None
    frames = await client.recv_until("cancelled")
    cancelled_at = time.perf_counter()
    assert frames[-1]["success"] is True
    closed_at = await fake.chats[0].wait_closed(limit=2)  # what makes vLLM free the slot
    assert closed_at < cancelled_at, "closed before `cancelled` was sent"
    await client.close()


async def test_a_stall_times_out_and_closes_the_request(fake: FakeOpenAI) -> None:
    fake.script(Reply(chunks=["a", "b", "c"], stall_after=1))
    async with running_service(openai_settings(fake.url, llm_chunk_timeout_s=0.3)) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("hi")
        assert tokens_of(frames) == ["a"] and frames[-1]["error"]["code"] == "timeout"
        await fake.chats[0].wait_closed(limit=2)
        await client.close()


async def test_refused_connections_are_upstream_unavailable(fake: FakeOpenAI) -> None:
    await fake.refuse()
    settings = openai_settings(fake.url, llm_retry_attempts=2)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        frames = await client.turn("hi")
        assert frames[-1]["error"]["code"] == "upstream_unavailable"
        health = await service.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        await fake.accept()
        assert (await client.turn("again"))[-1]["type"] == "response_complete"
        await client.close()


# ---- a real OpenAI-compatible server: llama-cpp-python's, with the packaged model ------------


@contextlib.asynccontextmanager
async def llama_cpp_server(tmp_path: Path, *extra: str) -> AsyncIterator[str]:
    """llama-cpp-python's server (`python -m llama_cpp.server`) on a free port, serving the
    packaged SmolLM2 as `smollm2` (with `extra` arguments); yields its base URL (`.../v1`)."""
    port = free_port()
    log = (tmp_path / f"llama-server-{port}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.llama_server",  # llama_cpp.server, loading the model as the embedded engine does
        "--model",
        str(packaged_model_path()),
        "--model_alias",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        "1",
        # otherwise any request, the service's /v1/models probes included, ends the reply
        # streaming at that moment with a [DONE] (and a busy machine makes them meet)
        "--interrupt_requests",
        "false",
        *extra,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            deadline = time.monotonic() + 60
            while True:
                assert proc.returncode is None, (tmp_path / log.name).read_text()
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(url + "/models")).is_success:
                        break
                assert time.monotonic() < deadline, "llama_cpp.server did not start"
                await asyncio.sleep(0.2)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def test_a_real_openai_compatible_server_holds_a_conversation(tmp_path: Path) -> None:
    async with llama_cpp_server(tmp_path) as url:
        settings = openai_settings(url, openai_sampling_dialect="llamacpp")
        async with running_service(settings) as service:
            health = (await service.get("/health")).json()
            assert health["status"] == "healthy" and health["backend"] == "openai"
            client = await service.connect()
            await client.start()
            await client.send(
                {
                    "type": "start_session",
                    "config": {
                        "temperature": 0.0,
                        "max_tokens": 48,
                        "system_prompt": "You are a helpful assistant. Keep answers short.",
                    },
                }
            )
            await client.recv()
            frames = await client.turn("Hi! My name is Zorblax.", limit=60)
            assert frames[-1]["type"] == "response_complete", frames[-1]
            frames = await client.turn("What is my name?", limit=60)
            assert frames[-1]["type"] == "response_complete"
            assert "Zorblax" in "".join(tokens_of(frames))
            # a cancel closes the request, and the server is free for the next turn at once
            await client.send({"type": "user_message", "text": "Write a long story."})
            await client.recv_until("token", limit=60)
            await client.send({"type": "cancel"})
            assert (await client.recv_until("cancelled", limit=30))[-1]["success"] is True
            frames = await client.turn("What is the capital of France?", limit=60)
            assert frames[-1]["type"] == "response_complete"
            await client.close()


async def test_a_real_openai_compatible_server_calls_a_tool_and_answers_with_its_result(
    tmp_path: Path,
) -> None:
    """llama-cpp-python's server with its `chatml-function-calling` handler, which streams
    calls in pieces when one is forced (grammar-constrained arguments). The first turn forces
    `get_time`; the follow-up, with tool_choice "none", answers in text from the result."""
    clock = {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    forced = {"type": "function", "function": {"name": "get_time"}}
    async with llama_cpp_server(tmp_path, "--chat_format", "chatml-function-calling") as url:
        settings = openai_settings(url, openai_sampling_dialect="llamacpp")
        async with running_service(settings) as service:
            client = await service.connect()
            await client.start()
            config = {"temperature": 0.0, "max_tokens": 96, "tools": [clock]}
            await client.send({"type": "start_session", "config": config})
            assert (await client.recv())["type"] == "session_configured"
            await client.send(
                {
                    "type": "user_message",
                    "text": "What time is it in Lisbon?",
                    "tool_choice": forced,
                }
            )
            frames = await client.recv_until(("response_complete", "error"), limit=60)
            assert frames[-1]["type"] == "response_complete", frames[-1]
            assert frames[-1]["stats"]["done_reason"] == "tool_calls"
            (called,) = [f for f in frames if f["type"] == "tool_call"]
            (call,) = called["calls"]
            assert call["name"] == "get_time" and isinstance(call["arguments"], dict)
            await client.send(
                {
                    "type": "tool_result",
                    "results": [{"id": call["id"], "content": "It is 12:00 in Lisbon."}],
                    "tool_choice": "none",
                }
            )
            frames = await client.recv_until(("response_complete", "error"), limit=60)
            assert frames[-1]["type"] == "response_complete", frames[-1]
            assert "".join(tokens_of(frames)).strip()  # a reply in words
            history = await client.history()
            assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
            assert history[2] == {
                "role": "tool",
                "content": "It is 12:00 in Lisbon.",
                "tool_call_id": call["id"],
                "name": "get_time",
            }
            await client.close()


async def test_the_engine_check_works_for_an_openai_compatible_server(tmp_path: Path) -> None:
    from tests.support import run_cli

    async with llama_cpp_server(tmp_path) as url:
        code, out = await run_cli(
            tmp_path, "test", LLM_BACKEND="openai", OPENAI_BASE_URL=url, LLM_MODEL="smollm2"
        )
    assert code == 0, out
    assert "engine    openai" in out and "verdict   OK" in out
