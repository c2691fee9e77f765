"""The composition root: `create_app(settings)` builds the service in its lifespan.

Nothing exists before the lifespan starts: the backend, the telemetry, the health probe are
made there, entered on one `AsyncExitStack` and closed in reverse when the app stops. They are
kept in a `Service` (`app.state.service`), beside the edge's connection `Hub`
(`app.state.hub`). The main app serves `/ws/llm`, `/health`, `/stats` and the chat page (`/`,
`/chat`); `create_monitoring_app` serves `/metrics` and a liveness `/health` on the monitoring
port, reading the same `Service`. A failure to start (no model file, a device that is not
there) is a `StartupError` and goes up as it is: the command line says it in one line.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llm_service import __version__, protocol
from llm_service.backends import BackendChoice, open_backend
from llm_service.backends.base import EngineStatus
from llm_service.backends.pool import EnginePool, RetryPolicy, Upstream
from llm_service.breaker import CircuitBreaker
from llm_service.config import Settings
from llm_service.conversation import SessionConfig, TurnLimits
from llm_service.health import EngineHealth
from llm_service.hub import Hub
from llm_service.metrics import Telemetry
from llm_service.registry import SessionRegistry
from llm_service.security import Access, AuthThrottle
from llm_service.service import Service
from llm_service.sessions import open_store
from llm_service.tracing import open_tracing
from llm_service.web import router as web_router
from llm_service.ws import router as ws_router

log = structlog.get_logger("llm_service.app")

BackendFactory = Callable[[Settings], Awaitable[BackendChoice]]


async def build_service(
    settings: Settings, stack: AsyncExitStack, backend_factory: BackendFactory
) -> Service:
    """Make every part of the service, each closed by `stack` in reverse."""
    telemetry = Telemetry()
    telemetry.connections_max.set(settings.llm_max_connections)
    tracing = open_tracing(settings.tracing())
    stack.push_async_callback(tracing.aclose)  # last: the spans of the final turns go out
    choice = await backend_factory(settings)
    upstreams = [
        Upstream(
            engine,
            engine.label,
            CircuitBreaker(
                settings.circuit_breaker_failure_threshold,
                settings.circuit_breaker_recovery_timeout,
            ),
        )
        for engine in choice.engines
    ]
    retry = RetryPolicy(
        attempts=settings.llm_retry_attempts,
        backoff_s=settings.llm_retry_backoff_s,
        max_backoff_s=settings.llm_retry_max_backoff_s,
        deadline_s=settings.llm_retry_deadline_s,
    )
    pool = EnginePool(
        upstreams,
        retry,
        telemetry,
        max_inflight=settings.llm_upstream_max_inflight,
        probe_interval_s=settings.llm_upstream_probe_interval_s,
        session_idle_s=settings.llm_session_ttl_s,
    )
    stack.push_async_callback(pool.aclose)
    telemetry.upstreams_known(u.label for u in upstreams)
    health = EngineHealth(pool, settings.health_cache_ttl_s, telemetry)
    stack.push_async_callback(health.aclose)
    await _warn_unless_ready(health, settings)
    pool.start()
    limit = pool.context_limit
    window = settings.default_context_window
    return Service(
        settings=settings,
        backend=pool,
        choice=choice,
        telemetry=telemetry,
        health=health,
        access=Access(
            settings.api_keys(),
            settings.allowed_origins(),
            AuthThrottle(settings.llm_auth_failures_per_minute),
        ),
        default_config=SessionConfig(
            settings.default_system_prompt, settings.default_sampling(pool.sampling_defaults)
        ),
        turn_limits=TurnLimits(
            max_chars=settings.llm_max_user_message_chars,
            per_minute=settings.llm_rate_limit_turns_per_minute,
            max_history_turns=settings.llm_max_history_turns,
        ),
        context_window=window if limit is None else min(window, limit),
        tracing=tracing,
    )


async def _warn_unless_ready(health: EngineHealth, settings: Settings) -> None:
    """Say at start-up, loudly, when the engine will fail every turn, what that means and what
    to do. (The service starts all the same and recovers by itself once the engine answers.)"""
    status = await health.current()
    if not status.reachable:
        log.warning(
            "engine_unreachable",
            backend=settings.llm_backend,
            detail=status.detail,
            effect="every turn fails with upstream_unavailable until the engine answers",
            fix="start the engine (ollama serve) or correct OLLAMA_BASE_URL; or set "
            "LLM_BACKEND=auto to serve with the embedded engine when Ollama is not there",
        )
    elif status.model_available is False:
        log.warning(
            "model_missing",
            model=settings.llm_model,
            effect="every turn fails with model_not_found until the engine has the model",
            fix="python main.py test --pull (or: ollama pull <model>), or change LLM_MODEL",
        )


def create_app(settings: Settings, backend_factory: BackendFactory = open_backend) -> FastAPI:
    """The main app: `/ws/llm`, `/health`, `/stats` and the chat page at `/`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            service = await build_service(settings, stack, backend_factory)
            app.state.service = service
            app.state.hub = Hub(
                settings.llm_max_connections,
                settings.llm_max_connections_per_client,
                settings.llm_shutdown_grace_s,
            )
            store = await open_store(settings)
            stack.push_async_callback(store.aclose)
            sessions = SessionRegistry(service, store)
            await sessions.start()
            stack.push_async_callback(sessions.aclose)  # before the store closes
            app.state.sessions = sessions
            if service.access.open:
                log.warning(
                    "access_open",
                    detail="LLM_API_KEY is not set: anyone who can reach "
                    "this port can use the service",
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
        code, body = await health_report(_service(request), request.app.state.sessions)
        return JSONResponse(body, status_code=code)

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return LIVE

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        return await readiness(_service(request), request.app.state.hub)

    @app.get("/stats")
    async def stats(request: Request) -> Response:
        service = _service(request)
        client = request.client.host if request.client else "unknown"
        refused = service.access.authenticate(
            client, "stats", request.headers, request.query_params
        )
        if refused is not None:
            service.telemetry.auth_failed("stats")
            return protocol.http_refusal(refused)
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
        _, body = await health_report(service(), getattr(main_app.state, "sessions", None))
        return body

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return LIVE

    @app.get("/readyz")
    async def readyz() -> Response:
        return await readiness(service(), main_app.state.hub)

    return app


LIVE = {"status": "alive"}


async def readiness(service: Service, hub: Hub) -> Response:
    """`/readyz`: 200 while a new session here would be served, else 503 with the reasons.

    Not ready while the service drains, while the engine does not answer or lacks the model,
    and while every upstream's circuit is open. A failing session store is not a reason: the
    sessions go on from memory (`/health` says so). `/livez` is 200 whenever the process
    answers at all: restarting the service helps none of the reasons here.
    """
    reasons = ["draining: the service is shutting down"] if hub.draining else []
    reasons += _engine_problems(service, await service.health.current())
    if reasons:
        return JSONResponse({"status": "not_ready", "reasons": reasons}, status_code=503)
    return JSONResponse({"status": "ready"})


def _engine_problems(service: Service, engine: EngineStatus) -> list[str]:
    """Why no turn would succeed now, as `/readyz` says it: `/health` is unhealthy for the
    first (no answer), degraded for the others."""
    problems = []
    if not engine.reachable:
        problems.append(f"engine unreachable: {engine.detail}")
    elif engine.model_available is False:
        problems.append(f"model {service.backend.model!r} is not on the engine")
    if service.backend.all_open():
        problems.append("every upstream's circuit breaker is open")
    return problems


async def health_report(
    service: Service, sessions: SessionRegistry | None = None
) -> tuple[int, dict[str, Any]]:
    """`/health`'s status code and body."""
    engine = await service.health.current()
    if not engine.reachable:
        status = "unhealthy"
    elif _engine_problems(service, engine):
        status = "degraded"
    else:
        status = "healthy"
    totals = service.telemetry.totals
    backend = service.backend
    body: dict[str, Any] = {
        "status": status,
        "model": backend.model,
        "ollama_connection": engine.reachable if backend.name == "ollama" else None,
        "active_connections": totals.active_connections,
        "active_sessions": totals.active_sessions,
        "backend": backend.name,
        "backend_reason": service.choice.reason,
        "device": service.choice.describe_device(),
        "context_window": service.context_window,
        "circuit_breaker": service.backend.breaker_snapshot(),
        "upstreams": service.backend.snapshot(),
        "engine": {
            "reachable": engine.reachable,
            "detail": engine.detail,
            "version": engine.version,
            "model_available": engine.model_available,
        },
        "version": __version__,
        "uptime_s": round(time.monotonic() - service.started_at, 1),
    }
    if sessions is not None:
        # a store that fails is said here, not in `status`: sessions go on from memory, and a
        # load balancer must not pull every replica because Redis is down
        body["session_store"] = sessions.status()
    return (200 if status == "healthy" else 503), body


def _service(request: Request) -> Service:
    found: Service = request.app.state.service
    return found
