"""The engine probe behind `/health`: cached, shared between callers, and quick to give up.

A flood of health checks must not become a flood of engine requests, and a hung engine must not
hang the health check: `EngineHealth.current()` returns the cached result while it is fresh,
lets one probe run at a time for all callers, and reports the engine unreachable when that
probe takes longer than about a second.
"""

from __future__ import annotations

import asyncio
import time

from llm_service.backends.base import EngineStatus, LLMBackend
from llm_service.metrics import Telemetry

PROBE_DEADLINE_S = 1.0


class EngineHealth:
    """Cached, single-flight engine status."""

    def __init__(self, backend: LLMBackend, ttl_s: float, telemetry: Telemetry) -> None:
        self._backend = backend
        self._ttl = ttl_s
        self._telemetry = telemetry
        self._last: EngineStatus | None = None
        self._checked_at = float("-inf")
        self._inflight: asyncio.Task[EngineStatus] | None = None

    async def current(self) -> EngineStatus:
        if self._last is not None and time.monotonic() - self._checked_at < self._ttl:
            return self._last
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._probe())
        try:
            return await asyncio.wait_for(asyncio.shield(self._inflight), PROBE_DEADLINE_S)
        except TimeoutError:
            return EngineStatus(
                reachable=False, detail=f"engine did not answer within {PROBE_DEADLINE_S:g} s"
            )

    async def _probe(self) -> EngineStatus:
        status = await self._backend.status()
        self._last, self._checked_at = status, time.monotonic()
        self._telemetry.engine_up.set(1 if status.reachable else 0)
        return status

    async def aclose(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
            await asyncio.wait({self._inflight})
