"""The circuit breaker's state machine, driven by a fake clock."""

from __future__ import annotations

import pytest

from llm_service.breaker import CircuitBreaker
from llm_service.errors import CircuitOpen
from tests.support import FakeClock


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


def test_what_health_shows_of_each_state(breaker: CircuitBreaker, clock: FakeClock) -> None:
    closed = {"state": "closed", "consecutive_failures": 0, "failure_threshold": 3}
    assert breaker.snapshot() == {**closed, "retry_after_ms": 0}
    failing(breaker, 3)
    clock.now += 2.5
    assert breaker.snapshot() == {
        "state": "open",
        "consecutive_failures": 3,
        "failure_threshold": 3,
        "retry_after_ms": 7500,
    }
    clock.now += 7.5
    breaker.before_call()  # the probe
    assert breaker.snapshot() == {
        "state": "half_open",
        "consecutive_failures": 3,
        "failure_threshold": 3,
        "retry_after_ms": 0,
    }


def test_admits_says_what_before_call_would_do(breaker: CircuitBreaker, clock: FakeClock) -> None:
    assert breaker.admits()
    failing(breaker, 3)
    clock.now += 9.5  # half a second left: still shut
    assert not breaker.admits()
    clock.now += 0.5
    assert breaker.admits()
    breaker.before_call()  # the probe is out: no other call until it ends
    assert not breaker.admits()
    breaker.record_success()
    assert breaker.admits() and breaker.state == "closed"


def test_the_rejection_says_why_and_when(breaker: CircuitBreaker, clock: FakeClock) -> None:
    failing(breaker, 3)
    clock.now += 10.0 - 0.0001  # a tenth of a millisecond left: the wait is never 0 ms
    with pytest.raises(CircuitOpen) as caught:
        breaker.before_call()
    assert caught.value.retry_after_ms == 1
    assert str(caught.value) == (
        "the engine failed 3 times in a row; calls are paused (next try in 1 ms)"
    )
    clock.now += 0.0001
    breaker.before_call()  # the probe
    with pytest.raises(CircuitOpen) as caught:
        breaker.before_call()  # while it is out: try again shortly
    assert caught.value.retry_after_ms == 100
    assert "(next try in 100 ms)" in str(caught.value)
