"""The Ollama backend: `/api/chat` streamed as NDJSON over httpx.

It maps session parameters onto Ollama's request (`max_tokens` -> `num_predict`, the context
window -> `num_ctx`, ...), reads the stream a line at a time within the service's deadlines
(`backends/http.py`), and translates every failure once, here, into the service's error
tree: HTTP status codes before the stream, in-band `{"error": ...}` lines and dropped
connections during it. Closing the stream closes the HTTP response, which is what makes
Ollama stop generating.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import httpx
import orjson

from llm_service.backends.base import (
    ChatMessage,
    ChatRequest,
    EngineStatus,
    StreamEnd,
    StreamItem,
    ToolCall,
    ToolCalls,
    finish_closing,
    tool_call,
)
from llm_service.backends.http import (
    PROBE_TIMEOUT_S,
    Timeouts,
    UnitReader,
    error_body,
    http_client,
    httpx_errors,
    open_stream,
    translated,
)
from llm_service.errors import (
    EngineError,
    MalformedToolCall,
    ModelNotFound,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from llm_service.redact import mask_url

# SamplingParams' names that Ollama spells otherwise; every other field goes by its own name.
_OLLAMA_OPTION = {"max_tokens": "num_predict"}


@dataclass(frozen=True, slots=True)
class PullProgress:
    """One progress line of `/api/pull`."""

    status: str
    completed: int | None = None
    total: int | None = None


class OllamaBackend:
    """Streams chat replies from an Ollama server."""

    name = "ollama"
    context_limit: int | None = None  # Ollama takes num_ctx per request
    calls_tools = True  # where the model does: Ollama answers 400 for one that does not
    sampling_defaults: Mapping[str, float] = MappingProxyType({})

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        keep_alive: str = "5m",
        api_key: str | None = None,
        timeouts: Timeouts | None = None,
        max_connections: int = 64,
        extra_options: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.label = mask_url(base_url)  # how metrics and /health name it
        self.where = f"Ollama at {self.label}"  # how messages name it
        self._keep_alive = _keep_alive_value(keep_alive)
        self._timeouts = timeouts = timeouts or Timeouts()
        self._extra_options = dict(extra_options or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = http_client(base_url, headers, timeouts, max_connections)

    async def aclose(self) -> None:
        await self._client.aclose()

    def count_tokens(self, text: str) -> int | None:
        return None

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The `/api/chat` request for one reply."""
        options: dict[str, Any] = {"num_ctx": request.context_window}
        for name, value in request.sampling:  # under Ollama's names; unset ones left to Ollama
            if value is not None and value != ():
                options[_OLLAMA_OPTION.get(name, name)] = value  # a tuple is sent as a list
        options.update(self._extra_options)
        body = {
            "model": self.model,
            "messages": [_message(m) for m in request.messages],
            "stream": True,
            "keep_alive": self._keep_alive,
            "options": options,
        }
        if request.tools and request.tool_choice != "none":  # Ollama has no other choice
            body["tools"] = list(request.tools)
        return body

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        chat = self._client.build_request(
            "POST",
            "/api/chat",
            content=orjson.dumps(self.request_body(request)),
            headers={"Content-Type": "application/json", **request.trace_headers(self.label)},
        )
        response = await open_stream(self._client, chat, self.where, self._timeouts)
        lines = UnitReader(response.aiter_lines(), self.where, self._timeouts)
        calls: list[ToolCall] = []
        try:
            if response.status_code != 200:
                raise await _status_error(response, self.model)
            while (line := await lines.next()) is not None:
                if not line:
                    continue
                try:
                    data = orjson.loads(line)
                    if "error" in data:
                        raise UpstreamError(f"Ollama: {data['error']}")
                    message = data.get("message")
                    if message is not None and "tool_calls" in message:
                        calls += self._calls(message["tool_calls"])
                    if data.get("done"):
                        end = _stream_end(data)
                        await lines.drain()
                        if calls:
                            yield ToolCalls(tuple(calls))
                            end = replace(end, done_reason="tool_calls")
                        yield end
                        return
                    content = message["content"]
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                    raise UpstreamError(
                        f"{self.where} sent a line that is not a chat chunk "
                        f"({len(line)} characters)"
                    ) from exc
                if content:
                    yield content
            raise UpstreamError(f"{self.where} ended the stream without a final 'done' line")
        finally:
            lines.close()
            await finish_closing(response.aclose())

    def _calls(self, items: Any) -> list[ToolCall]:
        """Ollama's `message.tool_calls`: whole calls, `arguments` an object."""
        if not isinstance(items, list):
            raise MalformedToolCall(f"{self.where} sent tool_calls that are not a list")
        calls = []
        for item in items:
            function = item.get("function") if isinstance(item, dict) else None
            if not isinstance(function, dict):
                raise MalformedToolCall(f"{self.where} sent a tool call without a function")
            name, arguments = function.get("name"), function.get("arguments", {})
            calls.append(tool_call(name, arguments, item.get("id"), self.where))
        return calls

    async def pull(self) -> AsyncGenerator[PullProgress, None]:
        """Pull the model through `/api/pull`, yielding Ollama's progress lines."""
        body = {"model": self.model, "stream": True}
        with httpx_errors(self.where):
            # Downloads pause between layers; the backstop read timeout bounds each pause.
            async with self._client.stream("POST", "/api/pull", json=body) as response:
                if response.status_code != 200:
                    raise await _status_error(response, self.model, pulling=True)
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    try:
                        data = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        data = None
                    if not isinstance(data, dict):
                        raise UpstreamError(
                            f"{self.where} sent an unreadable progress line from /api/pull"
                        )
                    if "error" in data:
                        raise UpstreamError(f"Ollama could not pull {self.model}: {data['error']}")
                    yield PullProgress(
                        status=str(data.get("status", "")),
                        completed=data.get("completed"),
                        total=data.get("total"),
                    )

    async def status(self) -> EngineStatus:
        try:
            version = await self._client.get("/api/version", timeout=PROBE_TIMEOUT_S)
            version.raise_for_status()
            tags = await self._client.get("/api/tags", timeout=PROBE_TIMEOUT_S)
            tags.raise_for_status()
            names = {m.get("name") for m in tags.json().get("models", [])}
        except httpx.HTTPError as exc:
            return EngineStatus(reachable=False, detail=translated(exc, self.where).message)
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


def _tagged(name: str) -> str:
    """The name with Ollama's default tag where it has none (a registry's port is no tag)."""
    return name if ":" in name.rpartition("/")[2] else f"{name}:latest"


def _keep_alive_value(keep_alive: str) -> str | int | float:
    # Ollama reads a bare number as seconds; as a string it must carry a unit.
    try:
        number = float(keep_alive)
    except ValueError:
        return keep_alive
    return int(number) if number.is_integer() else number


def _message(message: ChatMessage) -> dict[str, Any]:
    """A message as Ollama takes it: an assistant's with its calls, a tool's result with the
    tool's name."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_name:
        out["tool_name"] = message.tool_name
    return out


def _stream_end(data: dict[str, Any]) -> StreamEnd:
    eval_count = data.get("eval_count")
    eval_ns = data.get("eval_duration")
    speed = eval_count / eval_ns * 1e9 if eval_count and eval_ns else None
    return StreamEnd(
        completion_tokens=eval_count,
        prompt_tokens=data.get("prompt_eval_count"),
        prompt_cached_tokens=data.get("prompt_eval_cached_count"),
        done_reason=data.get("done_reason"),
        engine_tokens_per_second=speed,
    )


async def _status_error(
    response: httpx.Response, model: str, *, pulling: bool = False
) -> EngineError:
    raw = await error_body(response)
    try:
        message = str(orjson.loads(raw).get("error") or "")
    except (orjson.JSONDecodeError, AttributeError):
        message = raw[:500].decode(errors="replace").strip()
    status = response.status_code
    text = f"Ollama answered {status}: {message or response.reason_phrase}"
    if status == 404:
        said = f" ({message})" if message else ""
        if pulling:
            return ModelNotFound(f"Ollama found no model {model!r} to pull{said}")
        return ModelNotFound(f"model {model!r} not found in Ollama; pull it first{said}")
    if status in (429, 502, 503, 504):
        return UpstreamUnavailable(text)
    if 400 <= status < 500:
        return UpstreamRejected(text)
    return UpstreamError(text)
