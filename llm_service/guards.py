"""uvicorn's HTTP and WebSocket protocols with the bounds a public port needs.

uvicorn holds a connection that never finishes its request head for as long as the peer
likes (it arms its keep-alive timer only after a response), and its WebSocket protocol
answers every ping at once, however much is already waiting to be sent. Both let a peer
that sends little hold memory or file descriptors without end. `guarded_protocols` returns
subclasses that close both gaps:

- a request head (request line and headers) must be complete within `head_timeout_s` of the
  connection opening, or of the previous response on a kept-alive connection; otherwise the
  connection is closed;
- at most `max_pending` connections may be waiting for their head at once; a new one beyond
  that closes the one that has waited longest, so a flood of half-sent requests can neither
  use up the process's file descriptors nor lock out a client that sends its head at once;
- while a WebSocket's outgoing buffer is over its high-water mark (the peer is not reading),
  pings are not answered: a peer that floods pings and never reads gets nothing queued.

Each refusal is reported through `on_refused(reason)` (a metric in the app).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

Refused = Callable[[str], None]


def guarded_protocols(
    head_timeout_s: float, max_pending: int, on_refused: Refused
) -> tuple[type[HttpToolsProtocol], type[WebSocketsSansIOProtocol]]:
    """The HTTP and WebSocket protocol classes for one server, sharing one pending count."""
    pending: dict[GuardedHttp, None] = {}  # oldest first

    class GuardedHttp(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            while len(pending) >= max_pending:
                oldest = next(iter(pending))
                oldest._head_done()
                on_refused("pending_evicted")
                oldest.transport.abort()
            self._await_head()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_head()  # the next request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._head_done()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_done()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                pending[self] = None
                self._head_timer = self.loop.call_later(head_timeout_s, self._head_late)

        def _head_done(self) -> None:
            pending.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            pending.pop(self, None)
            on_refused("head_timeout")
            self.transport.close()

    class GuardedWebSocket(WebSocketsSansIOProtocol):
        def handle_ping(self) -> None:
            if self.writable.is_set():
                super().handle_ping()
            else:
                self.conn.data_to_send()  # the peer is not reading: drop the pong

    return GuardedHttp, GuardedWebSocket
