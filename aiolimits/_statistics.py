"""Statistics as values: frozen, typed snapshots of a set, a pool and a keyed set.

``statistics()`` returns these; ``get_stats()`` returns the same snapshot as a plain dict (its
long-standing shape, for logging and JSON). Taken under the set's lock, a snapshot is consistent:
every number in it describes the same instant. (trio's ``CapacityLimiterStatistics`` is the model:
a statistics object is data, not a view that changes under the reader.)

Clean numbers. Counts are ``int`` on every backend, whatever a shared store handed back (a
process backend's reclaimed slots, counters read from a file). Amounts of units are rounded
*down* to a millionth of a unit and the pause *up* to a microsecond (:func:`units`,
:func:`seconds_up`), so a figure never claims more room, or a shorter pause, than there is; a
bucket holding 0.22980038000059722 units after float arithmetic shows ``0.2298``, not the float
noise of the arithmetic. Values too large to carry a millionth (beyond about 10**9) are shown as
they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, final

import attrs

from ._algorithms import limit_now
from ._limits import CallLimit, Limit, RateLimitAlgorithm, ResourceLimit

if TYPE_CHECKING:
    from ._pool import LoadBalancingAlgorithm
    from ._scheduler import Scheduler

__all__ = [
    "KeyedStatistics",
    "LimitSetStatistics",
    "LimitStatistics",
    "PoolSetStatistics",
    "PoolStatistics",
    "RateLimitStatistics",
    "ResourceLimitStatistics",
    "limitset_statistics",
    "seconds_up",
    "units",
]

#: The resolution of the amounts and times in statistics.
_STEP = 1e-6
_PER_STEP = 1_000_000


def units(x: float) -> float:
    """``x`` rounded down to a millionth: the largest multiple of 1e-6 (as the nearest float)
    that is not above ``x``. Finite values whose float spacing is already coarser than 1e-6 are
    returned unchanged, as are infinities and NaN."""
    x = float(x)
    if not math.isfinite(x) or math.ulp(x) >= _STEP:
        return x
    k = math.floor(x * _PER_STEP)
    r = k / _PER_STEP
    if r > x:  # x * 1e6 rounded up to the next integer: one step lower
        r = (k - 1) / _PER_STEP
    return r + 0.0  # no -0.0


def seconds_up(x: float) -> float:
    """``x`` seconds rounded up to a microsecond (the mirror of :func:`units`)."""
    return -units(-x) + 0.0


def _count(x: float) -> int:
    """A count held as a number: an int (a shared store may hand back 3.0)."""
    return int(x)


def _frozen_mapping(items: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(items))


@final
@attrs.frozen(kw_only=True)
class RateLimitStatistics:
    """A rate limit (:class:`~aiolimits.RateLimit` or :class:`~aiolimits.CallLimit`) at one
    instant.

    Attributes:
        key: the limit's key (``"call_count"`` for the CallLimit).
        kind: ``"rate"`` or ``"call"``.
        algorithm: the limit's algorithm.
        capacity: the limit's capacity, as declared.
        window_seconds: the limit's window, as declared.
        available: units admissible now, rounded down to 1e-6; negative while a bucket is in
            debt (usage reported above the amount taken).
        waiting: queued requests that name this limit.
        refunded: units given back by usage updates since the set was made, rounded down.
    """

    key: str
    kind: Literal["rate", "call"]
    algorithm: RateLimitAlgorithm
    capacity: int | float
    window_seconds: int | float
    available: float
    waiting: int
    refunded: float

    def as_dict(self) -> dict[str, Any]:
        """The ``get_stats()`` form."""
        return {
            "kind": self.kind,
            "capacity": self.capacity,
            "available": self.available,
            "waiting": self.waiting,
            "algorithm": self.algorithm.value,
            "window_seconds": self.window_seconds,
            "refunded": self.refunded,
        }


@final
@attrs.frozen(kw_only=True)
class ResourceLimitStatistics:
    """A :class:`~aiolimits.ResourceLimit` at one instant.

    Attributes:
        key: the limit's key.
        kind: ``"resource"``.
        capacity: the number of slots.
        available: slots free now.
        in_use: slots held now (``capacity - available``), by this process and, on a shared
            backend, by every other.
        waiting: queued requests that name this limit.
    """

    key: str
    kind: Literal["resource"] = "resource"
    capacity: int
    available: int
    in_use: int
    waiting: int

    def as_dict(self) -> dict[str, Any]:
        """The ``get_stats()`` form."""
        return {
            "kind": self.kind,
            "capacity": self.capacity,
            "available": self.available,
            "waiting": self.waiting,
            "in_use": self.in_use,
        }


LimitStatistics: TypeAlias = RateLimitStatistics | ResourceLimitStatistics


@final
@attrs.frozen(kw_only=True)
class LimitSetStatistics:
    """A :class:`~aiolimits.LimitSet` (or one key of a KeyedLimitSet) at one instant: what
    ``statistics()`` returns.

    Attributes:
        limits: per key, in the order the limits were declared (read-only).
        waiting: queued requests (on a shared backend, of every process).
        granted: acquisitions granted since the set was made (a grant given back because its
            waiter was cancelled at that moment is not counted).
        timed_out: acquisitions that ended with ``TimeoutError``.
        cancelled: acquisitions cancelled while queued.
        refunded: units given back by usage updates, over all limits, rounded down to 1e-6.
        paused_for: seconds until a pause ends (0.0: not paused), rounded up to 1e-6.
    """

    limits: Mapping[str, LimitStatistics] = attrs.field(converter=_frozen_mapping)
    waiting: int
    granted: int
    timed_out: int
    cancelled: int
    refunded: float
    paused_for: float

    # A frozen value, but not hashable: it holds a mapping.
    __hash__ = None  # type: ignore[assignment]

    def as_dict(self) -> dict[str, Any]:
        """The ``get_stats()`` form: ``{"limits": {key: {...}}, "waiting": n, ...}``."""
        return {
            "limits": {key: entry.as_dict() for key, entry in self.limits.items()},
            "waiting": self.waiting,
            "granted": self.granted,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "refunded": self.refunded,
            "paused_for": self.paused_for,
        }


@final
@attrs.frozen(kw_only=True)
class PoolSetStatistics:
    """One set of a :class:`~aiolimits.LimitPool`.

    Attributes:
        config: the set's ``config`` (read-only).
        name: the set's ``name``.
        statistics: the set's snapshot.
    """

    config: Mapping[str, Any] = attrs.field(converter=_frozen_mapping)
    name: str | None
    statistics: LimitSetStatistics

    __hash__ = None  # type: ignore[assignment]


@final
@attrs.frozen(kw_only=True)
class PoolStatistics:
    """A :class:`~aiolimits.LimitPool`: each set's snapshot and totals over them. Each set's
    snapshot is consistent; the totals add snapshots taken one after another.

    Attributes:
        load_balancing: the pool's load balancing algorithm.
        sets: per set, in the pool's order.
        waiting, granted, timed_out, cancelled: sums over the sets (ints).
        refunded: units refunded, summed over the sets, rounded down to 1e-6.
    """

    load_balancing: LoadBalancingAlgorithm
    sets: tuple[PoolSetStatistics, ...]
    waiting: int
    granted: int
    timed_out: int
    cancelled: int
    refunded: float

    def as_dict(self) -> dict[str, Any]:
        """The ``get_stats()`` form."""
        return {
            "load_balancing": self.load_balancing.value,
            "sets": [
                {"config": dict(s.config), "name": s.name, "stats": s.statistics.as_dict()}
                for s in self.sets
            ],
            "waiting": self.waiting,
            "granted": self.granted,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "refunded": self.refunded,
        }

    @classmethod
    def of(
        cls, load_balancing: LoadBalancingAlgorithm, sets: Sequence[PoolSetStatistics]
    ) -> PoolStatistics:
        """Totals over the snapshots of the sets."""
        snapshots = [s.statistics for s in sets]
        return cls(
            load_balancing=load_balancing,
            sets=tuple(sets),
            waiting=sum(s.waiting for s in snapshots),
            granted=sum(s.granted for s in snapshots),
            timed_out=sum(s.timed_out for s in snapshots),
            cancelled=sum(s.cancelled for s in snapshots),
            refunded=units(math.fsum(s.refunded for s in snapshots)),
        )


@final
@attrs.frozen(kw_only=True)
class KeyedStatistics:
    """The keys of a :class:`~aiolimits.KeyedLimitSet` (one key's limits: ``statistics(key)``).

    Attributes:
        keys: keys whose state is held in this process.
        max_keys: the bound on ``keys``.
        dropped: keys dropped because they were fresh (no decision changed).
        forgotten: keys dropped at ``max_keys`` before they were fresh.
        paused_for: seconds until a pause of every key ends (0.0: none), rounded up to 1e-6.
    """

    keys: int
    max_keys: int
    dropped: int
    forgotten: int
    paused_for: float

    def as_dict(self) -> dict[str, Any]:
        """The ``get_keys_stats()`` form."""
        return attrs.asdict(self)


def limitset_statistics(
    limits: Sequence[Limit], sched: Scheduler, now: float
) -> LimitSetStatistics:
    """Under the lock: the snapshot of ``sched``, whose states belong to ``limits`` (as
    declared: the numbers shown are the states', which a change of a limit updates)."""
    waiting = sched.waiting_per_key()
    available = sched.availability(now)  # a shared backend also refreshes its totals here
    per_key: dict[str, LimitStatistics] = {}
    for declared, state in zip(limits, sched.states, strict=True):
        limit = limit_now(declared, state)
        key = limit.key
        if isinstance(limit, ResourceLimit):
            free = _count(available[key])
            per_key[key] = ResourceLimitStatistics(
                key=key,
                capacity=limit.capacity,
                available=free,
                in_use=limit.capacity - free,
                waiting=_count(waiting[key]),
            )
        else:
            per_key[key] = RateLimitStatistics(
                key=key,
                kind="call" if isinstance(limit, CallLimit) else "rate",
                algorithm=limit.algorithm,
                capacity=limit.capacity,
                window_seconds=limit.window_seconds,
                available=units(available[key]),
                waiting=_count(waiting[key]),
                refunded=units(sched.refunded_units(key)),
            )
    refunded = sched.refunded
    return LimitSetStatistics(
        limits=per_key,
        waiting=_count(sched.waiting_count()),
        granted=_count(sched.granted),
        timed_out=_count(sched.timed_out),
        cancelled=_count(sched.cancelled),
        refunded=units(math.fsum(refunded.values())) if refunded else 0.0,
        paused_for=seconds_up(max(0.0, sched.paused_until - now)),
    )
