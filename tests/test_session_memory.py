"""What an expired session leaves behind in the process: nothing of its own, and nothing that
keeps the memory it used from going back to the system (bench/sessions.py, scenario 3,
measures the RSS itself)."""

from __future__ import annotations

import gc
import sys
import uuid
import weakref

from llm_service.registry import Session
from tests.fakes.ollama import FakeOllama
from tests.support import RunningService, make_settings, poll, running_service

TTL_S = 0.2  # the sweeper runs every min(5 s, TTL)


def _live_session(session_id: str) -> weakref.ref[Session]:
    found = [o for o in gc.get_objects() if type(o) is Session and o.id == session_id]
    assert len(found) == 1
    return weakref.ref(found[0])


async def _expired(service: RunningService) -> None:
    """Until the sweeper has forgotten every session (it runs on its own period)."""
    sessions = service.runner.app.state.sessions

    async def none_left() -> bool:
        return len(sessions) == 0

    await poll(none_left, limit=5.0)


async def test_an_expired_session_is_freed_by_the_sweep_that_expires_it(
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_session_ttl_s=TTL_S)
    async with running_service(settings) as service:
        for _ in range(2):  # the last one a sweep expires, too (no later sweep to let it go)
            client = await service.connect()
            session = _live_session(await client.start())
            await client.close()
            await _expired(service)
            # the sweep that forgot it collected it: no reference survives it, not even the
            # sweeper's own variables, which live as long as the service
            assert session() is None


async def test_a_sweep_that_expires_sessions_empties_the_attribute_lookup_cache(
    fake_ollama: FakeOllama,
) -> None:
    settings = make_settings(ollama_base_url=fake_ollama.url, llm_session_ttl_s=TTL_S)
    async with running_service(settings) as service:
        client = await service.connect()
        await client.start()
        name = f"not_an_attribute_{uuid.uuid4().hex}"  # a fresh string, as C code makes them
        before = sys.getrefcount(name)
        getattr(Session, name, None)
        cached = sys.getrefcount(name) - before  # 1 where the cache holds the name it saw
        await client.close()
        await _expired(service)
        assert sys.getrefcount(name) - before == 0 or cached == 0
