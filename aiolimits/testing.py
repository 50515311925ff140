"""Helpers for testing code that uses aiolimits, deterministically and without real sleeps.

:class:`ManualClock` is a clock you move by hand. Pass it as ``LimitSet(..., clock=clock)``: every
decision then uses its time, and waiters that sleep until a computed time (or a ``timeout``) wake
when you :meth:`~ManualClock.advance` past it, never on their own. With async code, let the woken
tasks run after advancing, e.g. with ``await anyio.wait_all_tasks_blocked()``.

Example:
    >>> clock = ManualClock()
    >>> limits = LimitSet([RateLimit("req", window_seconds=1, capacity=1)], clock=clock)
    >>> limits.try_acquire({"req": 1}).successful
    True
    >>> limits.try_acquire({"req": 1}).successful
    False
    >>> clock.advance(1.0)
    >>> limits.try_acquire({"req": 1}).successful
    True
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections.abc import Callable
from typing import final

__all__ = ["ManualClock"]


@final
class _Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@final
class ManualClock:
    """A monotonic clock that moves only when told to, and fires the timers that come due.

    Thread-safe: any thread may read or advance it. Timer callbacks run on the thread that
    advances the clock, after the time has moved.

    Args:
        start: the initial reading in seconds (any finite number; ``1e7`` simulates a long uptime).
    """

    __slots__ = ("_counter", "_lock", "_now", "_timers")

    def __init__(self, start: float = 0.0) -> None:
        if (
            not isinstance(start, (int, float))
            or isinstance(start, bool)
            or not math.isfinite(start)
        ):
            raise ValueError(f"start must be a finite number of seconds, got {start!r}")
        self._now = float(start)
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._counter = itertools.count()

    def __call__(self) -> float:
        return self._now

    def now(self) -> float:
        """The current reading (same as calling the clock)."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (>= 0) and fire the timers now due, in order."""
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
            raise TypeError(f"seconds must be a number, got {type(seconds).__name__} {seconds!r}")
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        with self._lock:
            self._now += seconds
        self._fire_due()

    def set(self, when: float) -> None:
        """Move the clock to ``when``, which must not be in the past (the clock is monotonic)."""
        if not isinstance(when, (int, float)) or isinstance(when, bool) or not math.isfinite(when):
            raise ValueError(f"when must be a finite number of seconds, got {when!r}")
        with self._lock:
            if when < self._now:
                raise ValueError(f"when must be >= the current time {self._now!r}, got {when!r}")
            self._now = float(when)
        self._fire_due()

    def call_at(self, when: float, callback: Callable[[], object]) -> _Timer:
        """Call ``callback`` once the clock reads ``when`` or later; at once if it already does.
        Returns a handle whose ``cancel()`` prevents the call."""
        timer = _Timer(callback)
        with self._lock:
            due = when <= self._now
            if not due:
                heapq.heappush(self._timers, (when, next(self._counter), timer))
        if due:
            callback()
        return timer

    def pending_timers(self) -> int:
        """How many timers are waiting for the clock (cancelled ones not counted)."""
        with self._lock:
            return sum(1 for _, _, t in self._timers if not t.cancelled)

    def _fire_due(self) -> None:
        while True:
            with self._lock:
                if not self._timers or self._timers[0][0] > self._now:
                    return
                _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback()

    def __repr__(self) -> str:
        return f"ManualClock({self._now!r})"
