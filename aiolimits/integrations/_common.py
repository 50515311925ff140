"""What the server integrations share: one decision per request, and the HTTP headers for it.

A :class:`Gate` turns a request into a :class:`Verdict`: admitted (holding an Acquisition until
the response is done) or rejected (with the seconds to wait). It is framework-free; the Starlette
and aiohttp modules only read their request type through the user's ``key`` and ``cost`` functions
and write the verdict's headers into their response type.

Two modes:

* ``max_wait=0`` (the default) rejects at once: one awaited ``attempt`` (``try_acquire`` with
  its ``retry_after`` and statistics, one round trip on a shared backend) gives the verdict,
  ``Retry-After`` and the headers. Nothing waits in the server, and no event loop waits for
  the network.
* ``max_wait > 0`` waits in the limits' FIFO queue for at most that long (``acquire(timeout=)``);
  a request that the rate limits already place after the deadline is rejected at once, without
  sleeping into the timeout.

Headers follow the IETF httpapi draft "RateLimit header fields for HTTP": one policy item per rate
limit of the set, named by its key: ``RateLimit-Policy: "call_count";q=100;w=60`` (the quota and
its window) and ``RateLimit: "call_count";r=42;t=18`` (units left now, and seconds until the limit
is back to its full quota: exact for the bucket algorithms, an upper bound of one window for the
window algorithms). Resource limits are not rate quotas and get no item.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any, Generic, TypeVar, cast, final

from .._acquisition import Acquisition
from .._door import Attempt
from .._keyed import KeyedLimitSet
from .._limits import CallLimit, Limit, RateLimit
from .._limitset import LimitSet
from .._numbers import check_seconds, describe

__all__ = [
    "Gate",
    "Requested",
    "Verdict",
    "is_keyed",
    "ratelimit_headers",
]

Requested = Mapping[str, int | float]
Req = TypeVar("Req")


def is_keyed(limits: object) -> bool:
    """Whether ``limits`` is a :class:`KeyedLimitSet` (one set of limits per client key)."""
    return isinstance(limits, KeyedLimitSet)


def ratelimit_headers(
    limits: tuple[Limit, ...], stats: Mapping[str, Any], retry_after: float | None
) -> dict[str, str]:
    """The ``RateLimit-Policy``, ``RateLimit`` and (when rejected) ``Retry-After`` headers.

    Args:
        limits: the set's limits (rate and call limits get a policy item each).
        stats: the set's ``get_stats()`` snapshot.
        retry_after: seconds to wait when rejecting (``inf``: only a release helps, so no
            ``Retry-After``), or None when admitted.
    """
    headers: dict[str, str] = {}
    per_key = stats.get("limits", {})
    policies: list[str] = []
    current: list[str] = []
    for limit in limits:
        if not isinstance(limit, (RateLimit, CallLimit)):
            continue
        entry = per_key.get(limit.key)
        if entry is None:
            continue
        name = limit.key.replace("\\", "\\\\").replace('"', '\\"')
        capacity, window = limit.capacity, limit.window_seconds
        # Structured-field integers: the quota rounded down (never promise more than the limit
        # admits), the window rounded up.
        policies.append(f'"{name}";q={math.floor(capacity)};w={math.ceil(window)}')
        available = float(entry["available"])
        missing = capacity - available
        if missing <= 0:
            reset = 0.0
        elif entry["algorithm"] in ("sliding_window", "fixed_window"):
            reset = window
        else:
            reset = missing * window / capacity  # the refill rate is capacity / window
        current.append(f'"{name}";r={max(0, math.floor(available))};t={math.ceil(reset)}')
    if policies:
        headers["RateLimit-Policy"] = ", ".join(policies)
        headers["RateLimit"] = ", ".join(current)
    if retry_after is not None and math.isfinite(retry_after):
        # HTTP's delta-seconds are whole seconds; rounding up never invites a retry too early.
        headers["Retry-After"] = str(math.ceil(retry_after))
    return headers


@final
class Verdict:
    """The decision for one request: admitted (holding its acquisition) or rejected.

    Attributes:
        admitted: whether the request may proceed.
        acquisition: what it holds while it runs (None when rejected, or not limited).
        retry_after: seconds until a retry could be admitted (rejected only, else None).
        headers: the rate-limit headers to add to the response (and ``Retry-After`` if rejected).
    """

    __slots__ = ("_held", "acquisition", "admitted", "headers", "retry_after")

    def __init__(
        self,
        admitted: bool,
        held: AbstractAsyncContextManager[Acquisition] | None,
        acquisition: Acquisition | None,
        retry_after: float | None,
        headers: dict[str, str],
    ) -> None:
        self.admitted = admitted
        self._held = held
        self.acquisition = acquisition
        self.retry_after = retry_after
        self.headers = headers

    async def release(self) -> None:
        """Leave the acquisition, if any (it never waits). Idempotent."""
        held, self._held = self._held, None
        if held is not None:
            await held.__aexit__(None, None, None)

    def __repr__(self) -> str:
        what = "admitted" if self.admitted else f"rejected retry_after={self.retry_after!r}"
        return f"<Verdict {what} headers={self.headers!r}>"


@final
class Gate(Generic[Req]):
    """Decides, per request, whether it may proceed now (or within ``max_wait``).

    Args:
        limits: a :class:`LimitSet` (one global quota) or a ``KeyedLimitSet`` (one per client).
        key: for keyed limits, the client's key from the request (None: not limited).
        cost: the ``requested`` mapping from the request (None: the set's defaults).
        max_wait: 0 rejects at once; more waits in the FIFO queue up to that many seconds.
        headers: whether to compute the ``RateLimit`` headers for admitted requests too.
    """

    __slots__ = ("_cost", "_headers", "_key", "_keyed", "_limits", "_max_wait", "_set")

    def __init__(
        self,
        limits: LimitSet | KeyedLimitSet,
        *,
        key: Callable[[Req], str | None] | None,
        cost: Callable[[Req], Requested | None] | None,
        max_wait: float,
        headers: bool,
    ) -> None:
        keyed = is_keyed(limits)
        if not keyed and not isinstance(limits, LimitSet):
            raise TypeError(f"limits must be a LimitSet or a KeyedLimitSet, got {describe(limits)}")
        if keyed and key is None:
            raise ValueError(
                "limits is a KeyedLimitSet: pass key=, a function of the request returning the "
                "client's key (e.g. client_ip)"
            )
        if not keyed and key is not None:
            raise ValueError(
                "key= needs a KeyedLimitSet (one quota per client); a LimitSet is one global quota"
            )
        if key is not None and not callable(key):
            raise TypeError(f"key must be a callable of the request, got {describe(key)}")
        if cost is not None and not callable(cost):
            raise TypeError(f"cost must be a callable of the request, got {describe(cost)}")
        if not isinstance(headers, bool):
            raise TypeError(f"headers must be a bool, got {describe(headers)}")
        self._limits = limits
        self._keyed: KeyedLimitSet | None = cast("KeyedLimitSet", limits) if keyed else None
        self._set: LimitSet | None = limits if isinstance(limits, LimitSet) else None
        self._key = key
        self._cost = cost
        self._max_wait = check_seconds("max_wait", max_wait)
        self._headers = headers

    @property
    def limits(self) -> LimitSet | KeyedLimitSet:
        return self._limits

    async def enter(self, request: Req) -> Verdict:
        """Admit ``request`` (the verdict then holds an acquisition: ``await verdict.release()``
        when the response is done) or reject it. Raises what ``key`` and ``cost`` raise, and
        ``ValueError`` / ``TypeError`` for a ``requested`` the limits refuse."""
        requested = self._cost(request) if self._cost is not None else None
        if self._keyed is None:
            assert self._set is not None
            return await self._decide(
                self._set.attempt, self._set.acquire, self._set.get_stats, requested
            )
        assert self._key is not None
        key = self._key(request)
        if key is None:
            return Verdict(True, None, None, None, {})
        if not isinstance(key, str):
            raise TypeError(f"key() must return a str or None, got {describe(key)}")
        keyed = self._keyed
        return await self._decide(
            partial(keyed.attempt, key),
            partial(keyed.acquire, key),
            partial(keyed.get_stats, key),
            requested,
        )

    async def _decide(
        self,
        attempt: Callable[[Requested | None], Awaitable[Attempt]],
        acquire: Callable[..., AbstractAsyncContextManager[Acquisition]],
        get_stats: Callable[[], dict[str, Any]],
        requested: Requested | None,
    ) -> Verdict:
        limits = self._limits.limits
        held: AbstractAsyncContextManager[Acquisition]
        if self._max_wait == 0:
            # One awaited decision: the verdict, Retry-After and the headers of one answer.
            answer = await attempt(requested)
            acq = held = answer.acquisition
            if not acq.successful:
                wait = answer.retry_after
                return Verdict(
                    False, None, None, wait, ratelimit_headers(limits, answer.stats, wait)
                )
            headers = ratelimit_headers(limits, answer.stats, None) if self._headers else {}
            return Verdict(True, held, acq, None, headers)
        held = acquire(requested, timeout=self._max_wait)
        try:
            acq = await held.__aenter__()
        except TimeoutError:
            # Asked once more, awaited: admitted if that became possible meanwhile, else the
            # Retry-After and the headers of that answer.
            answer = await attempt(requested)
            if answer.acquisition.successful:
                acq = held = answer.acquisition
                headers = ratelimit_headers(limits, answer.stats, None) if self._headers else {}
                return Verdict(True, held, acq, None, headers)
            wait = answer.retry_after
            return Verdict(False, None, None, wait, ratelimit_headers(limits, answer.stats, wait))
        headers = ratelimit_headers(limits, get_stats(), None) if self._headers else {}
        return Verdict(True, held, acq, None, headers)
