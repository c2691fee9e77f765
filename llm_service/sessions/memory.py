"""`LLM_SESSION_STORE=memory`: sessions live in this process's memory only (the default).

A session outlives its socket for `LLM_SESSION_TTL_S` as a live object in the session
registry, so this store has nothing to keep: a session it is asked for is one that has
expired, ended, or never was. Nothing survives a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from llm_service.sessions.store import Frame, SessionRecord, StoreStatus


class MemoryStore:
    kind = "memory"
    shared = False

    async def load(self, session_id: str) -> SessionRecord | None:
        return None

    async def save(self, record: SessionRecord, *, detached: bool) -> None:
        return None

    async def delete(self, session_id: str) -> None:
        return None

    async def publish(self, session_id: str, epoch: int, frames: Sequence[Frame]) -> None:
        return None

    async def frames_after(self, session_id: str, epoch: int, seq: int) -> list[Frame]:
        return []

    async def tail(self, session_id: str, epoch: int, after: int) -> AsyncIterator[Frame]:
        return
        yield  # an async generator that yields nothing

    async def announce(self, op: str, session_id: str, replica: str) -> None:
        return None

    async def announcements(self) -> AsyncIterator[tuple[str, str, str]]:
        await asyncio.Event().wait()  # no other replica shares this store
        yield ("", "", "")

    async def sweep(self) -> None:
        return None

    def status(self) -> StoreStatus:
        return StoreStatus("memory", True, "in this process; nothing survives a restart")

    async def aclose(self) -> None:
        return None
