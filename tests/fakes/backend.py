"""A small in-memory `LLMBackend` for unit tests of the layers above the engine."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from llm_service.backends.base import (
    ChatRequest,
    EngineStatus,
    StreamEnd,
    StreamItem,
    ToolCall,
    ToolCalls,
)
from llm_service.errors import ServiceError


@dataclass
class Scripted:
    """One reply: its chunks, then either a `StreamEnd` or an error."""

    chunks: list[str]
    end: StreamEnd = field(default_factory=StreamEnd)
    error: ServiceError | None = None
    gate: asyncio.Event | None = None  # wait for this before each chunk after the first
    before: asyncio.Event | None = None  # wait for this before the first item (prompt reading)
    calls: tuple[ToolCall, ...] = ()  # tools the model calls, after the chunks


class FakeBackend:
    """Replays scripted replies and records what it was asked."""

    name = "fake"
    label = "fake"
    sampling_defaults: Mapping[str, float] = MappingProxyType({})
    context_limit: int | None = None
    calls_tools = True

    def __init__(self, *, model: str = "fake-model", tokens_per_char: float | None = None):
        self.model = model
        self.script: deque[Scripted] = deque()
        self.calls: list[ChatRequest] = []
        self.closed_streams = 0
        self.asked = asyncio.Event()  # set once a stream has started
        self.status_calls = 0
        self.status_gate: asyncio.Event | None = None  # status() waits for it when set
        self._tokens_per_char = tokens_per_char

    def count_tokens(self, text: str) -> int | None:
        if self._tokens_per_char is None:
            return None
        return round(len(text) * self._tokens_per_char)

    async def stream_chat(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        self.calls.append(request)
        self.asked.set()
        reply = self.script.popleft() if self.script else Scripted(["ok"])
        try:
            if reply.before is not None:
                await reply.before.wait()
            for index, chunk in enumerate(reply.chunks):
                if index and reply.gate is not None:
                    await reply.gate.wait()
                yield chunk
            if reply.error is not None:
                raise reply.error
            if reply.calls:
                yield ToolCalls(reply.calls)
            yield reply.end
        finally:
            self.closed_streams += 1

    async def status(self) -> EngineStatus:
        self.status_calls += 1
        if self.status_gate is not None:
            await self.status_gate.wait()
        return EngineStatus(reachable=True, detail="fake", version="0", model_available=True)

    async def aclose(self) -> None:
        pass
