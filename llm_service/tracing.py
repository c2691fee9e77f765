"""Traces: one OpenTelemetry span per turn, with its queue, upstream request and stream.

Off unless configured: with neither `OTEL_EXPORTER_OTLP_ENDPOINT` nor
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set (or with `OTEL_SDK_DISABLED=true`, or
`OTEL_TRACES_EXPORTER=none`), `Tracing.turn` returns None, the SDK is not even imported, and a
turn pays one `is None` test. Configured, a turn is four spans, exported in batches by the
SDK's own thread over OTLP/HTTP (protobuf):

    turn             SERVER    from the turn's start to its end: the whole of it, with its
                               attributes (session, model, upstream, tokens, done reason,
                               outcome); ERROR, with `error.type`, when it failed
      turn.queue     INTERNAL  until the engine takes the request (a free embedded worker)
      turn.upstream  CLIENT    from the request to its first token; one per attempt when the
                               engine is retried; its context is the `traceparent` header of
                               the engine request, so the engine's own spans (vLLM's) join
      turn.stream    INTERNAL  from the first token to the end

Nothing is recorded per token: the four spans are started and ended at the turn's few
moments. A client joins the turn to its own trace with a W3C `traceparent` (and optional
`tracestate`), given per turn (`user_message.trace`) or for the connection (the WebSocket
handshake's headers). The standard `OTEL_*` variables not named here (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`,
...) are read by the SDK itself, from the process environment.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

SERVICE_NAME = "fasttalk-llm-service"
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


@dataclass(frozen=True, slots=True)
class Parent:
    """The client's trace a turn continues: W3C trace-context headers."""

    traceparent: str
    tracestate: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Parent | None:
        """The handshake's `traceparent` and `tracestate`, when it has a valid one."""
        value = headers.get("traceparent", "").strip().lower()
        if not TRACEPARENT.match(value):
            return None
        return cls(value, headers.get("tracestate") or None)

    def carrier(self) -> dict[str, str]:
        headers = {"traceparent": self.traceparent}
        if self.tracestate:
            headers["tracestate"] = self.tracestate
        return headers


@dataclass(frozen=True, slots=True)
class Exporting:
    """Where spans go, from the settings: `endpoint` (OTLP/HTTP traces URL) or the console."""

    endpoint: str | None
    console: bool = False


class TurnTrace:
    """The spans of one turn, opened and closed at its moments."""

    __slots__ = ("_tracer", "_root", "_context", "_queue", "_upstream", "_stream", "attempts")

    def __init__(self, tracer: Tracer, parent: Parent | None, attributes: dict[str, Any]):
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        self._tracer = tracer
        context = _PROPAGATOR.extract(parent.carrier()) if parent is not None else None
        self._root: Span = tracer.start_span(
            "turn", context=context, kind=SpanKind.SERVER, attributes=attributes
        )
        self._context = trace.set_span_in_context(self._root)
        self._queue: Span | None = tracer.start_span("turn.queue", context=self._context)
        self._upstream: Span | None = None
        self._stream: Span | None = None
        self.attempts = 0

    @property
    def trace_id(self) -> str:
        return f"{self._root.get_span_context().trace_id:032x}"

    def upstream(self, label: str) -> dict[str, str]:
        """The engine request to `label` starts now: the headers that carry the trace to it.
        An earlier attempt still open failed before its first token (a retry)."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        now = time.time_ns()
        if self._queue is not None:
            self._queue.end(now)
            self._queue = None
        if self._upstream is not None:
            self._upstream.set_status(Status(StatusCode.ERROR, "failed before a token; retried"))
            self._upstream.end(now)
        self.attempts += 1
        self._root.set_attribute("llm_service.upstream", label)
        self._upstream = span = self._tracer.start_span(
            "turn.upstream",
            context=self._context,
            kind=SpanKind.CLIENT,
            start_time=now,
            attributes={"llm_service.upstream": label, "llm_service.attempt": self.attempts},
        )
        headers: dict[str, str] = {}
        _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
        return headers

    def first_token(self) -> None:
        now = time.time_ns()
        for span in (self._queue, self._upstream):
            if span is not None:
                span.end(now)
        self._queue = self._upstream = None
        self._stream = self._tracer.start_span("turn.stream", context=self._context, start_time=now)

    def finish(
        self, outcome: str, attributes: dict[str, Any], error: tuple[str, str] | None
    ) -> None:
        """End every span of the turn: `outcome` completed, cancelled or failed; `error` the
        failure's code and message."""
        from opentelemetry.trace import Status, StatusCode

        now = time.time_ns()
        root = self._root
        for span in (self._queue, self._upstream, self._stream):
            if span is not None:
                if error is not None and span is not self._stream:
                    span.set_status(Status(StatusCode.ERROR, error[1]))
                span.end(now)
        self._queue = self._upstream = self._stream = None
        root.set_attributes({k: v for k, v in attributes.items() if v is not None})
        root.set_attribute("llm_service.outcome", outcome)
        if error is not None:
            root.set_attribute("error.type", error[0])
            root.set_status(Status(StatusCode.ERROR, error[1]))
        root.end(now)


class Tracing:
    """The service's tracer; off (every `turn` None) without a provider."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._provider = provider
        self._tracer: Tracer | None = None
        if provider is not None:
            from llm_service import __version__

            self._tracer = provider.get_tracer("llm_service", __version__)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def turn(
        self,
        session_id: str,
        response_id: str,
        model: str,
        engine: str,
        parent: Parent | None,
    ) -> TurnTrace | None:
        if self._tracer is None:
            return None
        return TurnTrace(
            self._tracer,
            parent,
            {
                "session.id": session_id,
                "gen_ai.conversation.id": session_id,
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": engine,
                "gen_ai.request.model": model,
                "llm_service.response_id": response_id,
            },
        )

    async def aclose(self) -> None:
        """Export what is left, then stop (the exporter's last request runs in a thread)."""
        if self._provider is not None:
            await asyncio.to_thread(self._provider.shutdown)


OFF = Tracing()


def open_tracing(exporting: Exporting | None) -> Tracing:
    """A `Tracing` exporting as the settings say, or `OFF`."""
    if exporting is None:
        return OFF
    from opentelemetry.sdk.resources import SERVICE_NAME as NAME_KEY
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(NAME_KEY, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({NAME_KEY: SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if exporting.console:
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=exporting.endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)


class _Propagator:
    """W3C trace context, imported on first use."""

    def __init__(self) -> None:
        self._impl: Any = None

    def _get(self) -> Any:
        if self._impl is None:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._impl = TraceContextTextMapPropagator()
        return self._impl

    def extract(self, carrier: dict[str, str]) -> Any:
        return self._get().extract(carrier)

    def inject(self, carrier: dict[str, str], context: Any) -> None:
        self._get().inject(carrier, context=context)


_PROPAGATOR = _Propagator()
