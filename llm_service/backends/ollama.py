"""The Ollama backend: `/api/chat` streamed as NDJSON over httpx.

It maps session parameters onto Ollama's request (`max_tokens` -> `num_predict`, the context
window -> `num_ctx`, ...), reads the stream a line at a time, and translates every failure
once, here, into the service's error tree: HTTP status codes before the stream, in-band
`{"error": ...}` lines and dropped connections during it, and the service's own deadlines for
the first chunk and for the gap between chunks. Closing the stream closes the HTTP response,
which is what makes Ollama stop generating.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from llm_service.backends.base import (
    ChatRequest,
    EngineStatus,
    StreamEnd,
    StreamItem,
    finish_closing,
)
from llm_service.errors import (
    EngineError,
    ModelNotFound,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from llm_service.redact import mask_url
from llm_service.timing import Deadline

_MAX_ERROR_BODY = 64 * 1024
_KEEPALIVE_POOL = 20
_DRAIN_LIMIT_S = 1.0


@dataclass(frozen=True, slots=True)
class PullProgress:
    """One progress line of `/api/pull`."""

    status: str
    completed: int | None = None
    total: int | None = None


_PROBE_TIMEOUT_S = 1.0
# SamplingParams' names that Ollama spells otherwise; every other field goes by its own name.
_OLLAMA_OPTION = {"max_tokens": "num_predict"}


class OllamaBackend:
    """Streams chat replies from an Ollama server."""

    name = "ollama"
    context_limit: int | None = None  # Ollama takes num_ctx per request

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        keep_alive: str = "5m",
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        first_chunk_timeout: float = 120.0,
        chunk_timeout: float = 30.0,
        max_connections: int = 64,
        extra_options: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.where = f"Ollama at {mask_url(base_url)}"  # how messages name it
        self._keep_alive = _keep_alive_value(keep_alive)
        self._first_chunk_timeout = first_chunk_timeout
        self._chunk_timeout = chunk_timeout
        self._extra_options = dict(extra_options or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx's read timeout is only a backstop: the service's own deadlines, per chunk,
        # are shorter and give the error its meaning (first chunk vs gap between chunks).
        backstop = max(first_chunk_timeout, chunk_timeout) + 5.0
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(
                connect=connect_timeout, read=backstop, write=connect_timeout, pool=connect_timeout
            ),
            # A few idle connections are kept for the next turns; httpcore looks at every
            # pooled connection on each request, so hundreds of idle ones would cost more
            # than the handshakes they save.
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=min(max_connections, _KEEPALIVE_POOL),
            ),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def count_tokens(self, text: str) -> int | None:
        return None

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The `/api/chat` request for one reply."""
        options: dict[str, Any] = {"num_ctx": request.context_window}
        for name, value in request.sampling:  # under Ollama's names; unset ones left to Ollama
            if value is not None and value != ():
                options[_OLLAMA_OPTION.get(name, name)] = (
                    list(value) if isinstance(value, tuple) else value
                )
        options.update(self._extra_options)
        return {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            "keep_alive": self._keep_alive,
            "options": options,
        }

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        body = orjson.dumps(self.request_body(request))
        headers = {"Content-Type": "application/json"}
        try:
            async with asyncio.timeout(self._first_chunk_timeout):
                chat = self._client.build_request(
                    "POST", "/api/chat", content=body, headers=headers
                )
                with _httpx_errors(self.where):
                    response = await self._client.send(chat, stream=True)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"no answer from Ollama within {self._first_chunk_timeout:g} s"
            ) from exc
        deadline = _ChunkDeadline()
        try:
            if response.status_code != 200:
                raise await _status_error(response, self.model)
            lines = response.aiter_lines()
            limit = self._first_chunk_timeout
            while True:
                deadline.clock.start(limit)
                try:
                    line = await anext(lines)
                except StopAsyncIteration as exc:
                    raise UpstreamError(
                        "Ollama ended the stream without a final 'done' line"
                    ) from exc
                except asyncio.CancelledError as exc:
                    if deadline.expired():
                        phase = (
                            "first chunk" if limit == self._first_chunk_timeout else "next chunk"
                        )
                        raise UpstreamTimeout(f"Ollama sent no {phase} within {limit:g} s") from exc
                    raise
                except httpx.HTTPError as exc:
                    raise _translated(exc, self.where, mid_reply=True) from exc
                deadline.clock.stop()
                limit = self._chunk_timeout
                if not line:
                    continue
                try:
                    data = orjson.loads(line)
                    if "error" in data:
                        raise UpstreamError(f"Ollama: {data['error']}")
                    if data.get("done"):
                        end = _stream_end(data)
                        await _drain(lines)
                        yield end
                        return
                    content = data["message"]["content"]
                except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                    raise UpstreamError(
                        f"{self.where} sent a line that is not a chat chunk "
                        f"({len(line)} characters)"
                    ) from exc
                if content:
                    yield content
        finally:
            deadline.clock.close()
            await finish_closing(response.aclose())

    async def pull(self) -> AsyncGenerator[PullProgress, None]:
        """Pull the model through `/api/pull`, yielding Ollama's progress lines."""
        body = {"model": self.model, "stream": True}
        with _httpx_errors(self.where):
            # Downloads pause between layers; the backstop read timeout bounds each pause.
            async with self._client.stream("POST", "/api/pull", json=body) as response:
                if response.status_code != 200:
                    raise await _status_error(response, self.model)
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    try:
                        data = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise UpstreamError(
                            f"{self.where} sent an unreadable progress line from /api/pull"
                        ) from exc
                    if "error" in data:
                        raise UpstreamError(f"Ollama could not pull {self.model}: {data['error']}")
                    yield PullProgress(
                        status=str(data.get("status", "")),
                        completed=data.get("completed"),
                        total=data.get("total"),
                    )

    async def status(self) -> EngineStatus:
        try:
            version = await self._client.get("/api/version", timeout=_PROBE_TIMEOUT_S)
            version.raise_for_status()
            tags = await self._client.get("/api/tags", timeout=_PROBE_TIMEOUT_S)
            tags.raise_for_status()
            names = {m.get("name") for m in tags.json().get("models", [])}
        except httpx.HTTPError as exc:
            return EngineStatus(reachable=False, detail=_translated(exc, self.where).message)
        except (ValueError, AttributeError):
            return EngineStatus(
                reachable=False, detail=f"{self.where} answered, but not as Ollama does"
            )
        available = _tagged(self.model) in {_tagged(n) for n in names if isinstance(n, str)}
        return EngineStatus(
            reachable=True,
            detail=self.where,
            version=str(version.json().get("version")),
            model_available=available,
        )


class _ChunkDeadline:
    """The deadline of each wait for the next chunk: a `timing.Deadline` that cancels the
    waiting task when it expires, and turns that cancellation back into a timeout, the way
    `asyncio.timeout` does. Time the consumer spends elsewhere (sending to a slow client)
    does not count: only the waits themselves are timed."""

    def __init__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.clock = Deadline(asyncio.get_running_loop(), task.cancel)

    def expired(self) -> bool:
        """After a CancelledError: True when this deadline caused it (and it is undone)."""
        return self.clock.expired and self._task.uncancel() <= self._cancelling


async def _drain(lines: AsyncIterator[str]) -> None:
    """Read the body to its end after the `done` line (its closing chunk is usually already
    buffered), so the connection goes back to the pool instead of being closed. An engine
    that does not end the body promptly just loses the connection."""
    try:
        async with asyncio.timeout(_DRAIN_LIMIT_S):
            async for _ in lines:
                pass
    except (TimeoutError, httpx.HTTPError):
        return


def _tagged(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _keep_alive_value(keep_alive: str) -> str | int | float:
    # Ollama reads a bare number as seconds; as a string it must carry a unit.
    try:
        number = float(keep_alive)
    except ValueError:
        return keep_alive
    return int(number) if number.is_integer() else number


def _stream_end(data: dict[str, Any]) -> StreamEnd:
    eval_count = data.get("eval_count")
    eval_ns = data.get("eval_duration")
    speed = eval_count / eval_ns * 1e9 if eval_count and eval_ns else None
    return StreamEnd(
        completion_tokens=eval_count,
        prompt_tokens=data.get("prompt_eval_count"),
        done_reason=data.get("done_reason"),
        engine_tokens_per_second=speed,
    )


@contextmanager
def _httpx_errors(where: str, *, mid_reply: bool = False) -> Iterator[None]:
    """Translate httpx's exceptions into the service's error tree, once, with the cause kept."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise _translated(exc, where, mid_reply=mid_reply) from exc


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


def _translated(exc: httpx.HTTPError, where: str, *, mid_reply: bool = False) -> EngineError:
    words = next((w for kind, w in _WORDS if isinstance(exc, kind)), "failed")
    if mid_reply:
        return UpstreamError(f"{where} {words} mid-reply")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{where} {words}")
    return UpstreamUnavailable(f"{where} {words}")


async def _status_error(response: httpx.Response, model: str) -> EngineError:
    raw = b""
    async for part in response.aiter_bytes():
        raw += part
        if len(raw) >= _MAX_ERROR_BODY:
            break
    try:
        message = str(orjson.loads(raw).get("error") or "")
    except (orjson.JSONDecodeError, AttributeError):
        message = raw[:500].decode(errors="replace").strip()
    status = response.status_code
    text = f"Ollama answered {status}: {message or response.reason_phrase}"
    if status == 404:
        return ModelNotFound(f"model {model!r} not found in Ollama; pull it first ({message})")
    if status in (429, 502, 503, 504):
        return UpstreamUnavailable(text)
    if 400 <= status < 500:
        return UpstreamRejected(text)
    return UpstreamError(text)
