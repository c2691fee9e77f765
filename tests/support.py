"""What the tests share: the real service on ephemeral ports, a WebSocket client, and helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from llm_service.backends import BackendChoice, open_backend
from llm_service.config import Settings
from llm_service.server import ServiceRunner
from tests.fakes.backend import FakeBackend
from tests.process import ROOT, main_command

if TYPE_CHECKING:
    from llm_service.backends.llamacpp import LlamaCppBackend

RECV_TIMEOUT = 5.0


class _ServerResponseId:
    """Equal to any id the server assigns a reply (`resp_` and 32 hex digits)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.fullmatch(r"resp_[0-9a-f]{32}", other) is not None

    def __repr__(self) -> str:
        return "<server response_id>"


ANY_ID: Any = _ServerResponseId()


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test: defaults, no `.env`, loopback only, then `overrides`."""
    values: dict[str, Any] = {
        "llm_host": "127.0.0.1",
        "llm_backend": "ollama",
        "log_level": "WARNING",
        "health_cache_ttl_s": 0.0,
        "llm_retry_backoff_s": 0.01,
        "llm_retry_max_backoff_s": 0.05,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@dataclass
class RunningService:
    runner: ServiceRunner
    port: int
    monitoring_port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/llm"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def monitoring(self) -> str:
        return f"http://127.0.0.1:{self.monitoring_port}"

    async def get(self, path: str, monitoring: bool = False) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5.0) as client:
            return await client.get((self.monitoring if monitoring else self.http) + path)

    async def get_with_key(self, path: str, key: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5.0) as client:
            return await client.get(self.http + path, headers={"Authorization": f"Bearer {key}"})

    async def connect(self, **kwargs: Any) -> Client:
        ws = await websockets.connect(self.ws_url, compression=None, open_timeout=5, **kwargs)
        return Client(ws)


@contextlib.asynccontextmanager
async def running_service(
    settings: Settings,
    backend_factory: Callable[[Settings], Any] = open_backend,
    *,
    main_socket: socket.socket | None = None,
    prepare: Callable[[ServiceRunner], None] | None = None,
) -> AsyncIterator[RunningService]:
    """The real server on ephemeral 127.0.0.1 ports (or on `main_socket`); `prepare` may
    adjust the runner's app before it starts."""
    main_sock, monitoring_sock = main_socket or bound_socket(), bound_socket()
    runner = ServiceRunner(settings, backend_factory)
    if prepare is not None:
        prepare(runner)
    task = asyncio.create_task(runner.serve(sockets=(main_sock, monitoring_sock)))
    started = asyncio.create_task(runner.wait_started())
    await asyncio.wait({task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        started.cancel()
        runner.request_stop()
        await task  # surfaces the start-up failure
        raise RuntimeError("service did not start")
    try:
        yield RunningService(runner, main_sock.getsockname()[1], monitoring_sock.getsockname()[1])
    finally:
        runner.request_stop()
        await asyncio.wait_for(task, 15)
        main_sock.close()
        monitoring_sock.close()


class Client:
    """A WebSocket client that speaks frames as dicts.

    Every frame of a session carries `seq`, one more than the frame before it: `recv` checks
    that (a frame missing, doubled or out of order fails the test that reads it), keeps the
    numbers in `seqs`, and hands the frame over without it, so tests compare frames as the
    seed shaped them. `session_resumed` carries where a replay ends instead; the numbering
    then goes on from the client's own `last_seq`.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seqs: list[int] = []
        self.resume_token: str | None = None
        self.session_id: str | None = None

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else -1

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        raw = frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode()
        await self.ws.send(raw)

    async def recv(self, limit: float = RECV_TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), limit)
        frame: dict[str, Any] = orjson.loads(raw)
        if frame.get("type") == "session_resumed":
            return frame
        seq = frame.pop("seq", None)
        if seq is not None:
            assert seq == self.last_seq + 1, f"seq {seq} after {self.last_seq}: {frame}"
            self.seqs.append(seq)
        if frame.get("type") == "session_started":
            self.resume_token = frame.pop("resume_token")
        return frame

    async def recv_until(
        self, kind: str | tuple[str, ...], limit: float = RECV_TIMEOUT
    ) -> list[dict[str, Any]]:
        """Frames up to and including the first of type `kind`."""
        kinds = (kind,) if isinstance(kind, str) else kind
        frames = []
        async with asyncio.timeout(limit):
            while True:
                frame = await self.recv(limit)
                frames.append(frame)
                if frame["type"] in kinds:
                    return frames

    async def resume(self, session_id: str, token: str, last_seq: int) -> dict[str, Any]:
        """Send `resume` as the first frame; return the answer (`session_resumed`, or the
        error). Once resumed, the numbering this client checks goes on from `last_seq`."""
        await self.send(
            {
                "type": "resume",
                "session_id": session_id,
                "resume_token": token,
                "last_seq": last_seq,
            }
        )
        answer = await self.recv()
        if answer["type"] == "session_resumed":
            # the replay covers (seq - replayed, seq], and the live frames follow it
            start = answer["seq"] - answer["replayed"]
            self.seqs = [start] if start >= 0 else []
        return answer

    async def start(self) -> str:
        """Read `session_started`; return the session id."""
        frame = await self.recv()
        assert frame["type"] == "session_started"
        self.session_id = str(frame["session_id"])
        return self.session_id

    async def turn(self, text: str, limit: float = RECV_TIMEOUT) -> list[dict[str, Any]]:
        await self.send({"type": "user_message", "text": text})
        return await self.recv_until(("response_complete", "error"), limit)

    async def history(self, *, response_ids: bool = False) -> list[dict[str, Any]]:
        """`get_history`'s messages; each assistant message's `response_id` is checked to be
        there and left out unless `response_ids` (most tests compare the text alone)."""
        await self.send({"type": "get_history"})
        frame = await self.recv()
        assert frame["type"] == "history"
        messages: list[dict[str, Any]] = frame["messages"]
        for message in messages:
            if message["role"] == "assistant":
                assert isinstance(message.get("response_id"), str), message
        if response_ids:
            return messages
        return [{k: v for k, v in m.items() if k != "response_id"} for m in messages]

    async def read_to_close(
        self, limit: float = 10.0
    ) -> tuple[list[dict[str, Any]], int | None, str | None]:
        """The frames left until the server closes the socket, then its close code and
        reason (1006 and "" when the connection ended without a close frame)."""
        frames: list[dict[str, Any]] = []
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(limit):
                while True:
                    frames.append(await self.recv(limit))
        return frames, self.ws.close_code, self.ws.close_reason

    async def close(self) -> None:
        await self.ws.close()


def embedded_engine(model_path: Path | None = None, **settings: Any) -> LlamaCppBackend:
    """The embedded engine on `model_path` (the packaged model by default), with `settings`
    over a small CPU setup. Loading blocks: a test on the event loop calls it in a thread."""
    from llm_service.backends.llamacpp import LlamaCppBackend, packaged_model_path

    chosen: dict[str, Any] = {
        "context_window": 1024,
        "threads": 1,
        "gpu_layers": 0,
        "workers": 1,
        "queue_size": 16,
        "first_token_timeout": 120.0,
        "cache_bytes": 0,
        "extra_buffers": None,
    }
    return LlamaCppBackend(model_path or packaged_model_path(), **(chosen | settings))


def fake_engine(backend: FakeBackend) -> Callable[[Settings], Any]:
    """A backend factory for `running_service`: the service's one engine is `backend`."""

    async def factory(settings: Settings) -> BackendChoice:
        return BackendChoice((backend,), "a fake engine", None)

    return factory


async def draining(service: RunningService) -> bool:
    """Whether the service has begun its drain (its readiness probe says so)."""
    return (await service.get("/readyz", monitoring=True)).status_code == 503


# A tool for the sessions that offer one (`start_session`'s `tools`).
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


class FakeClock:
    """A clock that moves only when the test moves it (`clock.now += 10`); it starts far
    from 0, as a monotonic clock does, so that arithmetic on its readings shows."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def poll(check: Callable[[], Awaitable[bool]], limit: float = 2.0) -> None:
    """Re-check a condition the test cannot wait on directly (another process's state)."""
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def tokens_of(frames: list[dict[str, Any]]) -> list[str]:
    return [f["data"] for f in frames if f["type"] == "token"]


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of a series in Prometheus exposition text: the sum over the series of `name`
    whose labels include `labels` (`'outcome="success"'`), so a series that gained a label
    (`upstream`) is still found."""
    wanted = [label for label in labels.split(",") if label]
    pattern = re.compile(
        rf"^{re.escape(name)}(?:{{(?P<labels>[^}}]*)}})? (?P<value>[0-9.e+-]+)$", re.M
    )
    values = [
        float(found["value"])
        for found in pattern.finditer(text)
        if all(label in (found["labels"] or "").split(",") for label in wanted)
    ]
    assert values, f"{name}{{{labels}}} not in /metrics"
    return sum(values)


async def run_cli(tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    """Run `python main.py ARGS` in an empty directory (no stray `.env`) with only `env` set."""
    base = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        *main_command(*args),
        cwd=tmp_path,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


# The opening of a WebSocket handshake as a raw client writes it (no Origin: not a browser).
WS_HANDSHAKE = (
    b"GET /ws/llm HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
