"""The processes a benchmark runs: the fake Ollama, the service and the baseline relay.

Each is a subprocess on a free port of 127.0.0.1, started and waited for until it answers,
its output kept in a log file shown when it fails, and stopped with SIGTERM (SIGKILL if it
lingers). Also here: reading a process's resident memory and CPU time from `/proc`, and the
machine's description for the report.
"""

from __future__ import annotations

import collections
import ctypes
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.process import free_port, main_command, rss_bytes, service_env  # noqa: E402

_PR_SET_PDEATHSIG = 1


@dataclass
class Proc:
    """A started subprocess and where it listens."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/llm"

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the suite dies, so nothing is left behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start(
    name: str, args: list[str], env: dict[str, str], port: int, ready: str, logs: Path
) -> Proc:
    log = logs / f"{name}-{port}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            args,
            env=env,
            cwd=logs,  # not the repository: a developer's .env there must not apply
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    proc = Proc(name, popen, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{name} exited during start-up:\n{proc.log_tail()}")
        try:
            if httpx.get(proc.http + ready, timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"{name} did not answer {ready} within 60 s:\n{proc.log_tail()}")


def start_fake(logs: Path) -> Proc:
    port = free_port()
    args = [sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(port)]
    return _start("fake", args, dict(os.environ), port, "/api/version", logs)


def start_otlp_sink(logs: Path) -> Proc:
    """An OTLP/HTTP traces endpoint that counts the spans it is sent (`otlp_sink.py`)."""
    port = free_port()
    args = [sys.executable, str(BENCH / "otlp_sink.py"), "--port", str(port)]
    return _start("otlp-sink", args, dict(os.environ), port, "/spans", logs)


def start_service(upstream: str, logs: Path, max_connections: int = 5000) -> Proc:
    """`python main.py websocket` on Ollama at `upstream`, as an operator would run it."""
    return _start_service(
        {
            "LLM_BACKEND": "ollama",
            "OLLAMA_BASE_URL": upstream,
            "LLM_MAX_CONNECTIONS": str(max_connections),
            "LLM_SHUTDOWN_GRACE_S": "1",
            # Room for the 3,000-token reply: Ollama's num_predict would cut it at 2,048.
            "DEFAULT_MAX_TOKENS": "4096",
        },
        logs,
    )


def start_embedded_service(threads: int, logs: Path) -> Proc:
    """`python main.py websocket` on the embedded llama.cpp engine with `threads` threads."""
    return _start_service({"LLM_BACKEND": "llamacpp", "NUM_THREADS": str(threads)}, logs)


def start_service_with(env: dict[str, str], logs: Path) -> Proc:
    """`python main.py websocket` with `env` (any engine, any settings, `LOG_LEVEL` too) over
    the benchmark's defaults: room for 5,000 connections and a 3,000-token reply, a short
    shutdown grace, warnings and errors logged."""
    settings = {
        "LOG_LEVEL": "WARNING",
        "LLM_MAX_CONNECTIONS": "5000",
        "LLM_SHUTDOWN_GRACE_S": "1",
        "DEFAULT_MAX_TOKENS": "4096",
        **env,
    }
    port = free_port()
    full = service_env(logs, port, free_port(), **settings)
    return _start("service", main_command("websocket"), full, port, "/health", logs)


def _start_service(settings: dict[str, str], logs: Path) -> Proc:
    port = free_port()
    env = service_env(logs, port, free_port(), LOG_LEVEL="WARNING", **settings)
    return _start("service", main_command("websocket"), env, port, "/health", logs)


def start_baseline(upstream: str, logs: Path) -> Proc:
    port = free_port()
    args = [
        sys.executable,
        str(BENCH / "baseline_relay.py"),
        "--port",
        str(port),
        "--upstream",
        upstream,
    ]
    return _start("baseline", args, dict(os.environ), port, "/openapi.json", logs)


def start_redis(logs: Path) -> Proc:
    """A `redis-server` of the benchmark's own on a free port of 127.0.0.1, persisting nothing
    (no snapshots, no append-only file), waited for until it answers PING. Its URL for
    LLM_SESSION_STORE is `redis://127.0.0.1:PORT/0`."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(logs)]
    log = logs / f"redis-{port}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*args, "--save", "", "--appendonly", "no"],
            cwd=logs,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    proc = Proc("redis", popen, port, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"redis-server exited during start-up:\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"redis-server did not answer PING within 30 s:\n{proc.log_tail()}")


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` in KiB (VmRSS)."""
    return rss_bytes(pid) // 1024


def cpu_seconds(pid: int) -> float:
    """CPU time `pid`'s threads have run so far, to the nanosecond (the scheduler's own
    account in /proc/PID/task/*/schedstat; /proc/PID/stat counts in 10 ms clock ticks, too
    coarse for a few hundred tokens)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def machine_busy() -> tuple[float, float]:
    """Busy and total jiffies of the whole machine, all cores (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def machine() -> dict[str, str | int | float]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": os.getloadavg()[0],
    }


def log_problems(proc: Proc, expected: frozenset[str] = frozenset()) -> list[str]:
    """The warnings and errors in a service's JSON log, one line per event (and error code)
    with its count and a first example; events in `expected` left out."""
    counts: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for line in proc.log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("event") in expected:
            continue
        if entry.get("level") in ("warning", "error", "critical"):
            key = f"{entry.get('event')} {entry.get('code', '')}".strip()
            counts[key] += 1
            examples.setdefault(key, line[:400])
    return [f"{proc.log.name}: {n} x {key}, e.g. `{examples[key]}`" for key, n in counts.items()]
