"""`LLM_SESSION_STORE=redis://host:6379/0`: sessions shared by every replica.

Per session, two keys under the `fasttalk:` prefix:

- `fasttalk:session:<id>`: the record as JSON, written per turn; a detached session's key
  expires after `LLM_SESSION_TTL_S`.
- `fasttalk:frames:<id>:<epoch>`: a Redis stream of the frames the session's holder of that
  epoch sent. A replica publishes them in batches, one stream entry a batch (the frames'
  text, one a line, under the entry id `<last seq>-1`; one entry per frame cost the hot path
  over 40% of its throughput, measured), so a replica that a client resumes on can replay
  them (`XRANGE`) and follow a reply still streaming elsewhere (`XREAD BLOCK`), mid-reply
  included. The stream is capped at about `LLM_RESUME_BUFFER_FRAMES` frames.

And one pub/sub channel, `fasttalk:sessions`: a replica that resumes a session says so there
(the replica still holding its old socket closes it), and a replica following a reply another
is streaming asks there for it to be cancelled. The client is the
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
CHANNEL = PREFIX + "sessions"
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
        frames = _frames_key(record.session_id, record.epoch)
        if detached:
            pipe.set(key, record.dumps(), px=self._ttl_ms)
            pipe.pexpire(frames, self._ttl_ms)
        else:
            pipe.set(key, record.dumps())
            pipe.persist(frames)
        await self._call(pipe.execute())

    async def delete(self, session_id: str) -> None:
        record = await self.load(session_id)
        epochs = range(record.epoch + 1) if record is not None else range(1)
        keys = [_frames_key(session_id, epoch) for epoch in epochs]
        await self._call(self._redis.delete(_session_key(session_id), *keys))

    async def publish(self, session_id: str, epoch: int, frames: Sequence[Frame]) -> None:
        if not frames:
            return
        key = _frames_key(session_id, epoch)
        # a frame is compact JSON: never a raw line break inside, so one a line is safe
        batch = "\n".join(text for _, text in frames)
        last = frames[-1][0]
        pipe = self._redis.pipeline(transaction=False)
        # an entry's id is its last frame's seq: the entries wholly before the last
        # `max_frames` frames go (exactly: a stream holds a few large entries, and an
        # approximate trim removes only whole nodes of a hundred)
        keep_from = f"{max(0, last - self._max_frames + 1)}-0"
        pipe.xadd(key, {"f": batch}, id=f"{last}-1", minid=keep_from, approximate=False)
        pipe.pexpire(key, self._ttl_ms * 2)  # a stream nobody writes to any more goes too
        await self._call(pipe.execute())

    async def frames_after(self, session_id: str, epoch: int, seq: int) -> list[Frame]:
        key = _frames_key(session_id, epoch)
        entries: Any = await self._call(self._redis.xrange(key, f"{seq + 1}-1"))
        return [frame for _, fields in entries for frame in _frames(fields) if frame[0] > seq]

    async def tail(self, session_id: str, epoch: int, after: int) -> AsyncIterator[Frame]:
        key, last = _frames_key(session_id, epoch), f"{after}-1"
        while True:
            answer: Any = await self._call(
                self._redis.xread({key: last}, block=_BLOCK_MS, count=256)
            )
            for _, entries in answer or ():
                for entry_id, fields in entries:
                    last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    for frame in _frames(fields):
                        if frame[0] > after:
                            after = frame[0]
                            yield frame

    async def announce(self, op: str, session_id: str, replica: str) -> None:
        message = orjson.dumps({"op": op, "session_id": session_id, "by": replica})
        await self._call(self._redis.publish(CHANNEL, message))

    async def announcements(self) -> AsyncIterator[tuple[str, str, str]]:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        data = orjson.loads(message["data"])
                        yield str(data["op"]), str(data["session_id"]), str(data["by"])
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


def _frames_key(session_id: str, epoch: int) -> str:
    return f"{PREFIX}frames:{session_id}:{epoch}"


def _frames(fields: dict[Any, Any]) -> list[Frame]:
    """The frames of one stream entry, each with the seq its own text carries (last key)."""
    frames = []
    for text in fields[b"f"].decode().split("\n"):
        at = text.rfind('"seq":')
        frames.append((int(text[at + 6 : -1]), text))
    return frames
