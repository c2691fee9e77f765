"""Where sessions are kept so that they outlive a socket and a process: `LLM_SESSION_STORE`.

`memory` (the default) keeps them in this process; `sqlite:///path` in a file, so that they
survive a restart; `redis://...` in Redis, shared by every replica. `open_store` makes the one
the setting names; `store.py` has the record every store keeps and the interface they share,
`framelog.py` the numbering and the recent frames of a session. The edge and the app use
them; engines never do.
"""

from __future__ import annotations

import structlog

from llm_service.config import Settings
from llm_service.sessions.memory import MemoryStore
from llm_service.sessions.store import SessionStore, StoreError

log = structlog.get_logger("llm_service.sessions")


async def open_store(settings: Settings) -> SessionStore:
    """The store LLM_SESSION_STORE names, open. A SQLite file that is not one is a start-up
    error; a Redis that does not answer is said loudly, and the service starts degraded."""
    url = settings.llm_session_store
    ttl = settings.llm_session_ttl_s
    path = settings.sqlite_path()
    if path is not None:
        from llm_service.sessions.sqlite import SQLiteStore

        return await SQLiteStore.open(path, ttl)
    if url != "memory":
        from llm_service.sessions.redis import RedisStore

        store = RedisStore(url, ttl, settings.llm_resume_buffer_frames)
        try:
            await store.check()
        except StoreError as exc:
            log.error(
                "session_store_unreachable",
                error=str(exc),
                effect="sessions live in this process only until Redis answers",
                fix="start Redis or correct LLM_SESSION_STORE",
            )
        return store
    return MemoryStore()
