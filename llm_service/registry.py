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
sessions go on from memory, `/health` says the store is degraded, and the writer tries again
each second, new turns or not; once the store answers, every session here is written again
(a Redis that restarted empty, or the writes refused meanwhile, leave it behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
import structlog

from llm_service import protocol
from llm_service.backends.base import ToolCall
from llm_service.conversation import Conversation, Entry, SessionConfig, new_session_id
from llm_service.errors import ResumeGap, SessionNotFound, UpstreamError
from llm_service.generation import GONE as _SOCKET_GONE
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
_RETRY_WRITES_S = 1.0  # while the store fails: how often the writer tries it again
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
        self.moved = False  # another replica took the session over; its reply still ends here
        self.cancelling = False  # a cancel asked for there is stopping the reply here
        self.epoch = 0  # which holder of the session this is (its frames' stream)
        self.shared = registry.shared
        self.reply = Generation(
            self, registry.service.telemetry, registry.settings.llm_send_timeout_s
        )
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
        seq = self.log.next()
        await self._emit(seq, build(seq, *args))
        return seq

    async def relay(self, text: str, seq: int) -> None:
        """A frame another replica streamed as its `seq`: renumbered as this session's own
        next frame (its own frames may have come in between), then sent as one."""
        ours = self.log.next()
        if ours != seq:
            text = text[: text.rfind('"seq":')] + f'"seq":{ours}}}'
        await self._emit(ours, text)

    async def _emit(self, seq: int, text: str) -> None:
        log_ = self.log
        log_.keep(seq, text)
        if self.shared:
            self.outbox.append((seq, text))
            self.registry.publish_soon()
        socket = self.socket
        if socket is not None and self.live:
            await socket.send_text(text)
            log_.delivered = seq

    async def send_last(self, socket: Socket, build: Callable[..., str], *args: Any) -> None:
        """The last frame a socket gets as it closes (it may be detached already)."""
        seq = self.log.next()
        text = build(seq, *args)
        self.log.keep(seq, text)
        if self.shared:
            self.outbox.append((seq, text))
            self.registry.publish_soon()
        await socket.send_text(text)

    def lost(self) -> None:
        """The attached socket failed a send: frames go to the log only from now on."""
        self.live = False

    # -- attachment ---------------------------------------------------------------------------

    def attach(self, socket: Socket) -> None:
        previous = self.socket
        self.socket, self.detached_at = socket, None
        self.stop_grace()
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
        """Detached, and further ahead of the client than the frame log holds (a session that
        another replica took over is followed there: its frames are all read)."""
        if self.socket is not None or self.moved:
            return False
        return self.log.undelivered() >= self.registry.buffer_frames

    def stop_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def changed(self) -> None:
        """Something the store keeps changed: write the session soon, as it stands now
        (attached to a socket, or detached and expiring)."""
        self.registry.save_soon(self, detached=self.socket is None)

    def reply_ended(self) -> None:
        if self.moved:
            if not self.cancelling:  # else its `cancelled` comes first, then the hand-over
                self.registry.hand_over(self)
            return
        self.changed()
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
                "chunking": conv.config.chunking,
                "tools": list(conv.config.tools),
                "tool_choice": conv.config.tool_choice,
                **conv.config.sampling.model_dump(mode="json"),
            },
            messages=[
                _message(e)
                for e in conv.messages()
                if e.role != "system" and e.status != "streaming"
            ],
            turns=conv.turns,
            tokens_generated=conv.tokens_generated,
            seq=self.log.last,
            generating=self.generating,
            owner=self.registry.replica,
            epoch=self.epoch,
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
        does not answer gets `_CLOSE_LIMIT_S` in all: the process must be able to stop."""
        loop = asyncio.get_running_loop()
        until = loop.time() + _CLOSE_LIMIT_S
        for session in list(self._sessions.values()):
            await session.reply.stop()
            self.save_soon(session, detached=True)
        # the background tasks go first, so that only this flush writes; a store client may
        # swallow a cancel (redis-py in a pipeline does), hence the bound on each wait
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=max(0.1, until - loop.time()))
        try:
            async with asyncio.timeout(max(0.1, until - loop.time())):
                await self._flush_writes()
                await self._flush_publishes()
        except TimeoutError:
            log.warning("sessions_not_saved", sessions=len(self._dirty), store=self.store.kind)

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn_stop(self, session: Session) -> None:
        """The grace period ended with no socket: stop the reply (stored as interrupted)."""
        if session.socket is None and not session.moved and session.reply.busy:
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
            tracing=service.tracing,
        )
        token = new_resume_token()
        session = Session(self, conversation, token_hash(token), FrameLog(self.buffer_frames))
        self._sessions[session.id] = session
        return session, token

    async def share(self, session: Session) -> None:
        """Write a fresh session to a shared store before its `session_started` goes out, so
        that its client may resume it on any replica from that frame on. (While the store
        is failing, the write is queued as every other is: an outage costs no start-up.)"""
        if not self.shared:
            return
        if self._degraded_since is None:
            await self._save_now(session)
        else:
            session.changed()

    def forget(self, session: Session) -> None:
        """Drop a session that will never be resumed here."""
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
        if session is not None and not session.moved:
            if not token_matches(token, session.token_hash):
                raise _not_found()
            if last_seq > session.log.last:
                return session, None  # it cannot have seen what was never sent
            return session, session.log.after(last_seq)
        record = await self._load(session_id)
        if record is None or not token_matches(token, record.token_hash):
            raise _not_found()
        if session is not None:
            self.forget(session)  # moved away: the store has what happened since
        session = self._restore(record, last_seq)
        if not self.shared:
            return session, (None if last_seq < record.seq else [])  # no frames kept
        frames = await self._replay(record, last_seq)
        for seq, text in frames or ():
            session.log.keep(seq, text)
            session.log.last = session.log.delivered = seq
        session.epoch = record.epoch + 1
        following = record.generating and record.owner != self.replica
        if following:
            after = frames[-1][0] if frames else last_seq
            session.following = self.spawn(self._follow(session, record, after))
        # claimed before the last holder hears of it: the turn it hands over lands on this
        await self._save_now(session)
        await self._announce("taken", session_id)
        return session, frames

    async def _save_now(self, session: Session) -> None:
        self._dirty.pop(session.id, None)
        try:
            await self.store.save(session.record(), detached=session.socket is None)
        except StoreError as exc:
            self._failed(exc)

    def _restore(self, record: SessionRecord, last_seq: int) -> Session:
        service = self.service
        sampling = dict(record.config)
        prompt = str(sampling.pop("system_prompt", "") or "")
        chunking = sampling.pop("chunking", "none")
        if chunking not in ("none", "clause", "sentence"):
            chunking = "none"
        tools = tuple(sampling.pop("tools", None) or ())
        choice = sampling.pop("tool_choice", None) or "auto"
        config = SessionConfig(
            prompt, service.default_config.sampling.updated(sampling), chunking, tools, choice
        )
        conversation = Conversation(
            session_id=record.session_id,
            config=config,
            backend=service.backend,
            context_window=service.context_window,
            telemetry=service.telemetry,
            limits=service.turn_limits,
            tracing=service.tracing,
        )
        _restore_history(conversation, record)
        # numbering goes on after whatever the client saw last
        session = Session(self, conversation, record.token_hash, FrameLog(self.buffer_frames))
        session.log.last = session.log.delivered = max(last_seq, -1 if self.shared else record.seq)
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
        if not self.persistent or session.moved:
            return  # nothing to keep, or not ours to write any more
        self._dirty[session.id] = (session, detached)
        self._wake_writer.set()

    def publish_soon(self) -> None:
        self._wake_publisher.set()

    async def _writer(self) -> None:
        while True:
            if self._degraded_since is None:
                await self._wake_writer.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_writer.wait(), _RETRY_WRITES_S)
                self._save_all_soon()
            self._wake_writer.clear()
            await self._flush_writes()

    def _save_all_soon(self) -> None:
        """Queue every session: the store may have lost what it held. While it fails, the
        first write refused ends the writer's pass, so that is one try a second. (A method,
        not the writer's loop: a loop variable there would hold a session for good.)"""
        for session in list(self._sessions.values()):
            session.changed()

    async def _flush_writes(self) -> None:
        while self._dirty:
            session_id, (session, detached) = next(iter(self._dirty.items()))
            del self._dirty[session_id]
            if self._sessions.get(session_id) is not session:
                continue  # ended meanwhile
            if session.following is not None:
                continue  # the other replica writes the turn; this one saves when it ends
            try:
                await self.store.save(session.record(), detached=detached)
            except StoreError as exc:
                self._dirty.setdefault(session_id, (session, detached))  # a newer one stands
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
            if not await self._publish(session):
                return

    async def _publish(self, session: Session) -> bool:
        """Send on the frames `session` has numbered since the last batch; False: the store
        failed."""
        if not session.outbox:
            return True
        batch, session.outbox = session.outbox, []
        batch = [frame for frame in batch if frame[0] > 0]  # seq 0 holds the token
        try:
            await self.store.publish(session.id, session.epoch, batch)
        except StoreError as exc:
            self._failed(exc)
            return False
        return True

    async def _sweeper(self) -> None:
        ttl = self.settings.llm_session_ttl_s
        while True:
            await asyncio.sleep(min(_SWEEP_S, ttl))
            if self._expire(ttl):
                # a session and its reply refer to each other: only a collection frees them,
                # and after gc.freeze() the collector's own passes come rarely
                gc.collect()
                _clear_type_cache()
                _trim_heap()
            try:
                await self.store.sweep()
            except StoreError as exc:
                self._failed(exc)

    def _expire(self, ttl: float) -> int:
        """Forget the sessions detached for `ttl` or longer; how many there were.

        A function of its own, not the sweeper's loop: the sweeper's frame lives as long as
        the service, and a loop variable there would hold the last session it expired (its
        conversation, frames and reply) until a later sweep expired another; in memory
        that pymalloc hands out in arenas, those few objects keep whole arenas of the freed
        ones from going back to the system."""
        now = time.monotonic()
        expired = [
            session
            for session in self._sessions.values()
            if session.detached_at is not None
            and now - session.detached_at >= ttl
            and not session.generating
        ]
        for session in expired:
            self.forget(session)
        return len(expired)

    # -- replicas -----------------------------------------------------------------------------

    async def _replay(self, record: SessionRecord, last_seq: int) -> list[Frame] | None:
        """The frames after `last_seq` that the last holder published; None: some are gone."""
        try:
            frames = await self.store.frames_after(record.session_id, record.epoch, last_seq)
        except StoreError as exc:
            self._failed(exc)
            return None
        if frames and frames[0][0] != last_seq + 1:
            return None
        if not frames and record.seq > last_seq:
            return None
        return frames

    async def _announce(self, op: str, session_id: str) -> None:
        try:
            await self.store.announce(op, session_id, self.replica)
        except StoreError as exc:
            self._failed(exc)

    async def interrupt(self, session: Session) -> None:
        """Cancel the reply in flight, here or on the replica streaming it, and wait until
        its `cancelled` has gone out (a `user_message` with `interrupt` follows it)."""
        following = session.following
        if following is None:
            await session.reply.cancel()
            return
        await self.request_cancel(session)
        await asyncio.wait({following}, timeout=_CLOSE_LIMIT_S)

    async def request_cancel(self, session: Session) -> None:
        """`cancel` of a reply another replica streams: ask it; its `cancelled` follows."""
        await self._announce("cancel", session.id)

    async def _listener(self) -> None:
        """What other replicas say: a session taken over, a reply to cancel."""
        async for op, session_id, replica in self.store.announcements():
            if replica == self.replica:
                continue
            session = self._sessions.get(session_id)
            if session is None:
                continue
            if op == "taken":
                self._moved(session)
            elif op == "cancel" and session.reply.busy:
                self.spawn(self._cancel_moved(session))

    def _moved(self, session: Session) -> None:
        """Another replica resumed this session: close its socket here. A reply still
        streaming goes on here, followed there, and its turn is handed over when it ends."""
        session.moved = True
        session.stop_grace()
        socket = session.socket
        session.socket, session.live = None, False
        if socket is not None:
            socket.taken_over()
        if not session.generating:  # a reply it streams, or follows, still ends here
            self.forget(session)

    async def _cancel_moved(self, session: Session) -> None:
        """Cancel the reply here that another replica follows: its `cancelled` frame is the
        turn's last, so the turn is handed over after it."""
        session.cancelling = True
        try:
            await session.reply.cancel()
        finally:
            session.cancelling = False
        if session.moved:
            self.hand_over(session)

    def hand_over(self, session: Session) -> None:
        """A moved session's reply ended here: write its turn into the record that now
        belongs to the other replica (keeping its owner, epoch and numbering), then forget it."""
        self.forget(session)
        self.spawn(self._write_turn_for(session))

    async def _write_turn_for(self, session: Session) -> None:
        await self._publish(session)  # the replica following it must see the turn's end
        record = await self._load(session.id)
        if record is None:
            return
        mine = session.record()
        record.messages, record.turns = mine.messages, mine.turns
        record.tokens_generated, record.generating = mine.tokens_generated, False
        try:
            await self.store.save(record, detached=False)
        except StoreError as exc:
            self._failed(exc)

    async def _follow(self, session: Session, record: SessionRecord, after: int) -> None:
        """Relay, as this session's own frames, a reply another replica is streaming, until
        it ends; take the finished turn from the store before the turn's end is sent on, so
        the next turn starts from it."""
        idle = self.settings.llm_chunk_timeout_s + self.settings.llm_first_token_timeout_s
        tail = self.store.tail(session.id, record.epoch, after)
        ending: str | None = None
        try:
            while ending is None:
                try:
                    async with asyncio.timeout(idle):
                        seq, text = await anext(tail)
                except (TimeoutError, StopAsyncIteration, StoreError):
                    break
                if _turn_ended(text):
                    ending = text
                    break
                with contextlib.suppress(*_SOCKET_GONE):
                    await session.relay(text, seq)
        finally:
            await tail.aclose()  # type: ignore[attr-defined]
        fresh = record
        for _ in range(50):  # the other replica writes the finished turn as it hands over
            found = await self._load(session.id)
            if found is None or found.turns > record.turns:
                fresh = found or record
                break
            await asyncio.sleep(0.05)
        _restore_history(session.conversation, fresh)
        session.following = None
        if ending is not None:
            with contextlib.suppress(*_SOCKET_GONE):
                await session.relay(ending, -1)
        else:
            with contextlib.suppress(*_SOCKET_GONE):
                await session.send(protocol.error, _follow_lost())
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


def _message(entry: Entry) -> dict[str, Any]:
    message = {
        "role": entry.role,
        "content": entry.content,
        "tokens": entry.tokens,
        "status": entry.status,
    }
    if entry.response_id is not None:
        message["response_id"] = entry.response_id
    if entry.tool_calls:
        message["tool_calls"] = [[c.id, c.name, c.arguments] for c in entry.tool_calls]
    if entry.tool_call_id is not None:
        message["tool_call_id"] = entry.tool_call_id
        message["tool_name"] = entry.tool_name
    return message


def _restore_history(conversation: Conversation, record: SessionRecord) -> None:
    conversation.entries = [
        Entry(
            m["role"],
            m["content"],
            int(m["tokens"]),
            m["status"],
            m.get("response_id"),
            tuple(ToolCall(*call) for call in m.get("tool_calls") or ()),
            m.get("tool_call_id"),
            m.get("tool_name"),
        )
        for m in record.messages
    ]
    conversation.turns = record.turns
    conversation.tokens_generated = record.tokens_generated


def _clear_type_cache() -> None:
    """Empty CPython's attribute-lookup cache (refilled by the next lookups). Each of its
    4,096 entries holds the name it was looked up by, and names made at run time are new
    strings each time (datetime's `dst`, for the Date header of every WebSocket handshake):
    hundreds of them stay alive there, scattered through the memory that expired sessions
    used, each keeping an arena of it from going back to the system."""
    clear = getattr(sys, "_clear_internal_caches", None) or getattr(sys, "_clear_type_cache", None)
    if clear is not None:
        clear()


def _trim_heap() -> None:
    """Hand the memory freed by expired sessions back to the system where the C library
    can (glibc's malloc_trim); elsewhere the allocator keeps it for the next sessions."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def _follow_lost() -> UpstreamError:
    return UpstreamError(
        "the replica streaming this reply stopped answering; the reply is lost: "
        "resynchronise with get_history"
    )


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
