"""How a waiter sleeps and is woken: a task on asyncio, uvloop or trio, on any thread, or a thread.

The scheduler (``_scheduler.py``) decides; this module only parks and unparks. Every waiter,
whatever its kind, sits in the one FIFO queue of its LimitSet and offers the same two operations:

* ``notify()``, called by *any* thread while it holds the LimitSet's lock: "look at your state
  again". It never blocks and never runs the waiter's code; it posts a wake-up through the waiter's
  own mechanism (setting an asyncio future on its loop's thread, rescheduling a trio task through
  its trio token, releasing a thread's private lock). Repeated notifications before the waiter
  looks collapse into one.
* ``sleep(until)`` / ``sleep_sync(until)``: park until notified, or until the clock reaches
  ``until`` (a time on the LimitSet's clock), whichever comes first. It returns normally either
  way; the caller re-reads its state under the lock. Cancellation propagates out of it.

Timers: with a real clock (``time.monotonic`` or any clock ticking at real speed) a sleep until
``until`` becomes a timer of ``until - clock()`` seconds on the event loop (or a timed lock
acquire). A clock that implements :class:`TimerClock` (``aiolimits.testing.ManualClock``) fires the
timers itself when it is advanced, so tests never sleep for real.

Prior art: trio's ``ParkingLot`` (one queue that knows about cancellation), anyio's
``CapacityLimiter``; the cross-thread wake is what ``loop.call_soon_threadsafe`` and
``TrioToken.run_sync_soon`` exist for.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._algorithms import RateState

__all__ = [
    "AsyncioWaiter",
    "Cancellable",
    "TaskWaiter",
    "ThreadWaiter",
    "TimerClock",
    "TrioWaiter",
    "Waiter",
    "async_waiter",
    "refuse_on_event_loop",
    "running_event_loop",
    "trio_lowlevel",
]

WAITING = 0
GRANTED = 1
LEFT = 2  # cancelled or timed out, out of the queue, holding nothing

_INF = math.inf
# Per event loop class: whether its timers must be padded to whole milliseconds (uvloop).
_PAD_MS: dict[type, bool] = {}


class Cancellable(Protocol):
    def cancel(self) -> None: ...


@runtime_checkable
class TimerClock(Protocol):
    """A clock that drives timers itself (a manual or simulated clock)."""

    def __call__(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Cancellable:
        """Call ``callback`` (from whichever thread moves the clock) once the time is >= ``when``;
        at once, from the calling thread, when it already is."""
        ...


class Waiter:
    """One queued request. Fields other than the wake-up mechanism belong to the scheduler and
    are read and written only under the LimitSet's lock."""

    __slots__ = (
        "deadline",
        "granted_at",
        "items",
        "notified",
        "rate_at",
        "receipts",
        "state",
        "wake_at",
    )

    def __init__(self, items: tuple[tuple[RateState, float], ...], deadline: float) -> None:
        self.items = items
        self.deadline = deadline  # the caller's timeout, on the LimitSet's clock (inf: none)
        # WAITING, then GRANTED or LEFT, both final: once granted, only the waiter's own task
        # or thread touches it again, so it may read GRANTED without the lock after a wake-up
        # (whoever granted it wrote every field of the grant first, then woke it).
        self.state = WAITING
        self.notified = False
        # Set by the scheduler while this waiter is the head: when it becomes admissible
        # (inf: only a release can do it) and the part of that known from the rate limits alone.
        self.wake_at = _INF
        self.rate_at = -_INF
        self.receipts: list[Any] | None = None
        self.granted_at = 0.0

    def notify(self) -> bool:
        """Wake the waiter to re-read its state. Under the lock. False if it can never wake."""
        raise NotImplementedError

    def notify_at(self, when: float, now: float, fire: Callable[[], None]) -> bool:
        """Under the lock, when this waiter has just become the head: call ``fire`` (which
        takes the lock, grants what is due and wakes whom it concerns) once the clock (now
        reading ``now``) reads ``when`` (inf: never; a later notification will wake it). A
        waiter that can arm that timer itself without running does; the others are woken now,
        to arm their own when they run (the default). False if it can never wake."""
        return self.notify()

    def consume_notification(self) -> None:
        """Under the lock, after waking: forget a notification already delivered."""
        self.notified = False

    def cancel_pending(self) -> bool:
        """Whether a cancellation has already reached this waiter, which will leave as soon as it
        runs: granting it would only take units to give them back."""
        return False


class ThreadWaiter(Waiter):
    """A plain thread blocked in ``acquire_sync``, parked on a private lock used as a binary
    semaphore (released once per notification)."""

    __slots__ = ("_got", "_parker")

    def __init__(self, items: tuple[tuple[RateState, float], ...], deadline: float) -> None:
        super().__init__(items, deadline)
        self._parker = threading.Lock()
        self._parker.acquire()
        self._got = False

    def notify(self) -> bool:
        if not self.notified:
            self.notified = True
            self._parker.release()
        return True

    def sleep_sync(self, timeout: float | None) -> None:
        """Block without the LimitSet's lock for at most ``timeout`` seconds (None: no limit)."""
        if timeout is None:
            self._got = self._parker.acquire()
        else:
            # Far-off wake times (huge windows) exceed what a lock wait accepts: wake at the
            # bound, and the caller sleeps again for the rest.
            timeout = min(max(timeout, 0.0), threading.TIMEOUT_MAX)
            self._got = self._parker.acquire(timeout=timeout)

    def consume_notification(self) -> None:
        if self.notified:
            if not self._got:
                # The notification arrived after our timed acquire gave up: take it now so the
                # parker is held again for the next sleep.
                acquired = self._parker.acquire(blocking=False)
                assert acquired
            self.notified = False
        self._got = False


def _resolve_timer(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class TaskWaiter(Waiter):
    """A task of an event loop running on one thread (``_thread``): woken directly from that
    thread, or through the loop's thread-safe door (``_post``) from any other."""

    __slots__ = ("_thread",)

    def __init__(self, items: tuple[tuple[RateState, float], ...], deadline: float) -> None:
        super().__init__(items, deadline)
        self._thread = threading.get_ident()

    def _wake(self) -> None:
        raise NotImplementedError

    def _post(self, callback: Callable[[], None]) -> None:
        raise NotImplementedError

    def sleep(self, delay: float | None) -> Awaitable[None]:
        """Sleep ``delay`` seconds (None: until notified), or less when notified; the caller
        calls :meth:`unpark` once it is over (woken, timed out or cancelled)."""
        raise NotImplementedError

    def unpark(self) -> None:
        """After :meth:`sleep`, however it ended: drop the timers it or a notifier armed."""

    def notify(self) -> bool:
        if self.notified:
            return True
        self.notified = True
        if threading.get_ident() == self._thread:
            self._wake()
            return True
        try:
            self._post(self._wake)
        except RuntimeError:  # its loop is closed or its run is over: it will never run again
            return False
        return True


class AsyncioWaiter(TaskWaiter):
    """A task on an asyncio (or uvloop) event loop, possibly on another thread than the notifier."""

    __slots__ = ("_fut", "_handle", "_loop", "_pad_ms", "_timer")

    def __init__(
        self,
        items: tuple[tuple[RateState, float], ...],
        deadline: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        # Every waiting task makes one: Waiter.__init__ and TaskWaiter.__init__ inline.
        self.items = items
        self.deadline = deadline
        self.state = WAITING  # see Waiter.__init__
        self.notified = False
        self.wake_at = _INF
        self.rate_at = -_INF
        self.receipts: list[Any] | None = None
        self.granted_at = 0.0
        self._thread = threading.get_ident()
        self._loop = loop
        self._fut: asyncio.Future[None] = loop.create_future()
        # uvloop rounds timer delays to whole milliseconds against a cached millisecond clock, so
        # a timer can fire up to ~1.5 ms early; waking early and going back to sleep is the
        # spinning other limiters show under uvloop. Round up instead: never early, <= 2 ms late.
        pad = _PAD_MS.get(type(loop))
        if pad is None:
            pad = _PAD_MS[type(loop)] = type(loop).__module__.startswith("uvloop")
        self._pad_ms = pad
        # A wake-up the scheduler armed for it on its loop (notify_at); touched on that loop's
        # thread only.
        self._timer: asyncio.TimerHandle | None = None
        # The timer of its own sleep, if any (sleep, unpark).
        self._handle: asyncio.TimerHandle | None = None

    def _wake(self) -> None:
        fut = self._fut
        if not fut.done():
            fut.set_result(None)

    def notify(self) -> bool:
        # TaskWaiter.notify with _wake inline: every grant of a waiting task calls it.
        if self.notified:
            return True
        self.notified = True
        if threading.get_ident() == self._thread:
            fut = self._fut
            if not fut.done():
                fut.set_result(None)
            return True
        try:
            self._post(self._wake)
        except RuntimeError:  # its loop is closed or its run is over: it will never run again
            return False
        return True

    def _post(self, callback: Callable[[], None]) -> None:
        self._loop.call_soon_threadsafe(callback)  # RuntimeError once the loop is closed

    def cancel_pending(self) -> bool:
        # Task.cancel() cancels the future the task awaits at once; reading that flag from
        # another thread can only be late, which is the case handled by giving the grant back.
        return self._fut.cancelled()

    def notify_at(self, when: float, now: float, fire: Callable[[], None]) -> bool:
        # On its loop's thread, the timer is armed here and the task sleeps on until it fires:
        # otherwise it would run now only to arm the same timer, one loop iteration (and a
        # share of a grant's CPU) per new head in a busy queue. The timer grants by itself
        # (``fire``), so the head does not run first only to grant itself and those behind it.
        if self.notified or threading.get_ident() != self._thread:
            return self.notify()
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        if when == _INF:
            return True  # asleep already: a release or a refund will notify it
        delay = when - now
        if delay <= 0:
            return self.notify()
        self._timer = self._loop.call_later(self._padded(delay), self._fire, fire)
        return True

    def _fire(self, fire: Callable[[], None]) -> None:
        self._timer = None  # only ever touched on this loop's thread
        fire()

    def _padded(self, delay: float) -> float:
        # uvloop rounds to whole milliseconds, early as well as late: round up, plus one.
        return (math.ceil(delay * 1000.0) + 1) / 1000.0 if self._pad_ms else delay

    def sleep(self, delay: float | None) -> Awaitable[None]:
        """Park until notified or ``delay`` seconds (None: no limit) have passed: the future
        to await (no coroutine of its own: every waiting task awaits one)."""
        fut = self._fut
        if fut.done():
            fut = self._fut = self._loop.create_future()
        if delay is not None:
            self._handle = self._loop.call_later(self._padded(delay), _resolve_timer, fut)
        return fut

    def unpark(self) -> None:
        handle = self._handle
        if handle is not None:
            handle.cancel()
            self._handle = None
        timer = self._timer
        if timer is not None:  # awake for another reason: it re-reads its wake time itself
            timer.cancel()
            self._timer = None


class TrioWaiter(TaskWaiter):
    """A trio task, possibly notified from another thread through its trio token."""

    __slots__ = ("_parked", "_task", "_token")

    def __init__(self, items: tuple[tuple[RateState, float], ...], deadline: float) -> None:
        import trio

        super().__init__(items, deadline)
        self._task = trio.lowlevel.current_task()
        self._token = trio.lowlevel.current_trio_token()
        self._parked = False  # touched only on the trio thread

    def _wake(self) -> None:
        if self._parked:
            import trio

            self._parked = False
            trio.lowlevel.reschedule(self._task)

    def _post(self, callback: Callable[[], None]) -> None:
        self._token.run_sync_soon(callback)  # trio.RunFinishedError (a RuntimeError) once over

    def _abort(self, _raise_cancel: object) -> Any:
        import trio

        self._parked = False
        return trio.lowlevel.Abort.SUCCEEDED

    async def sleep(self, delay: float | None) -> None:
        import trio

        if self.notified:
            # A notification is pending (posted from another thread, or already delivered while
            # we were not parked): do not park, the caller re-reads its state.
            await trio.lowlevel.checkpoint()
            return
        self._parked = True
        if delay is None:
            await trio.lowlevel.wait_task_rescheduled(self._abort)
            return
        with trio.move_on_after(max(delay, 0.0)):
            await trio.lowlevel.wait_task_rescheduled(self._abort)


def running_event_loop() -> str | None:
    """The async library running on this thread: "asyncio", "trio" or None."""
    if asyncio._get_running_loop() is not None:
        return "asyncio"
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_run():
        return "trio"
    return None


def trio_lowlevel() -> Any:
    """``trio.lowlevel`` when the caller is a trio task, else None: the doors make every async
    acquisition a trio checkpoint with it (trio's convention for its own primitives). Under
    asyncio it costs one C call."""
    if asyncio._get_running_loop() is not None:
        return None
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_task():
        return trio.lowlevel
    return None


def refuse_on_event_loop(owner: str) -> None:
    """Raise RuntimeError on a thread that runs an event loop: a blocking acquire there would
    block the loop (``owner`` names the object in the advice)."""
    if running_event_loop() is not None:
        raise RuntimeError(
            "acquire_sync() would block the event loop running on this thread; "
            f"use `async with {owner}.acquire(...)` instead"
        )


def async_waiter(items: tuple[tuple[RateState, float], ...], deadline: float) -> TaskWaiter:
    """A waiter for the current task, whichever async library runs it."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        return AsyncioWaiter(items, deadline, loop)
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_task():
        return TrioWaiter(items, deadline)
    raise RuntimeError(
        "LimitSet.acquire() must be awaited in a task of asyncio (or uvloop) or trio; "
        "from a thread, use acquire_sync()"
    )
