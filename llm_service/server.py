"""Running the service: the main app and the monitoring app on two ports, in one event loop.

uvicorn serves both. Its own signal handling is replaced by the service's, because uvicorn's
closes every WebSocket with 1012 at once and then re-raises the signal. Here the first SIGTERM
or SIGINT starts a graceful shutdown (`ServiceRunner.shutdown`): the main port stops accepting,
replies in flight get `LLM_SHUTDOWN_GRACE_S` to finish, the rest are cancelled and their
sockets closed with 1001, and then both servers stop and the process exits 0. A second signal
stops at once. A `ServiceRunner` takes pre-bound sockets too, so tests run the real server on
ephemeral ports.

Start-up is in that order: both ports are bound (a taken port fails at once, naming
`LLM_PORT` or `LLM_MONITORING_PORT`), the app's lifespan builds the service (loading a model
can take seconds; a failure is the `StartupError` it raised, not a traceback), both servers
start, and only then is `service_ready` logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from collections.abc import Callable, Generator
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI

from llm_service.app import BackendFactory, create_app, create_monitoring_app
from llm_service.backends import open_backend
from llm_service.config import Settings
from llm_service.errors import StartupFailed
from llm_service.guards import guarded_protocols
from llm_service.hub import Hub
from llm_service.redact import protect_server_logs
from llm_service.service import Service

log = structlog.get_logger("llm_service.server")

# How far past LLM_MAX_MESSAGE_BYTES a frame may go and still be read (to be answered with a
# `message_too_large` error on a socket that stays open). A frame larger than that is refused
# from its header, before its payload is buffered: the socket closes with 1009. The bound
# holds after permessage-deflate decompression too.
FRAME_MARGIN_BYTES = 4096


class _Server(uvicorn.Server):
    """uvicorn's server without its signal capture, telling when it is up."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.up.set()


class ServiceRunner:
    """The two servers of one service instance, started and stopped together."""

    def __init__(self, settings: Settings, backend_factory: BackendFactory = open_backend) -> None:
        self.settings = settings
        self.app: FastAPI = create_app(settings, backend_factory)
        protect_server_logs()
        forwarded = settings.forwarded_allow_ips.strip()
        common: dict[str, Any] = {
            "log_config": None,
            "timeout_graceful_shutdown": 5,
            # X-Forwarded-For is believed only from the proxies named in FORWARDED_ALLOW_IPS
            "proxy_headers": bool(forwarded),
            "forwarded_allow_ips": forwarded or None,
            "server_header": False,
        }
        http, ws = self._protocols()
        self._main = _Server(
            uvicorn.Config(
                self.app,
                host=settings.llm_host,
                port=settings.llm_port,
                http=http,
                ws=ws,
                ws_per_message_deflate=settings.llm_ws_compression,
                ws_max_size=settings.llm_max_message_bytes + FRAME_MARGIN_BYTES,
                lifespan="off",  # entered by serve(), so that a failure is a plain exception
                **common,
            )
        )
        http, ws = self._protocols()
        self._monitoring = _Server(
            uvicorn.Config(
                create_monitoring_app(self.app),
                host=settings.llm_host,
                port=settings.llm_monitoring_port,
                http=http,
                ws="none",
                lifespan="off",
                **common,
            )
        )

    def _protocols(self) -> tuple[type[asyncio.Protocol], type[asyncio.Protocol]]:
        settings = self.settings
        return guarded_protocols(
            settings.llm_request_head_timeout_s,
            settings.llm_max_pending_connections,
            self._refused,
        )

    def _refused(self, reason: str) -> None:
        service = getattr(self.app.state, "service", None)
        if service is not None:
            service.telemetry.connection_rejected(reason)

    on_started: Callable[[], None] | None = None

    async def wait_started(self) -> None:
        """Return once both servers accept connections."""
        await self._main.up.wait()
        await self._monitoring.up.wait()

    def request_stop(self) -> None:
        self._main.should_exit = self._monitoring.should_exit = True

    async def shutdown(self) -> None:
        """Stop accepting, drain the connections, then stop both servers."""
        for server in getattr(self._main, "servers", []):
            server.close()
        hub: Hub | None = getattr(self.app.state, "hub", None)
        if hub is not None:
            await hub.drain(self.settings.llm_send_timeout_s + 1)
        self.request_stop()

    async def serve(self, sockets: tuple[socket.socket, socket.socket] | None = None) -> None:
        """Bind both ports (unless given sockets), build the service, then serve until
        `request_stop()`. A port that cannot be bound, or a service that cannot be built,
        raises its `StartupError` before anything is served."""
        settings = self.settings
        bound = sockets or (
            _bind(settings.llm_host, settings.llm_port, "LLM_PORT"),
            _bind(settings.llm_host, settings.llm_monitoring_port, "LLM_MONITORING_PORT"),
        )
        try:
            # The app's lifespan builds the service (and closes it after both servers stop).
            async with self.app.router.lifespan_context(self.app):
                await self._serve_both(*bound)
        finally:
            if sockets is None:
                for sock in bound:
                    sock.close()

    async def _serve_both(self, main: socket.socket, monitoring: socket.socket) -> None:
        async def serve_main() -> None:
            try:
                await self._main.serve(sockets=[main])
            finally:
                self._monitoring.should_exit = True

        async def when_started() -> None:
            await self.wait_started()
            service: Service = self.app.state.service
            log.info(
                "service_ready",
                backend=service.backend.name,
                model=service.backend.model,
                reason=service.choice.reason,
                device=service.choice.describe_device(),
                port=main.getsockname()[1],
                monitoring_port=monitoring.getsockname()[1],
            )
            if self.on_started is not None:
                self.on_started()

        async with asyncio.TaskGroup() as group:
            started = group.create_task(when_started())
            await asyncio.gather(serve_main(), self._monitoring.serve(sockets=[monitoring]))
            started.cancel()
        if not self._main.started:
            raise StartupFailed("the service failed to start; see the log above")


def _bind(host: str, port: int, variable: str) -> socket.socket:
    """A socket bound to `host:port`, or a `StartupFailed` that names the variable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupFailed(
            f"{variable}: cannot listen on {host}:{port}: {exc.strerror or exc} "
            f"(another process holds the port? set {variable} to a free one)"
        ) from exc
    return sock


async def serve(settings: Settings) -> None:
    """Run the service until SIGINT or SIGTERM, then shut down gracefully."""
    runner = ServiceRunner(settings)
    loop = asyncio.get_running_loop()
    # Once started, everything built so far lives as long as the process: keep it out of
    # the collector's full passes, which would otherwise rescan it with every session's
    # garbage (tens of milliseconds each with hundreds of sessions).
    runner.on_started = gc.freeze
    shutdown: asyncio.Task[None] | None = None

    def on_signal() -> None:
        nonlocal shutdown
        if shutdown is None:
            shutdown = asyncio.create_task(runner.shutdown())
        else:
            runner.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await runner.serve()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if shutdown is not None and not shutdown.done():
            shutdown.cancel()
            await asyncio.wait({shutdown})


def run(settings: Settings) -> None:
    """Run the service in a fresh event loop (uvloop where installed)."""
    try:
        import uvloop
    except ImportError:
        with asyncio.Runner() as runner:
            runner.run(serve(settings))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(settings))
