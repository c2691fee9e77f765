"""The circuit breaker around the engine: a pure state machine with an injected clock.

    closed ──(failure_threshold consecutive failures)──> open
    open ──(recovery_timeout elapsed, next call)──> half_open: one probe call let through
    half_open ──probe succeeds──> closed
    half_open ──probe fails──> open (the recovery timeout starts again)
    half_open ──probe abandoned (cancelled)──> half_open, the next call probes

While open, and while a half-open probe is in flight, `before_call()` raises `CircuitOpen`
with the time left until the next probe, so turns fail at once without touching the engine.
The breaker does no I/O and reads time only through `clock`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from llm_service.errors import CircuitOpen

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Counts consecutive engine failures and fails fast while the engine is down."""

    def __init__(
        self,
        failure_threshold: int,
        recovery_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self._clock = clock
        self.state: State = "closed"
        self.failures = 0
        self.opened_at = 0.0  # pragma: no mutate (read only while open; opening sets it)
        self._probing = False
        self.times_opened = 0

    def retry_after(self) -> float:
        """Seconds until the next probe is allowed (0 when calls pass)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.opened_at + self.recovery_timeout - self._clock())

    def admits(self) -> bool:
        """Whether `before_call()` would let a call through now (it changes nothing)."""
        if self.state == "open":
            return self.retry_after() <= 0
        return not self._probing  # never probing while closed

    def before_call(self) -> None:
        """Admit a call or raise `CircuitOpen`. An admitted call must end in exactly one of
        `record_success`, `record_failure` or `record_abandoned`."""
        if self.state == "open":
            if self.retry_after() > 0:
                raise self._rejection()
            self.state = "half_open"
        if self.state == "half_open":
            if self._probing:
                raise self._rejection()
            self._probing = True

    def record_success(self) -> None:
        self.state = "closed"
        self.failures = 0
        self._probing = False

    def record_failure(self) -> None:
        self.failures += 1
        # a failed probe reopens too: failures count from the last success, so a breaker
        # that opened has at least the threshold
        if self.failures >= self.failure_threshold:
            if self.state != "open":
                self.times_opened += 1
            self.state = "open"
            self.opened_at = self._clock()
        self._probing = False

    def record_abandoned(self) -> None:
        """The call ended without a verdict on the engine (the client cancelled)."""
        self._probing = False

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "consecutive_failures": self.failures,
            "failure_threshold": self.failure_threshold,
            "retry_after_ms": round(self.retry_after() * 1000),
        }

    def _rejection(self) -> CircuitOpen:
        wait_ms = max(1, round(self.retry_after() * 1000)) if self.state == "open" else 100
        return CircuitOpen(
            f"the engine failed {self.failures} times in a row; calls are paused "
            f"(next try in {wait_ms} ms)",
            retry_after_ms=wait_ms,
        )
