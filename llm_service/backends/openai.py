"""The OpenAI-compatible backend: `/v1/chat/completions` streamed as server-sent events.

One backend for every engine that speaks OpenAI's API: vLLM, llama.cpp's `llama-server`,
llama-cpp-python's server, SGLang, TGI, LM Studio, OpenAI itself. The request asks for
`stream: true` and `stream_options.include_usage`, so the engine's own token counts arrive in
a last chunk (an engine that sends none, such as llama-cpp-python's server, falls back to
counting frames). Sampler settings beyond OpenAI's own go at the top level of the body under
the names the engine kind knows (`OPENAI_SAMPLING_DIALECT`: vLLM and SGLang take
`repetition_penalty`, llama.cpp `repeat_penalty`, OpenAI none of them). The events are
parsed as the server-sent events standard says (`sse_data`: any line ending, `data:` lines
joined, comments and keep-alives skipped, other fields ignored), each read within the
service's deadlines; `[DONE]` ends the stream. (The `httpx-sse` package does the same, but
its pure-Python line decoding took a quarter of the service's CPU per token, measured: this
reads whole events out of the bytes as they arrive.)

Failures are translated once, here: a refused connection, 429, 502, 503 and 504 are
`upstream_unavailable`; 401 and 403 are `upstream_unauthorized` (the service's key is wrong:
no retry helps); 404 or "does not exist" is `model_not_found`; a 400 about the context length
is `context_overflow`; any other status, an in-band `{"error": ...}` event or a stream that
breaks off is `upstream_error`. Closing the stream closes the HTTP response, which is how
vLLM and llama-server learn to stop and free the slot.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from types import MappingProxyType
from typing import Any, Literal

import httpx
import orjson

from llm_service.backends.base import (
    ChatMessage,
    ChatRequest,
    EngineStatus,
    StreamEnd,
    StreamItem,
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
    open_stream,
    translated,
)
from llm_service.errors import (
    ContextOverflow,
    EngineError,
    ModelNotFound,
    ServiceError,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnauthorized,
    UpstreamUnavailable,
)
from llm_service.redact import mask_url

Dialect = Literal["vllm", "llamacpp", "openai"]

# The sampler settings every OpenAI-compatible engine takes, under OpenAI's names.
_STANDARD = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
# Those beyond OpenAI's, per engine kind: SamplingParams' name -> the engine's.
_EXTRAS: dict[Dialect, dict[str, str]] = {
    "vllm": {"top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repetition_penalty"},
    "llamacpp": {"top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repeat_penalty"},
    "openai": {},
}
_CONTEXT_LENGTH = re.compile(r"context length|context window|too many tokens|maximum context", re.I)


class OpenAIBackend:
    """Streams chat replies from an OpenAI-compatible server at `base_url` (`.../v1`)."""

    name = "openai"
    context_limit: int | None = None  # the engine's own; it answers 400 when it is exceeded
    calls_tools = True  # where the model does (vLLM: with a tool parser configured)
    sampling_defaults: Mapping[str, float] = MappingProxyType({})

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        dialect: Dialect = "vllm",
        timeouts: Timeouts | None = None,
        max_connections: int = 64,
    ) -> None:
        self.model = model
        self.label = mask_url(base_url)
        self.where = f"the engine at {self.label}"
        self._dialect = dialect
        self._timeouts = timeouts = timeouts or Timeouts()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = http_client(base_url, headers, timeouts, max_connections)

    async def aclose(self) -> None:
        await self._client.aclose()

    def count_tokens(self, text: str) -> int | None:
        return None

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The `/chat/completions` request for one reply."""
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                _tool_message(m)
                if m.tool_calls or m.tool_call_id
                else {"role": m.role, "content": m.content}
                for m in request.messages
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = list(request.tools)
            if request.tool_choice != "auto":  # the engines' default, left to them
                body["tool_choice"] = request.tool_choice
        # OpenAI's newer models take only max_completion_tokens; the other engines max_tokens
        limit = "max_completion_tokens" if self._dialect == "openai" else "max_tokens"
        body[limit] = sampling.max_tokens
        for name in _STANDARD:
            value = getattr(sampling, name)
            if value is not None:
                body[name] = value
        for name, engine_name in _EXTRAS[self._dialect].items():
            value = getattr(sampling, name)
            if value is not None:
                body[engine_name] = value
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        return body

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        chat = self._client.build_request(
            "POST",
            "chat/completions",
            content=orjson.dumps(self.request_body(request)),
            headers={
                "Content-Type": "application/json",
                "Accept": "text/event-stream",
                **request.trace_headers(self.label),
            },
        )
        response = await open_stream(self._client, chat, self.where, self._timeouts)
        events = None
        try:
            if response.status_code != 200:
                raise await _status_error(response, self.model, self.where)
            if "text/event-stream" not in response.headers.get("content-type", ""):
                raise UpstreamError(f"{self.where} did not answer with an event stream")
            events = UnitReader(sse_data(response.aiter_bytes()), self.where, self._timeouts)
            finish: str | None = None
            usage: dict[str, Any] = {}
            pieces: dict[int, list[Any]] = {}  # a call's index: its id, name, argument text
            while (event := await events.next()) is not None:
                if event == b"[DONE]":
                    if finish is None:  # every complete reply says why it ended
                        raise UpstreamError(
                            f"{self.where} ended the reply without a finish_reason: it was "
                            "cut off (llama-cpp-python's server does so whenever another "
                            "request arrives, unless started with --interrupt_requests false)"
                        )
                    await events.drain()
                    break
                data = _json(event, self.where)
                if "error" in data:
                    raise UpstreamError(f"{self.where}: {_message(data['error'])}")
                usage = data.get("usage") or usage
                for choice in data.get("choices") or ():
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    if content:
                        yield content
                    if "tool_calls" in delta:
                        _gather(delta["tool_calls"] or (), pieces)
                    finish = choice.get("finish_reason") or finish
            else:
                if finish is None:
                    raise UpstreamError(f"{self.where} ended the stream without [DONE]")
            if pieces:
                calls = [tool_call(n, a, i, self.where) for i, n, a in _ordered(pieces)]
                yield ToolCalls(tuple(calls))
                finish = "tool_calls"
            details = usage.get("prompt_tokens_details") or {}
            yield StreamEnd(
                completion_tokens=usage.get("completion_tokens"),
                prompt_tokens=usage.get("prompt_tokens"),
                done_reason=finish,
                prompt_cached_tokens=details.get("cached_tokens"),  # vLLM, OpenAI
            )
        except (AttributeError, TypeError) as exc:
            raise UpstreamError(f"{self.where} sent a chunk that is not a chat chunk") from exc
        finally:
            if events is not None:
                events.close()
            await finish_closing(response.aclose())

    async def status(self) -> EngineStatus:
        try:
            answer = await self._client.get("models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return EngineStatus(reachable=False, detail=translated(exc, self.where).message)
        if answer.status_code in (401, 403):
            return EngineStatus(
                reachable=False,
                detail=f"{self.where} refused the service's key ({answer.status_code}): "
                "check OPENAI_API_KEY",
            )
        try:
            answer.raise_for_status()
            ids = {str(m.get("id")) for m in answer.json().get("data", [])}
        except (httpx.HTTPError, ValueError, AttributeError, TypeError):
            return EngineStatus(
                reachable=False, detail=f"{self.where} answered, but not as an OpenAI API does"
            )
        return EngineStatus(reachable=True, detail=self.where, model_available=self.model in ids)


def _gather(deltas: Any, pieces: dict[int, list[Any]]) -> None:
    """Add a chunk's `delta.tool_calls` to the calls so far: the first piece of a call names
    its id and function, later ones add fragments of its arguments' JSON text."""
    for delta in deltas:
        index = delta.get("index", 0)
        call = pieces.setdefault(index, [None, None, ""])
        call[0] = delta.get("id") or call[0]
        function = delta.get("function") or {}
        call[1] = function.get("name") or call[1]
        call[2] += function.get("arguments") or ""


def _ordered(pieces: dict[int, list[Any]]) -> list[list[Any]]:
    return [pieces[index] for index in sorted(pieces)]


def _tool_message(message: ChatMessage) -> dict[str, Any]:
    """An assistant message with its calls, or a tool's result, as the OpenAI API takes them."""
    if message.tool_call_id:
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    calls = [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": orjson.dumps(c.arguments).decode()},
        }
        for c in message.tool_calls
    ]
    # content "" rather than null: llama-cpp-python's server takes only a string
    return {"role": message.role, "content": message.content, "tool_calls": calls}


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """The data of each server-sent event in `chunks` (events with no data are skipped).

    Events end at a blank line; lines may end with CRLF, LF or CR; the `data` lines of an
    event are joined with LF; comments (`:` lines) and other fields are ignored; an event cut
    off by the end of the stream is dropped, as the standard says.
    """
    pending = b""
    carriage = False  # the last chunk ended with CR: an LF opening this one is its pair
    async for chunk in chunks:
        if carriage and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        carriage = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *events, pending = (pending + chunk if pending else chunk).split(b"\n\n")
        for block in events:
            if block.startswith(b"data: ") and b"\n" not in block:
                yield block[6:]  # the usual event: one data line
                continue
            lines = []
            for line in block.split(b"\n"):
                name, _, value = line.partition(b":")
                if name == b"data":
                    lines.append(value[1:] if value.startswith(b" ") else value)
            if lines:
                yield b"\n".join(lines)


def _json(text: bytes, where: str) -> dict[str, Any]:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"{where} sent an event that is not JSON ({len(text)} chars)") from exc
    if not isinstance(data, dict):
        raise UpstreamError(f"{where} sent an event that is not a JSON object")
    return data


def _message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)
    return str(error)


async def _status_error(response: httpx.Response, model: str, where: str) -> ServiceError:
    raw = await error_body(response)
    try:
        message = _message(orjson.loads(raw).get("error") or "")
    except (orjson.JSONDecodeError, AttributeError):
        message = raw[:500].decode(errors="replace").strip()
    status = response.status_code
    text = f"{where} answered {status}: {message or response.reason_phrase}"
    error: EngineError
    if status in (401, 403):
        return UpstreamUnauthorized(
            f"{where} refused the service's credentials ({status}): an operator must set "
            f"OPENAI_API_KEY to a key it accepts ({message})"
        )
    if status == 404 or "does not exist" in message:
        return ModelNotFound(f"model {model!r} is not served by {where} ({message})")
    if status == 400 and _CONTEXT_LENGTH.search(message):
        return ContextOverflow(f"the prompt does not fit the model's context: {message}")
    if status in (429, 502, 503, 504):
        error = UpstreamUnavailable(text)
        retry_after = response.headers.get("retry-after", "")
        if retry_after.isdigit():
            error.retry_after_ms = int(retry_after) * 1000
        return error
    if 400 <= status < 500:
        return UpstreamRejected(text)
    return UpstreamError(text)
