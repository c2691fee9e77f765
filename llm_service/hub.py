"""The edge's view of every connection: who may connect, who is connected, and the drain.

`Hub.admit(client)` is the connection policy: no new session while the service drains, at
most `LLM_MAX_CONNECTIONS` at once and `LLM_MAX_CONNECTIONS_PER_CLIENT` from one address. A
connection that is let in is held by `attached()` for its life. `drain()` is the graceful
shutdown: idle connections end at once, replies in flight may finish within the grace period,
and every connection still open after it is ended; each gets `service_shutting_down` and a
1001 close.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import structlog

from llm_service.errors import (
    MaxConnections,
    MaxConnectionsPerClient,
    ServiceError,
    ServiceShuttingDown,
)

log = structlog.get_logger("llm_service.hub")


class Attached(Protocol):
    """What the hub asks of a live connection."""

    def begin_drain(self, error: ServiceShuttingDown) -> None:
        """End now if idle, else once the reply in flight has ended."""

    def end(self, error: ServiceError) -> None:
        """End the connection with this error's frame and close code."""


class Hub:
    """Live connections, their per-address counts, and the connection policy."""

    def __init__(self, max_connections: int, max_per_client: int, shutdown_grace_s: float):
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.shutdown_grace_s = shutdown_grace_s
        self.draining = False
        self._live: set[Attached] = set()
        self._clients: Counter[str] = Counter()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._live)

    def admit(self, client: str) -> ServiceError | None:
        """Why a new connection from `client` cannot be served, or None."""
        if self.draining:
            return self.shutting_down()
        if len(self._live) >= self.max_connections:
            return MaxConnections(
                f"the service is at its limit of {self.max_connections} connections; retry later"
            )
        if self.max_per_client and self._clients[client] >= self.max_per_client:
            return MaxConnectionsPerClient(
                f"this client address already has {self.max_per_client} connections open "
                "(the limit); close one"
            )
        return None

    @contextmanager
    def attached(self, connection: Attached, client: str) -> Iterator[None]:
        """Count `connection` as live while the block runs."""
        self._live.add(connection)
        self._clients[client] += 1
        self._empty.clear()
        try:
            yield
        finally:
            self._live.discard(connection)
            self._clients[client] -= 1
            if not self._clients[client]:
                del self._clients[client]
            if not self._live:
                self._empty.set()

    def shutting_down(self) -> ServiceShuttingDown:
        return ServiceShuttingDown(
            "the service is shutting down; reconnect to continue (replies in flight had "
            f"{self.shutdown_grace_s:g} s to finish)"
        )

    async def drain(self, close_limit_s: float) -> None:
        """Let replies in flight finish for up to the grace period, then end every
        connection, and wait up to `close_limit_s` more for their closes."""
        self.draining = True
        log.info("drain_started", connections=len(self._live), grace_s=self.shutdown_grace_s)
        for connection in list(self._live):
            connection.begin_drain(self.shutting_down())
        if not await self._wait_empty(self.shutdown_grace_s):
            for connection in list(self._live):
                connection.end(self.shutting_down())
            await self._wait_empty(close_limit_s)
        log.info("drain_finished", connections_left=len(self._live))

    async def _wait_empty(self, limit: float) -> bool:
        try:
            await asyncio.wait_for(self._empty.wait(), limit)
        except TimeoutError:
            return False
        return True
