"""Deadlines and rates on an injected clock: `Deadline` and `SlidingWindow`.

`Deadline` bounds the waits of one task with a single timer for all of them: `start(limit)`
when a wait begins and `stop()` when it ends cost a clock read and an assignment, which is
what a per-token path can afford. The timer wakes only at the earliest moment a wait could be
over its limit; if the wait in progress is, `on_expired()` is called, once. Time outside the
waits does not count. The send watchdog of a connection (a client that stopped reading) and
the chunk deadline of an engine stream (an engine that stopped sending) are both one of these.

`SlidingWindow` counts events in the last `window` seconds (the turn rate limit, the budget
of logged failures). Neither does I/O; both read time only through what they are given, so
tests drive them with a fake clock and no sleeps.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def when(self) -> float: ...

    def cancel(self) -> None: ...


class Timers(Protocol):
    """A clock that can call back: an asyncio event loop is one."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object], /) -> Timer: ...


class Deadline:
    """One timer bounding each of a series of waits."""

    def __init__(self, timers: Timers, on_expired: Callable[[], object]) -> None:
        self._timers = timers
        self._on_expired = on_expired
        self._since: float | None = None
        self._limit = 0.0
        self._timer: Timer | None = None
        self.expired = False

    def start(self, limit: float) -> None:
        """A wait begins that may last at most `limit` seconds."""
        now = self._timers.time()
        self._since, self._limit = now, limit
        due = now + limit
        timer = self._timer
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self._timer = self._timers.call_at(due, self._check)

    def stop(self) -> None:
        """The wait is over in time."""
        self._since = None

    def close(self) -> None:
        self._since = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        since = self._since
        if since is None:
            return  # not waiting: the next start() sets a timer again
        due = since + self._limit
        if self._timers.time() >= due:
            self._since = None
            self.expired = True
            self._on_expired()
        else:
            self._timer = self._timers.call_at(due, self._check)


class SlidingWindow:
    """At most `limit` events in any `window` seconds (a limit of 0: no limit)."""

    def __init__(
        self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self._events: deque[float] = deque()

    def wait(self) -> float:
        """Seconds until one more event is allowed; 0 when it is now."""
        if self._limit <= 0:
            return 0.0
        now = self._clock()
        events = self._events
        while events and now - events[0] >= self._window:
            events.popleft()
        if len(events) < self._limit:
            return 0.0
        return self._window - (now - events[0])

    def record(self) -> None:
        """Count one event (only the last `limit` are kept)."""
        if self._limit > 0:
            self._events.append(self._clock())
            if len(self._events) > self._limit:
                self._events.popleft()

    def admit(self) -> float:
        """`wait()`, and when it is 0, `record()` too: 0 means the event may happen."""
        wait = self.wait()
        if not wait:
            self.record()
        return wait
