"""Sessions that outlive a socket: the live `Session` and the `SessionRegistry` that keeps them.

A `Session` is one conversation and everything that streams it: its `FrameLog` (every frame's
`seq`, the recent frames kept for a resume), its reply in flight (`Generation`) and the
socket it is attached to, if any. A socket that goes detaches its session instead of ending
it: the session stays resumable for `LLM_SESSION_TTL_S`, and a reply that was streaming goes
on for `LLM_RESUME_GRACE_S` into the frame log (0, the default: it is cancelled at once,
stored as interrupted), never further than `LLM_RESUME_BUFFER_FRAMES` frames ahead of what
the client took. `resume` attaches a session to a new socket and replays the frames its
client missed, with their original numbers; the socket it was attached to, if any, is closed
(1000, "resumed").

The registry writes each session to the store (`sessions/`) per turn and when its socket goes,
off the hot path (one writer task, coalescing), and expires detached sessions. With a store
that other replicas share (Redis) it also publishes each session's frames in batches,
resumes a session another replica held (from the store's record and frames, following a reply
that is still streaming there), and tells the other replicas when it took a session over, so
that the one holding the old socket closes it. A store that fails does not stop the service:
sessions go on from memory, `/health` says the store is degraded, and writes resume once it
answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import structlog

from llm_service import protocol
from llm_service.conversation import Conversation, Entry, SessionConfig, new_session_id
from llm_service.errors import ResumeGap, SessionNotFound
from llm_service.generation import Generation, Socket
from llm_service.service import Service
from llm_service.sessions.framelog import FrameLog
from llm_service.sessions.store import (
    Frame,
    SessionRecord,
    SessionStore,
    StoreError,
    StoreStatus,
    new_resume_token,
    token_hash,
    token_matches,
)

log = structlog.get_logger("llm_service.sessions")

_SWEEP_S = 5.0
_PUBLISH_EVERY_S = 0.01
_FOLLOW_IDLE_S = 30.0
_CLOSE_LIMIT_S = 5.0


class Session:
    """One conversation, its frames and its reply, attached to a socket or waiting for one."""

    def __init__(
        self,
        registry: SessionRegistry,
        conversation: Conversation,
        token_hash_: str,
        log_: FrameLog,
    ) -> None:
        self.registry = registry
        self.id = conversation.session_id
        self.conversation = conversation
        self.token_hash = token_hash_
        self.log = log_
        self.socket: Socket | None = None
        self.live = False  # frames go to the socket as they are made (not while replaying)
        self.detached_at: float | None = time.monotonic()
        self.outbox: list[Frame] = []  # frames not yet published to a shared store
        self.following: asyncio.Task[None] | None = None  # a reply streaming elsewhere
        self.shared = registry.shared
        self.reply = Generation(self, registry.service)
        self._grace: asyncio.TimerHandle | None = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self.registry.spawn(coro)

    def publish_soon(self) -> None:
        self.registry.publish_soon()

    @property
    def generating(self) -> bool:
        return self.reply.busy or (self.following is not None and not self.following.done())

    async def send(self, build: Callable[..., str], *args: Any) -> int:
        """Number a frame, keep it, and send it to the socket if one is attached."""
        log_ = self.log
        seq = log_.next()
        text = build(seq, *args)
        log_.keep(seq, text)
        if self.shared:
            self.outbox.append((seq, text))
            self.registry.publish_soon()
        socket = self.socket
        if socket is not None and self.live:
            await socket.send_text(text)
            log_.delivered = seq
        return seq

    async def send_last(self, socket: Socket, build: Callable[..., str], *args: Any) -> None:
        """The last frame a socket gets as it closes (it may be detached already)."""
        log_ = self.log
        seq = log_.next()
        text = build(seq, *args)
        log_.keep(seq, text)
        await socket.send_text(text)

    def lost(self) -> None:
        """The attached socket failed a send: frames go to the log only from now on."""
        self.live = False

    # -- attachment ---------------------------------------------------------------------------

    def attach(self, socket: Socket) -> None:
        previous = self.socket
        self.socket, self.detached_at = socket, None
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if previous is not None and previous is not socket:
            previous.taken_over()

    def go_live(self) -> None:
        self.live = True

    async def detach(self, socket: Socket) -> None:
        """`socket` is gone. Its reply goes on for the grace period, or stops now."""
        if self.socket is not socket:
            return  # resumed elsewhere meanwhile
        self.socket, self.live, self.detached_at = None, False, time.monotonic()
        grace = self.registry.settings.llm_resume_grace_s
        if self.reply.busy:
            if grace <= 0:
                await self.reply.stop()
            else:
                loop = asyncio.get_running_loop()
                self._grace = loop.call_later(grace, self.registry.spawn_stop, self)
        self.registry.save_soon(self, detached=True)

    def overflowing(self) -> bool:
        """Detached, and further ahead of the client than the frame log holds."""
        return self.socket is None and self.log.undelivered() >= self.registry.buffer_frames

    def reply_ended(self) -> None:
        self.registry.save_soon(self, detached=self.socket is None)
        if self.socket is not None:
            self.socket.reply_ended()

    # -- the store's view -----------------------------------------------------------------------

    def record(self) -> SessionRecord:
        conv = self.conversation
        return SessionRecord(
            session_id=self.id,
            token_hash=self.token_hash,
            config={
                "system_prompt": conv.config.system_prompt,
                **conv.config.sampling.model_dump(mode="json"),
            },
            messages=[
                {"role": e.role, "content": e.content, "tokens": e.tokens, "status": e.status}
                for e in conv.messages()
                if e.role != "system" and e.status != "streaming"
            ],
            turns=conv.turns,
            tokens_generated=conv.tokens_generated,
            seq=self.log.last,
            generating=self.reply.busy,
            owner=self.registry.replica,
            updated_at=time.time(),
        )


class SessionRegistry:
    """Every session of this process, attached or waiting to be resumed."""

    def __init__(self, service: Service, store: SessionStore) -> None:
        self.service = service
        self.settings = service.settings
        self.store = store
        self.shared = store.shared
        self.persistent = store.kind != "memory"
        self.buffer_frames = self.settings.llm_resume_buffer_frames
        self.replica = uuid.uuid4().hex[:12]
        self._sessions: dict[str, Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._dirty: dict[str, tuple[Session, bool]] = {}
        self._wake_writer = asyncio.Event()
        self._wake_publisher = asyncio.Event()
        self._degraded_since: float | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.spawn(self._writer())
        self.spawn(self._sweeper())
        if self.shared:
            self.spawn(self._publisher())
            self.spawn(self._listener())

    async def aclose(self) -> None:
        """Keep every session resumable (their sockets are gone), then stop. A store that
        does not answer gets `_CLOSE_LIMIT_S`: the process must be able to stop."""
        for session in list(self._sessions.values()):
            await session.reply.stop()
            self.save_soon(session, detached=True)
        try:
            async with asyncio.timeout(_CLOSE_LIMIT_S):
                await self._flush_writes()
                await self._flush_publishes()
        except TimeoutError:
            log.warning("sessions_not_saved", sessions=len(self._dirty), store=self.store.kind)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn_stop(self, session: Session) -> None:
        """The grace period ended with no socket: stop the reply (stored as interrupted)."""
        if session.socket is None:
            log.info("resume_grace_over", session_id=session.id)
            self.spawn(session.reply.stop())

    # -- sessions -----------------------------------------------------------------------------

    def create(self) -> tuple[Session, str]:
        """A fresh session with the default config, and its resume token."""
        service = self.service
        conversation = Conversation(
            session_id=new_session_id(),
            config=service.default_config,
            backend=service.backend,
            context_window=service.context_window,
            telemetry=service.telemetry,
            limits=service.turn_limits,
        )
        token = new_resume_token()
        session = Session(self, conversation, token_hash(token), FrameLog(self.buffer_frames))
        self._sessions[session.id] = session
        return session, token

    def forget(self, session: Session) -> None:
        """Drop a session that will never be resumed (a fresh one replaced by a resume)."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    async def end(self, session: Session) -> None:
        """`end_session`: the conversation is gone, from memory and from the store, now."""
        await session.reply.stop()
        self.forget(session)
        self._dirty.pop(session.id, None)
        try:
            await self.store.delete(session.id)
        except StoreError as exc:
            self._failed(exc)

    async def resume(
        self, session_id: str, token: str, last_seq: int
    ) -> tuple[Session, list[Frame] | None]:
        """The session to attach, and the frames its client missed (None: some are gone)."""
        session = self._sessions.get(session_id)
        if session is not None:
            if not token_matches(token, session.token_hash):
                raise _not_found()
            if last_seq > session.log.last:
                return session, None  # it cannot have seen what was never sent
            return session, session.log.after(last_seq)
        record = await self._load(session_id)
        if record is None or not token_matches(token, record.token_hash):
            raise _not_found()
        session = self._restore(record, last_seq)
        frames: list[Frame] | None = []
        if self.shared:
            await self._take_over(session_id)
            frames = await self._frames_after(session_id, last_seq, record.seq)
            if record.generating and record.owner != self.replica:
                session.following = self.spawn(self._follow(session, record))
        elif last_seq < record.seq:
            frames = None  # frames are not kept across a restart
        return session, frames

    def _restore(self, record: SessionRecord, last_seq: int) -> Session:
        service = self.service
        sampling = dict(record.config)
        prompt = str(sampling.pop("system_prompt", "") or "")
        config = SessionConfig(prompt, service.default_config.sampling.updated(sampling))
        conversation = Conversation(
            session_id=record.session_id,
            config=config,
            backend=service.backend,
            context_window=service.context_window,
            telemetry=service.telemetry,
            limits=service.turn_limits,
        )
        conversation.entries = [
            Entry(m["role"], m["content"], int(m["tokens"]), m["status"]) for m in record.messages
        ]
        conversation.turns = record.turns
        conversation.tokens_generated = record.tokens_generated
        # numbering goes on after whatever the client or the store saw last
        session = Session(self, conversation, record.token_hash, FrameLog(self.buffer_frames))
        session.log.last = session.log.delivered = max(record.seq, last_seq)
        self._sessions[session.id] = session
        return session

    async def _load(self, session_id: str) -> SessionRecord | None:
        try:
            return await self.store.load(session_id)
        except StoreError as exc:
            self._failed(exc)
            return None
        except (ValueError, TypeError, KeyError) as exc:  # a record this version cannot read
            log.warning("session_record_unreadable", session_id=session_id, error=str(exc))
            return None

    # -- writing to the store, off the hot path -------------------------------------------------

    def save_soon(self, session: Session, *, detached: bool) -> None:
        if not self.persistent:
            return  # the memory store keeps nothing: the live session is all there is
        self._dirty[session.id] = (session, detached)
        self._wake_writer.set()

    def publish_soon(self) -> None:
        self._wake_publisher.set()

    async def _writer(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            await self._flush_writes()

    async def _flush_writes(self) -> None:
        while self._dirty:
            session_id, (session, detached) = next(iter(self._dirty.items()))
            del self._dirty[session_id]
            if self._sessions.get(session_id) is not session:
                continue  # ended meanwhile
            try:
                await self.store.save(session.record(), detached=detached)
            except StoreError as exc:
                self._failed(exc)
                return
            self._recovered()

    async def _publisher(self) -> None:
        while True:
            await self._wake_publisher.wait()
            await asyncio.sleep(_PUBLISH_EVERY_S)  # let a batch gather
            self._wake_publisher.clear()
            await self._flush_publishes()

    async def _flush_publishes(self) -> None:
        for session in list(self._sessions.values()):
            if not session.outbox:
                continue
            batch, session.outbox = session.outbox, []
            batch = [frame for frame in batch if frame[0] > 0]  # seq 0 holds the token
            try:
                await self.store.publish(session.id, batch)
            except StoreError as exc:
                self._failed(exc)
                return

    async def _sweeper(self) -> None:
        ttl = self.settings.llm_session_ttl_s
        while True:
            await asyncio.sleep(min(_SWEEP_S, ttl))
            now = time.monotonic()
            for session in list(self._sessions.values()):
                gone = session.detached_at
                if gone is not None and now - gone >= ttl and not session.generating:
                    self.forget(session)
            try:
                await self.store.sweep()
            except StoreError as exc:
                self._failed(exc)

    # -- replicas -----------------------------------------------------------------------------

    async def _frames_after(self, session_id: str, last_seq: int, last: int) -> list[Frame] | None:
        if last_seq >= last:
            return []
        try:
            frames = await self.store.frames_after(session_id, last_seq)
        except StoreError as exc:
            self._failed(exc)
            return None
        if not frames or frames[0][0] != last_seq + 1:
            return None
        return frames

    async def _take_over(self, session_id: str) -> None:
        """Tell the other replicas that this one holds the session now."""
        try:
            await self.store.announce(session_id, self.replica)
        except StoreError as exc:
            self._failed(exc)

    async def _listener(self) -> None:
        """Close a local socket whose session another replica resumed."""
        async for session_id, replica in self.store.announcements():
            if replica != self.replica:
                self._moved(session_id)

    def _moved(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is None:
            return
        socket = session.socket
        session.socket, session.live = None, False
        if socket is not None:
            socket.taken_over()
        if not session.generating:
            self.forget(session)
        # a reply still streaming goes on here, published, and the session is forgotten
        # when it ends (its record then says who owns it)

    async def _follow(self, session: Session, record: SessionRecord) -> None:
        """Forward, as this session's own frames, a reply another replica is streaming, until
        it ends; then take the finished turn from the store."""
        last = session.log.last
        tail = self.store.tail(session.id, last)
        try:
            while True:
                try:
                    async with asyncio.timeout(_FOLLOW_IDLE_S):
                        seq, text = await anext(tail)
                except (TimeoutError, StopAsyncIteration, StoreError):
                    break
                if seq <= session.log.last:
                    continue
                session.log.last = seq
                session.log.keep(seq, text)
                socket = session.socket
                if socket is not None and session.live:
                    with contextlib.suppress(Exception):
                        await socket.send_text(text)
                        session.log.delivered = seq
                if _turn_ended(text):
                    break
        finally:
            await tail.aclose()  # type: ignore[attr-defined]
        for _ in range(20):  # the other replica writes the finished turn, then it is ours
            fresh = await self._load(session.id)
            if fresh is None or not fresh.generating:
                break
            await asyncio.sleep(0.1)
        if fresh is not None:
            conv = session.conversation
            conv.entries = [
                Entry(m["role"], m["content"], int(m["tokens"]), m["status"])
                for m in fresh.messages
            ]
            conv.turns, conv.tokens_generated = fresh.turns, fresh.tokens_generated
        session.following = None
        session.reply_ended()

    # -- health -------------------------------------------------------------------------------

    def _failed(self, exc: StoreError) -> None:
        if self._degraded_since is None:
            self._degraded_since = time.monotonic()
            log.error(
                "session_store_failed",
                store=self.store.kind,
                error=str(exc),
                effect="sessions go on from memory; they may not survive a restart or a move "
                "to another replica until the store answers again",
            )

    def _recovered(self) -> None:
        if self._degraded_since is not None:
            log.info("session_store_recovered", store=self.store.kind)
            self._degraded_since = None

    def status(self) -> dict[str, Any]:
        status: StoreStatus = self.store.status()
        degraded = self._degraded_since is not None or not status.available
        return {
            "kind": status.kind,
            "available": status.available and self._degraded_since is None,
            "degraded": degraded,
            "detail": status.detail,
            "sessions": len(self._sessions),
            "detached": sum(1 for s in self._sessions.values() if s.socket is None),
        }


def _not_found() -> SessionNotFound:
    return SessionNotFound("no session with that id and token (it may have expired or ended)")


def _turn_ended(text: str) -> bool:
    try:
        kind = orjson.loads(text).get("type")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    return kind in protocol.TURN_ENDS


def resume_gap(last_seq: int) -> ResumeGap:
    return ResumeGap(
        f"frames after seq {last_seq} are no longer held; the session is attached: "
        "resynchronise with get_history"
    )
