"""LimitSet: the verbs users call. A thin door over one scheduler for tasks and threads.

``acquire`` (async), ``acquire_sync`` (threads) and ``try_acquire`` (never waits) share one path
(``_door.py``): turn ``requested`` into a validated tuple of ``(state, amount)`` items
(``_requests.py``), try to take them at once under the lock, and only if that fails park a waiter
in the one FIFO queue.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Final, final

import attrs

from . import _decorator
from ._acquisition import PENDING, Acquisition
from ._algorithms import RateState, limit_now, new_state
from ._backends._base import Backend
from ._backends.memory import MemoryBackend
from ._door import Attempt, Door, check_common, check_picklable_clock
from ._limits import CallLimit, Limit, RateLimit, ResourceLimit
from ._numbers import check_timeout, check_timer_slack, describe
from ._requests import Requests
from ._scheduler import Scheduler
from ._statistics import LimitSetStatistics
from ._waiters import ThreadWaiter, refuse_on_event_loop

_INF: Final = math.inf

__all__ = ["LimitSet", "changed_limit", "check_limits", "limit_changes"]

#: ``[n]``: n moves on with every change of a limit in this process (two changes at once may
#: move it by one only: it only has to differ). A pool validates requests against one set per
#: distinct list of limits, and makes those lists again when it moved on.
limit_changes = [0]


def check_limits(limits: Iterable[Limit]) -> tuple[Limit, ...]:
    """``limits`` as a tuple, each a limit and every key once, or the error saying which is not."""
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
    return limits


def changed_limit(
    limits: tuple[Limit, ...],
    key: object,
    capacity: object,
    window_seconds: object,
) -> tuple[int, Limit] | None:
    """The limit of ``limits`` named ``key`` with the new ``capacity`` and ``window_seconds``
    (None: unchanged), validated as a new limit is: ``(its index, the new value)``, or None when
    nothing changes. Raises the error naming the argument, having changed nothing."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {describe(key)}")
    index = next((i for i, limit in enumerate(limits) if limit.key == key), None)
    if index is None:
        keys = ", ".join(repr(x.key) for x in limits)
        raise ValueError(f"key {key!r} is not a limit of this set (keys: {keys})")
    limit = limits[index]
    changes: dict[str, Any] = {}
    if capacity is not None:
        changes["capacity"] = capacity
    if window_seconds is not None:
        if isinstance(limit, ResourceLimit):
            raise ValueError(
                f"window_seconds: resource limit {key!r} has no window, got {window_seconds!r}"
            )
        changes["window_seconds"] = window_seconds
    if not changes:
        return None
    new = attrs.evolve(limit, **changes)  # validated as a new limit is (semantics §11)
    return index, new


@final
class LimitSet(Door):
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
        timer_slack: seconds (0 to 1) a waiter may be woken after its admissible time, so that
            waiters due close together are granted by one wake-up: less CPU per grant for at
            most that much more latency. Never early, FIFO kept; the rate is kept when every
            rate limit holds ``rate * timer_slack`` units. Default 0.0: woken at the exact time.

    Examples:
        >>> limits = LimitSet([
        ...     CallLimit(window_seconds=60, capacity=500),
        ...     RateLimit("tokens", window_seconds=60, capacity=90_000),
        ... ])
        >>> async def call_llm(prompt_tokens: int) -> None:
        ...     async with limits.acquire(requested={"tokens": prompt_tokens + 1000}) as acq:
        ...         used = await send(...)
        ...         acq.update(usage={"tokens": used})
    """

    __slots__ = ("__weakref__", "_backend", "_items", "_name", "_requests", "_scheduler")

    def __init__(
        self,
        limits: Iterable[Limit] = (),
        *,
        config: Mapping[str, Any] | None = None,
        backend: Backend | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        timer_slack: float = 0.0,
    ) -> None:
        limits = check_limits(limits)
        frozen_config = check_common(config, clock, name)
        slack = check_timer_slack(timer_slack)
        if backend is None:
            backend = MemoryBackend()
        elif not isinstance(backend, Backend):
            raise TypeError(f"backend must be a backend such as MemoryBackend(), got {backend!r}")
        self._init_door(limits, frozen_config, clock, slack)
        self._name = name
        self._backend = backend
        now = clock()
        states = tuple(new_state(limit, now) for limit in limits)
        self._scheduler: Scheduler = backend.attach(limits, states, clock, name)
        self._scheduler.timer_slack = slack
        self._requests = Requests(limits, states)
        self._items = self._requests.items  # bound once: it runs on every acquisition

    # -- what it is --------------------------------------------------------------------------

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The limits with their numbers now: as declared, until :meth:`change_limit` (here or,
        on a shared backend, in another process) changed one."""
        with self._scheduler.lock:
            return self._limits_now()

    def _limits_now(self) -> tuple[Limit, ...]:
        index = self._requests.index
        return tuple(limit_now(limit, index[limit.key][1]) for limit in self._limits)

    def _set_timer_slack(self, slack: float) -> None:
        """Wake-ups armed from now on use ``slack`` (validated); a LimitPool's option."""
        sched = self._scheduler
        with sched.lock:
            self._timer_slack = sched.timer_slack = slack

    def _usage(
        self, usage: Mapping[str, int | float], sched: Scheduler
    ) -> Sequence[tuple[RateState, float]]:
        return self._requests.usage(usage)

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
        # Positional arguments: a keyword costs a noticeable share of creating the object.
        return Acquisition(
            self,
            self._scheduler,
            items,
            PENDING,
            None,
            _INF if timeout is None else check_timeout(timeout),
        )

    def try_acquire(self, requested: Mapping[str, int | float] | None = None) -> Acquisition:
        """Take everything now, or nothing: never waits, and fails while anyone is queued.

        Check ``acq.successful``; as a context manager a failed acquisition releases nothing.
        """
        return self._try(self._scheduler, self._items(requested))

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
        sched = self._scheduler
        with sched.lock:
            taken = self._take_or_queue_locked(sched, items, timeout_s, ThreadWaiter)
        return self._wait_sync(sched, items, timeout_s, taken)

    async def attempt(self, requested: Mapping[str, int | float] | None = None) -> Attempt:
        """:meth:`try_acquire` for tasks, answering :meth:`retry_after` and :meth:`get_stats`
        of the same moment too: never waits in the queue, and on a shared backend makes one
        awaited round trip (the sync verbs would make theirs on the event loop's thread).

        Example:
            >>> attempt = await limits.attempt({"tokens": 1000})
            >>> if not attempt.acquisition.successful:
            ...     return reject(retry_after=attempt.retry_after)
            >>> with attempt.acquisition:
            ...     ...

        Returns:
            an :class:`~aiolimits._door.Attempt`: ``acquisition``, ``retry_after`` (0.0 when
            admitted), ``stats``.
        """
        return await self._attempt(self._scheduler, self._items(requested))

    # -- questions ---------------------------------------------------------------------------

    def retry_after(self, requested: Mapping[str, int | float] | None = None) -> float:
        """Seconds until such a request could be admitted: 0.0 if at once, ``inf`` when only a
        release can make it admissible. With others queued it is a lower bound (they go first).
        Suitable for an HTTP ``Retry-After`` header."""
        return self._retry_after(self._scheduler, self._items(requested))

    def pause(self, seconds: float) -> None:
        """Admit nobody before ``now + seconds`` (a provider answered 429 with Retry-After).

        Queued waiters keep their places; overlapping pauses keep the later end."""
        self._pause(self._scheduler, seconds)

    def change_limit(
        self,
        key: str,
        *,
        capacity: float | int | None = None,
        window_seconds: float | None = None,
    ) -> None:
        """Change the capacity and/or window of the limit ``key`` now, for every user of the set.

        What is in use stays in use, counted against the new numbers; a limit that grows admits
        its waiters at once; a limit that shrinks never admits what the old or the new limit
        would have refused (exact rules per algorithm: semantics §4, "Limits that change at run
        time"). Waiters asking more than a new, smaller capacity leave with ``ValueError``. On a
        shared backend every process and client of the set sees the change. :attr:`limits` and
        the statistics show the new numbers. Never waits and never does I/O on the calling
        thread's event loop (a shared backend hands the change to its I/O path, in order).

        Example:
            >>> limits.change_limit("tokens", capacity=45_000)  # the provider said so

        Args:
            key: the limit's key.
            capacity: the new capacity (None: unchanged), in the range of a new limit's.
            window_seconds: the new window (None: unchanged); not for a ResourceLimit.

        Raises:
            ValueError, TypeError: an unknown key, a number out of range, a window for a
                ResourceLimit; nothing is changed.
        """
        sched = self._scheduler
        with sched.lock:
            changed = changed_limit(self._limits_now(), key, capacity, window_seconds)
            if changed is None:
                return
            _index, limit = changed
            state = self._requests.index[limit.key][1]
            window = 0.0 if isinstance(limit, ResourceLimit) else limit.window_seconds
            sched.change_limit(state, limit.capacity, window, sched.clock())
        limit_changes[0] += 1

    def get_stats(self) -> dict[str, Any]:
        """A consistent snapshot: per limit, and totals for the set.

        Returns:
            ``{"limits": {key: {...}}, "waiting": n, "granted": n, "timed_out": n,
            "cancelled": n, "refunded": units, "paused_for": seconds}``; each limit has
            ``kind`` ("rate", "call" or "resource"), ``capacity``, ``available`` (units
            admissible now, negative while in debt), ``waiting`` (queued requests naming it),
            and ``algorithm``, ``window_seconds``, ``refunded`` (rate limits) or ``in_use``
            (resource limits). Counts (and a resource's ``available`` and ``in_use``) are
            ints; amounts are rounded as :meth:`statistics` says. The typed form of the same
            snapshot is :meth:`statistics`.
        """
        return self._stats(self._scheduler)

    def statistics(self) -> LimitSetStatistics:
        """A consistent snapshot as a frozen, typed value: per limit
        (``RateLimitStatistics`` or ``ResourceLimitStatistics``) and totals for the
        set. The same numbers as :meth:`get_stats`: counts are ints, amounts of units are
        rounded down to 1e-6 and ``paused_for`` up to 1e-6 s, so no figure overstates what is
        available.

        Example:
            >>> stats = limits.statistics()
            >>> stats.limits["tokens"].available, stats.waiting
            (87600.0, 0)
        """
        return self._statistics(self._scheduler)

    # -- decorator and pickling --------------------------------------------------------------

    def limited(
        self,
        requested: _decorator.Requested | None = None,
        *,
        cost: Callable[..., _decorator.Requested | None] | None = None,
    ) -> _decorator.Limited:
        """A decorator: ``async def`` functions run in ``async with limits.acquire(...)``, plain
        functions in ``with limits.acquire_sync(...)`` (blocking the calling thread).

        Examples:
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
        check_picklable_clock(self, clock)
        rebuild = partial(
            LimitSet,
            config=dict(self._config),
            backend=self._backend,
            name=self._name,
            clock=clock,
            timer_slack=self._timer_slack,
        )
        return (rebuild, (self._limits,))

    def __repr__(self) -> str:
        name = f" name={self._name!r}" if self._name else ""
        sched = self._scheduler
        return (
            f"<LimitSet{name} limits={list(self._limits)!r} waiting={len(sched.queue)} "
            f"granted={sched.granted}>"
        )
