"""The doors over a scheduler, shared by LimitSet (one scheduler) and KeyedLimitSet (one per key).

``try_acquire``, ``acquire`` (async) and ``acquire_sync`` (threads) share one path: try to take
the validated items at once under the lock, and only if that fails park a waiter in the one FIFO
queue (trio's ``_nowait`` twins: the blocking verb is "try; if not, park"). Every method here takes
the scheduler it works on, so a keyed set can point them at the scheduler of one key.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from functools import partial
from types import MappingProxyType
from typing import Any, Final, TypeVar, final

from ._acquisition import FAILED, HELD, Acquisition
from ._algorithms import RateState
from ._limits import Limit, ResourceLimit
from ._numbers import check_seconds, describe
from ._scheduler import Items, Scheduler
from ._statistics import LimitSetStatistics, limitset_statistics
from ._waiters import (
    GRANTED,
    Cancellable,
    TaskWaiter,
    ThreadWaiter,
    TimerClock,
    Waiter,
    async_waiter,
)

__all__ = ["Attempt", "Door"]

W = TypeVar("W", bound=Waiter)

_INF: Final = math.inf


def check_common(
    config: Mapping[str, Any] | None, clock: object, name: object
) -> Mapping[str, Any]:
    """Validate the options every set takes; returns ``config`` as a read-only mapping."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping or None, got {describe(config)}")
    if not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds, got {describe(clock)}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {describe(name)}")
    return MappingProxyType(dict(config or {}))


@final
class Attempt:
    """The answer of ``attempt``: an acquisition taken now or not at all, with the wait a
    refusal implies and the statistics, all of one moment (one round trip on a shared backend).

    Attributes:
        acquisition: held when ``acquisition.successful``; as a context manager it releases.
        retry_after: seconds until such a request could be admitted (0.0 when admitted; ``inf``
            when only a release can admit it), as :meth:`LimitSet.retry_after` answers.
        stats: the set's (or the key's) ``get_stats()`` at that moment.
    """

    __slots__ = ("acquisition", "retry_after", "stats")

    def __init__(self, acquisition: Acquisition, retry_after: float, stats: dict[str, Any]) -> None:
        self.acquisition = acquisition
        self.retry_after = retry_after
        self.stats = stats

    def __repr__(self) -> str:
        return f"<Attempt {self.acquisition!r} retry_after={self.retry_after!r}>"


class Door:
    """What the public sets share: the waiting protocol over a scheduler, questions, stats."""

    __slots__ = ("_clock", "_config", "_has_resources", "_limits", "_timer_clock", "_timer_slack")

    _limits: tuple[Limit, ...]
    _config: Mapping[str, Any]
    _clock: Callable[[], float]
    _timer_clock: TimerClock | None
    #: Seconds a wake-up may come late to be shared (``Scheduler.timer_at``); validated.
    _timer_slack: float
    #: Whether releasing must take the lock: the set has resource limits, or counts holders.
    _has_resources: bool

    def _init_door(
        self,
        limits: tuple[Limit, ...],
        config: Mapping[str, Any],
        clock: Callable[[], float],
        timer_slack: float,
    ) -> None:
        self._timer_slack = timer_slack
        self._limits = limits
        self._config = config
        self._clock = clock
        self._timer_clock = clock if isinstance(clock, TimerClock) else None
        self._has_resources = any(isinstance(limit, ResourceLimit) for limit in limits)

    @property
    def limits(self) -> tuple[Limit, ...]:
        return self._limits

    @property
    def timer_slack(self) -> float:
        """Seconds a waiter may be woken after its admissible time, so that waiters due close
        together are granted by one wake-up (0.0: at that exact time)."""
        return self._timer_slack

    @property
    def config(self) -> Mapping[str, Any]:
        """Read-only; exposed to callers as ``acquisition.config``."""
        return self._config

    def _usage(
        self, usage: Mapping[str, int | float], sched: Scheduler
    ) -> Sequence[tuple[RateState, float]]:
        """``usage`` validated and turned into ``(state, amount)`` items of ``sched``."""
        raise NotImplementedError

    def _relocate(
        self, acq: Acquisition, checked: Sequence[tuple[RateState, float]]
    ) -> tuple[Scheduler, Sequence[tuple[RateState, float]]]:
        """Under the lock: move ``acq`` off a scheduler that was dropped (keyed sets only)."""
        raise NotImplementedError

    # -- acquiring ---------------------------------------------------------------------------

    def _try(self, sched: Scheduler, items: Items) -> Acquisition:
        with sched.lock:
            receipts = sched.try_take(items, sched.clock())
        if receipts is None:
            return Acquisition(self, sched, items, FAILED)
        return Acquisition(self, sched, items, HELD, receipts)

    def _wait_sync(
        self,
        sched: Scheduler,
        items: Items,
        timeout: float,
        taken: tuple[list[Any] | None, ThreadWaiter | None, float],
    ) -> Acquisition:
        """The blocking door, after :meth:`_take_or_queue_locked` returned ``taken``."""
        receipts, waiter, start = taken
        acq = Acquisition(self, sched, items, HELD, receipts)
        if waiter is None:
            return acq
        steps = self._parking(sched, waiter)
        try:
            for delay in steps:
                waiter.sleep_sync(delay)
        finally:
            steps.close()  # if the sleep raised: leave the queue, holding nothing
        return self._finish(acq, waiter, start, timeout)

    async def _acquire_async(self, acq: Acquisition) -> None:
        """The async door, once the fast path in ``Acquisition.__aenter__`` failed."""
        sched = acq._sched
        if sched.remote:  # it may await the network: not under the lock
            receipts, waiter, start = await sched.take_first(acq._items, acq._timeout, async_waiter)
            if receipts is None and waiter is None:
                raise self._timeout_error(acq._items, acq._timeout)
        else:
            with sched.lock:
                receipts, waiter, start = self._take_or_queue_locked(
                    sched, acq._items, acq._timeout, async_waiter
                )
        if waiter is None:
            assert receipts is not None
            acq._granted(receipts, 0.0)
            return
        await self._park_async(acq, waiter, start)

    async def _park_async(
        self, acq: Acquisition, waiter: TaskWaiter, start: float, until: float | None = None
    ) -> None:
        """Wait in the queue of ``acq``'s scheduler until granted (or raise TimeoutError);
        ``until``: the first wake time, when read under the lock that queued the waiter
        (``Scheduler.sleep_until``)."""
        steps = self._parking(acq._sched, waiter, until)
        try:
            for delay in steps:
                try:
                    await waiter.sleep(delay)
                finally:
                    waiter.unpark()
        finally:
            steps.close()  # if the sleep raised (cancelled): leave the queue, holding nothing
        self._finish(acq, waiter, start, acq._timeout)

    def _take_or_queue_locked(
        self,
        sched: Scheduler,
        items: Items,
        timeout: float,
        new_waiter: Callable[[Items, float], W],
    ) -> tuple[list[Any] | None, W | None, float]:
        """Under the lock: take ``items`` at once, or queue a new waiter: ``(receipts, None,
        start)`` or ``(None, waiter, start)``. Raises TimeoutError when the deadline is out of
        reach (nothing queued)."""
        start = sched.clock()
        if sched.remote:
            # A shared backend's first round trip answers within the caller's timeout too.
            bound: Callable[[float], None] | None = getattr(sched, "bound_next_call", None)
            if bound is not None:
                bound(timeout)
        receipts = sched.try_take(items, start)
        if receipts is not None:
            return receipts, None, start
        return None, self._queue_locked(sched, items, timeout, start, new_waiter), start

    def _queue_locked(
        self,
        sched: Scheduler,
        items: Items,
        timeout: float,
        start: float,
        new_waiter: Callable[[Items, float], W],
    ) -> W:
        """Under the lock, once ``try_take`` at ``start`` failed: queue a new waiter, or raise
        TimeoutError when its deadline is out of reach (nothing queued)."""
        waiter = new_waiter(items, start + timeout)
        if sched.enqueue(waiter, start):
            return waiter
        raise self._timeout_error(items, timeout)

    def _parking(
        self, sched: Scheduler, waiter: Waiter, until: float | None = None
    ) -> Generator[float | None, None, None]:
        """The waiting protocol of both doors: yields how long to sleep (None: until notified)
        until ``waiter`` is granted or times out. Closed while it is suspended (the door's sleep
        raised: cancellation, interruption), it takes the waiter out of the queue holding nothing,
        handing a grant that arrived meanwhile to the next waiter. ``until``: the first wake
        time, when the caller read it under the lock that queued the waiter."""
        if until is None:
            with sched.lock:
                until = sched.sleep_until(waiter)
        # Whether a granted waiter may skip after_wake (see below): only on the in-memory
        # scheduler. A subclass may keep books there (Ray), or sync a shared state on taking
        # the lock again (the process backend stores the grant's counts then).
        plain = type(sched) is Scheduler
        try:
            while until is not None:
                if until == _INF:  # the common case: until notified (see _arm)
                    yield None
                else:
                    delay, timer = self._arm(sched, waiter, until)
                    try:
                        yield delay
                    finally:
                        if timer is not None:
                            timer.cancel()
                if plain and waiter.state == GRANTED:
                    # Granted while asleep, the common case: GRANTED is final (see
                    # ``Waiter.__init__``), so no lock is needed to see it.
                    break
                with sched.lock:
                    until = sched.after_wake(waiter, sched.clock())
        except BaseException:
            with sched.lock:
                sched.abandon(waiter, sched.clock())
            raise

    def _arm(
        self, sched: Scheduler, waiter: Waiter, until: float
    ) -> tuple[float | None, Cancellable | None]:
        """How to sleep until the clock reads ``until``: a delay in real seconds, or a timer of a
        clock that drives its own timers."""
        if until == _INF:
            return None, None
        if self._timer_clock is not None:
            if until <= self._clock():
                # Due already: a timer would fire now, on this thread, before the waiter sleeps
                # (a task's sleep drops a wake-up that came before it): a sleep of no time.
                return 0.0, None
            return None, self._timer_clock.call_at(until, partial(_timer_fired, sched, waiter))
        return until - self._clock(), None

    def _finish(
        self, acq: Acquisition, waiter: Waiter, start: float, timeout: float
    ) -> Acquisition:
        if waiter.state != GRANTED:
            sched = acq._sched
            with sched.lock:
                failure = sched.failure(waiter)
            raise failure or self._timeout_error(waiter.items, timeout)
        assert waiter.receipts is not None
        acq._granted(waiter.receipts, waiter.granted_at - start)
        return acq

    def _timeout_error(self, items: Items, timeout: float) -> TimeoutError:
        asked = {state.key: amount for state, amount in items}
        return TimeoutError(f"could not acquire {asked!r} within timeout={timeout!r}s")

    async def _attempt(self, sched: Scheduler, items: Items) -> Attempt:
        """``try_acquire`` for a task, with its ``retry_after`` and ``get_stats`` answers: on a
        shared backend one awaited round trip (never a wait for the network on the loop), in
        memory under the lock at once."""
        remote = getattr(sched, "attempt", None) if sched.remote else None
        if remote is None:
            with sched.lock:
                return attempt_locked(self, sched, items, sched.clock())
        receipts, wait, stats = await remote(items, self._limits)
        if receipts is None:
            return Attempt(Acquisition(self, sched, items, FAILED), wait, stats)
        return Attempt(Acquisition(self, sched, items, HELD, receipts), 0.0, stats)

    # -- questions ---------------------------------------------------------------------------

    def _retry_after(self, sched: Scheduler, items: Items) -> float:
        with sched.lock:
            return retry_after_locked(sched, items, sched.clock())

    def _pause(self, sched: Scheduler, seconds: float) -> None:
        seconds = check_seconds("seconds", seconds)
        with sched.lock:
            now = sched.clock()
            sched.pause(now + seconds, now)

    def _stats(self, sched: Scheduler) -> dict[str, Any]:
        """A consistent snapshot of ``sched`` (see ``LimitSet.get_stats``)."""
        return self._statistics(sched).as_dict()

    def _statistics(self, sched: Scheduler) -> LimitSetStatistics:
        """A consistent snapshot of ``sched`` (see ``LimitSet.statistics``)."""
        with sched.lock:
            now = sched.clock()
            sched.catch_up(now)
            return limitset_statistics(self._limits, sched, now)


def attempt_locked(door: Door, sched: Scheduler, items: Items, now: float) -> Attempt:
    """Under the lock that guards ``sched``: take ``items`` now if the limits admit them, with the
    ``retry_after`` and statistics of that same moment (the in-memory answer of ``attempt``)."""
    receipts = sched.try_take(items, now)
    wait = 0.0 if receipts is not None else retry_after_locked(sched, items, now)
    stats = stats_locked(door._limits, sched, now)
    if receipts is None:
        return Attempt(Acquisition(door, sched, items, FAILED), wait, stats)
    return Attempt(Acquisition(door, sched, items, HELD, receipts), 0.0, stats)


def retry_after_locked(sched: Scheduler, items: Items, now: float) -> float:
    """Under the lock: seconds until ``items`` could be admitted by ``sched`` (inf: only a
    release can), a lower bound while others are queued: the rate limits' time counts the
    requests queued ahead, each granted at its own earliest time (``Scheduler.queued_rate_at``)."""
    sched.catch_up(now)
    _rate_at, at = sched.admit_time(items, now)
    # FIFO: nobody passes the head, which (caught up above) is not admissible before its wake
    # time.
    head_at = sched.head_wake_at()
    if head_at > at:
        at = head_at
    queued_at = sched.queued_rate_at(items, now)  # after those queued ahead, as a timeout is
    if queued_at > at:
        at = queued_at
    return max(0.0, at - now)


def check_picklable_clock(owner: object, clock: Callable[[], float]) -> None:
    """Raise TypeError naming ``owner`` when ``clock`` cannot be pickled with it."""
    if clock is time.monotonic:
        return
    try:
        pickle.dumps(clock)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(
            f"cannot pickle {owner!r}: its clock {clock!r} is not picklable ({exc}); "
            "use a module-level function such as time.monotonic"
        ) from exc


def stats_locked(limits: Sequence[Limit], sched: Scheduler, now: float) -> dict[str, Any]:
    """Under the lock: the statistics of ``sched``, whose states belong to ``limits``, as the
    ``get_stats()`` dict (see ``_statistics.py``)."""
    return limitset_statistics(limits, sched, now).as_dict()


def _timer_fired(sched: Scheduler, waiter: Waiter) -> None:
    with sched.lock:
        waiter.notify()
