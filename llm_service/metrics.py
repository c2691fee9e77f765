"""What the service counts: the Prometheus registry behind `/metrics` and the totals of `/stats`.

`Telemetry` is made once per app with its own `CollectorRegistry` (never the global one) and is
the sink for events: each method updates the Prometheus series and the plain totals that
`/stats` reports, so the two never disagree. Two histograms are observed directly by their one
user, where a method call would be pure overhead: `inter_token` (once per token, by the turn)
and `cancel_latency` (by the cancel). Labels stay bounded: outcomes and error codes, never a
session id.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from llm_service.errors import ServiceError

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 5.0)
_TURN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

TURN_OUTCOMES = ("completed", "cancelled", "failed")
TOOL_CALL_OUTCOMES = ("called", "answered", "cancelled", "malformed")
# why a connection was refused: an error code, or the edge's own reasons
REJECTIONS = (
    "origin",
    "unauthorized",
    "max_connections",
    "max_connections_per_client",
    "service_shutting_down",
    "send_timeout",
    "pending_evicted",
    "head_timeout",
)


def _codes(cls: type[ServiceError]) -> set[str]:
    found = {cls.code}
    for sub in cls.__subclasses__():
        found |= _codes(sub)
    return found


ERROR_CODES = tuple(sorted(_codes(ServiceError)))
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


class HotHistogram(Collector):
    """A histogram observed once per token: plain counts, no lock, exposed by `collect`.

    prometheus_client's Histogram takes a lock and walks its buckets on every observation;
    this one is only ever touched from the event loop's thread, so a bisect and two
    additions do.
    """

    def __init__(
        self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative = list(accumulate(self._counts))
        buckets = [(repr(float(b)), c) for b, c in zip(self._bounds, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum
        )


@dataclass(frozen=True, slots=True)
class UpstreamGauges:
    """What /metrics shows of one upstream at a scrape."""

    upstream: str
    circuit_state: int  # 0 closed, 1 half-open, 2 open
    in_flight: int
    up: bool


class _UpstreamCollector(Collector):
    def __init__(self, gauges: Callable[[], list[UpstreamGauges]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        p = "llm_service_"
        state = GaugeMetricFamily(
            p + "circuit_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            labels=["upstream"],
        )
        inflight = GaugeMetricFamily(
            p + "upstream_in_flight", "Replies streaming from the upstream", labels=["upstream"]
        )
        up = GaugeMetricFamily(
            p + "upstream_up", "1 when the upstream's last probe succeeded", labels=["upstream"]
        )
        for g in self._gauges():
            state.add_metric([g.upstream], g.circuit_state)
            inflight.add_metric([g.upstream], g.in_flight)
            up.add_metric([g.upstream], 1 if g.up else 0)
        yield from (state, inflight, up)


@dataclass
class Totals:
    """The plain counts behind `/stats`."""

    active_connections: int = 0
    total_connections: int = 0
    active_sessions: int = 0
    total_sessions: int = 0
    total_turns: int = 0
    total_tokens_generated: int = 0
    total_errors: int = 0
    errors_by_code: Tally[str] = field(default_factory=Tally)


class Telemetry:
    """Prometheus series and `/stats` totals, updated together."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.totals = Totals()
        r = self.registry
        p = "llm_service_"
        self.connections_active = Gauge(
            p + "connections_active", "Open WebSocket connections", registry=r
        )
        self.connections_total = Counter(
            p + "connections_total", "WebSocket connections accepted", registry=r
        )
        self.connections_max = Gauge(
            p + "connections_max",
            "The most WebSocket connections served at once (LLM_MAX_CONNECTIONS)",
            registry=r,
        )
        self.connections_rejected = Counter(
            p + "connections_rejected_total",
            "WebSocket connections refused",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            p + "auth_failures_total",
            "Requests refused for a missing or wrong API key",
            ["endpoint"],
            registry=r,
        )
        self.sessions_active = Gauge(
            p + "sessions_active", "Live conversation sessions", registry=r
        )
        self.sessions_total = Counter(p + "sessions_total", "Sessions started", registry=r)
        self.turns = Counter(p + "turns_total", "Turns by outcome", ["outcome"], registry=r)
        self.tokens = Counter(p + "tokens_generated_total", "Tokens generated", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens sent", registry=r)
        self.prompt_tokens_cached = Counter(
            p + "prompt_tokens_cached_total",
            "Prompt tokens the engine reused from its cache instead of reading (where it says)",
            registry=r,
        )
        self.trimmed_turns = Counter(
            p + "history_trimmed_turns_total",
            "Old turns dropped to fit the context window",
            registry=r,
        )
        self.errors = Counter(
            p + "errors_total", "Error frames sent, by code", ["code"], registry=r
        )
        self.tool_call_outcomes = Counter(
            p + "tool_calls_total",
            "Tool calls: called by the model, answered or cancelled by the client, or malformed",
            ["outcome"],
            registry=r,
        )
        self.upstream_requests = Counter(
            p + "upstream_requests_total",
            "Engine requests by outcome and upstream",
            ["outcome", "upstream"],
            registry=r,
        )
        self.upstream_retries = Counter(
            p + "upstream_retries_total",
            "Engine requests tried again (another upstream, or the same after a backoff)",
            ["upstream"],
            registry=r,
        )
        self.engine_up = Gauge(
            p + "engine_up", "1 when the last engine probe succeeded", registry=r
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "From user_message to the first token frame",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfc = Histogram(
            p + "time_to_first_chunk_seconds",
            "From user_message to the first clause or sentence (sessions with chunking)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = HotHistogram(
            p + "inter_token_gap_seconds",
            "Gap between consecutive token frames",
            _GAP_BUCKETS,
            r,
        )
        self.turn_duration = Histogram(
            p + "turn_duration_seconds",
            "From user_message to the end of the turn",
            buckets=_TURN_BUCKETS,
            registry=r,
        )
        self.cancel_latency = Histogram(
            p + "cancel_latency_seconds",
            "From reading cancel to the upstream stream closed",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        # Every label value known in advance is there from the start, at 0, so that rate()
        # sees the first event of each: a counter series appears only with its first count.
        for outcome in TURN_OUTCOMES:
            self.turns.labels(outcome)
        for outcome in TOOL_CALL_OUTCOMES:
            self.tool_call_outcomes.labels(outcome)
        for code in ERROR_CODES:
            self.errors.labels(code)
        for reason in REJECTIONS:
            self.connections_rejected.labels(reason)

    def upstreams_known(self, labels: Iterable[str]) -> None:
        """Start the per-upstream counters of these upstreams at 0."""
        for label in labels:
            self.upstream_retries.labels(label)
            for outcome in ("success", "cancelled"):
                self.upstream_requests.labels(outcome, label)

    def connection_opened(self) -> None:
        self.totals.active_connections += 1
        self.totals.total_connections += 1
        self.connections_active.inc()
        self.connections_total.inc()

    def connection_closed(self) -> None:
        self.totals.active_connections -= 1
        self.connections_active.dec()

    def connection_rejected(self, reason: str) -> None:
        self.connections_rejected.labels(reason).inc()

    def auth_failed(self, endpoint: str) -> None:
        self.auth_failures.labels(endpoint).inc()

    def session_started(self) -> None:
        self.totals.active_sessions += 1
        self.totals.total_sessions += 1
        self.sessions_active.inc()
        self.sessions_total.inc()

    def session_ended(self) -> None:
        self.totals.active_sessions -= 1
        self.sessions_active.dec()

    def error(self, code: str) -> None:
        self.totals.total_errors += 1
        self.totals.errors_by_code[code] += 1
        self.errors.labels(code).inc()

    def upstream_request(self, outcome: str, upstream: str) -> None:
        self.upstream_requests.labels(outcome, upstream).inc()

    def upstream_retried(self, upstream: str) -> None:
        self.upstream_retries.labels(upstream).inc()

    def watch_upstreams(self, gauges: Callable[[], list[UpstreamGauges]]) -> None:
        """Expose each upstream's breaker state, replies in flight and health, read when
        /metrics is scraped."""
        self.registry.register(_UpstreamCollector(gauges))

    def tool_calls(self, outcome: str, count: int = 1) -> None:
        """`count` tool calls reached `outcome`: called, answered, cancelled or malformed."""
        self.tool_call_outcomes.labels(outcome).inc(count)

    def turn_finished(
        self,
        outcome: str,
        *,
        tokens: int,
        prompt_tokens: int | None,
        trimmed: int,
        duration_s: float,
        ttft_s: float | None,
        ttfc_s: float | None = None,
        cached_tokens: int | None = None,
    ) -> None:
        self.totals.total_turns += 1
        self.totals.total_tokens_generated += tokens
        self.turns.labels(outcome).inc()
        self.tokens.inc(tokens)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if cached_tokens:
            self.prompt_tokens_cached.inc(cached_tokens)
        if trimmed:
            self.trimmed_turns.inc(trimmed)
        self.turn_duration.observe(duration_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if ttfc_s is not None:
            self.ttfc.observe(ttfc_s)

    def stats(self) -> dict[str, Any]:
        """The body of `GET /stats`."""
        t = self.totals
        return {
            "connections": {
                "active_connections": t.active_connections,
                "total_connections": t.total_connections,
                "total_tokens_generated": t.total_tokens_generated,
            },
            "conversations": {
                "active_sessions": t.active_sessions,
                "total_sessions": t.total_sessions,
                "total_turns": t.total_turns,
                "total_tokens_generated": t.total_tokens_generated,
            },
            "errors": {"total_errors": t.total_errors, "by_category": dict(t.errors_by_code)},
        }
