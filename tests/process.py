"""The service as a separate process (`python main.py websocket`), for signal and memory tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServiceProcess:
    proc: asyncio.subprocess.Process
    port: int
    monitoring_port: int
    output: list[str] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/llm"

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, limit: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), limit)


@contextlib.asynccontextmanager
async def service_process(workdir: Path, **env: str) -> AsyncIterator[ServiceProcess]:
    """Start the service with `env` on free loopback ports; kill it if still running after."""
    port, monitoring_port = free_port(), free_port()
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "HOME": str(workdir),
        "LLM_HOST": "127.0.0.1",
        "LLM_PORT": str(port),
        "LLM_MONITORING_PORT": str(monitoring_port),
        "LOG_FORMAT": "json",
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "main.py"),
        "websocket",
        cwd=workdir,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    service = ServiceProcess(proc, port, monitoring_port)

    async def collect() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            service.output.append(line.decode(errors="replace"))

    reader = asyncio.create_task(collect())
    try:
        async with httpx.AsyncClient(timeout=1.0) as client, asyncio.timeout(30):
            while True:
                assert proc.returncode is None, "".join(service.output)
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{monitoring_port}/health")).is_success:
                        break
                await asyncio.sleep(0.1)
        yield service
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.wait_for(reader, 5)
