"""Sessions' prompt state on the embedded engine: the cache's bound, and with the real model,
the same replies with and without it, and the prompt read once per session."""

from __future__ import annotations

from typing import Any

import pytest

from llm_service.backends.prompt_cache import PromptCache, SavedPrompt, common_prefix
from tests.support import Client, make_settings, metric, running_service, tokens_of

LONG_SYSTEM = "You are a helpful assistant. Keep answers short. " + " ".join(
    f"Fact {i}: the river number {i} flows into lake {i * 7 % 13}." for i in range(60)
)


def saved(size: int, *tokens: int) -> SavedPrompt:
    return SavedPrompt(tokens, b"x" * size)


def test_the_cache_keeps_the_most_recent_sessions_within_its_bound() -> None:
    cache = PromptCache(100)
    cache.put("a", saved(40, 1))
    cache.put("b", saved(40, 2))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", saved(40, 3))  # 120 > 100: b, the least recent, goes
    assert (cache.get("b"), len(cache), cache.bytes, cache.evictions) == (None, 2, 80, 1)
    cache.put("a", saved(10, 1, 2))  # replaced, not added
    assert cache.bytes == 50 and cache.get("a") == saved(10, 1, 2)
    cache.put("huge", saved(101))  # larger than the whole bound: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2
    assert common_prefix([1, 2, 3], (1, 2, 4)) == 2 and common_prefix([], [1]) == 0


async def converse(client: Client, questions: list[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for question in questions:
        frames = await client.turn(question, limit=300)  # one worker, a busy machine
        assert frames[-1]["type"] == "response_complete", frames[-1]
        out.append(("".join(tokens_of(frames)), frames[-1]["stats"]))
    return out


async def two_sessions_taking_turns(cache_bytes: int) -> list[list[tuple[str, dict[str, Any]]]]:
    settings = make_settings(llm_backend="llamacpp", llamacpp_cache_bytes=cache_bytes)
    async with running_service(settings) as service:
        clients = [await service.connect() for _ in range(2)]
        for client, name in zip(clients, ("Ada", "Bo"), strict=True):
            await client.start()
            config = {"system_prompt": f"The user is {name}. {LONG_SYSTEM}", "temperature": 0.0,
                      "seed": 7, "max_tokens": 12}  # fmt: skip
            await client.send({"type": "start_session", "config": config})
            assert (await client.recv())["type"] == "session_configured"
        turns: list[list[tuple[str, dict[str, Any]]]] = [[], []]
        for question in ("Hello!", "Who am I?"):
            for n, client in enumerate(clients):
                turns[n] += await converse(client, [question])
        body = (await service.get("/metrics", monitoring=True)).text
        cached = metric(body, "llm_service_prompt_tokens_cached_total")
        for client in clients:
            await client.close()
    assert all(t[1]["prompt_tokens"] > 500 for session in turns for t in session)
    turns.append([("", {"cached_total": cached})])
    return turns


@pytest.mark.slow
async def test_sessions_taking_turns_keep_their_prompt_and_get_the_same_replies() -> None:
    """Two sessions with ~600-token system prompts take turns on one worker. With the cache,
    each turn after a session's first reads only what is new; without it, each reads its
    whole prompt again. The replies are the same (temperature 0, a fixed seed)."""
    with_cache = await two_sessions_taking_turns(256 * 2**20)
    without = await two_sessions_taking_turns(0)
    assert [[t[0] for t in s] for s in with_cache[:2]] == [[t[0] for t in s] for s in without[:2]]
    for session in with_cache[:2]:
        for text, stats in session[1:]:  # the previous turn's whole prompt came back
            assert stats["prompt_tokens_cached"] > 0.8 * stats["prompt_tokens"], (text, stats)
    for session in without[:2]:
        for _, stats in session[1:]:  # the other session's turn replaced it: little in common
            assert stats["prompt_tokens_cached"] < 0.2 * stats["prompt_tokens"], stats
    assert with_cache[2][0][1]["cached_total"] > 4 * without[2][0][1]["cached_total"]
