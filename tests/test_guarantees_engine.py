"""The embedded engine's own failures, with the real packaged model: a turn that finds no free
worker within LLM_FIRST_TOKEN_TIMEOUT_S gets `timeout`, and an exception in the worker thread
reaches the turn as `upstream_error`; either way the engine serves the next turn. And what the
end of a reply reports, and a client's stop sequence reaching llama.cpp."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

# llama_cpp opens two files when imported and never closes them: imported here, at
# collection, rather than first inside a test, their close at exit raises no warning.
import llama_cpp
import pytest

from llm_service.backends.base import ChatMessage, ChatRequest, EngineStatus, StreamEnd, StreamItem
from llm_service.backends.llamacpp import LlamaCppBackend
from llm_service.errors import UpstreamError, UpstreamTimeout
from llm_service.sampling import SamplingParams
from tests.support import embedded_engine

pytestmark = pytest.mark.slow

HANDOFF = 64  # what the worker thread may hand over before it waits for the turn to read
LIMIT_S = 30  # a bound on each wait for the engine, far above what it takes


@pytest.fixture
async def engine() -> AsyncIterator[LlamaCppBackend]:
    backend = await asyncio.to_thread(  # loading blocks: off the event loop, as the app does
        embedded_engine, context_window=512, queue_size=4, first_token_timeout=0.5
    )
    try:
        yield backend
    finally:
        await backend.aclose()


def request(text: str, max_tokens: int = 16, stop: tuple[str, ...] = ()) -> ChatRequest:
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=stop)
    return ChatRequest([ChatMessage("user", text)], sampling, 512)


async def answer(
    engine: LlamaCppBackend, text: str, max_tokens: int = 16, stop: tuple[str, ...] = ()
) -> list[StreamItem]:
    chat = engine.stream_chat(request(text, max_tokens, stop))
    async with asyncio.timeout(LIMIT_S), aclosing(chat) as stream:
        return [item async for item in stream]


async def test_a_turn_that_finds_no_free_worker_times_out_and_the_next_one_is_served(
    engine: LlamaCppBackend,
) -> None:
    # The one worker writes a long story for a turn that reads a single token: once the
    # hand-off buffer is full, the thread waits for that turn, and holds the worker.
    long = request("Write a long story about a dragon.", max_tokens=2 * HANDOFF)
    async with aclosing(engine.stream_chat(long)) as story:
        async with asyncio.timeout(LIMIT_S):
            assert isinstance(await anext(story), str)
        with pytest.raises(UpstreamTimeout, match="no engine worker free within 0.5 s"):
            async with asyncio.timeout(LIMIT_S):
                await anext(engine.stream_chat(request("Hello")))
        async with asyncio.timeout(LIMIT_S):
            rest = [item async for item in story]
    assert sum(isinstance(item, str) for item in rest) > HANDOFF, "the worker was not held"
    assert isinstance(rest[-1], StreamEnd)
    items = await answer(engine, "Hello")
    assert any(isinstance(item, str) for item in items) and isinstance(items[-1], StreamEnd)
    assert await engine.status() == EngineStatus(
        reachable=True,
        detail=f"llama.cpp in-process, {engine.model_path.name}, 0/1 workers busy",
        version=f"llama-cpp-python {llama_cpp.__version__}",
        model_available=True,
    )


async def test_a_failure_in_the_worker_thread_is_an_upstream_error(
    engine: LlamaCppBackend,
) -> None:
    # llama.cpp refuses a prompt longer than its context (512 tokens) in the worker thread
    with pytest.raises(UpstreamError, match="failed while generating \\(ValueError"):
        await answer(engine, "word " * 1000)
    assert "0/1 workers busy" in (await engine.status()).detail
    items = await answer(engine, "Hello")
    assert any(isinstance(item, str) for item in items) and isinstance(items[-1], StreamEnd)


async def test_a_reply_cut_at_max_tokens_says_so_with_its_tokens_and_speed(
    engine: LlamaCppBackend,
) -> None:
    items = await answer(engine, "Write a long story about a dragon.", max_tokens=4)
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.done_reason == "length"
    # a chunk a token, fewer where one character's bytes span two tokens
    chunks = sum(isinstance(item, str) for item in items)
    assert end.completion_tokens is not None and end.completion_tokens >= chunks >= 1
    assert end.engine_tokens_per_second is not None and end.engine_tokens_per_second > 0


async def test_a_stop_sequence_ends_the_reply_before_it(engine: LlamaCppBackend) -> None:
    """Any answer to this has a space within its 16 tokens; stopped at the first, the reply
    is at most a word."""
    items = await answer(engine, "Name three colours.", stop=(" ",))
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.done_reason == "stop"
    assert " " not in "".join(item for item in items if isinstance(item, str))
