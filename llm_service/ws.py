"""`/ws/llm`: WebSocket frames in, conversation calls out, and the one place errors become frames.

Each connection runs its receive loop and at most one generation task inside one task group.
The loop keeps reading while a reply streams, so `cancel`, `end_session` and a disconnect are
seen at once; each of them cancels the generation task, which closes the upstream stream
through `aclosing` before the loop answers. Whatever goes wrong inside a frame's handling is
answered with an error frame on the same socket; nothing a client sends ends the connection
except `end_session`.

Two things end a connection from outside: a client that stops reading while a reply streams
(its sends block past `LLM_SEND_TIMEOUT_S`: the reply is cancelled and the socket closed with
1008), and the service shutting down (`drain`: replies in flight may finish, then the socket
closes with 1001 after a `service_shutting_down` frame).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from llm_service.conversation import Conversation, SessionConfig, Turn, new_session_id
from llm_service.errors import (
    ClientError,
    GenerationInProgress,
    InternalError,
    InvalidMessage,
    MaxConnections,
    MaxConnectionsPerClient,
    MessageTooLong,
    RateLimited,
    ServiceError,
    ServiceShuttingDown,
    SessionIdleTimeout,
)
from llm_service.protocol import (
    Cancel,
    ClientFrame,
    EndSession,
    GetHistory,
    StartSession,
    UserMessage,
    dumps,
    parse_client_frame,
    token_frame,
)
from llm_service.security import TurnRateLimiter, chosen_subprotocol

if TYPE_CHECKING:
    from llm_service.app import Service

log = structlog.get_logger("llm_service.ws")
router = APIRouter()

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN_LATER = 1013
_GONE = (WebSocketDisconnect, WebSocketDisconnected)
_UNWIND_LIMIT_S = 5.0


@dataclass(frozen=True)
class Ending:
    """Why the service ends a connection, and how: an optional last frame, then a close."""

    code: int
    reason: str
    error: ServiceError | None = None


@router.websocket("/ws/llm")
async def llm_socket(websocket: WebSocket) -> None:
    service: Service = websocket.app.state.service
    telemetry = service.telemetry
    client = websocket.client.host if websocket.client else "unknown"
    origin = websocket.headers.get("origin")
    if not service.access.origin_ok(origin):
        telemetry.connection_rejected("origin")
        log.warning("origin_refused", origin=origin[:200] if origin else None, client=client)
        await websocket.close(CLOSE_POLICY)  # before the handshake: uvicorn answers 403
        return
    subprotocols: list[str] = websocket.scope.get("subprotocols", [])
    # The key is checked before the handshake completes: a stranger gets an HTTP answer and
    # a closed socket, and nothing it sends afterwards is ever parsed.
    refused = service.access.authenticate(
        client, "ws", websocket.headers, websocket.query_params, subprotocols
    )
    if refused is not None:
        telemetry.auth_failed("ws")
        telemetry.connection_rejected(refused.code)
        telemetry.error(refused.code)
        await websocket.send_denial_response(http_refusal(refused))
        return
    await websocket.accept(subprotocol=chosen_subprotocol(subprotocols))
    refusal = service.refusal(client)
    if refusal is not None:
        await _refuse(websocket, service, *refusal)
        return
    telemetry.connection_opened()
    service.clients[client] += 1
    session_id = new_session_id()
    try:
        with structlog.contextvars.bound_contextvars(session_id=session_id):
            await Connection(websocket, service, session_id).run()
    finally:
        telemetry.connection_closed()
        service.clients[client] -= 1
        if not service.clients[client]:
            del service.clients[client]


def http_refusal(error: ClientError) -> JSONResponse:
    """The HTTP answer to a request refused before it is served (no key, throttled)."""
    status = 429 if isinstance(error, RateLimited) else 401
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if error.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_ms / 1000)))
    return JSONResponse({"error": error.to_wire()}, status_code=status, headers=headers)


async def _refuse(websocket: WebSocket, service: Service, error: ServiceError, code: int) -> None:
    """Answer a connection that will get no session: one error frame, then the close."""
    service.telemetry.connection_rejected(error.code)
    service.telemetry.error(error.code)
    try:
        await websocket.send_text(dumps({"type": "error", "error": error.to_wire()}))
        await websocket.close(code, error.code)
    except _GONE:
        pass


class Connections:
    """The live connections, with a way to wait until there are none."""

    def __init__(self) -> None:
        self._live: set[Connection] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, connection: Connection) -> None:
        self._live.add(connection)
        self._empty.clear()

    def discard(self, connection: Connection) -> None:
        self._live.discard(connection)
        if not self._live:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._live)

    def snapshot(self) -> list[Connection]:
        return list(self._live)

    async def wait_empty(self, limit: float) -> bool:
        """Wait up to `limit` seconds for the last connection to go; True if none is left."""
        try:
            await asyncio.wait_for(self._empty.wait(), limit)
        except TimeoutError:
            return False
        return True


def max_connections_error(limit: int) -> MaxConnections:
    return MaxConnections(f"the service is at its limit of {limit} connections; retry later")


def max_per_client_error(limit: int) -> MaxConnectionsPerClient:
    return MaxConnectionsPerClient(
        f"this client address already has {limit} connections open (the limit); close one"
    )


class Connection:
    """One client socket: its session, its receive loop and its generation task."""

    def __init__(self, websocket: WebSocket, service: Service, session_id: str) -> None:
        self.ws = websocket
        self.service = service
        self.telemetry = service.telemetry
        self.settings = service.settings
        self.conversation = Conversation(
            session_id=session_id,
            config=SessionConfig.from_settings(service.settings),
            backend=service.backend,
            context_window=service.context_window,
            telemetry=service.telemetry,
            max_history_turns=service.settings.llm_max_history_turns,
        )
        self.generation: asyncio.Task[None] | None = None
        self.turn: Turn | None = None
        self._unwinding = False  # the generation task is closing its stream
        self.ending: Ending | None = None
        self.draining = False
        self._receiver: asyncio.Task[str] | None = None
        self._send_started = 0.0  # loop time a token send began; 0 when none is pending
        self._watchdog: asyncio.TimerHandle | None = None
        self._rate = TurnRateLimiter(service.settings.llm_rate_limit_turns_per_minute)
        self._active_at = 0.0  # loop time of the last client frame or end of a reply

    async def run(self) -> None:
        self.telemetry.session_started()
        self.service.connections.add(self)
        started = time.monotonic()
        log.info("session_started", client=_client(self.ws))
        reason = "disconnect"
        try:
            await self.send({"type": "session_started", "session_id": self.conversation.session_id})
            if self.draining:
                self.end(self.service.shutdown_ending())
            else:
                async with asyncio.TaskGroup() as group:
                    self._receiver = group.create_task(self.receive_loop(group))
                reason = self._receiver.result() if not self._receiver.cancelled() else "ended"
            if self.ending is not None:
                reason = self.ending.reason
                await self._close(self.ending)
        except _GONE:
            pass
        finally:
            self.service.connections.discard(self)
            self.telemetry.session_ended()
            log.info(
                "session_closed",
                reason=reason,
                turns=self.conversation.turns,
                duration_s=round(time.monotonic() - started, 3),
            )

    async def receive_loop(self, group: asyncio.TaskGroup) -> str:
        max_bytes = self.settings.llm_max_message_bytes
        try:
            while True:
                message = await self._next_message()
                if message is None:
                    self.end(
                        Ending(
                            CLOSE_NORMAL,
                            "idle timeout",
                            SessionIdleTimeout(
                                f"no activity for {self.settings.llm_session_idle_timeout_s:g} s; "
                                "the session is closed (LLM_SESSION_IDLE_TIMEOUT_S)"
                            ),
                        )
                    )
                    return "idle"
                if message["type"] == "websocket.disconnect":
                    return "disconnect"
                text = message.get("text")
                try:
                    if text is None:
                        raise InvalidMessage("binary frames are not accepted; send JSON text")
                    frame = parse_client_frame(text, max_bytes)
                    if await self.handle(frame, group):
                        return "end_session"
                except ServiceError as exc:
                    await self.send_error(exc)
                except _GONE:
                    return "disconnect"
                except Exception as exc:  # the boundary: a bug must not end the connection
                    log.exception("frame_handling_failed")
                    await self.send_error(InternalError(f"internal error: {type(exc).__name__}"))
        finally:
            await self.stop_generation()

    async def _next_message(self) -> Message | None:
        """The next client message, or None once the session has been idle too long. A reply
        streaming counts as activity, so a long answer never makes a session idle."""
        idle = self.settings.llm_session_idle_timeout_s
        loop = asyncio.get_running_loop()
        self._active_at = loop.time()
        if not idle:
            return await self.ws.receive()
        while True:
            try:
                async with asyncio.timeout_at(self._active_at + idle):
                    return await self.ws.receive()
            except TimeoutError:
                if not self.busy and loop.time() >= self._active_at + idle:
                    return None
                if self.busy:
                    self._active_at = loop.time()

    async def handle(self, frame: ClientFrame, group: asyncio.TaskGroup) -> bool:
        """Answer one frame; True when the session is over."""
        conv = self.conversation
        if isinstance(frame, UserMessage):
            if self.busy:
                raise GenerationInProgress("a reply is still streaming; send cancel first")
            limit = self.settings.llm_max_user_message_chars
            if limit and len(frame.text) > limit:
                raise MessageTooLong(
                    f"the message has {len(frame.text)} characters; the limit is {limit}"
                )
            wait = self._rate.admit()
            if wait:
                per_minute = self.settings.llm_rate_limit_turns_per_minute
                raise RateLimited(
                    f"at most {per_minute} turns a minute on one connection; retry later",
                    retry_after_ms=max(1, round(wait * 1000)),
                )
            self.turn = conv.start_turn(frame.text)
            self._unwinding = False
            self.generation = group.create_task(self.generate(self.turn))
        elif isinstance(frame, Cancel):
            await self.cancel()
        elif isinstance(frame, StartSession):
            if self.busy:
                raise GenerationInProgress("a reply is still streaming; send cancel first")
            base = SessionConfig.from_settings(self.settings)
            conv.reset(base.updated(frame.config, conv.context_window))
            await self.send(
                {
                    "type": "session_configured",
                    "session_id": conv.session_id,
                    "config": conv.config.to_wire(),
                }
            )
        elif isinstance(frame, GetHistory):
            await self.send(
                {"type": "history", "session_id": conv.session_id, "messages": conv.history()}
            )
        elif isinstance(frame, EndSession):
            await self.stop_generation()
            await self.send(
                {"type": "session_ended", "session_id": conv.session_id, "stats": conv.summary()}
            )
            await self.ws.close(CLOSE_NORMAL)
            return True
        return False

    @property
    def busy(self) -> bool:
        return self.generation is not None and not self.generation.done()

    async def generate(self, turn: Turn) -> None:
        """Stream one reply to the client; errors end the turn, never the connection."""
        send = self.ws.send_text
        loop = asyncio.get_running_loop()
        clock = loop.time
        self._watchdog = loop.call_later(self.settings.llm_send_timeout_s, self._check_sends)
        try:
            async with aclosing(turn.stream()) as stream:
                try:
                    async for item in stream:
                        if isinstance(item, str):
                            self._send_started = clock()
                            await send(token_frame(item))
                            self._send_started = 0.0
                        else:
                            await self.send({"type": "response_complete", "stats": item.to_wire()})
                            log.info(
                                "turn_completed",
                                tokens=item.tokens_generated,
                                ms=round(item.processing_time_ms, 1),
                            )
                except BaseException:
                    self._unwinding = True  # the stream is closing: let that finish
                    raise
        except ServiceError as exc:
            log.warning(
                "turn_failed",
                code=exc.code,
                error=exc.message,
                cause=None if exc.__cause__ is None else repr(exc.__cause__),
                sent_tokens=len(turn.parts),
            )
            await self.send_error(exc)
        except _GONE:
            return
        except Exception as exc:  # the boundary: a bug ends the turn with a frame, not the socket
            log.exception("turn_crashed")
            await self.send_error(InternalError(f"internal error: {type(exc).__name__}"))
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._send_started = 0.0
            self._active_at = loop.time()
        if self.draining:
            self.end(self.service.shutdown_ending())

    def _check_sends(self) -> None:
        """Timer callback: end the connection if a send has been blocked for too long."""
        limit = self.settings.llm_send_timeout_s
        loop = asyncio.get_running_loop()
        blocked_since = self._send_started
        if blocked_since and loop.time() - blocked_since >= limit:
            log.warning("client_not_reading", blocked_s=round(loop.time() - blocked_since, 1))
            self.telemetry.connection_rejected("send_timeout")
            self.end(Ending(CLOSE_POLICY, f"client not reading for {limit:g} s"))
        else:
            self._watchdog = loop.call_at((blocked_since or loop.time()) + limit, self._check_sends)

    async def cancel(self) -> None:
        turn, task = self.turn, self.generation
        if task is None or task.done() or turn is None:
            await self.send({"type": "cancelled", "success": False})
            return
        started = time.perf_counter()
        sent_when_read = len(turn.parts)
        await self.stop_generation()
        self.telemetry.cancel_latency.observe(time.perf_counter() - started)
        log.info("turn_cancelled", sent_tokens=len(turn.parts))
        stats = turn.stats().to_wire()
        # The promise: at most one more token frame once the cancel is read. Frames already
        # on the wire when it was read are not counted: the client sees them after its cancel.
        stats["token_frames_after_cancel"] = len(turn.parts) - sent_when_read
        await self.send({"type": "cancelled", "success": True, "stats": stats})

    async def stop_generation(self) -> None:
        """Cancel the generation task, if any, and wait until its upstream stream is closed.

        A generation that is already unwinding (its send failed because the client went, or
        the engine failed) is closing its stream: it is waited for, not cancelled, so the
        close is never cut short. Only one stuck past `_UNWIND_LIMIT_S` is cancelled.
        """
        task = self.generation
        if task is None or task.done():
            return
        if self._unwinding:
            await asyncio.wait({task}, timeout=_UNWIND_LIMIT_S)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})

    def begin_drain(self) -> None:
        """The service is shutting down: end now if idle, else once the reply in flight ends."""
        self.draining = True
        if not self.busy:
            self.end(self.service.shutdown_ending())

    def end(self, ending: Ending) -> None:
        """End the connection from outside its receive loop (idempotent)."""
        if self.ending is None:
            self.ending = ending
        if self._receiver is not None:
            self._receiver.cancel()

    async def _close(self, ending: Ending) -> None:
        # A client that stopped reading blocks every send, the close frame too: bound them.
        limit = self.settings.llm_send_timeout_s
        try:
            async with asyncio.timeout(limit):
                if ending.error is not None:
                    await self.send_error(ending.error)
                await self.ws.close(ending.code, ending.reason[:120])
        except TimeoutError:
            log.warning("close_not_delivered", code=ending.code)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_text(dumps(frame))

    async def send_error(self, exc: ServiceError) -> None:
        self.telemetry.error(exc.code)
        await self.send({"type": "error", "error": exc.to_wire()})


def shutting_down_error(grace_s: float) -> ServiceShuttingDown:
    return ServiceShuttingDown(
        f"the service is shutting down; reconnect to continue (replies in flight had "
        f"{grace_s:g} s to finish)"
    )


def _client(ws: WebSocket) -> str:
    return f"{ws.client.host}:{ws.client.port}" if ws.client else "unknown"
