"""What a session store keeps, and the small interface every store implements.

A `SessionRecord` is everything needed to bring a session back on another socket, after a
restart, or on another replica: its config, its history with statuses and token counts, its
last sequence number, whether a reply is streaming, the hash of its resume token (never the
token), and when it was last written. It is written per turn (at a turn's start and end),
on a config change and when the socket goes, never per token. A detached session expires
after `LLM_SESSION_TTL_S`; `end_session` deletes it at once.

`SessionStore` is that storage (`memory`, `sqlite:///path`, `redis://...`). A store that is
shared between replicas also carries each session's frames (`publish`, `frames_after`,
`tail`), so that a replica a client resumes on can replay a reply another replica generated,
and follow it while it is still streaming; and messages between replicas (`announce`): that
one took a session over, or asks the one streaming its reply to cancel it. Each holder of a
session writes its frames under its own `epoch` (one more at each take-over), so that two
replicas never number frames in the same stream.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson

Frame = tuple[int, str]  # (seq, the frame as sent)


class StoreError(Exception):
    """The store could not be read or written; what was asked of it did not happen."""


def new_resume_token() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: object, stored_hash: str) -> bool:
    """Whether `token` is the one whose hash is stored, compared in constant time."""
    presented = token_hash(token) if isinstance(token, str) else ""
    return hmac.compare_digest(presented.encode(), stored_hash.encode())


@dataclass
class SessionRecord:
    """A session as the store keeps it."""

    session_id: str
    token_hash: str
    config: dict[str, Any]  # the config as session_configured shows it
    messages: list[dict[str, Any]] = field(default_factory=list)  # role, content, tokens, status
    turns: int = 0
    tokens_generated: int = 0
    seq: int = 0  # the sequence number of the last frame sent
    generating: bool = False  # a reply was streaming when this was written
    owner: str = ""  # the replica that holds the session's live state
    epoch: int = 0  # one more each time another replica takes the session over
    updated_at: float = field(default_factory=time.time)

    def dumps(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: bytes | str) -> SessionRecord:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a session record is a JSON object")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class StoreStatus:
    kind: str
    available: bool
    detail: str


class SessionStore(Protocol):
    """Where sessions are kept beyond this process's memory."""

    kind: str  # memory, sqlite, redis
    shared: bool  # other replicas read it too (frames are published)

    async def load(self, session_id: str) -> SessionRecord | None: ...

    async def save(self, record: SessionRecord, *, detached: bool) -> None:
        """Write `record`; a detached one expires after the TTL unless written again."""
        ...

    async def delete(self, session_id: str) -> None: ...

    async def publish(self, session_id: str, epoch: int, frames: Sequence[Frame]) -> None:
        """Make frames replayable on other replicas (a no-op for an unshared store)."""
        ...

    async def frames_after(self, session_id: str, epoch: int, seq: int) -> list[Frame]: ...

    def tail(self, session_id: str, epoch: int, after: int) -> AsyncIterator[Frame]:
        """Frames after `after` as they are published, until the caller stops."""
        ...

    async def announce(self, op: str, session_id: str, replica: str) -> None:
        """Tell the other replicas: `taken` (`replica` holds the session now) or `cancel`
        (stop the reply you are streaming for it)."""
        ...

    def announcements(self) -> AsyncIterator[tuple[str, str, str]]:
        """(op, session id, replica) as other replicas announce; never ends, and goes on
        through failures of the store (an unshared store has none to give)."""
        ...

    async def sweep(self) -> None:
        """Forget what has expired (a store whose backend expires keys itself does nothing)."""
        ...

    def status(self) -> StoreStatus: ...

    async def aclose(self) -> None: ...
