"""What the engines reached over HTTP share: the client, the deadlines, the error translation.

`http_client` makes the httpx client of one upstream, with explicit timeouts and limits (the
read timeout only a backstop: the service's own deadlines are shorter and give a timeout its
meaning). `open_stream` sends a streamed request within the first-chunk deadline; a
`UnitReader` then reads its units (NDJSON lines for Ollama, SSE events for the OpenAI-
compatible engines) each within its deadline: the first within `LLM_FIRST_TOKEN_TIMEOUT_S`
(model loading included), every next one within `LLM_CHUNK_TIMEOUT_S`, one timer for all of
them. `httpx_errors` and `translated` turn httpx's exceptions into the service's error tree,
once, in words, with the exception kept as the cause, as httpx's own `map_httpcore_exceptions`
does one layer down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import httpx

from llm_service.errors import EngineError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from llm_service.timing import Deadline

T = TypeVar("T")

PROBE_TIMEOUT_S = 1.0
MAX_ERROR_BODY = 64 * 1024
_KEEPALIVE_POOL = 20
_DRAIN_LIMIT_S = 1.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The deadlines of an engine request, in seconds."""

    connect: float = 5.0
    first_chunk: float = 120.0
    chunk: float = 30.0


def http_client(
    base_url: str, headers: dict[str, str], timeouts: Timeouts, max_connections: int
) -> httpx.AsyncClient:
    backstop = max(timeouts.first_chunk, timeouts.chunk) + 5.0
    connect = timeouts.connect
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(connect=connect, read=backstop, write=connect, pool=connect),
        # A few idle connections are kept for the next turns; httpcore looks at every
        # pooled connection on each request, so hundreds of idle ones would cost more than
        # the handshakes they save.
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=min(max_connections, _KEEPALIVE_POOL),
        ),
    )


async def open_stream(
    client: httpx.AsyncClient, request: httpx.Request, where: str, timeouts: Timeouts
) -> httpx.Response:
    """Send `request` for a streamed answer; its headers must come within the first-chunk
    deadline."""
    try:
        async with asyncio.timeout(timeouts.first_chunk):
            with httpx_errors(where):
                return await client.send(request, stream=True)
    except TimeoutError as exc:
        raise UpstreamTimeout(f"no answer from {where} within {timeouts.first_chunk:g} s") from exc


class UnitReader(Generic[T]):
    """The units of one streamed response, each read within its deadline.

    The deadline is one `timing.Deadline` that cancels the reading task when a wait runs
    over, and turns that cancellation back into a timeout, the way `asyncio.timeout` does.
    Time the consumer spends elsewhere (sending to a slow client) does not count."""

    def __init__(self, units: AsyncIterator[T], where: str, timeouts: Timeouts) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._units = units
        self._where = where
        self._timeouts = timeouts
        self._limit = timeouts.first_chunk
        self._task = task
        self._cancelling = task.cancelling()
        self._deadline = Deadline(asyncio.get_running_loop(), task.cancel)

    async def next(self) -> T | None:
        """The next unit, or None at the end of the response."""
        limit = self._limit
        self._deadline.start(limit)
        try:
            unit = await anext(self._units)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError as exc:
            if self._deadline.expired and self._task.uncancel() <= self._cancelling:
                phase = "first chunk" if limit == self._timeouts.first_chunk else "next chunk"
                raise UpstreamTimeout(f"{self._where} sent no {phase} within {limit:g} s") from exc
            raise
        except httpx.HTTPError as exc:
            raise translated(exc, self._where, mid_reply=True) from exc
        finally:
            self._deadline.stop()
        self._limit = self._timeouts.chunk
        return unit

    async def drain(self) -> None:
        """Read the body to its end after the last unit that matters (its closing chunk is
        usually already buffered), so the connection goes back to the pool instead of being
        closed. An engine that does not end the body promptly just loses the connection."""
        self._deadline.close()
        try:
            async with asyncio.timeout(_DRAIN_LIMIT_S):
                async for _ in self._units:
                    pass
        except (TimeoutError, httpx.HTTPError):
            return

    def close(self) -> None:
        self._deadline.close()


async def error_body(response: httpx.Response) -> bytes:
    """The start of an error response's body (at most MAX_ERROR_BODY bytes)."""
    raw = b""
    async for part in response.aiter_bytes():
        raw += part
        if len(raw) >= MAX_ERROR_BODY:
            break
    return raw


@contextmanager
def httpx_errors(where: str, *, mid_reply: bool = False) -> Iterator[None]:
    """Translate httpx's exceptions into the service's error tree, once, with the cause kept."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise translated(exc, where, mid_reply=mid_reply) from exc


# What each httpx failure means, in words; the exception itself stays the error's cause (and
# reaches the log), never the client's message.
_WORDS: tuple[tuple[type[httpx.HTTPError], str], ...] = (
    (httpx.PoolTimeout, "had no free connection in time (every connection busy)"),
    (httpx.ConnectTimeout, "did not accept the connection in time"),
    (httpx.ReadTimeout, "sent nothing within the read timeout"),
    (httpx.WriteTimeout, "did not take the request in time"),
    (httpx.ConnectError, "cannot be reached (connection refused or host unreachable)"),
    (httpx.RemoteProtocolError, "closed the connection unexpectedly"),
    (httpx.ReadError, "broke the connection while the service was reading"),
    (httpx.WriteError, "broke the connection while the service was sending"),
)


def translated(exc: httpx.HTTPError, where: str, *, mid_reply: bool = False) -> EngineError:
    words = next((w for kind, w in _WORDS if isinstance(exc, kind)), "failed")
    if mid_reply:
        return UpstreamError(f"{where} {words} mid-reply")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{where} {words}")
    return UpstreamUnavailable(f"{where} {words}")
