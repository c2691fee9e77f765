"""A connection's reply in flight: `Generation`, one task streaming one turn to the socket.

The task reads the turn's stream (`Conversation`'s `Turn.stream()`, which closes the engine
request when it is closed) and sends each chunk as a token frame, then `response_complete`.
Each token frame's send is watched by a `timing.Deadline` (`LLM_SEND_TIMEOUT_S`): a client
that stops reading trips `on_not_reading`, and the connection ends. A failure ends the turn
with an error frame, never the connection. `cancel` (and a disconnect, through `stop`)
cancels the task and waits until the engine request is closed; a task already closing its
stream is waited for, never cancelled halfway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import aclosing

import structlog
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from llm_service import protocol
from llm_service.conversation import Turn
from llm_service.errors import GenerationInProgress, InternalError, ServiceError
from llm_service.service import Service
from llm_service.timing import Deadline

log = structlog.get_logger("llm_service.ws")

GONE = (WebSocketDisconnect, WebSocketDisconnected)  # what a send to a closed socket raises
_UNWIND_LIMIT_S = 5.0


class Generation:
    """A connection's reply in flight; `on_ended` is called when a reply ends, however it
    ends, and `on_fatal` after an error that leaves the socket of no use."""

    def __init__(
        self,
        websocket: WebSocket,
        service: Service,
        on_ended: Callable[[], None],
        on_not_reading: Callable[[], None],
        on_fatal: Callable[[ServiceError], None],
    ) -> None:
        self._ws = websocket
        self._telemetry = service.telemetry
        self._send_timeout_s = service.settings.llm_send_timeout_s
        self._on_ended = on_ended
        self._on_fatal = on_fatal
        self._sends = Deadline(asyncio.get_running_loop(), on_not_reading)
        self.task: asyncio.Task[None] | None = None
        self.turn: Turn | None = None
        self._unwinding = False  # the task is closing its stream

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def refuse_if_busy(self) -> None:
        if self.busy:
            raise GenerationInProgress("a reply is still streaming; send cancel first")

    def start(self, group: asyncio.TaskGroup, turn: Turn) -> None:
        self.turn, self._unwinding = turn, False
        self.task = group.create_task(self._stream(turn))

    async def _stream(self, turn: Turn) -> None:
        """Stream one reply to the client; errors end the turn, never the connection."""
        send, sends, token = self._ws.send_text, self._sends, protocol.token
        limit = self._send_timeout_s
        try:
            async with aclosing(turn.stream()) as stream:
                try:
                    async for item in stream:
                        if isinstance(item, str):
                            sends.start(limit)
                            await send(token(item))
                            sends.stop()
                        else:
                            await send(protocol.response_complete(item))
                            log.info("turn_completed", tokens=item.tokens_generated)
                except BaseException:
                    self._unwinding = True  # the stream is closing: let that finish
                    raise
        except ServiceError as exc:
            cause = None if exc.__cause__ is None else repr(exc.__cause__)
            log.warning("turn_failed", code=exc.code, error=exc.message, cause=cause)
            await self.send_error(exc)
            if not exc.recoverable:
                self._on_fatal(exc)  # no turn on this socket can succeed: end it
        except GONE:
            return
        except Exception as exc:  # the boundary: a bug ends the turn with a frame, not the socket
            log.exception("turn_crashed")
            await self.send_error(InternalError(f"internal error: {type(exc).__name__}"))
        finally:
            sends.stop()
            self._on_ended()

    async def cancel(self) -> None:
        """Answer `cancel`: stop the reply, then say so, with what was sent."""
        turn = self.turn
        if not self.busy or turn is None:
            await self._ws.send_text(protocol.cancelled(None))
            return
        started = time.perf_counter()
        sent_when_read = len(turn.parts)
        await self.stop()
        self._telemetry.cancel_latency.observe(time.perf_counter() - started)
        log.info("turn_cancelled", sent_tokens=len(turn.parts))
        after = len(turn.parts) - sent_when_read  # frames sent after the cancel was read
        await self._ws.send_text(protocol.cancelled(turn.stats(), after))

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
        await self._ws.send_text(protocol.error(exc))
