"""The circuit breaker's state machine, driven by a fake clock."""

from __future__ import annotations

import pytest

from llm_service.breaker import CircuitBreaker
from llm_service.errors import CircuitOpen


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failing(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.before_call()
        breaker.record_failure()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, recovery_timeout=10.0, clock=clock)


def test_closed_admits_and_counts_consecutive_failures(breaker: CircuitBreaker) -> None:
    failing(breaker, 2)
    assert breaker.state == "closed" and breaker.failures == 2
    breaker.before_call()
    breaker.record_success()
    assert breaker.failures == 0
    failing(breaker, 2)
    assert breaker.state == "closed"


def test_threshold_opens_and_open_rejects_with_retry_after(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    failing(breaker, 3)
    assert breaker.state == "open" and breaker.times_opened == 1
    clock.now += 4.0
    with pytest.raises(CircuitOpen) as caught:
        breaker.before_call()
    assert caught.value.retry_after_ms == 6000
    assert caught.value.recoverable is True
    assert breaker.snapshot()["retry_after_ms"] == 6000


def test_recovery_timeout_lets_one_probe_through(breaker: CircuitBreaker, clock: FakeClock) -> None:
    failing(breaker, 3)
    clock.now += 10.0
    breaker.before_call()
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # only one probe at a time


def test_probe_success_closes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    failing(breaker, 3)
    clock.now += 10.0
    breaker.before_call()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.failures == 0
    breaker.before_call()
    breaker.before_call()


def test_probe_failure_reopens_for_a_new_timeout(breaker: CircuitBreaker, clock: FakeClock) -> None:
    failing(breaker, 3)
    clock.now += 10.0
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state == "open" and breaker.times_opened == 2
    clock.now += 9.9
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.now += 0.1
    breaker.before_call()
    assert breaker.snapshot()["state"] == "half_open"


def test_abandoned_probe_frees_the_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    failing(breaker, 3)
    clock.now += 10.0
    breaker.before_call()
    breaker.record_abandoned()
    assert breaker.state == "half_open"
    breaker.before_call()
    breaker.record_success()
    assert breaker.snapshot()["state"] == "closed"


def test_late_failure_while_open_keeps_it_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    breaker.before_call()  # admitted while closed, fails after the breaker opened
    failing(breaker, 3)
    breaker.record_failure()
    assert breaker.state == "open" and breaker.times_opened == 1
