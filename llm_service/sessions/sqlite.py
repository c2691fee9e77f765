"""`LLM_SESSION_STORE=sqlite:///path/to/sessions.db`: conversations survive a restart.

One table, one row per session: the record as JSON, and when it expires (a detached session,
`LLM_SESSION_TTL_S` after its socket went; no expiry while attached). Writes go through
`aiosqlite` (one thread of its own, so the event loop never waits on the disk), in WAL mode,
per turn and never per token. The file is marked as this service's with SQLite's
`application_id`, so a file that belongs to something else, or is not a database at all, is
a start-up error naming `LLM_SESSION_STORE` rather than something silently overwritten.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiosqlite

from llm_service.errors import ConfigError
from llm_service.sessions.store import Frame, SessionRecord, StoreError, StoreStatus

APPLICATION_ID = 0x46544C4B  # "FTLK"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS fasttalk_sessions (
    session_id TEXT PRIMARY KEY,
    record BLOB NOT NULL,
    expires_at REAL
)
"""


class SQLiteStore:
    kind = "sqlite"
    shared = False

    def __init__(self, db: aiosqlite.Connection, path: Path, ttl_s: float) -> None:
        self._db = db
        self._path = path
        self._ttl_s = ttl_s
        self._failure: str | None = None

    @classmethod
    async def open(cls, path: Path, ttl_s: float) -> SQLiteStore:
        """Open (or create) the store at `path`; a file that is not one is a ConfigError."""
        what = f"LLM_SESSION_STORE: {path}"
        if path.parent and not path.parent.is_dir():
            raise ConfigError(f"{what}: the folder {path.parent} does not exist")
        try:
            db = await aiosqlite.connect(path)
        except sqlite3.Error as exc:
            raise ConfigError(f"{what} cannot be opened ({exc})") from exc
        try:
            await _claim(db, what)
        except BaseException:
            await db.close()
            raise
        store = cls(db, path, ttl_s)
        await store.sweep()
        return store

    async def load(self, session_id: str) -> SessionRecord | None:
        rows = await self._fetch(
            "SELECT record, expires_at FROM fasttalk_sessions WHERE session_id = ?", session_id
        )
        if not rows:
            return None
        raw, expires_at = rows[0]
        if expires_at is not None and expires_at < time.time():
            await self.delete(session_id)
            return None
        return SessionRecord.loads(raw)

    async def save(self, record: SessionRecord, *, detached: bool) -> None:
        expires_at = time.time() + self._ttl_s if detached else None
        await self._write(
            "INSERT INTO fasttalk_sessions (session_id, record, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT(session_id) DO UPDATE SET record = excluded.record, "
            "expires_at = excluded.expires_at",
            record.session_id,
            record.dumps(),
            expires_at,
        )

    async def delete(self, session_id: str) -> None:
        await self._write("DELETE FROM fasttalk_sessions WHERE session_id = ?", session_id)

    async def publish(self, session_id: str, epoch: int, frames: Sequence[Frame]) -> None:
        return None

    async def frames_after(self, session_id: str, epoch: int, seq: int) -> list[Frame]:
        return []  # frames are not kept across a restart: a resume after one is a resume_gap

    async def tail(self, session_id: str, epoch: int, after: int) -> AsyncIterator[Frame]:
        return
        yield

    async def announce(self, op: str, session_id: str, replica: str) -> None:
        return None

    async def announcements(self) -> AsyncIterator[tuple[str, str, str]]:
        await asyncio.Event().wait()  # no other replica shares this store
        yield ("", "", "")

    async def sweep(self) -> None:
        await self._write("DELETE FROM fasttalk_sessions WHERE expires_at < ?", time.time())

    def status(self) -> StoreStatus:
        if self._failure is not None:
            return StoreStatus("sqlite", False, f"{self._path}: {self._failure}")
        return StoreStatus("sqlite", True, str(self._path))

    async def aclose(self) -> None:
        await self._db.close()

    async def _write(self, sql: str, *args: object) -> None:
        try:
            await self._db.execute(sql, args)
            await self._db.commit()
        except sqlite3.Error as exc:
            self._failure = str(exc)
            raise StoreError(f"the session file {self._path}: {exc}") from exc
        self._failure = None

    async def _fetch(self, sql: str, *args: object) -> list[tuple[bytes, float | None]]:
        try:
            async with self._db.execute(sql, args) as cursor:
                return [(row[0], row[1]) for row in await cursor.fetchall()]
        except sqlite3.Error as exc:
            self._failure = str(exc)
            raise StoreError(f"the session file {self._path}: {exc}") from exc


async def _claim(db: aiosqlite.Connection, what: str) -> None:
    """Make sure the file is a FastTalk session store, making it one if it is new and empty."""
    try:
        async with db.execute("PRAGMA application_id") as cursor:
            row = await cursor.fetchone()
        app_id = int(row[0]) if row else 0
        async with db.execute("SELECT count(*) FROM sqlite_master") as cursor:
            row = await cursor.fetchone()
        objects = int(row[0]) if row else 0
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{what} is not an SQLite database ({exc})") from exc
    if app_id not in (0, APPLICATION_ID) or (app_id == 0 and objects):
        raise ConfigError(
            f"{what} is an SQLite database of something else (it holds {objects} objects and "
            f"application_id {app_id:#x}); name a new file or one this service made"
        )
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    await db.execute(_SCHEMA)
    await db.commit()
