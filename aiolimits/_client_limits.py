"""Client limits that keep a provider's own limits free of 429s, with requests in flight.

A client admits a request at ``t``; the provider counts it when it *arrives*, at ``a >= t``. In
between the request is in transit, and a client that declares exactly the provider's limits can
still be refused: requests admitted just before a window's edge arrive just after it, beside the
ones admitted there. The fix is arithmetic, done once here.

The client holds a ``ResourceLimit("in_flight", K)`` slot from admission until it has read the
answer, which the provider sends after counting the request. So at any moment at most ``K``
requests, and ``K * m`` units of a limit whose largest single request is ``m``, are in transit.
Whatever arrives at the provider in an interval was either admitted by the client in that
interval (the client's own limit bounds it) or was in transit when the interval began (at most
``K * m``). The client therefore declares each provider limit less that margin, at the same rate:

* ``token_bucket`` and ``gcra``: capacity ``C - margin`` and the window shrunk to ``W * (C -
  margin) / C``, so the rate ``C / W`` is unchanged: the provider's bucket always holds ``margin``
  more than the client needs, and the margin costs nothing of the long-run rate;
* ``sliding_window`` and ``fixed_window``: the same window with ``C - margin`` whole units (fixed
  windows are aligned on the same clock, ``[kW, (k+1)W)``, when the provider's are).

Real usage settles at the provider before it answers and at the client after it reads the answer,
so the provider never counts more for a request than the client does at any later moment. The
margin holds one more unit (or ``m``, if smaller) to absorb float rounding where ``C / W`` is not a
binary fraction. ``leaky_bucket`` is refused: it has no burst to take the margin from, so a request
delayed in transit would arrive closer than ``1 / r`` to the next one.

The margin costs a fraction ``K * m / (C + r * T)`` of the throughput over a run of ``T`` seconds:
small for a window that holds many requests, and nothing of the rate itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from ._limits import CallLimit, Limit, RateLimit, RateLimitAlgorithm, ResourceLimit

__all__ = ["client_limits"]


def client_limits(
    provider: Iterable[RateLimit | CallLimit],
    *,
    in_flight: int,
    largest: Mapping[str, float] | None = None,
    in_flight_key: str = "in_flight",
) -> list[Limit]:
    """The limits a client declares so that the provider's ``provider`` limits never refuse it.

    Args:
        provider: the provider's published limits, as :class:`RateLimit` and :class:`CallLimit`
            values with the provider's windows and capacities (e.g. 500 requests and 200,000
            tokens per 60 s).
        in_flight: ``K``, the most requests the client lets be in flight at once; the result
            holds a :class:`ResourceLimit` of that many slots, which every request must take
            from admission until its answer is read.
        largest: per key of a plain ``RateLimit``, the most one request may ask for (e.g. the
            longest prompt plus ``max_tokens``). A ``CallLimit`` counts 1 per request.
        in_flight_key: the key of that ``ResourceLimit``.

    Returns:
        One limit per provider limit, with the in-transit margin taken from its burst at the same
        rate, then ``ResourceLimit(in_flight_key, in_flight)``.

    Raises:
        ValueError: a limit is a ``leaky_bucket``, ``largest`` misses a key or names one that is
            not there, or the margin leaves less than the largest request: raise the limit or the
            window, or lower ``in_flight`` (the message names the limit and the numbers).
        TypeError: an argument of the wrong type.

    Examples:
        >>> calls, tokens, in_flight = client_limits(
        ...     [CallLimit(60, 500), RateLimit("tokens", 60, 200_000)],
        ...     in_flight=32,
        ...     largest={"tokens": 2_300},  # the longest prompt plus max_tokens
        ... )
        >>> calls.capacity, round(calls.window_seconds, 2)  # 500 less 32 in transit, less 1
        (467.0, 56.04)
        >>> tokens.capacity, round(tokens.window_seconds, 2)  # the same 200,000 per minute
        (126399.0, 37.92)
        >>> in_flight
        ResourceLimit('in_flight', capacity=32)
    """
    if not isinstance(in_flight, int) or isinstance(in_flight, bool):
        raise TypeError(f"in_flight must be an int, got {type(in_flight).__name__} {in_flight!r}")
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight!r}")
    limits = list(provider)
    for limit in limits:
        if not isinstance(limit, (RateLimit, CallLimit)):
            raise TypeError(
                f"provider must hold RateLimit or CallLimit values, got {type(limit).__name__} "
                f"{limit!r}"
            )
    keys = [limit.key for limit in limits]
    if in_flight_key in keys:
        raise ValueError(f"in_flight_key {in_flight_key!r} is already a provider limit's key")
    sizes = dict(largest or {})
    plain = {limit.key for limit in limits if not isinstance(limit, CallLimit)}
    if set(sizes) != plain:
        missing, unknown = sorted(plain - set(sizes)), sorted(set(sizes) - plain)
        raise ValueError(
            "largest must name each plain RateLimit's key and no other"
            + (f"; missing {missing}" if missing else "")
            + (f"; not a plain RateLimit: {unknown}" if unknown else "")
        )
    result: list[Limit] = [_within(limit, in_flight, sizes.get(limit.key, 1)) for limit in limits]
    result.append(ResourceLimit(in_flight_key, in_flight))
    return result


def _within(limit: RateLimit | CallLimit, in_flight: int, size: float) -> RateLimit | CallLimit:
    """``limit`` less the margin for ``in_flight`` requests of at most ``size`` each."""
    name = f"the provider's {limit.key!r} limit ({limit.capacity:g} per {limit.window_seconds:g} s)"
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(f"largest[{limit.key!r}] must be a number, got {size!r}")
    if not 0 < size <= limit.capacity:
        raise ValueError(
            f"largest[{limit.key!r}] must be > 0 and at most {name}'s capacity, got {size!r}"
        )
    algorithm = limit.algorithm
    if algorithm is RateLimitAlgorithm.LeakyBucket:
        raise ValueError(
            f"{name} is a leaky_bucket, which has no burst to take the in-transit margin from; "
            "declare it as token_bucket or gcra with the provider's burst"
        )
    margin = in_flight * size + min(1.0, size)
    own = limit.capacity - margin
    if algorithm.integral:
        own = math.floor(own)
    if own < size:
        raise ValueError(
            f"{name} leaves no room for a request of {size:g} after the margin for {in_flight} "
            f"requests in transit ({margin:g}): raise the limit or the window, or lower in_flight"
        )
    window = limit.window_seconds
    if algorithm in (RateLimitAlgorithm.TokenBucket, RateLimitAlgorithm.GCRA):
        window = window * own / limit.capacity  # the same rate, a smaller burst
    if isinstance(limit, CallLimit):
        return CallLimit(window, own, algorithm)
    return RateLimit(limit.key, window, own, algorithm)
