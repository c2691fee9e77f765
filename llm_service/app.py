"""The composition root: `create_app(settings)` builds the service in its lifespan.

Nothing exists before the lifespan starts: the backend, the telemetry, the health probe are
made there, entered on one `AsyncExitStack` and closed in reverse when the app stops. The
main app serves `/ws/llm`, `/health`, `/stats` and the chat page (`/`, `/chat`);
`create_monitoring_app` serves `/metrics` and a liveness `/health` on the monitoring port,
reading the same `Service`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llm_service import __version__
from llm_service.backends import BackendChoice, open_backend
from llm_service.backends.base import LLMBackend
from llm_service.backends.llamacpp import ModelFileError
from llm_service.backends.resilient import ResilientBackend, RetryPolicy
from llm_service.breaker import CircuitBreaker
from llm_service.config import Settings
from llm_service.device import DeviceUnavailableError
from llm_service.errors import ServiceError
from llm_service.health import EngineHealth
from llm_service.metrics import CIRCUIT_STATES, Telemetry
from llm_service.security import Access, AuthThrottle
from llm_service.web import router as web_router
from llm_service.ws import (
    CLOSE_GOING_AWAY,
    CLOSE_TRY_AGAIN_LATER,
    Connections,
    Ending,
    http_refusal,
    max_connections_error,
    max_per_client_error,
    shutting_down_error,
)
from llm_service.ws import router as ws_router

log = structlog.get_logger("llm_service.app")


@dataclass
class Service:
    """Everything a request handler needs, built once per app."""

    settings: Settings
    backend: LLMBackend
    choice: BackendChoice
    breaker: CircuitBreaker
    telemetry: Telemetry
    health: EngineHealth
    started_at: float = field(default_factory=time.monotonic)
    connections: Connections = field(default_factory=Connections)
    clients: Counter[str] = field(default_factory=Counter)
    draining: bool = False
    access: Access = field(init=False)

    def __post_init__(self) -> None:
        settings = self.settings
        throttle = AuthThrottle(settings.llm_auth_failures_per_minute)
        self.access = Access(settings.api_keys(), settings.allowed_origins(), throttle)

    @property
    def context_window(self) -> int:
        """The context a conversation may fill: the setting, capped by what the engine holds."""
        limit = self.backend.context_limit
        window = self.settings.default_context_window
        return window if limit is None else min(window, limit)

    def refusal(self, client: str) -> tuple[ServiceError, int] | None:
        """Why a new connection from `client` cannot be served, with its close code."""
        settings = self.settings
        if self.draining:
            return shutting_down_error(settings.llm_shutdown_grace_s), CLOSE_GOING_AWAY
        if self.telemetry.totals.active_connections >= settings.llm_max_connections:
            return max_connections_error(settings.llm_max_connections), CLOSE_TRY_AGAIN_LATER
        per_client = settings.llm_max_connections_per_client
        if per_client and self.clients[client] >= per_client:
            return max_per_client_error(per_client), CLOSE_TRY_AGAIN_LATER
        return None

    def shutdown_ending(self) -> Ending:
        error = shutting_down_error(self.settings.llm_shutdown_grace_s)
        return Ending(CLOSE_GOING_AWAY, "service shutting down", error)

    async def drain(self, grace_s: float) -> None:
        """Let replies in flight finish for up to `grace_s`, then end every connection."""
        self.draining = True
        log.info("drain_started", connections=len(self.connections), grace_s=grace_s)
        for connection in self.connections.snapshot():
            connection.begin_drain()
        if not await self.connections.wait_empty(grace_s):
            for connection in self.connections.snapshot():
                connection.end(self.shutdown_ending())
            await self.connections.wait_empty(self.settings.llm_send_timeout_s + 1)
        log.info("drain_finished", connections_left=len(self.connections))

    async def health_report(self) -> tuple[int, dict[str, Any]]:
        """`/health`'s status code and body."""
        engine = await self.health.current()
        if not engine.reachable:
            status = "unhealthy"
        elif engine.model_available is False or self.breaker.state == "open":
            status = "degraded"
        else:
            status = "healthy"
        totals = self.telemetry.totals
        body: dict[str, Any] = {
            "status": status,
            "model": self.backend.model,
            "ollama_connection": engine.reachable if self.backend.name == "ollama" else None,
            "active_connections": totals.active_connections,
            "active_sessions": totals.active_sessions,
            "backend": self.backend.name,
            "backend_reason": self.choice.reason,
            "device": self.choice.describe_device(),
            "context_window": self.context_window,
            "circuit_breaker": self.breaker.snapshot(),
            "engine": {
                "reachable": engine.reachable,
                "detail": engine.detail,
                "version": engine.version,
                "model_available": engine.model_available,
            },
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        }
        return (200 if status == "healthy" else 503), body


BackendFactory = Callable[[Settings], Awaitable[BackendChoice]]


def create_app(settings: Settings, backend_factory: BackendFactory = open_backend) -> FastAPI:
    """The main app: `/ws/llm`, `/health`, `/stats` and the chat page at `/`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            telemetry = Telemetry()
            try:
                choice = await backend_factory(settings)
            except (ModelFileError, DeviceUnavailableError) as exc:
                log.error("engine_unavailable", error=str(exc))
                raise
            engine = choice.backend
            stack.push_async_callback(engine.aclose)
            breaker = CircuitBreaker(
                settings.circuit_breaker_failure_threshold,
                settings.circuit_breaker_recovery_timeout,
            )
            telemetry.circuit_state.set_function(lambda: CIRCUIT_STATES[breaker.state])
            retry = RetryPolicy(
                attempts=settings.llm_retry_attempts,
                backoff_s=settings.llm_retry_backoff_s,
                max_backoff_s=settings.llm_retry_max_backoff_s,
                deadline_s=settings.llm_retry_deadline_s,
            )
            backend = ResilientBackend(engine, breaker, retry, telemetry)
            health = EngineHealth(engine, settings.health_cache_ttl_s, telemetry)
            stack.push_async_callback(health.aclose)
            app.state.service = Service(settings, backend, choice, breaker, telemetry, health)
            if app.state.service.access.open:
                log.warning(
                    "access_open",
                    detail="LLM_API_KEY is not set: anyone who can reach "
                    "this port can use the service",
                )
            log.info(
                "service_ready",
                backend=backend.name,
                model=backend.model,
                reason=choice.reason,
                device=choice.describe_device(),
            )
            yield
            log.info("service_stopping")

    docs = settings.llm_api_docs  # off unless asked for: the Swagger page loads from a CDN
    app = FastAPI(
        title="FastTalk LLM service",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.include_router(ws_router)
    app.include_router(web_router)

    @app.get("/health")
    async def health(request: Request) -> Response:
        code, body = await _service(request).health_report()
        return JSONResponse(body, status_code=code)

    @app.get("/stats")
    async def stats(request: Request) -> Response:
        service = _service(request)
        client = request.client.host if request.client else "unknown"
        refused = service.access.authenticate(
            client, "stats", request.headers, request.query_params
        )
        if refused is not None:
            service.telemetry.auth_failed("stats")
            return http_refusal(refused)
        body = service.telemetry.stats()
        body["service"] = {
            "backend": service.backend.name,
            "model": service.backend.model,
            "uptime_s": round(time.monotonic() - service.started_at, 1),
        }
        return JSONResponse(body)

    return app


def create_monitoring_app(main_app: FastAPI) -> FastAPI:
    """The monitoring app: `/metrics` and a liveness `/health`, over `main_app`'s service."""
    app = FastAPI(
        title="FastTalk LLM service monitoring",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    def service() -> Service:
        found: Service = main_app.state.service
        return found

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            generate_latest(service().telemetry.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        _, body = await service().health_report()
        return body

    return app


def _service(request: Request) -> Service:
    found: Service = request.app.state.service
    return found
