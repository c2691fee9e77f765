"""`Deadline` and `SlidingWindow` on a fake clock: no sleeps, every moment chosen by the test."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import pytest

from llm_service.timing import Deadline, SlidingWindow


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self._when = when
        self.callback = callback
        self.cancelled = False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    """An event loop's clock and timers, advanced by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self._heap: list[tuple[float, int, FakeTimer]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object], /) -> FakeTimer:
        timer = FakeTimer(when, callback)
        heapq.heappush(self._heap, (when, next(self._order), timer))
        return timer

    @property
    def pending(self) -> int:
        return sum(1 for _, _, timer in self._heap if not timer.cancelled)

    def advance(self, seconds: float) -> None:
        """Move the clock on, running each timer that comes due, in order."""
        end = self.now + seconds
        while self._heap and self._heap[0][0] <= end:
            when, _, timer = heapq.heappop(self._heap)
            if not timer.cancelled:
                self.now = when
                timer.callback()
        self.now = end


@pytest.fixture
def timers() -> FakeTimers:
    return FakeTimers()


def test_a_wait_past_its_limit_expires_once(timers: FakeTimers) -> None:
    fired: list[float] = []
    deadline = Deadline(timers, lambda: fired.append(timers.now))
    deadline.start(2.0)
    timers.advance(1.9)
    assert (fired, deadline.expired) == ([], False)
    timers.advance(0.2)
    assert (fired, deadline.expired) == ([102.0], True)
    timers.advance(10)
    assert fired == [102.0]


def test_waits_that_end_in_time_never_expire(timers: FakeTimers) -> None:
    fired: list[float] = []
    deadline = Deadline(timers, lambda: fired.append(timers.now))
    for _ in range(1000):  # a wait of 0.5 s each, with 0.5 s outside the waits between them
        deadline.start(2.0)
        timers.advance(0.5)
        deadline.stop()
        timers.advance(0.5)
    assert fired == []
    assert timers.pending <= 1, "one timer for all the waits, not one per wait"


def test_time_outside_the_waits_does_not_count(timers: FakeTimers) -> None:
    fired: list[float] = []
    deadline = Deadline(timers, lambda: fired.append(timers.now))
    deadline.start(2.0)
    timers.advance(1.5)
    deadline.stop()
    timers.advance(5.0)  # the consumer was busy elsewhere
    deadline.start(2.0)
    timers.advance(1.5)
    assert fired == []
    timers.advance(0.5)
    assert fired == [timers.now] and timers.now == pytest.approx(108.5)


def test_a_shorter_limit_brings_the_timer_forward(timers: FakeTimers) -> None:
    fired: list[float] = []
    deadline = Deadline(timers, lambda: fired.append(timers.now))
    deadline.start(120.0)  # the first chunk may take long (model loading)
    timers.advance(1.0)
    deadline.stop()
    deadline.start(2.0)  # the next ones may not
    timers.advance(2.0)
    assert fired == [103.0]


def test_close_cancels_the_timer(timers: FakeTimers) -> None:
    deadline = Deadline(timers, lambda: pytest.fail("closed"))
    deadline.start(1.0)
    deadline.close()
    timers.advance(5.0)
    assert timers.pending == 0


def test_sliding_window_admits_up_to_its_limit_per_window() -> None:
    now = [0.0]
    window = SlidingWindow(2, 60.0, clock=lambda: now[0])
    assert window.admit() == 0.0
    now[0] = 10.0
    assert window.admit() == 0.0
    now[0] = 20.0
    assert window.admit() == pytest.approx(40.0)  # the first leaves the window at 60
    assert window.wait() == pytest.approx(40.0), "a refused event is not counted"
    now[0] = 60.0
    assert window.admit() == 0.0
    assert window.admit() == pytest.approx(10.0)


def test_a_window_of_no_limit_admits_everything() -> None:
    window = SlidingWindow(0)
    assert all(window.admit() == 0.0 for _ in range(10_000))
