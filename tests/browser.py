"""Helpers for the browser tests: Debian's Chromium driven by Playwright, and the service with
the chat page, both on 127.0.0.1.

Nothing here downloads a browser: Playwright starts `/usr/bin/chromium` (Debian's `chromium`
package) through `executable_path`, with a fresh profile directory for each test. Tests that
need it carry `needs_chromium`, which skips them, saying why, only where that binary is absent.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import ConsoleMessage, Page, async_playwright
from starlette.types import ASGIApp, Receive, Scope, Send

from llm_service.config import Settings
from llm_service.server import ServiceRunner
from tests.support import RunningService, running_service

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is absent: apt-get install chromium (.ci/run does)",
)


@dataclass
class Browser:
    """One page in a fresh Chromium profile, with the console errors it logged."""

    page: Page
    errors: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def open_page(profile: Path, **context: Any) -> AsyncIterator[Browser]:
    """Start Chromium on a fresh profile in `profile` and open one page."""
    async with async_playwright() as playwright:
        browser_context = await playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            **context,
        )
        try:
            page = browser_context.pages[0] if browser_context.pages else None
            page = page or await browser_context.new_page()
            page.set_default_timeout(5_000)
            found = Browser(page)

            def on_console(message: ConsoleMessage) -> None:
                if message.type == "error":
                    found.errors.append(message.text)

            page.on("console", on_console)
            page.on("pageerror", lambda exc: found.errors.append(f"uncaught: {exc}"))
            yield found
        finally:
            await browser_context.close()


class RecordHandshakes:
    """ASGI middleware that notes the subprotocols and query of each WebSocket handshake."""

    def __init__(self, app: ASGIApp, into: list[dict[str, Any]]) -> None:
        self.app = app
        self.into = into

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            self.into.append(
                {
                    "path": scope["path"],
                    "query": scope["query_string"].decode(),
                    "subprotocols": list(scope.get("subprotocols", [])),
                }
            )
        await self.app(scope, receive, send)


def socket_on(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:`port` again, for a service restarted on the same port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.asynccontextmanager
async def chat_service(
    settings: Settings, port: int | None = None, handshakes: list[dict[str, Any]] | None = None
) -> AsyncIterator[RunningService]:
    """The service on `port` (a restart on the same port) or an ephemeral one of 127.0.0.1,
    recording each WebSocket handshake into `handshakes` when given."""

    def record(runner: ServiceRunner) -> None:
        if handshakes is not None:
            runner.app.add_middleware(RecordHandshakes, into=handshakes)

    main_socket = None if port is None else socket_on(port)
    async with running_service(settings, main_socket=main_socket, prepare=record) as service:
        yield service
