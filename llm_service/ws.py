"""`/ws/llm`: WebSocket frames in, conversation calls out, and the one place errors become frames.

Each connection runs its receive loop and at most one generation task inside one task group.
The loop keeps reading while a reply streams, so `cancel`, `end_session` and a disconnect are
seen at once; each of them cancels the generation task, which closes the upstream stream
through `aclosing` before the loop answers. Whatever goes wrong inside a frame's handling is
answered with an error frame on the same socket; nothing a client sends ends the connection
except `end_session`.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from llm_service.conversation import Conversation, SessionConfig, Turn, new_session_id
from llm_service.errors import (
    GenerationInProgress,
    InternalError,
    InvalidMessage,
    MaxConnections,
    ServiceError,
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

if TYPE_CHECKING:
    from llm_service.app import Service

log = structlog.get_logger("llm_service.ws")
router = APIRouter()

CLOSE_NORMAL = 1000
CLOSE_TRY_AGAIN_LATER = 1013
_GONE = (WebSocketDisconnect, WebSocketDisconnected)


@router.websocket("/ws/llm")
async def llm_socket(websocket: WebSocket) -> None:
    service: Service = websocket.app.state.service
    await websocket.accept()
    telemetry = service.telemetry
    if telemetry.totals.active_connections >= service.settings.llm_max_connections:
        telemetry.connection_rejected("max_connections")
        telemetry.error(MaxConnections.code)
        limit = service.settings.llm_max_connections
        error = MaxConnections(f"the service is at its limit of {limit} connections; retry later")
        try:
            await websocket.send_text(dumps({"type": "error", "error": error.to_wire()}))
            await websocket.close(CLOSE_TRY_AGAIN_LATER, "max connections")
        except _GONE:
            pass
        return
    telemetry.connection_opened()
    session_id = new_session_id()
    try:
        with structlog.contextvars.bound_contextvars(session_id=session_id):
            await Connection(websocket, service, session_id).run()
    finally:
        telemetry.connection_closed()


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
            context_window=service.settings.default_context_window,
            telemetry=service.telemetry,
        )
        self.generation: asyncio.Task[None] | None = None
        self.turn: Turn | None = None

    async def run(self) -> None:
        self.telemetry.session_started()
        started = time.monotonic()
        log.info("session_started", client=_client(self.ws))
        reason = "disconnect"
        try:
            await self.send({"type": "session_started", "session_id": self.conversation.session_id})
            async with asyncio.TaskGroup() as group:
                try:
                    reason = await self.receive_loop(group)
                finally:
                    await self.stop_generation()
        except _GONE:
            pass
        finally:
            self.telemetry.session_ended()
            log.info(
                "session_closed",
                reason=reason,
                turns=self.conversation.turns,
                duration_s=round(time.monotonic() - started, 3),
            )

    async def receive_loop(self, group: asyncio.TaskGroup) -> str:
        max_bytes = self.settings.llm_max_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return "disconnect"
            text = message.get("text")
            try:
                if text is None:
                    raise InvalidMessage("binary frames are not accepted; send JSON text frames")
                frame = parse_client_frame(text, max_bytes)
                if await self.handle(frame, group):
                    return "end_session"
            except ServiceError as exc:
                await self.send_error(exc)
            except _GONE:
                raise
            except Exception as exc:  # the boundary: a bug must not end the connection
                log.exception("frame_handling_failed")
                await self.send_error(InternalError(f"internal error: {type(exc).__name__}"))

    async def handle(self, frame: ClientFrame, group: asyncio.TaskGroup) -> bool:
        """Answer one frame; True when the session is over."""
        conv = self.conversation
        if isinstance(frame, UserMessage):
            if self.busy:
                raise GenerationInProgress("a reply is still streaming; send cancel first")
            self.turn = conv.start_turn(frame.text)
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
        try:
            async with aclosing(turn.stream()) as stream:
                async for item in stream:
                    if isinstance(item, str):
                        await send(token_frame(item))
                    else:
                        await self.send({"type": "response_complete", "stats": item.to_wire()})
                        log.info(
                            "turn_completed",
                            tokens=item.tokens_generated,
                            ms=round(item.processing_time_ms, 1),
                        )
        except ServiceError as exc:
            log.warning(
                "turn_failed", code=exc.code, error=exc.message, sent_tokens=len(turn.parts)
            )
            await self.send_error(exc)
        except _GONE:
            return
        except Exception as exc:  # the boundary: a bug ends the turn with a frame, not the socket
            log.exception("turn_crashed")
            await self.send_error(InternalError(f"internal error: {type(exc).__name__}"))

    async def cancel(self) -> None:
        turn, task = self.turn, self.generation
        if task is None or task.done() or turn is None:
            await self.send({"type": "cancelled", "success": False})
            return
        started = time.perf_counter()
        await self.stop_generation()
        self.telemetry.cancel_latency.observe(time.perf_counter() - started)
        log.info("turn_cancelled", sent_tokens=len(turn.parts))
        await self.send({"type": "cancelled", "success": True, "stats": turn.stats().to_wire()})

    async def stop_generation(self) -> None:
        """Cancel the generation task, if any, and wait until its upstream stream is closed."""
        task = self.generation
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_text(dumps(frame))

    async def send_error(self, exc: ServiceError) -> None:
        self.telemetry.error(exc.code)
        await self.send({"type": "error", "error": exc.to_wire()})


def _client(ws: WebSocket) -> str:
    return f"{ws.client.host}:{ws.client.port}" if ws.client else "unknown"
