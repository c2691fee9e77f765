"""The service as a separate process, as an operator runs it: for the tests and the benchmarks.

`main_command` and `service_env` are the one way to start `python main.py ...`: on free
loopback ports, from a directory of its own (so a developer's `.env` does not apply), with
the given settings. `service_process` runs it for a test; `bench/processes.py` for a benchmark.
"""

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


def main_command(*args: str) -> list[str]:
    """`python main.py ARGS` with this interpreter."""
    return [sys.executable, str(ROOT / "main.py"), *args]


_COVERAGE = ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START", "COVERAGE_FILE")


def service_env(home: Path, port: int, monitoring_port: int, **settings: str) -> dict[str, str]:
    """The environment of a service process: nothing inherited but PATH (and, under
    scripts/coverage.sh, coverage's own variables, so the process is measured too), loopback
    only."""
    return {
        "PATH": os.environ.get("PATH", ""),
        **{k: v for k, v in os.environ.items() if k in _COVERAGE},
        "PYTHONPATH": str(ROOT),
        "HOME": str(home),
        "LLM_HOST": "127.0.0.1",
        "LLM_PORT": str(port),
        "LLM_MONITORING_PORT": str(monitoring_port),
        "LOG_FORMAT": "json",
        **settings,
    }


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


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
        return rss_bytes(self.proc.pid)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, limit: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), limit)


@contextlib.asynccontextmanager
async def service_process(workdir: Path, **env: str) -> AsyncIterator[ServiceProcess]:
    """Start the service with `env` on free loopback ports; kill it if still running after."""
    port, monitoring_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        *main_command("websocket"),
        cwd=workdir,
        env=service_env(workdir, port, monitoring_port, **env),
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
