"""The embedded engine's prompt cache at the backend, with the real packaged model: a session
whose worker served another session meanwhile gets its own state back and reads only what is
new, with the reply it would have had had the worker served it alone; a state llama.cpp
refuses is read again in full, with the reply a worker without the cache gives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import NamedTuple

# llama_cpp opens two files when imported and never closes them: imported here, at
# collection, rather than first inside a test, their close at exit raises no warning.
import llama_cpp  # noqa: F401
import pytest

from llm_service.backends.base import ChatMessage, ChatRequest, StreamEnd
from llm_service.backends.llamacpp import LlamaCppBackend
from llm_service.backends.prompt_cache import SavedPrompt
from llm_service.sampling import SamplingParams
from tests.support import embedded_engine

pytestmark = pytest.mark.slow

WINDOW = 1024
LIMIT_S = 60  # a bound on each reply, far above what one takes
FACTS = " ".join(f"Fact {i}: the river number {i} flows into lake {i * 7 % 13}." for i in range(12))


def system(name: str) -> ChatMessage:
    return ChatMessage("system", f"The user is {name}. Keep answers short. {FACTS}")


async def load(cache_bytes: int) -> LlamaCppBackend:
    return await asyncio.to_thread(  # loading blocks: off the event loop, as the app does
        embedded_engine, context_window=WINDOW, threads=2, cache_bytes=cache_bytes
    )


@pytest.fixture
async def engines() -> AsyncIterator[tuple[LlamaCppBackend, LlamaCppBackend]]:
    cached, plain = await load(64 * 2**20), await load(0)
    try:
        yield cached, plain
    finally:
        await cached.aclose()
        await plain.aclose()


class Read(NamedTuple):
    """Of a reply's prompt: its tokens, and those the engine did not read again."""

    prompt: int
    cached: int


async def reply(
    engine: LlamaCppBackend, session: str, messages: Sequence[ChatMessage], max_tokens: int = 12
) -> tuple[str, Read]:
    sampling = SamplingParams(temperature=0.0, seed=7, max_tokens=max_tokens)
    request = ChatRequest(list(messages), sampling, WINDOW, affinity=session)
    async with asyncio.timeout(LIMIT_S), aclosing(engine.stream_chat(request)) as stream:
        items = [item async for item in stream]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.prompt_tokens and end.prompt_cached_tokens is not None
    return "".join(i for i in items if isinstance(i, str)), Read(
        end.prompt_tokens, end.prompt_cached_tokens
    )


async def second_turn(
    engine: LlamaCppBackend, bo_between: bool = True, before_second: object = None
) -> tuple[str, Read]:
    """Ada's first turn, Bo's first turn on the same worker, then Ada's second turn."""
    ada = [system("Ada"), ChatMessage("user", "Hello!")]
    first, _ = await reply(engine, "ada", ada)
    if bo_between:
        await reply(engine, "bo", [system("Bo"), ChatMessage("user", "Hello!")])
    if callable(before_second):
        before_second()
    ada += [ChatMessage("assistant", first), ChatMessage("user", "Who am I?")]
    return await reply(engine, "ada", ada)


async def test_a_session_gets_its_state_back_after_another_sessions_turn(
    engines: tuple[LlamaCppBackend, LlamaCppBackend],
) -> None:
    cached, plain = engines
    text, end = await second_turn(cached)
    # the previous turn's prompt and reply came back: only the new message is read
    assert end.cached > 0.8 * end.prompt, end
    assert cached.prompt_cache is not None and len(cached.prompt_cache) == 2
    # the same context, bit for bit, as a worker that served Ada alone: the same reply
    alone_text, alone = await second_turn(plain, bo_between=False)
    assert (text, end.prompt) == (alone_text, alone.prompt)
    assert end.cached == alone.cached
    # without the cache Bo's turn replaced Ada's state: little beyond the template's start
    _, without = await second_turn(plain)
    assert without.cached < 0.2 * without.prompt, without


async def test_a_state_llama_cpp_refuses_is_read_again_in_full(
    engines: tuple[LlamaCppBackend, LlamaCppBackend],
) -> None:
    cached, plain = engines
    cache = cached.prompt_cache
    assert cache is not None

    def spoil() -> None:  # Ada's saved tokens stand, but their state is cut in half
        saved = cache.get("ada")
        assert saved is not None and len(saved.state) > 1000
        cache.put("ada", SavedPrompt(saved.tokens, saved.state[: len(saved.state) // 2]))

    text, end = await second_turn(cached, before_second=spoil)
    # the whole prompt read again, as a worker without the cache reads it
    without_text, without = await second_turn(plain)
    assert (text, end.prompt) == (without_text, without.prompt)
    assert end.cached < 0.2 * end.prompt, end


async def test_a_prompt_that_is_all_saved_state_is_answered_as_afresh(
    engines: tuple[LlamaCppBackend, LlamaCppBackend],
) -> None:
    """A saved state holds no logits: when a prompt is exactly what was saved (a one-token
    reply saves the prompt alone, and the same messages come again), the last token is read
    again rather than the next one sampled from whatever the context decoded last."""
    cached, plain = engines
    ada = [system("Ada"), ChatMessage("user", "Hello!")]
    await reply(cached, "ada", ada, max_tokens=1)
    await reply(cached, "bo", [system("Bo"), ChatMessage("user", "Hello!")])
    assert cached.prompt_cache is not None
    saved = cached.prompt_cache.get("ada")
    text, read = await reply(cached, "ada", ada)
    assert saved is not None and len(saved.tokens) == read.prompt  # the prompt, all saved
    assert read.cached == read.prompt - 1  # all but the last token, read again
    fresh_text, _ = await reply(plain, "ada", ada)
    assert text == fresh_text
