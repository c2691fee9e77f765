"""A session's reply in flight: `Generation`, one task streaming one turn.

The task reads the turn's stream (`Conversation`'s `Turn.stream()`, which closes the engine
request when it is closed), numbers each chunk as a token frame of its session, keeps it in
the session's frame log and sends it to the attached socket, then `response_complete`. With
no socket attached (a client gone within `LLM_RESUME_GRACE_S`) the frames go to the log only,
until the client is further behind than the log holds: then the reply stops. Each send to a
socket is watched by a `timing.Deadline` (`LLM_SEND_TIMEOUT_S`): a client that stops reading
is told so through its socket, which ends the connection. A failure ends the turn with an
error frame, never the session. `cancel` (and a disconnect with no grace, through `stop`)
cancels the task and waits until the engine request is closed; a task already closing its
stream is waited for, never cancelled halfway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import aclosing
from typing import Any, Protocol

import structlog
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from llm_service import protocol
from llm_service.conversation import Turn
from llm_service.errors import InternalError, ServiceError
from llm_service.metrics import Telemetry
from llm_service.sessions.framelog import FrameLog
from llm_service.sessions.store import Frame
from llm_service.timing import Deadline

log = structlog.get_logger("llm_service.ws")

GONE = (WebSocketDisconnect, WebSocketDisconnected)  # what a send to a closed socket raises
_UNWIND_LIMIT_S = 5.0


class Socket(Protocol):
    """What a session needs of the connection it is attached to."""

    @property
    def send_text(self) -> Callable[[str], Awaitable[None]]:
        """Send one text frame (the socket's own send, as directly as can be)."""

    def reply_ended(self) -> None:
        """The session's reply ended (the connection's idle clock starts, a drain goes on)."""

    def not_reading(self) -> None:
        """A send was blocked past LLM_SEND_TIMEOUT_S: the client has stopped reading."""

    def failed_for_good(self, error: ServiceError) -> None:
        """An error that no further turn on this socket can get past."""

    def taken_over(self) -> None:
        """The session was resumed on another socket: close this one (1000, "resumed")."""


class Streamed(Protocol):
    """What a reply needs of its session (registry.Session)."""

    log: FrameLog
    outbox: list[Frame]
    socket: Socket | None
    live: bool
    shared: bool

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...

    def publish_soon(self) -> None: ...

    async def send(self, build: Callable[..., str], *args: Any) -> int: ...

    def lost(self) -> None: ...

    def overflowing(self) -> bool: ...

    def reply_ended(self) -> None: ...


class Generation:
    """A session's reply in flight."""

    def __init__(self, session: Streamed, telemetry: Telemetry, send_timeout_s: float) -> None:
        self._session = session
        self._telemetry = telemetry
        self._send_timeout_s = send_timeout_s  # LLM_SEND_TIMEOUT_S
        self._sends = Deadline(asyncio.get_running_loop(), self._not_reading)
        self.task: asyncio.Task[None] | None = None
        self.turn: Turn | None = None
        self._unwinding = False  # the task is closing its stream

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    async def settle(self) -> None:
        """Let a reply whose turn has ended send its last frames: a `tool_result` may be read
        between the `tool_call` it answers and that reply's `response_complete`."""
        task, turn = self.task, self.turn
        if task is not None and not task.done() and turn is not None and turn.finished_at:
            await asyncio.wait({task}, timeout=_UNWIND_LIMIT_S)

    def start(self, turn: Turn) -> None:
        self.turn, self._unwinding = turn, False
        self.task = self._session.spawn(self._stream(turn))

    async def _stream(self, turn: Turn) -> None:
        """Stream one reply; errors end the turn, never the session."""
        session, sends, token = self._session, self._sends, protocol.token
        frames, shared = session.log, session.shared
        limit = self._send_timeout_s
        try:
            async with aclosing(turn.stream()) as stream:
                try:
                    async for item in stream:
                        if isinstance(item, str):
                            socket = session.socket
                            live = socket is not None and session.live
                            if not live and session.overflowing():
                                # the client would miss frames: stop (interrupted), the
                                # history ending with the last frame the log holds
                                log.info("resume_buffer_full", frames=frames.undelivered())
                                break
                            seq = frames.next()
                            text = token(seq, item)
                            frames.keep(seq, text)
                            if shared:
                                session.outbox.append((seq, text))
                                session.publish_soon()
                            if socket is not None and live:
                                sends.start(limit)
                                try:
                                    await socket.send_text(text)
                                except GONE:
                                    session.lost()
                                else:
                                    frames.delivered = seq
                                sends.stop()
                        else:
                            if turn.calls:
                                await self._send(protocol.tool_call, turn.response_id, turn.calls)
                            await self._send(protocol.response_complete, item, turn.response_id)
                            log.info("turn_completed", tokens=item.tokens_generated)
                except BaseException:
                    self._unwinding = True  # the stream is closing: let that finish
                    raise
        except ServiceError as exc:
            cause = None if exc.__cause__ is None else repr(exc.__cause__)
            log.warning("turn_failed", code=exc.code, error=exc.message, cause=cause)
            exc.response_id = turn.response_id
            await self.send_error(exc)
            socket = session.socket
            if not exc.recoverable and socket is not None:
                socket.failed_for_good(exc)  # no turn on this socket can succeed: end it
        except Exception as exc:  # the boundary: a bug ends the turn with a frame, not the socket
            log.exception("turn_crashed")
            crash = InternalError(f"internal error: {type(exc).__name__}")
            crash.response_id = turn.response_id
            await self.send_error(crash)
        finally:
            sends.stop()
            session.reply_ended()

    def _not_reading(self) -> None:
        socket = self._session.socket
        if socket is not None:
            socket.not_reading()

    async def _send(self, build: Callable[..., str], *args: object) -> None:
        try:
            await self._session.send(build, *args)
        except GONE:
            self._session.lost()

    async def cancel(self) -> None:
        """Answer `cancel`: stop the reply, then say so, with what was sent. With chunking,
        the piece held back for its clause to end is sent first (and stored)."""
        turn = self.turn
        if not self.busy or turn is None:
            await self._session.send(protocol.cancelled, None)
            return
        started = time.perf_counter()
        sent_when_read = len(turn.parts)
        turn.flush_on_stop = True
        await self.stop()
        self._telemetry.cancel_latency.observe(time.perf_counter() - started)
        log.info("turn_cancelled", sent_tokens=len(turn.parts))
        if turn.flushed:
            await self._session.send(protocol.token, turn.flushed)
        after = len(turn.parts) - sent_when_read  # frames sent after the cancel was read
        await self._session.send(protocol.cancelled, turn.stats(), after, turn.response_id)

    async def stop(self) -> None:
        """Cancel the task, if any, and wait until its upstream stream is closed.

        A task that is already unwinding (its send failed because the client went, or the
        engine failed) is closing its stream: it is waited for, not cancelled, so the close
        is never cut short. Only one stuck past `_UNWIND_LIMIT_S` is cancelled.
        """
        task = self.task
        if task is None or task.done():
            return
        if self._unwinding:
            await asyncio.wait({task}, timeout=_UNWIND_LIMIT_S)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})

    def close(self) -> None:
        self._sends.close()

    async def send_error(self, exc: ServiceError) -> None:
        self._telemetry.error(exc.code)
        await self._send(protocol.error, exc)
