"""The seam between conversations and engines: the `LLMBackend` Protocol and its event types.

A backend streams the reply to one `ChatRequest` as an async iterator of `str` chunks (one
per piece of text the engine produced, in order) ending with exactly one `StreamEnd` carrying
the engine's own counters. When the model calls tools, one `ToolCalls` (every call, its
arguments parsed) comes just before the `StreamEnd`, whose `done_reason` is then
`tool_calls`. Everything a backend raises is a `ServiceError` (`errors.py`); nothing
engine-specific (httpx, llama_cpp) crosses this seam. Closing a stream must never stop
halfway: `finish_closing` runs a close to its end even when the task is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from llm_service.errors import MalformedToolCall
from llm_service.sampling import SamplingParams
from llm_service.tracing import TurnTrace

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model asked for: its id, the function's name, its arguments."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    tool_name: str | None = None  # and that call's function


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """The tools the model called in this reply, all of them, once the engine had sent them."""

    calls: tuple[ToolCall, ...]


def new_call_id() -> str:
    """An id for a call the engine sent without one."""
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: Any, arguments: Any, call_id: Any, where: str) -> ToolCall:
    """A `ToolCall` from an engine's fields: `arguments` a JSON object, or its text."""
    if not isinstance(name, str) or not name:
        raise MalformedToolCall(f"{where} sent a tool call without a function name")
    if isinstance(arguments, str | bytes):
        try:
            arguments = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise MalformedToolCall(
                f"{where} sent a call of {name!r} whose arguments are not valid JSON"
            ) from exc
    if not isinstance(arguments, dict):
        raise MalformedToolCall(
            f"{where} sent a call of {name!r} whose arguments are not a JSON object"
        )
    given = call_id if isinstance(call_id, str) and call_id else new_call_id()
    return ToolCall(given, name, arguments)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One reply to generate: the prompt, how to sample it, and the context it must fit."""

    messages: Sequence[ChatMessage]
    sampling: SamplingParams
    context_window: int
    affinity: str = ""  # the session's id: a pool keeps a session on one engine
    tools: Sequence[Mapping[str, Any]] = ()  # the functions the model may call
    tool_choice: str | Mapping[str, Any] = "auto"  # OpenAI's shape: auto, none, required, one
    trace: TurnTrace | None = None  # the turn's spans, when tracing is on

    def trace_headers(self, upstream: str) -> dict[str, str]:
        """The request to `upstream` starts now: the headers that carry the trace (if any)."""
        return {} if self.trace is None else self.trace.upstream(upstream)


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of a stream: the engine's own account of the reply."""

    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    done_reason: str | None = None
    engine_tokens_per_second: float | None = None
    prompt_cached_tokens: int | None = None  # of prompt_tokens, reused from a cache, not read


StreamItem = str | ToolCalls | StreamEnd


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """What a cheap probe of the engine found."""

    reachable: bool
    detail: str
    version: str | None = None
    model_available: bool | None = None


class LLMBackend(Protocol):
    """An inference engine the service can stream chat replies from."""

    name: str  # the engine kind: ollama, openai, llamacpp
    model: str
    label: str  # this engine, for metrics and /health: its URL without credentials
    context_limit: int | None  # the most context the engine can hold, when it is fixed
    calls_tools: bool  # whether its model can be given tools to call

    @property
    def sampling_defaults(self) -> Mapping[str, float]:
        """Sampler settings this engine answers best with, where DEFAULT_* leaves them unset."""
        ...

    def stream_chat(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        """Stream one reply. Closing the iterator stops the generation upstream."""
        ...

    async def status(self) -> EngineStatus:
        """Probe the engine cheaply; never raises for an unreachable engine."""
        ...

    def count_tokens(self, text: str) -> int | None:
        """Exact token count of `text` when the engine has a local tokenizer, else None."""
        ...

    async def aclose(self) -> None: ...


async def finish_closing(closing: Awaitable[object]) -> None:
    """Run `closing` to its end even if this task is cancelled meanwhile, then re-raise the
    cancellation.

    A close interrupted halfway leaves its resource neither in use nor given back: an HTTP
    response whose `aclose()` is cancelled never returns its connection to the pool, and the
    engine goes on generating for nobody. A cancel that arrives while a stream is closing
    (the client went away just as the reply failed, say) waits for the close instead.
    """
    task = asyncio.ensure_future(closing)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled
    task.result()
