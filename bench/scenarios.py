"""The load generator's side of the benchmark suite: one measurement against one target.

Each function drives a target over `/ws/llm` (the service or the baseline relay, which speak
the same frames) or the fake Ollama directly with httpx, and returns raw timings; `suite.py`
alternates the targets and reduces the timings to medians and percentiles. What the fake
answers is set in the user message (`tokens=N rate=R id=X`, see `fake_upstream.py`). Token
frames are recognised by their prefix and not parsed, to keep the load generator's own cost
per token low; every other frame is parsed and checked.
"""

from __future__ import annotations

import asyncio
import math
import re
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

TOKEN_PREFIX = '{"type":"token"'
CONNECT_BATCH = 100  # WebSocket handshakes in flight at once when opening many sessions


class BenchError(RuntimeError):
    """A target answered something other than what the scenario expects."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def user_message(text: str) -> str:
    return orjson.dumps({"type": "user_message", "text": text}).decode()


async def open_session(url: str) -> ClientConnection:
    """A WebSocket to `url` that has received its `session_started`."""
    ws = await connect(
        url,
        compression=None,
        proxy=None,
        ping_interval=None,
        open_timeout=30,
        close_timeout=5,
        max_size=2**24,
    )
    frame = orjson.loads(await ws.recv())
    if frame.get("type") != "session_started":
        await ws.close()
        raise BenchError(f"expected session_started, got {frame}")
    return ws


async def open_sessions(url: str, count: int) -> list[ClientConnection]:
    """`count` sessions, opened `CONNECT_BATCH` at a time; all or none."""
    opened: list[ClientConnection] = []
    try:
        for start in range(0, count, CONNECT_BATCH):
            batch = min(CONNECT_BATCH, count - start)
            opened += await asyncio.gather(*(open_session(url) for _ in range(batch)))
    except BaseException:
        await close_sessions(opened)
        raise
    return opened


async def close_sessions(sockets: Sequence[ClientConnection]) -> None:
    for start in range(0, len(sockets), 500):
        await asyncio.gather(
            *(ws.close() for ws in sockets[start : start + 500]), return_exceptions=True
        )


async def read_until_complete(ws: ClientConnection, tokens: int = 0) -> tuple[int, dict[str, Any]]:
    """Read a reply's frames; return the token frames counted (on top of `tokens`) and the
    `response_complete` frame."""
    while True:
        raw = await ws.recv()
        assert isinstance(raw, str)
        if raw.startswith(TOKEN_PREFIX):
            tokens += 1
            continue
        frame: dict[str, Any] = orjson.loads(raw)
        if frame.get("type") == "response_complete":
            return tokens, frame
        raise BenchError(f"unexpected frame during a reply: {raw[:300]}")


# 1. Single stream ------------------------------------------------------------------------


@dataclass
class StreamRun:
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


async def ws_stream(url: str, tokens: int) -> StreamRun:
    """One reply of `tokens` tokens, unpaced, on a fresh session: from sending the message
    to `response_complete`."""
    ws = await open_session(url)
    try:
        started = time.perf_counter()
        await ws.send(user_message(f"tokens={tokens} rate=0"))
        count, _ = await read_until_complete(ws)
        elapsed = time.perf_counter() - started
    finally:
        await ws.close()
    if count != tokens:
        raise BenchError(f"expected {tokens} token frames, got {count}")
    return StreamRun(count, elapsed)


def chat_body(text: str) -> bytes:
    messages = [{"role": "user", "content": text}]
    return orjson.dumps({"model": "llama3.2:1b", "messages": messages, "stream": True})


async def direct_stream(client: httpx.AsyncClient, tokens: int) -> StreamRun:
    """The same reply read from the fake directly with httpx, one line parsed at a time."""
    started = time.perf_counter()
    count = 0
    async with client.stream("POST", "/api/chat", content=chat_body(f"tokens={tokens}")) as r:
        async for line in r.aiter_lines():
            if line and orjson.loads(line)["message"]["content"]:
                count += 1
    return StreamRun(count, time.perf_counter() - started)


# 2. First token --------------------------------------------------------------------------


async def ws_first_token(ws: ClientConnection) -> float:
    """Seconds from sending a one-token `user_message` to its token frame."""
    started = time.perf_counter()
    await ws.send(user_message("tokens=1 rate=0"))
    while True:
        raw = await ws.recv()
        assert isinstance(raw, str)
        if raw.startswith(TOKEN_PREFIX):
            first = time.perf_counter() - started
            break
        raise BenchError(f"unexpected frame before the first token: {raw[:300]}")
    await read_until_complete(ws, 1)
    return first


async def direct_first_token(client: httpx.AsyncClient) -> float:
    started = time.perf_counter()
    first = math.nan
    async with client.stream("POST", "/api/chat", content=chat_body("tokens=1")) as r:
        async for line in r.aiter_lines():
            if line and math.isnan(first) and orjson.loads(line)["message"]["content"]:
                first = time.perf_counter() - started
    return first


async def alternated_first_tokens(
    urls: Sequence[str], turns: int, blocks: int
) -> list[tuple[float, float]]:
    """For each of `urls`, in order: the medians over `blocks` blocks of the p50 and p99 ms
    of `turns` one-token turns. Each block opens one session a target (whose first turn is a
    warm-up, not counted) and asks the targets in turn, in the given order on even turns and
    reversed on odd ones, so that none always goes first."""
    per_block: list[list[tuple[float, float]]] = [[] for _ in urls]
    for _ in range(blocks):
        sockets = [await open_session(url) for url in urls]
        times: list[list[float]] = [[] for _ in urls]
        try:
            for ws in sockets:  # warm-up: a session's first turn sets it up
                await ws_first_token(ws)
            for turn in range(turns):
                order = range(len(urls)) if turn % 2 == 0 else reversed(range(len(urls)))
                for k in order:
                    times[k].append(await ws_first_token(sockets[k]) * 1000)
        finally:
            await close_sessions(sockets)
        for k, values in enumerate(times):
            per_block[k].append((percentile(values, 50), percentile(values, 99)))
    return [
        (statistics.median(b[0] for b in bs), statistics.median(b[1] for b in bs))
        for bs in per_block
    ]


# 3. Concurrency --------------------------------------------------------------------------


@dataclass
class Level:
    """N sessions streaming at once: did every reply complete in time, and how even was the
    flow. A reply's lag is how long after its upstream schedule its last token arrived (from
    sending the message, the tokens go out 1/rate apart): a target that cannot keep up
    falls further behind with every token, even when frames arrive in bunches and the gaps
    between them stay small."""

    sessions: int
    completed: int = 0
    p99_gap_ms: float = math.nan
    max_gap_ms: float = math.nan
    p99_first_token_ms: float = math.nan
    max_lag_ms: float = math.nan
    seconds: float = 0.0
    client_cpu: float = 0.0  # the load generator's CPU seconds over wall seconds
    errors: list[str] = field(default_factory=list)

    def ok(self, gap_limit_ms: float, lag_limit_ms: float) -> bool:
        return (
            self.completed == self.sessions
            and self.p99_gap_ms < gap_limit_ms
            and self.max_lag_ms < lag_limit_ms
        )


async def run_level(
    url: str, sessions: int, tokens: int, rate: float, window_s: float = 1.0
) -> Level:
    """`sessions` sessions each asking for `tokens` tokens at `rate` a second. The messages
    go out evenly spread over `window_s`, as independent users' would, rather than all in
    the same instant: the streams then overlap for all but that window, and the upstream's
    emissions interleave instead of coming in lockstep bursts."""
    level = Level(sessions)
    sockets = await open_sessions(url, sessions)
    gaps: list[float] = []
    first_tokens: list[float] = []
    lags: list[float] = []
    spacing = window_s / sessions
    schedule = (tokens - 1) / rate

    async def one(ws: ClientConnection, delay: float) -> None:
        await asyncio.sleep(delay)
        clock = time.perf_counter
        sent = clock()
        await ws.send(user_message(f"tokens={tokens} rate={rate:g}"))
        last = 0.0
        count = 0
        while True:
            raw = await ws.recv()
            assert isinstance(raw, str)
            if not raw.startswith(TOKEN_PREFIX):
                break
            now = clock()
            if count:
                gaps.append(now - last)
            else:
                first_tokens.append(now - sent)
            last = now
            count += 1
        if '"response_complete"' not in raw[:40] or count != tokens:
            raise BenchError(f"{count} tokens then {raw[:200]}")
        lags.append(last - sent - schedule)
        level.completed += 1

    cpu_before = _own_cpu()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(window_s + schedule + 15):
            results = await asyncio.gather(
                *(one(ws, i * spacing) for i, ws in enumerate(sockets)), return_exceptions=True
            )
        level.errors = sorted(
            {f"{type(r).__name__}: {r}"[:200] for r in results if isinstance(r, BaseException)}
        )[:5]
    except TimeoutError:
        level.errors.append("timed out waiting for the replies")
    finally:
        level.seconds = time.perf_counter() - started
        level.client_cpu = (_own_cpu() - cpu_before) / level.seconds
        await close_sessions(sockets)
    if gaps:
        level.p99_gap_ms = percentile(gaps, 99) * 1000
        level.max_gap_ms = max(gaps) * 1000
    if first_tokens:
        level.p99_first_token_ms = percentile(first_tokens, 99) * 1000
    if lags:
        level.max_lag_ms = max(lags) * 1000
    return level


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# 5. Cancel latency -----------------------------------------------------------------------


@dataclass
class CancelRun:
    closed_s: float  # from sending cancel to the upstream seeing its response closed
    acked_s: float | None  # from sending cancel to the `cancelled` frame


async def upstream_closed_at(fake: httpx.AsyncClient, request_id: str) -> float:
    answer = await fake.get("/_bench/closed", params={"id": request_id, "wait": "5"})
    closed_at = answer.raise_for_status().json()["closed_at"]
    if closed_at is None:
        raise BenchError(f"the upstream response {request_id} was not closed within 5 s")
    return float(closed_at)


async def ws_cancel(
    ws: ClientConnection, fake: httpx.AsyncClient, request_id: str, after: int, rate: float
) -> CancelRun:
    """Start a long paced reply, cancel it after `after` tokens. Both ends read
    `time.monotonic()`: CLOCK_MONOTONIC is one system-wide clock on Linux, so the fake's
    closure time (another process) and this process's send time compare directly."""
    await ws.send(user_message(f"tokens=1000000 rate={rate:g} id={request_id}"))
    for _ in range(after):
        raw = await ws.recv()
        assert isinstance(raw, str)
        if not raw.startswith(TOKEN_PREFIX):
            raise BenchError(f"unexpected frame before cancelling: {raw[:300]}")
    sent = time.monotonic()
    await ws.send('{"type":"cancel"}')
    while True:
        raw = await ws.recv()
        assert isinstance(raw, str)
        if raw.startswith(TOKEN_PREFIX):
            continue
        frame = orjson.loads(raw)
        if frame.get("type") != "cancelled" or not frame.get("success"):
            raise BenchError(f"expected cancelled, got {raw[:300]}")
        acked = time.monotonic() - sent
        break
    return CancelRun(await upstream_closed_at(fake, request_id) - sent, acked)


async def direct_cancel(
    client: httpx.AsyncClient, request_id: str, after: int, rate: float
) -> CancelRun:
    """The floor: httpx closing the response itself after `after` lines."""
    body = chat_body(f"tokens=1000000 rate={rate:g} id={request_id}")
    async with client.stream("POST", "/api/chat", content=body) as response:
        lines = response.aiter_lines()
        read = 0
        while read < after:
            if await anext(lines):
                read += 1
        sent = time.monotonic()
        await response.aclose()
    return CancelRun(await upstream_closed_at(client, request_id) - sent, None)


# Engines and pools (`engines.py`) ----------------------------------------------------------


@dataclass
class Turn:
    """One turn as the client saw it: when it was sent, its first token, its text, its end."""

    sid: str  # the `sid=` the fake counts it under
    tokens: int  # asked for
    sent: float = 0.0  # time.monotonic()
    first_s: float | None = None
    text: str = ""
    end: str = ""  # "complete", or the error frame's code


async def run_turn(ws: ClientConnection, turn: Turn, message: str) -> Turn:
    """Send `message` and read the reply to its end, keeping its text (every frame parsed)."""
    turn.sent = time.monotonic()
    await ws.send(user_message(message))
    parts: list[str] = []
    while True:
        frame = orjson.loads(await ws.recv())
        kind = frame.get("type")
        if kind == "token":
            if turn.first_s is None:
                turn.first_s = time.monotonic() - turn.sent
            parts.append(frame["data"])
            continue
        code = (frame.get("error") or {}).get("code")
        turn.end = "complete" if kind == "response_complete" else str(code or kind)
        turn.text = "".join(parts)
        return turn


async def chats_by_session(fake_url: str) -> dict[str, int]:
    """The chats a fake has served, by the `sid=` of their user message."""
    async with httpx.AsyncClient(timeout=5) as client:
        stats = (await client.get(f"{fake_url}/_bench/stats")).raise_for_status().json()
    return dict(stats["by_session"])


_SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$", re.M)


async def scrape(monitoring_port: int) -> list[tuple[str, str, float]]:
    """The service's /metrics samples that carry labels: (name, labels, value)."""
    async with httpx.AsyncClient(timeout=2) as client:
        text = (await client.get(f"http://127.0.0.1:{monitoring_port}/metrics")).text
    return [(name, labels, float(value)) for name, labels, value in _SAMPLE.findall(text)]


# Sessions (`sessions.py`) ------------------------------------------------------------------


@dataclass(frozen=True)
class Resumable:
    """What a client keeps to resume its session: the id, the token, the last `seq` it saw."""

    session_id: str
    token: str
    last_seq: int


async def open_resumable(url: str) -> tuple[ClientConnection, Resumable]:
    """A WebSocket to `url` that has received its `session_started`, and that session."""
    ws = await connect(
        url,
        compression=None,
        proxy=None,
        ping_interval=None,
        open_timeout=30,
        close_timeout=5,
        max_size=2**24,
    )
    frame = orjson.loads(await ws.recv())
    session_id, token, seq = (frame.get(k) for k in ("session_id", "resume_token", "seq"))
    if frame.get("type") != "session_started" or seq != 0:
        await ws.close()
        raise BenchError(f"expected session_started with seq 0, got {frame}")
    if not isinstance(session_id, str) or not isinstance(token, str) or token == session_id:
        await ws.close()
        raise BenchError(f"session_started without a distinct resume_token: {frame}")
    return ws, Resumable(session_id, token, seq)


async def leave_mid_turn(url: str, message: str) -> Resumable:
    """A session whose client sends `message` and closes its socket at once, having seen no
    more than `session_started`: what the reply sends, the client misses. With `delay=` in
    the message the fake answers only after the socket is gone, so with LLM_RESUME_GRACE_S
    the whole reply streams into the session's frame log."""
    ws, session = await open_resumable(url)
    try:
        await ws.send(user_message(message))
    finally:
        await ws.close()
    return session


@dataclass
class ResumeRun:
    """One resume as the client saw it: times from sending `resume`, and what came back."""

    resumed_s: float  # to `session_resumed`
    first_s: float  # to the first replayed frame
    last_s: float  # to the last replayed frame
    replayed: int  # what `session_resumed` announced
    generating: bool
    seqs: list[int]  # the replayed frames' `seq`, in the order they came
    text: str  # the replayed token frames' text, joined
    last_type: str  # the type of the last replayed frame


async def ws_resume(url: str, session: Resumable) -> ResumeRun:
    """Resume `session` on a new connection to `url` (its first frame after that connection's
    own `session_started`) and read the replay `session_resumed` announces; then close."""
    ws, _ = await open_resumable(url)
    try:
        resume = {
            "type": "resume",
            "session_id": session.session_id,
            "resume_token": session.token,
            "last_seq": session.last_seq,
        }
        text = orjson.dumps(resume).decode()
        clock = time.perf_counter
        started = clock()
        await ws.send(text)
        head = orjson.loads(await ws.recv())
        resumed = clock() - started
        if head.get("type") != "session_resumed" or not head.get("replayed"):
            raise BenchError(f"expected session_resumed with frames to replay, got {head}")
        frames = [await ws.recv()]
        first = clock() - started
        for _ in range(int(head["replayed"]) - 1):
            frames.append(await ws.recv())
        last = clock() - started
    finally:
        await ws.close()
    parsed = [orjson.loads(raw) for raw in frames]
    return ResumeRun(
        resumed_s=resumed,
        first_s=first,
        last_s=last,
        replayed=int(head["replayed"]),
        generating=bool(head.get("generating")),
        seqs=[int(f.get("seq", -1)) for f in parsed],
        text="".join(str(f["data"]) for f in parsed if f.get("type") == "token"),
        last_type=str(parsed[-1].get("type")),
    )
