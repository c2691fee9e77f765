"""`LLM_SESSION_STORE=redis://host:6379/0`: sessions shared by every replica.

Per session, two keys under the `fasttalk:` prefix:

- `fasttalk:session:<id>`: the record as JSON, written per turn; a detached session's key
  expires after `LLM_SESSION_TTL_S`.
- `fasttalk:frames:<id>`: a Redis stream of the session's frames, entry id `<seq>-1`, capped
  at about `LLM_RESUME_BUFFER_FRAMES` entries (`MAXLEN ~`). A replica publishes a reply's
  frames in batches (`publish`, one pipelined round trip a batch), so a replica that a client
  resumes on can replay them (`XRANGE`) and follow a reply still streaming elsewhere
  (`XREAD BLOCK`), mid-reply included.

And one pub/sub channel, `fasttalk:detach`: a replica that resumes a session says so there,
and the replica still holding that session's old socket closes it. The client is the
well-kept `redis` asyncio client; every Redis failure becomes a `StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llm_service.redact import mask_url
from llm_service.sessions.store import Frame, SessionRecord, StoreError, StoreStatus

T = TypeVar("T")

PREFIX = "fasttalk:"
DETACH_CHANNEL = PREFIX + "detach"
_BLOCK_MS = 1000


class RedisStore:
    kind = "redis"
    shared = True

    def __init__(self, url: str, ttl_s: float, max_frames: int) -> None:
        self._url = url
        self._where = mask_url(url)
        self._redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=15
        )
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._max_frames = max_frames
        self._failure: str | None = None

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    async def check(self) -> None:
        """Reach the server once (at start-up: an unreachable one is said loudly)."""
        await self._call(self._redis.ping())

    async def load(self, session_id: str) -> SessionRecord | None:
        raw = await self._call(self._redis.get(_session_key(session_id)))
        return None if raw is None else SessionRecord.loads(raw)

    async def save(self, record: SessionRecord, *, detached: bool) -> None:
        key = _session_key(record.session_id)
        pipe = self._redis.pipeline(transaction=False)
        if detached:
            pipe.set(key, record.dumps(), px=self._ttl_ms)
            pipe.pexpire(_frames_key(record.session_id), self._ttl_ms)
        else:
            pipe.set(key, record.dumps())
            pipe.persist(_frames_key(record.session_id))
        await self._call(pipe.execute())

    async def delete(self, session_id: str) -> None:
        await self._call(self._redis.delete(_session_key(session_id), _frames_key(session_id)))

    async def publish(self, session_id: str, frames: Sequence[Frame]) -> None:
        if not frames:
            return
        key = _frames_key(session_id)
        pipe = self._redis.pipeline(transaction=False)
        for seq, text in frames:
            pipe.xadd(key, {"f": text}, id=f"{seq}-1", maxlen=self._max_frames, approximate=True)
        await self._call(pipe.execute())

    async def frames_after(self, session_id: str, seq: int) -> list[Frame]:
        entries: Any = await self._call(self._redis.xrange(_frames_key(session_id), f"{seq + 1}-1"))
        return [_frame(entry_id, fields) for entry_id, fields in entries]

    async def tail(self, session_id: str, after: int) -> AsyncIterator[Frame]:
        key, last = _frames_key(session_id), f"{after}-1"
        while True:
            answer: Any = await self._call(
                self._redis.xread({key: last}, block=_BLOCK_MS, count=256)
            )
            for _, entries in answer or ():
                for entry_id, fields in entries:
                    last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    yield _frame(entry_id, fields)

    async def announce(self, session_id: str, replica: str) -> None:
        message = orjson.dumps({"session_id": session_id, "by": replica})
        await self._call(self._redis.publish(DETACH_CHANNEL, message))

    async def announcements(self) -> AsyncIterator[tuple[str, str]]:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(DETACH_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        data = orjson.loads(message["data"])
                        yield str(data["session_id"]), str(data["by"])
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        continue  # not one of ours
            except (RedisError, OSError) as exc:
                self._failure = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(1.0)  # then subscribe again

    async def sweep(self) -> None:
        return None  # Redis expires the keys itself

    def status(self) -> StoreStatus:
        if self._failure is not None:
            return StoreStatus("redis", False, f"{self._where}: {self._failure}")
        return StoreStatus("redis", True, self._where)

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self._redis.aclose()

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            result = await awaitable
        except (RedisError, OSError) as exc:
            self._failure = f"{type(exc).__name__}: {exc}"[:200]
            raise StoreError(f"Redis at {self._where} failed: {self._failure}") from exc
        self._failure = None
        return result


def _session_key(session_id: str) -> str:
    return f"{PREFIX}session:{session_id}"


def _frames_key(session_id: str) -> str:
    return f"{PREFIX}frames:{session_id}"


def _frame(entry_id: bytes | str, fields: dict[Any, Any]) -> Frame:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0]), fields[b"f"].decode()
