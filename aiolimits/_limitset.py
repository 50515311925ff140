"""LimitSet: the verbs users call. A thin door over the scheduler for tasks and threads.

``acquire`` (async), ``acquire_sync`` (threads) and ``try_acquire`` (never waits) share one path:
turn ``requested`` into a validated tuple of ``(state, amount)`` items (``_requests.py``), try to
take them at once under the lock, and only if that fails park a waiter in the one FIFO queue
(trio's ``_nowait`` twins: the blocking verb is "try; if not, park").
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from functools import partial
from types import MappingProxyType
from typing import Any, Final, TypeVar, final

from . import _decorator
from ._acquisition import FAILED, HELD, PENDING, Acquisition
from ._algorithms import new_state
from ._backends._base import Backend
from ._backends.memory import MemoryBackend
from ._limits import CallLimit, Limit, RateLimit, ResourceLimit
from ._requests import Requests, check_amount, check_timeout, describe
from ._scheduler import Items, Scheduler
from ._waiters import (
    GRANTED,
    Cancellable,
    ThreadWaiter,
    TimerClock,
    Waiter,
    async_waiter,
    refuse_on_event_loop,
)

__all__ = ["LimitSet"]

W = TypeVar("W", bound=Waiter)

_INF: Final = math.inf


@final
class LimitSet:
    """Several limits acquired together, all-or-nothing, by tasks and threads in FIFO order.

    A LimitSet combines rate limits (:class:`RateLimit`, :class:`CallLimit`) and resource limits
    (:class:`ResourceLimit`) and holds their state. An acquisition waits until *every* limit can
    admit its amount, then takes them all at once; while waiting it holds nothing. Waiters are
    served in arrival order across tasks (asyncio, uvloop, trio), event loops on several threads,
    and threads; each sleeps until the exact time its request becomes admissible, or until a
    release or refund makes it admissible sooner. It is not a retry loop and it never polls.

    Args:
        limits: the limits; keys must be unique. An empty set admits everything at once.
        config: read-only data exposed as ``acquisition.config`` (account, region, key id).
        backend: where the state lives; default :class:`MemoryBackend` (this process).
        name: identifies the state in a shared backend.
        clock: monotonic seconds; ``aiolimits.testing.ManualClock`` for deterministic tests.

    Example:
        >>> limits = LimitSet([
        ...     CallLimit(window_seconds=60, capacity=500),
        ...     RateLimit("tokens", window_seconds=60, capacity=90_000),
        ... ])
        >>> async def call_llm(prompt_tokens: int) -> None:
        ...     async with limits.acquire(requested={"tokens": prompt_tokens + 1000}) as acq:
        ...         used = await send(...)
        ...         acq.update(usage={"tokens": used})
    """

    __slots__ = (
        "__weakref__",
        "_backend",
        "_clock",
        "_config",
        "_has_resources",
        "_items",
        "_limits",
        "_name",
        "_requests",
        "_scheduler",
        "_timer_clock",
    )

    def __init__(
        self,
        limits: Iterable[Limit] = (),
        *,
        config: Mapping[str, Any] | None = None,
        backend: Backend | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(limits, (RateLimit, CallLimit, ResourceLimit)):
            raise TypeError(f"limits must be an iterable of limits, got a single {limits!r}")
        limits = tuple(limits)
        seen: set[str] = set()
        for i, limit in enumerate(limits):
            if not isinstance(limit, (RateLimit, CallLimit, ResourceLimit)):
                raise TypeError(
                    f"limits[{i}] must be a RateLimit, CallLimit or ResourceLimit, "
                    f"got {describe(limit)}"
                )
            if limit.key in seen:
                raise ValueError(f"limits has the key {limit.key!r} more than once")
            seen.add(limit.key)
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping or None, got {describe(config)}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {describe(clock)}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {describe(name)}")
        if backend is None:
            backend = MemoryBackend()
        elif not isinstance(backend, Backend):
            raise TypeError(f"backend must be a backend such as MemoryBackend(), got {backend!r}")

        self._limits = limits
        self._config: Mapping[str, Any] = MappingProxyType(dict(config or {}))
        self._name = name
        self._clock = clock
        self._timer_clock: TimerClock | None = clock if isinstance(clock, TimerClock) else None
        now = clock()
        states = tuple(new_state(limit, now) for limit in limits)
        self._backend = backend
        self._scheduler: Scheduler = backend.attach(limits, states, clock, name)
        self._requests = Requests(limits, states)
        self._items = self._requests.items  # bound once: it runs on every acquisition
        self._has_resources = any(isinstance(limit, ResourceLimit) for limit in limits)

    # -- what it is --------------------------------------------------------------------------

    @property
    def limits(self) -> tuple[Limit, ...]:
        return self._limits

    @property
    def config(self) -> Mapping[str, Any]:
        """Read-only; exposed to callers as ``acquisition.config``."""
        return self._config

    @property
    def name(self) -> str | None:
        return self._name

    # -- requests ----------------------------------------------------------------------------

    # -- acquiring ---------------------------------------------------------------------------

    def acquire(
        self, requested: Mapping[str, int | float] | None = None, *, timeout: float | None = None
    ) -> Acquisition:
        """Wait, in FIFO order, until every limit admits its amount; take them all at once.

        Use as ``async with limits.acquire(requested={"tokens": 1200}) as acq:``. The request is
        validated when this is called; the waiting happens on entering the block.

        Args:
            requested: amount per key. CallLimits and ResourceLimits default to 1 (0 skips one);
                a RateLimit is taken only when named here.
            timeout: seconds to wait at most. When the rate limits alone already place the
                admission after it, it fails at once.

        Raises:
            TimeoutError: not admitted within ``timeout``; nothing is held.
            ValueError, TypeError: bad ``requested`` or ``timeout``; nothing is taken.
        """
        items = self._items(requested)
        return Acquisition(self, items, PENDING, timeout=check_timeout(timeout))

    def try_acquire(self, requested: Mapping[str, int | float] | None = None) -> Acquisition:
        """Take everything now, or nothing: never waits, and fails while anyone is queued.

        Check ``acq.successful``; as a context manager a failed acquisition releases nothing.
        """
        items = self._items(requested)
        sched = self._scheduler
        with sched.lock:
            receipts = sched.try_take(items, sched.clock())
        if receipts is None:
            return Acquisition(self, items, FAILED)
        return Acquisition(self, items, HELD, receipts)

    def acquire_sync(
        self, requested: Mapping[str, int | float] | None = None, *, timeout: float | None = None
    ) -> Acquisition:
        """The blocking form of :meth:`acquire`, for threads; it waits when called.

        Use as ``with limits.acquire_sync(...) as acq:`` or call ``acq.release()`` when done.

        Raises:
            RuntimeError: called on a thread that runs an event loop (it would block the loop).
            TimeoutError: not admitted within ``timeout``; nothing is held.
        """
        refuse_on_event_loop("limits")
        items = self._items(requested)
        timeout_s = check_timeout(timeout)
        receipts, waiter, start = self._take_or_queue(items, timeout_s, ThreadWaiter)
        acq = Acquisition(self, items, HELD, receipts)
        if waiter is None:
            return acq
        steps = self._parking(waiter)
        try:
            for delay in steps:
                waiter.sleep_sync(delay)
        finally:
            steps.close()  # if the sleep raised: leave the queue, holding nothing
        return self._finish(acq, waiter, start, timeout_s)

    async def _acquire_async(self, acq: Acquisition) -> None:
        if self._scheduler.remote:
            receipts, waiter, start = await self._scheduler.take_first(
                acq._items, acq._timeout, async_waiter
            )
            if receipts is None and waiter is None:
                raise self._timeout_error(acq._items, acq._timeout)
        else:
            receipts, waiter, start = self._take_or_queue(acq._items, acq._timeout, async_waiter)
        if waiter is None:
            assert receipts is not None
            acq._granted(receipts, 0.0)
            return
        steps = self._parking(waiter)
        try:
            for delay in steps:
                await waiter.sleep(delay)
        finally:
            steps.close()  # if the sleep raised (cancelled): leave the queue, holding nothing
        self._finish(acq, waiter, start, acq._timeout)

    def _take_or_queue(
        self, items: Items, timeout: float, new_waiter: Callable[[Items, float], W]
    ) -> tuple[list[Any] | None, W | None, float]:
        """Take ``items`` at once, or queue a new waiter: ``(receipts, None, start)`` or
        ``(None, waiter, start)``. Raises TimeoutError when the deadline is out of reach."""
        sched = self._scheduler
        with sched.lock:
            start = sched.clock()
            receipts = sched.try_take(items, start)
            if receipts is not None:
                return receipts, None, start
            waiter = new_waiter(items, start + timeout)
            if sched.enqueue(waiter, start):
                return None, waiter, start
        raise self._timeout_error(items, timeout)

    def _parking(self, waiter: Waiter) -> Generator[float | None, None, None]:
        """The waiting protocol of both doors: yields how long to sleep (None: until notified)
        until ``waiter`` is granted or times out. Closed while it is suspended (the door's sleep
        raised: cancellation, interruption), it takes the waiter out of the queue holding nothing,
        handing a grant that arrived meanwhile to the next waiter."""
        sched = self._scheduler
        with sched.lock:
            # Only the head has a wake time; the others sleep until notified or their deadline.
            wake = waiter.wake_at if sched.head() is waiter else _INF
            until: float | None = wake if wake < waiter.deadline else waiter.deadline
        try:
            while until is not None:
                delay, timer = self._arm(waiter, until)
                try:
                    yield delay
                finally:
                    if timer is not None:
                        timer.cancel()
                with sched.lock:
                    until = sched.after_wake(waiter, sched.clock())
        except BaseException:
            with sched.lock:
                sched.abandon(waiter, sched.clock())
            raise

    def _arm(self, waiter: Waiter, until: float) -> tuple[float | None, Cancellable | None]:
        """How to sleep until the clock reads ``until``: a delay in real seconds, or a timer of a
        clock that drives its own timers."""
        if until == _INF:
            return None, None
        if self._timer_clock is not None:
            return None, self._timer_clock.call_at(until, partial(self._timer_fired, waiter))
        return until - self._clock(), None

    def _timer_fired(self, waiter: Waiter) -> None:
        with self._scheduler.lock:
            waiter.notify()

    def _finish(
        self, acq: Acquisition, waiter: Waiter, start: float, timeout: float
    ) -> Acquisition:
        if waiter.state != GRANTED:
            with self._scheduler.lock:
                failure = self._scheduler.failure(waiter)
            raise failure or self._timeout_error(waiter.items, timeout)
        assert waiter.receipts is not None
        acq._granted(waiter.receipts, waiter.granted_at - start)
        return acq

    def _timeout_error(self, items: Items, timeout: float) -> TimeoutError:
        asked = {state.key: amount for state, amount in items}
        return TimeoutError(f"could not acquire {asked!r} within timeout={timeout!r}s")

    # -- questions ---------------------------------------------------------------------------

    def retry_after(self, requested: Mapping[str, int | float] | None = None) -> float:
        """Seconds until such a request could be admitted: 0.0 if at once, ``inf`` when only a
        release can make it admissible. With others queued it is a lower bound (they go first).
        Suitable for an HTTP ``Retry-After`` header."""
        items = self._items(requested)
        sched = self._scheduler
        with sched.lock:
            now = sched.clock()
            sched.catch_up(now)
            _rate_at, at = sched.admit_time(items, now)
            head = sched.head()
            # FIFO: nobody passes the head, which (caught up above) is not admissible before
            # its wake time.
            if head is not None and head.wake_at > at:
                at = head.wake_at
        return max(0.0, at - now)

    def pause(self, seconds: float) -> None:
        """Admit nobody before ``now + seconds`` (a provider answered 429 with Retry-After).

        Queued waiters keep their places; overlapping pauses keep the later end."""
        seconds = check_amount("seconds", seconds)
        sched = self._scheduler
        with sched.lock:
            now = sched.clock()
            sched.pause(now + seconds, now)

    def get_stats(self) -> dict[str, Any]:
        """A consistent snapshot: per limit, and totals for the set.

        Returns:
            ``{"limits": {key: {...}}, "waiting": n, "granted": n, "timed_out": n,
            "cancelled": n, "refunded": units, "paused_for": seconds}``; each limit has
            ``kind`` ("rate", "call" or "resource"), ``capacity``, ``available`` (units
            admissible now, negative while in debt), ``waiting`` (queued requests naming it),
            and ``algorithm``, ``window_seconds``, ``refunded`` (rate limits) or ``in_use``
            (resource limits).
        """
        sched = self._scheduler
        with sched.lock:
            now = sched.clock()
            sched.catch_up(now)
            waiting = sched.waiting_per_key()
            available = sched.availability(now)
            per_key: dict[str, dict[str, Any]] = {}
            for key, (limit, _state) in self._requests.index.items():
                entry: dict[str, Any] = {
                    "kind": "resource"
                    if isinstance(limit, ResourceLimit)
                    else ("call" if isinstance(limit, CallLimit) else "rate"),
                    "capacity": limit.capacity,
                    "available": available[key],
                    "waiting": waiting[key],
                }
                if isinstance(limit, ResourceLimit):
                    entry["in_use"] = limit.capacity - available[key]
                else:
                    entry["algorithm"] = limit.algorithm.value
                    entry["window_seconds"] = limit.window_seconds
                    entry["refunded"] = sched.refunded[key]
                per_key[key] = entry
            return {
                "limits": per_key,
                "waiting": len(sched.queue),
                "granted": sched.granted,
                "timed_out": sched.timed_out,
                "cancelled": sched.cancelled,
                "refunded": sum(sched.refunded.values()),
                "paused_for": max(0.0, sched.paused_until - now),
            }

    # -- decorator and pickling --------------------------------------------------------------

    def limited(
        self,
        requested: _decorator.Requested | None = None,
        *,
        cost: Callable[..., _decorator.Requested | None] | None = None,
    ) -> _decorator.Limited:
        """A decorator: ``async def`` functions run in ``async with limits.acquire(...)``, plain
        functions in ``with limits.acquire_sync(...)`` (blocking the calling thread).

        Example:
            >>> @limits.limited({"tokens": 1000})
            ... async def summarize(text: str) -> str: ...
            >>> @limits.limited(cost=lambda prompt, max_tokens: {"tokens": max_tokens})
            ... def complete(prompt: str, max_tokens: int) -> str: ...

        Args:
            requested: the amounts every call takes; validated now, at decoration time.
            cost: instead, a callable receiving the call's arguments and returning ``requested``.

        Raises:
            ValueError: both ``requested`` and ``cost``, or a bad ``requested``.
            TypeError: a bad ``requested``, a non-callable ``cost``; when decorating, a generator
                function.
        """
        return _decorator.limited(self, requested, cost=cost)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the recipe, not the state: limits, ``config``, backend, ``name``, ``clock``.

        A memory-backed LimitSet unpickles fresh (full buckets, empty windows, nothing held,
        nobody queued): its state belongs to one process. Sets on a shared backend attach to the
        same ``name`` there, and so share its state.

        Raises:
            TypeError: the clock is not picklable (a lambda, a ``ManualClock``); use a module-level
                function such as ``time.monotonic``, which pickles by reference.
        """
        clock = self._clock
        if clock is not time.monotonic:
            try:
                pickle.dumps(clock)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                raise TypeError(
                    f"cannot pickle {self!r}: its clock {clock!r} is not picklable ({exc}); "
                    "use a module-level function such as time.monotonic"
                ) from exc
        rebuild = partial(
            LimitSet,
            config=dict(self._config),
            backend=self._backend,
            name=self._name,
            clock=clock,
        )
        return (rebuild, (self._limits,))

    def __repr__(self) -> str:
        name = f" name={self._name!r}" if self._name else ""
        sched = self._scheduler
        return (
            f"<LimitSet{name} limits={list(self._limits)!r} waiting={len(sched.queue)} "
            f"granted={sched.granted}>"
        )
