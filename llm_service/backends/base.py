"""The seam between conversations and engines: the `LLMBackend` Protocol and its event types.

A backend streams the reply to one `ChatRequest` as an async iterator of `str` chunks (one
per piece of text the engine produced, in order) ending with exactly one `StreamEnd` carrying
the engine's own counters. Everything a backend raises is a `ServiceError` (`errors.py`); nothing
engine-specific (httpx, llama_cpp) crosses this seam. Closing a stream must never stop
halfway: `finish_closing` runs a close to its end even when the task is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from llm_service.sampling import SamplingParams

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One reply to generate: the prompt, how to sample it, and the context it must fit."""

    messages: Sequence[ChatMessage]
    sampling: SamplingParams
    context_window: int
    affinity: str = ""  # the session's id: a pool keeps a session on one engine


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of a stream: the engine's own account of the reply."""

    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    done_reason: str | None = None
    engine_tokens_per_second: float | None = None


StreamItem = str | StreamEnd


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
