"""LimitPool: one facade over several LimitSets with the same keys, and how it picks one.

A pool spreads callers over interchangeable quotas: several API keys, accounts or regions, each a
LimitSet with the same keys (and the same kind of limit per key) but its own ``config``. Every
verb picks one set and delegates to it, so each set keeps its own FIFO queue, its own
all-or-nothing decisions and its own statistics; the pool adds no queue of its own (one waiting
primitive, see CONTRIBUTING.md) and holds no lock while anyone waits.

Picking:

* ``RoundRobin``: a counter starting at ``worker_index`` (so workers that each build the same pool
  start on different sets), advanced under a ``threading.Lock`` by every pick.
* ``Random``: a per-pool ``random.Random`` under the same lock.
* ``LeastWait``: try to take from the sets in round-robin order and stop at the first that admits
  the request now; only if none does, queue on the set whose ``retry_after`` is smallest (ties in
  round-robin order). A caller is never queued on a full set while another could admit it at the
  moment it was asked; once queued it stays in that set's FIFO queue (it does not move if another
  set frees up later: moving would need one queue across sets, and give up each set's FIFO order).

Prior art: the load-balancing options of multi-key LLM client libraries; Go's ``rate.Limiter``
has no pool, which is why this is a facade and not another kind of limit.
"""

from __future__ import annotations

import enum
import math
import random
import threading
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Final, final

from ._acquisition import Acquisition, DeferredAcquire
from ._decorator import Limited, Requested, limited
from ._limits import CallLimit, Limit, ResourceLimit, enum_member
from ._limitset import LimitSet, limit_changes
from ._numbers import check_seconds, check_timeout, check_timer_slack, describe
from ._statistics import PoolSetStatistics, PoolStatistics
from ._waiters import refuse_on_event_loop, trio_lowlevel

__all__ = ["LimitPool", "LoadBalancingAlgorithm", "PoolAcquire"]

_INF: Final = math.inf


class LoadBalancingAlgorithm(str, enum.Enum):
    """How a :class:`LimitPool` picks a set. The string values are accepted too."""

    RoundRobin = "round_robin"
    Random = "random"
    LeastWait = "least_wait"

    def __str__(self) -> str:
        return self.value


def _kind(limit: Limit) -> str:
    if isinstance(limit, ResourceLimit):
        return "ResourceLimit"
    return "CallLimit" if isinstance(limit, CallLimit) else "RateLimit"


def _check_sets(limit_sets: object) -> tuple[LimitSet, ...]:
    if isinstance(limit_sets, LimitSet):
        raise TypeError("limit_sets must be a sequence of LimitSets, got a single LimitSet")
    if not isinstance(limit_sets, Iterable) or isinstance(limit_sets, (str, bytes)):
        raise TypeError(f"limit_sets must be a sequence of LimitSets, got {describe(limit_sets)}")
    sets = tuple(limit_sets)
    if not sets:
        raise ValueError("limit_sets must hold at least one LimitSet, got none")
    shapes: list[dict[str, str]] = []
    for i, limit_set in enumerate(sets):
        if not isinstance(limit_set, LimitSet):
            raise TypeError(f"limit_sets[{i}] must be a LimitSet, got {describe(limit_set)}")
        for j in range(i):
            if sets[j] is limit_set:
                raise ValueError(f"limit_sets[{i}] is the same LimitSet as limit_sets[{j}]")
        shapes.append({limit.key: _kind(limit) for limit in limit_set.limits})
    first = shapes[0]
    for i, shape in enumerate(shapes[1:], start=1):
        missing = sorted(first.keys() - shape.keys())
        extra = sorted(shape.keys() - first.keys())
        if missing or extra:
            raise ValueError(
                f"every LimitSet of a pool must have the same keys: limit_sets[{i}] lacks "
                f"{missing!r} and has {extra!r} beyond the keys of limit_sets[0]"
            )
        differ = sorted(key for key in first if first[key] != shape[key])
        if differ:
            what = ", ".join(f"{k!r} is a {shape[k]}, not a {first[k]}" for k in differ)
            raise ValueError(
                f"every LimitSet of a pool must have the same kind of limit per key: in "
                f"limit_sets[{i}] {what} as in limit_sets[0]"
            )
    return sets


@final
class LimitPool:
    """One facade over several LimitSets with the same keys: each call picks one set.

    Use it for several interchangeable quotas (API keys, accounts, regions): each set has the same
    keys but its own ``config``, and ``acq.config`` tells the caller which one it got. The verbs
    are those of :class:`LimitSet`. A pool is not one bigger limit: a request is always served by
    exactly one set, in that set's FIFO order, and it is never split across sets.

    Capacities may differ between sets; a request must be valid for every set (an amount above
    one set's capacity raises ``ValueError``, whichever set would have been picked).

    Args:
        limit_sets: the LimitSets, at least one; the same keys and the same kind of limit
            (RateLimit, CallLimit, ResourceLimit) per key, each set at most once.
        load_balancing: ``RoundRobin`` (the default), ``Random`` or ``LeastWait`` (see
            :class:`LoadBalancingAlgorithm`), or their string values.
        worker_index: where round-robin starts (modulo the number of sets): give each worker
            process its index so that they do not all start on the first set.
        timer_slack: None (the default) keeps each set's own ``timer_slack``; seconds (0 to 1)
            set it on every set of the pool (see :class:`LimitSet`).

    Raises:
        TypeError: ``limit_sets`` is not a sequence of LimitSets, or a wrong type of option.
        ValueError: no set, a set given twice, sets whose keys or kinds differ (the message names
            the set's index and the keys), an unknown algorithm, a negative ``worker_index``.

    Examples:
        >>> pool = LimitPool(
        ...     [LimitSet(limits, config={"api_key": key}) for key in api_keys],
        ...     load_balancing="least_wait",
        ... )
        >>> async with pool.acquire({"tokens": 1200}) as acq:
        ...     await call(api_key=acq.config["api_key"])
    """

    __slots__ = (
        "_algorithm",
        "_checked_at",
        "_checks",
        "_counter",
        "_lock",
        "_random",
        "_sets",
        "_worker_index",
    )

    def __init__(
        self,
        limit_sets: Iterable[LimitSet],
        *,
        load_balancing: LoadBalancingAlgorithm | str = LoadBalancingAlgorithm.RoundRobin,
        worker_index: int = 0,
        timer_slack: float | None = None,
    ) -> None:
        sets = _check_sets(limit_sets)
        slack = None if timer_slack is None else check_timer_slack(timer_slack)
        algorithm = enum_member(LoadBalancingAlgorithm, "load_balancing", load_balancing)
        if not isinstance(worker_index, int) or isinstance(worker_index, bool):
            raise TypeError(f"worker_index must be an int, got {describe(worker_index)}")
        if worker_index < 0:
            raise ValueError(f"worker_index must be >= 0, got {worker_index!r}")
        if slack is not None:
            for limit_set in sets:
                limit_set._set_timer_slack(slack)
        self._sets = sets
        self._algorithm = algorithm
        self._worker_index = worker_index
        self._lock = threading.Lock()
        self._counter = worker_index % len(sets)
        self._random = random.Random()
        self._checked_at = -1
        self._checks: tuple[Callable[[Requested | None], Any], ...] = ()
        self._distinct_checks()

    # -- what it is --------------------------------------------------------------------------

    @property
    def limit_sets(self) -> tuple[LimitSet, ...]:
        """The sets, in the order given. Pause or inspect one with ``pool.limit_sets[i]``."""
        return self._sets

    @property
    def load_balancing(self) -> LoadBalancingAlgorithm:
        return self._algorithm

    @property
    def worker_index(self) -> int:
        return self._worker_index

    # -- picking -----------------------------------------------------------------------------

    def _distinct_checks(self) -> None:
        """Validating a request against one set per distinct list of limits suffices: identical
        sets (the common case) cost one check, whichever set is picked later. Made again after
        a limit changed (``change_limit``), in any set."""
        changes = limit_changes[0]
        distinct: dict[frozenset[Limit], LimitSet] = {}
        for limit_set in self._sets:
            distinct.setdefault(frozenset(limit_set.limits), limit_set)
        self._checks = tuple(s._items for s in distinct.values())
        self._checked_at = changes

    def _check(self, requested: Requested | None) -> None:
        if self._checked_at != limit_changes[0]:
            self._distinct_checks()
        for check in self._checks:
            check(requested)

    def _rotation(self) -> list[LimitSet]:
        """The sets in round-robin order from the counter, which advances by one."""
        sets = self._sets
        with self._lock:
            start = self._counter
            self._counter = (start + 1) % len(sets)
        return [*sets[start:], *sets[:start]]

    def _pick(self) -> LimitSet:
        """RoundRobin or Random: the one set this call uses."""
        sets = self._sets
        with self._lock:
            if self._algorithm is LoadBalancingAlgorithm.Random:
                return sets[self._random.randrange(len(sets))]
            i = self._counter
            self._counter = (i + 1) % len(sets)
        return sets[i]

    def _least_wait(self, requested: Requested | None) -> tuple[Acquisition, list[LimitSet]]:
        """LeastWait, first step: ``try_acquire`` on the sets in rotation order, stopping at the
        first success. Returns that acquisition, or the failed one of the first set tried, and
        the rotation."""
        rotation = self._rotation()
        first: Acquisition | None = None
        for limit_set in rotation:
            acq = limit_set.try_acquire(requested)
            if acq.successful:
                return acq, rotation
            if first is None:
                first = acq
        assert first is not None  # a pool has at least one set
        return first, rotation

    def _soonest(self, rotation: list[LimitSet], requested: Requested | None) -> LimitSet:
        """LeastWait, second step: the set whose ``retry_after`` is smallest, the first in
        rotation on ties (all ``inf``: the first)."""
        best, best_wait = rotation[0], _INF
        for limit_set in rotation:
            wait = limit_set.retry_after(requested)
            if wait < best_wait:
                best, best_wait = limit_set, wait
        return best

    # -- acquiring ---------------------------------------------------------------------------

    def acquire(
        self, requested: Requested | None = None, *, timeout: float | None = None
    ) -> PoolAcquire:
        """Pick a set and wait in its FIFO queue until it admits ``requested``.

        Use as ``async with pool.acquire({"tokens": 1200}) as acq:``; ``acq`` is the chosen set's
        :class:`Acquisition` and ``acq.config`` says which set it is. The request is validated
        now; the set is picked, and the waiting happens, on entering the block.

        Raises:
            TimeoutError: not admitted within ``timeout``; nothing is held.
            ValueError, TypeError: bad ``requested`` (for any set) or ``timeout``.
        """
        self._check(requested)
        check_timeout(timeout)
        return PoolAcquire(self, requested, timeout)

    def try_acquire(self, requested: Requested | None = None) -> Acquisition:
        """Take from a set now, or nothing: never waits.

        With ``RoundRobin`` and ``Random`` only the picked set is tried (a failure still advances
        the round-robin counter). With ``LeastWait`` every set is tried in round-robin order and
        the first success is returned; when all fail, the failed acquisition of the first set
        tried is returned. Check ``acq.successful``.
        """
        self._check(requested)
        if self._algorithm is not LoadBalancingAlgorithm.LeastWait:
            return self._pick().try_acquire(requested)
        acq, _rotation = self._least_wait(requested)
        return acq

    def acquire_sync(
        self, requested: Requested | None = None, *, timeout: float | None = None
    ) -> Acquisition:
        """The blocking form of :meth:`acquire`, for threads; it picks and waits when called.

        Raises:
            RuntimeError: called on a thread that runs an event loop (it would block the loop).
            TimeoutError: not admitted within ``timeout``; nothing is held.
        """
        refuse_on_event_loop("pool")
        self._check(requested)
        check_timeout(timeout)
        if self._algorithm is not LoadBalancingAlgorithm.LeastWait:
            return self._pick().acquire_sync(requested, timeout=timeout)
        acq, rotation = self._least_wait(requested)
        if acq.successful:
            return acq
        return self._soonest(rotation, requested).acquire_sync(requested, timeout=timeout)

    def limited(
        self,
        requested: Requested | None = None,
        *,
        cost: Callable[..., Requested | None] | None = None,
    ) -> Limited:
        """A decorator running ``async def`` functions in ``async with pool.acquire(...)`` and
        plain functions in ``with pool.acquire_sync(...)``; see :meth:`LimitSet.limited`."""
        return limited(self, requested, cost=cost)

    # -- questions ---------------------------------------------------------------------------

    def retry_after(self, requested: Requested | None = None) -> float:
        """Seconds until some set could admit such a request: the minimum over the sets."""
        return min(limit_set.retry_after(requested) for limit_set in self._sets)

    def pause(self, seconds: float) -> None:
        """Pause every set: nobody is admitted by any before ``now + seconds``.

        To pause one set only (one API key answered 429), use ``pool.limit_sets[i].pause(...)``.
        """
        check_seconds("seconds", seconds)  # before pausing any, so bad input pauses nothing
        for limit_set in self._sets:
            limit_set.pause(seconds)

    def get_stats(self) -> dict[str, Any]:
        """Per set (its config and :meth:`LimitSet.get_stats`) and totals over the sets.

        Returns:
            ``{"load_balancing": "least_wait", "sets": [{"config": {...}, "name": ...,
            "stats": {...}}, ...], "waiting": n, "granted": n, "timed_out": n,
            "cancelled": n, "refunded": units}``. Each set's snapshot is consistent; the totals
            add snapshots taken one after another. The typed form: :meth:`statistics`.
        """
        return self.statistics().as_dict()

    def statistics(self) -> PoolStatistics:
        """Per set (its config, name and :meth:`LimitSet.statistics`) and totals over the sets,
        as a frozen, typed value; the same numbers as :meth:`get_stats`."""
        return PoolStatistics.of(
            self._algorithm,
            [
                PoolSetStatistics(config=s.config, name=s.name, statistics=s.statistics())
                for s in self._sets
            ],
        )

    # -- pickling and repr -------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        """Re-create the pool from its sets and options (each set pickles as
        :meth:`LimitSet.__reduce__` says). The round-robin counter restarts at
        ``worker_index`` and the random generator is reseeded."""
        rebuild = partial(
            LimitPool, load_balancing=self._algorithm.value, worker_index=self._worker_index
        )
        return (rebuild, (self._sets,))

    def __repr__(self) -> str:
        waiting = granted = 0
        for limit_set in self._sets:
            stats = limit_set.statistics()
            waiting += stats.waiting
            granted += stats.granted
        return (
            f"<LimitPool load_balancing={self._algorithm.value} sets={len(self._sets)} "
            f"waiting={waiting} granted={granted}>"
        )


@final
class PoolAcquire(DeferredAcquire):
    """Returned by :meth:`LimitPool.acquire`: entering it picks a set and yields that set's
    :class:`Acquisition`; leaving it releases that. Single use."""

    __slots__ = ("_pool", "_requested", "_timeout")

    _owner = "pool"

    def __init__(
        self,
        pool: LimitPool,
        requested: Requested | None,
        timeout: float | None,
    ) -> None:
        super().__init__()
        self._pool = pool
        self._requested = requested
        self._timeout = timeout

    async def _enter(self) -> Acquisition:
        pool, requested = self._pool, self._requested
        if pool._algorithm is not LoadBalancingAlgorithm.LeastWait:
            chosen = pool._pick()
        else:
            lowlevel = trio_lowlevel()  # under trio, a checkpoint as Acquisition.__aenter__ is
            if lowlevel is not None:
                await lowlevel.checkpoint_if_cancelled()
            acq, rotation = pool._least_wait(requested)
            if acq.successful:
                if lowlevel is not None:
                    await lowlevel.cancel_shielded_checkpoint()
                return acq
            chosen = pool._soonest(rotation, requested)
        acq = chosen.acquire(requested, timeout=self._timeout)
        await acq.__aenter__()
        return acq

    def __repr__(self) -> str:
        return f"<PoolAcquire {self._state()} requested={self._requested!r} of {self._pool!r}>"
