"""`/ws/llm`: WebSocket frames in, conversation calls out, and the one place errors become frames.

A connection is checked before its handshake completes (origin, then key: a stranger gets an
HTTP answer and a closed socket), then admitted by the hub (`hub.py`). Each connection runs
its receive loop and at most one generation task inside one task group. The loop keeps
reading while a reply streams, so `cancel`, `end_session` and a disconnect are seen at once;
each of them cancels the generation task, which closes the upstream stream through `aclosing`
before the loop answers. Whatever goes wrong inside a frame's handling is answered with an
error frame on the same socket; nothing a client sends ends the connection except
`end_session`.

Three things end a connection from outside: idleness (no frame and no reply for
`LLM_SESSION_IDLE_TIMEOUT_S`), a client that stops reading while a reply streams (a send
blocked past `LLM_SEND_TIMEOUT_S`: the reply is cancelled and the socket closed with 1008),
and the service shutting down (`Hub.drain`). Both clocks are `timing.Deadline`s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from fastapi import APIRouter, WebSocket

from llm_service import protocol
from llm_service.conversation import new_response_id
from llm_service.errors import (
    GenerationInProgress,
    InternalError,
    InvalidConfig,
    InvalidMessage,
    ServiceError,
    ServiceShuttingDown,
    SessionIdleTimeout,
)
from llm_service.generation import GONE as _GONE
from llm_service.hub import Hub
from llm_service.metrics import Telemetry
from llm_service.protocol import (
    Cancel,
    EndSession,
    GetHistory,
    Resume,
    StartSession,
    ToolResult,
    Truncate,
    UserMessage,
)
from llm_service.registry import SessionRegistry, resume_gap
from llm_service.security import chosen_subprotocol
from llm_service.service import Service
from llm_service.timing import Deadline
from llm_service.tracing import Parent

log = structlog.get_logger("llm_service.ws")
router = APIRouter()

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008


@dataclass(frozen=True)
class Ending:
    """Why the service ends a connection, and how: an optional last frame, then a close."""

    code: int
    reason: str  # the service's own few words: a close frame holds at most 123 bytes of it
    error: ServiceError | None = None

    @classmethod
    def of(cls, error: ServiceError) -> Ending:
        return cls(error.close_code or CLOSE_NORMAL, error.code, error)


@router.websocket("/ws/llm")
async def llm_socket(websocket: WebSocket) -> None:
    service: Service = websocket.app.state.service
    hub: Hub = websocket.app.state.hub
    telemetry = service.telemetry
    client = websocket.client.host if websocket.client else "unknown"
    origin = websocket.headers.get("origin")
    if not service.access.origin_ok(origin):
        telemetry.connection_rejected("origin")
        log.warning("origin_refused", origin=origin[:200] if origin else None, client=client)
        await websocket.close(CLOSE_POLICY)  # before the handshake: uvicorn answers 403
        return
    subprotocols: list[str] = websocket.scope.get("subprotocols", [])
    refused = service.access.authenticate(
        client, "ws", websocket.headers, websocket.query_params, subprotocols
    )
    if refused is not None:
        telemetry.auth_failed("ws")
        telemetry.connection_rejected(refused.code)
        telemetry.error(refused.code)
        await websocket.send_denial_response(protocol.http_refusal(refused))
        return
    await websocket.accept(subprotocol=chosen_subprotocol(subprotocols))
    refusal = hub.admit(client)
    if refusal is not None:
        await _refuse(websocket, telemetry, refusal)
        return
    registry: SessionRegistry = websocket.app.state.sessions
    connection = Connection(websocket, service, registry)
    telemetry.connection_opened()
    try:
        with hub.attached(connection, client):
            await connection.run()
    finally:
        telemetry.connection_closed()


async def _refuse(websocket: WebSocket, telemetry: Telemetry, error: ServiceError) -> None:
    """Answer a connection that will get no session: one error frame, then its close."""
    telemetry.connection_rejected(error.code)
    telemetry.error(error.code)
    try:
        await websocket.send_text(protocol.error(None, error))
        await websocket.close(error.close_code or CLOSE_POLICY, error.code)
    except _GONE:
        pass


class Connection:
    """One client socket: the session it is attached to, its receive loop, how it ends."""

    def __init__(self, websocket: WebSocket, service: Service, registry: SessionRegistry):
        self.ws = websocket
        # the socket's own send: a frame goes out through no wrapper of this class
        self.send_text: Callable[[str], Awaitable[None]] = websocket.send_text
        self.settings = service.settings
        self.telemetry = service.telemetry
        self.default_config = service.default_config
        self.registry = registry
        self.session, self._token = registry.create()
        self.ending: Ending | None = None
        self._frames_read = 0
        self._draining: ServiceShuttingDown | None = None
        self._receiver: asyncio.Task[str] | None = None
        self._idle = Deadline(asyncio.get_running_loop(), self._idled)
        # the handshake's trace: every turn on this socket continues it, unless it names its own
        # (with tracing off, Tracing.turn drops it, as it drops a frame's)
        self._trace = Parent.from_headers(websocket.headers)

    async def run(self) -> None:
        self.telemetry.session_started()
        started = time.monotonic()
        session = self.session
        session.attach(self)
        session.go_live()
        reason = "disconnect"
        try:
            with structlog.contextvars.bound_contextvars(session_id=session.id):
                log.info("session_started", client=_client(self.ws))
            await self.registry.share(session)
            await session.send(protocol.session_started, session.id, self._token)
            del self._token  # sent once; only its hash is kept
            if self.ending is None:  # (a drain may have begun meanwhile)
                async with asyncio.TaskGroup() as group:
                    self._receiver = group.create_task(self.receive_loop())
                if not self._receiver.cancelled():  # (only `_end` cancels it, setting `ending`)
                    reason = self._receiver.result()
            if self.ending is not None:
                reason = self.ending.reason
                await self._close(self.ending)
        except _GONE:
            pass
        finally:
            self._idle.close()
            self.telemetry.session_ended()
            with structlog.contextvars.bound_contextvars(session_id=self.session.id):
                log.info(
                    "session_closed",
                    reason=reason,
                    turns=self.session.conversation.turns,
                    duration_s=round(time.monotonic() - started, 3),
                )

    async def receive_loop(self) -> str:
        idle_s = self.settings.llm_session_idle_timeout_s
        try:
            while True:
                if idle_s and not self.session.generating:
                    self._idle.start(idle_s)  # a reply streaming is not idleness
                message = await self.ws.receive()
                self._idle.stop()
                if message["type"] == "websocket.disconnect":
                    return "disconnect"
                self._frames_read += 1
                try:
                    text = message.get("text")
                    if text is None:
                        raise InvalidMessage("binary frames are not accepted; send JSON text")
                    frame = protocol.parse_client_frame(text, self.settings.llm_max_message_bytes)
                    with structlog.contextvars.bound_contextvars(session_id=self.session.id):
                        if await self.handle(frame):
                            return "end_session"
                except ServiceError as exc:
                    await self.send_error(exc)
                except _GONE:
                    return "disconnect"
                except Exception as exc:  # the boundary: a bug must not end the connection
                    log.exception("frame_handling_failed")
                    await self.send_error(InternalError(f"internal error: {type(exc).__name__}"))
        finally:
            await self.session.detach(self)

    async def handle(self, frame: protocol.ClientFrame) -> bool:
        """Answer one frame; True when the session is over."""
        session = self.session
        conv, reply, send = session.conversation, session.reply, session.send
        match frame:
            case UserMessage():
                await self._user_message(frame)
            case ToolResult(results=results):
                await reply.settle()
                self._refuse_if_busy()
                response_id = frame.response_id or new_response_id()
                try:
                    reply.start(
                        conv.answer_tools(
                            results, response_id, frame.tool_choice, frame.trace or self._trace
                        )
                    )
                except ServiceError as exc:
                    exc.response_id = response_id
                    raise
                session.changed()
            case Truncate(response_id=response_id, heard_chars=heard):
                kept = conv.truncate(response_id, heard)
                await send(protocol.truncated, response_id, kept)
                session.changed()
            case Cancel():
                if session.following is not None:  # streaming on another replica
                    await self.registry.request_cancel(session)
                else:
                    await reply.cancel()
            case StartSession():
                self._refuse_if_busy()
                changes = frame.changes()
                if changes.tools and not conv.backend.calls_tools:
                    raise InvalidConfig(
                        f"tools: the {conv.backend.name} engine does not call tools (the "
                        "embedded engine's packaged SmolLM2-135M was not trained to); use "
                        "LLM_BACKEND=ollama or openai with a model that does"
                    )
                config = self.default_config.updated(
                    changes.system_prompt,
                    changes.sampling,
                    conv.context_window,
                    changes.chunking,
                    changes.tools,
                    changes.tool_choice,
                )
                conv.reset(config)
                await send(protocol.session_configured, conv.session_id, config, frame.ignored)
                session.changed()
            case GetHistory():
                await send(protocol.history, conv.session_id, conv.messages())
            case EndSession():
                await self.registry.end(session)
                await send(protocol.session_ended, conv.session_id, conv.summary())
                await self.ws.close(CLOSE_NORMAL)
                return True
            case Resume():
                await self._resume(frame)
        return False

    async def _user_message(self, frame: UserMessage) -> None:
        """Start a turn; with `interrupt`, cancel the reply streaming first (its last frames
        and its `cancelled` go out before the new reply's)."""
        session = self.session
        response_id = frame.response_id or new_response_id()
        try:
            if frame.interrupt and session.generating:
                await self.registry.interrupt(session)
            self._refuse_if_busy()
            turn = session.conversation.start_turn(
                frame.text, response_id, frame.tool_choice, frame.trace or self._trace
            )
            session.reply.start(turn)
        except ServiceError as exc:
            exc.response_id = response_id  # the refusal names the reply it refused
            raise
        session.changed()

    def _refuse_if_busy(self) -> None:
        if self.session.generating:
            raise GenerationInProgress("a reply is still streaming; send cancel first")

    async def _resume(self, frame: Resume) -> None:
        """Attach the session `frame` names to this socket, and replay what its client
        missed with the frames' own numbers; then the frames go on live."""
        if self._frames_read > 1:
            raise InvalidMessage("resume must be the first frame on a new connection")
        target, frames = await self.registry.resume(
            frame.session_id, frame.resume_token, frame.last_seq
        )
        fresh, self.session = self.session, target
        self.registry.forget(fresh)
        target.attach(self)
        replay = frames or []
        # The replay covers (last_seq, last]; the frames after it come as they would live.
        # Not `target.log.last` after an empty replay: a reply followed from another replica
        # may have added frames to the log since the replay was read, and they come next.
        if frames is None:  # a gap: the numbering goes on from the last frame numbered
            last = target.log.last
        elif frames:
            last = frames[-1][0]
        else:
            last = frame.last_seq
        await self.ws.send_text(
            protocol.session_resumed(target.id, last, len(replay), target.generating)
        )
        batch = replay
        while True:  # the replay, then what came while it was being sent
            for seq, text in batch:
                await self.ws.send_text(text)
                target.log.delivered = last = seq
            more = target.log.after(last)
            if not more:
                break
            batch = more
        target.go_live()  # no await since the last check: nothing can slip in between
        # the frame's log context names the fresh session this socket started with
        log.info("session_resumed", session_id=target.id, replayed=len(replay), gap=frames is None)
        if frames is None:
            await self.send_error(resume_gap(frame.last_seq))

    # -- the session's socket (registry.Socket) ---------------------------------------------

    def reply_ended(self) -> None:
        idle_s = self.settings.llm_session_idle_timeout_s
        if idle_s:
            self._idle.start(idle_s)  # the receive loop is waiting: idleness starts now
        if self._draining is not None:
            self.end(self._draining)

    def not_reading(self) -> None:
        limit = self.settings.llm_send_timeout_s
        log.warning("client_not_reading", blocked_s=limit)
        self.telemetry.connection_rejected("send_timeout")
        self._end(Ending(CLOSE_POLICY, f"client not reading for {limit:g} s"))

    def failed_for_good(self, error: ServiceError) -> None:
        self._end(Ending(error.close_code or 1011, error.code))  # its frame is already sent

    def taken_over(self) -> None:
        self._end(Ending(CLOSE_NORMAL, "resumed"))

    # -- how it ends --------------------------------------------------------------------------

    def begin_drain(self, error: ServiceShuttingDown) -> None:
        """The service is shutting down: end now if idle, else once the reply in flight ends."""
        self._draining = error
        if not self.session.generating:
            self.end(error)

    def end(self, error: ServiceError) -> None:
        """End the connection from outside its receive loop, with `error`'s frame and close."""
        self._end(Ending.of(error))

    def _end(self, ending: Ending) -> None:
        if self.ending is None:
            self.ending = ending
        if self._receiver is not None:
            self._receiver.cancel()

    def _idled(self) -> None:
        idle_s = self.settings.llm_session_idle_timeout_s
        message = f"no activity for {idle_s:g} s; the socket is closed (LLM_SESSION_IDLE_TIMEOUT_S)"
        self.end(SessionIdleTimeout(message))

    async def _close(self, ending: Ending) -> None:
        # A client that stopped reading blocks every send, the close frame too: bound them.
        try:
            async with asyncio.timeout(self.settings.llm_send_timeout_s):
                if ending.error is not None:
                    self.telemetry.error(ending.error.code)
                    await self.session.send_last(self, protocol.error, ending.error)
                await self.ws.close(ending.code, ending.reason)
        except TimeoutError:
            log.warning("close_not_delivered", code=ending.code)

    async def send_error(self, exc: ServiceError) -> None:
        self.telemetry.error(exc.code)
        await self.session.send(protocol.error, exc)


def _client(ws: WebSocket) -> str:
    return f"{ws.client.host}:{ws.client.port}" if ws.client else "unknown"
