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
limit of the set, named ``name.key`` from the set's name (or ``policy=``) and the limit's key, or
the bare key for a set without a name: ``RateLimit-Policy: "api.call_count";q=100;w=60`` (the
quota and its window) and ``RateLimit: "api.call_count";r=42;t=18`` (units left now, and seconds
until the limit is back to its full quota: exact for the bucket algorithms, an upper bound of one
window for the window algorithms). Resource limits are not rate quotas and get an item only when
they refused the request.

A rejection names the limit that refused, read from the refusal's own statistics (no second
question): its items come first, ``RateLimit-Refused-By`` names its policy, and the integration's
``on_reject`` hook gets it in a :class:`Rejection`. Every integration answers a rejection alike by
default: 429, ``application/json``, ``{"detail":"Too Many Requests"}``, which is what FastAPI
renders for the dependency's ``HTTPException``; a dependency can only raise, so this is the one
body all three can give without an exception handler.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any, Final, Generic, TypeVar, cast, final

import attrs

from .._acquisition import Acquisition
from .._door import Attempt
from .._keyed import KeyedLimitSet
from .._limits import CallLimit, Limit, RateLimit, ResourceLimit
from .._limitset import LimitSet
from .._numbers import check_seconds, describe

__all__ = [
    "DEFAULT_BODY",
    "DEFAULT_MEDIA_TYPE",
    "Gate",
    "Rejection",
    "Requested",
    "Verdict",
    "check_hook",
    "is_keyed",
    "policy_name",
    "ratelimit_headers",
    "refusing_limit",
]

Requested = Mapping[str, int | float]
Req = TypeVar("Req")


def is_keyed(limits: object) -> bool:
    """Whether ``limits`` is a :class:`KeyedLimitSet` (one set of limits per client key)."""
    return isinstance(limits, KeyedLimitSet)


def policy_name(prefix: str | None, key: str) -> str:
    """The policy's name in the headers, as a structured-field string (with its quotes).

    ``prefix.key`` (the set's name, or the integration's ``policy=``), or ``key`` alone. Only
    printable ASCII may appear in an sf-string: every other character, and ``%`` itself, is
    percent-encoded (UTF-8), so a hostile key can neither break the header nor inject another;
    ``"`` and ``\\`` are backslash-escaped.
    """
    name = f"{prefix}.{key}" if prefix else key
    if not _PRINTABLE.fullmatch(name):
        name = "".join(
            ch
            if " " <= ch <= "~" and ch != "%"
            else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
            for ch in name
        )
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


_PRINTABLE = re.compile(r"[ !-$&-~]*")  # printable ASCII but %


def _items(limit: Limit, entry: Mapping[str, Any], name: str) -> tuple[str, str]:
    """The ``RateLimit-Policy`` and ``RateLimit`` items of one limit."""
    available = float(entry["available"])
    if isinstance(limit, ResourceLimit):
        # A concurrency limit: a quota with no window, and nothing refills it but a release.
        return f"{name};q={math.floor(limit.capacity)}", f"{name};r={max(0, math.floor(available))}"
    capacity, window = limit.capacity, limit.window_seconds
    missing = capacity - available
    if missing <= 0:
        reset = 0.0
    elif entry["algorithm"] in ("sliding_window", "fixed_window"):
        reset = window
    else:
        reset = missing * window / capacity  # the refill rate is capacity / window
    # Structured-field integers: the quota rounded down (never promise more than the limit
    # admits), the window rounded up.
    return (
        f"{name};q={math.floor(capacity)};w={math.ceil(window)}",
        f"{name};r={max(0, math.floor(available))};t={math.ceil(reset)}",
    )


def ratelimit_headers(
    limits: tuple[Limit, ...],
    stats: Mapping[str, Any],
    retry_after: float | None,
    *,
    prefix: str | None = None,
    refused: str | None = None,
) -> dict[str, str]:
    """The ``RateLimit-Policy``, ``RateLimit`` and (when rejected) ``Retry-After`` headers.

    Args:
        limits: the set's limits (rate and call limits get a policy item each).
        stats: the set's ``get_stats()`` snapshot.
        retry_after: seconds to wait when rejecting (``inf``: only a release helps, so no
            ``Retry-After``), or None when admitted.
        prefix: what the policy names start with (``prefix.key``), or None for the bare keys.
        refused: the key of the limit that refused the request: its items come first (a
            resource limit's too, which otherwise has none), and ``RateLimit-Refused-By``
            names its policy.
    """
    headers: dict[str, str] = {}
    per_key = stats.get("limits", {})
    policies: list[str] = []
    current: list[str] = []
    for limit in limits:
        if isinstance(limit, ResourceLimit) and limit.key != refused:
            continue
        entry = per_key.get(limit.key)
        if entry is None:
            continue
        items = _items(limit, entry, policy_name(prefix, limit.key))
        where = 0 if limit.key == refused else len(policies)
        policies.insert(where, items[0])
        current.insert(where, items[1])
    if policies:
        headers["RateLimit-Policy"] = ", ".join(policies)
        headers["RateLimit"] = ", ".join(current)
    if refused is not None:
        headers["RateLimit-Refused-By"] = policy_name(prefix, refused)
    if retry_after is not None and math.isfinite(retry_after):
        # HTTP's delta-seconds are whole seconds; rounding up never invites a retry too early.
        headers["Retry-After"] = str(math.ceil(retry_after))
    return headers


def refusing_limit(
    limits: tuple[Limit, ...], stats: Mapping[str, Any], amounts: Mapping[str, float]
) -> str | None:
    """The key of the limit that refused ``amounts``, read from the refusal's statistics.

    A full resource limit first (only a release helps it), else the rate limit short of the
    most time (its missing units over its rate); None when every limit had room, i.e. the
    requests queued ahead were what held this one back.
    """
    per_key = stats.get("limits", {})
    best: str | None = None
    longest = -1.0
    for limit in limits:
        amount = amounts.get(limit.key, 0)
        entry = per_key.get(limit.key)
        if amount <= 0 or entry is None:
            continue
        missing = amount - float(entry["available"])
        if missing <= 0:
            continue
        if isinstance(limit, ResourceLimit):
            return limit.key
        if isinstance(limit, (RateLimit, CallLimit)):
            wait = missing * limit.window_seconds / limit.capacity
            if wait > longest:
                best, longest = limit.key, wait
    return best


@attrs.frozen
class Rejection:
    """What an ``on_reject`` hook is told about a refused request.

    Attributes:
        limit: the key of the limit that refused it (e.g. ``"tokens"``), or None when every
            limit had room and the requests queued ahead (or a pause) held it back.
        policy: that limit's policy name in the headers (an sf-string, quotes included), or None.
        retry_after: seconds until such a request could be admitted, or None when only a
            release can admit it (a full ``ResourceLimit``).
        remaining: whole units the refusing limit has left now (None when ``limit`` is None).
        client: the client's key for a ``KeyedLimitSet`` (None for a ``LimitSet``).
        headers: the default rejection's headers: ``Retry-After``, ``RateLimit-Policy`` and
            ``RateLimit`` (the refusing limit's item first), ``RateLimit-Refused-By``.
        stats: the set's (or the client's) ``get_stats()`` of the refusing answer.
    """

    limit: str | None
    policy: str | None
    retry_after: float | None
    remaining: int | None
    client: str | None
    headers: Mapping[str, str]
    stats: Mapping[str, Any] = attrs.field(repr=False)


#: The body of every integration's default rejection (FastAPI's error shape, so that the
#: dependency, whose ``HTTPException`` FastAPI renders, and the middlewares answer alike).
DEFAULT_DETAIL: Final = "Too Many Requests"
DEFAULT_BODY: Final = json.dumps({"detail": DEFAULT_DETAIL}, separators=(",", ":")).encode()
DEFAULT_MEDIA_TYPE: Final = "application/json"


def check_hook(name: str, value: object) -> None:
    """Refuse, when an integration is built, a hook that is neither None nor callable."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable of the request or None, got {describe(value)}")


@final
class Verdict:
    """The decision for one request: admitted (holding its acquisition) or rejected.

    Attributes:
        admitted: whether the request may proceed.
        acquisition: what it holds while it runs (None when rejected, or not limited).
        retry_after: seconds until a retry could be admitted (rejected only, else None).
        headers: the rate-limit headers to add to the response (and ``Retry-After`` if rejected).
        rejection: what an ``on_reject`` hook is given (rejected only, else None).
    """

    __slots__ = ("_held", "acquisition", "admitted", "headers", "rejection", "retry_after")

    def __init__(
        self,
        admitted: bool,
        held: AbstractAsyncContextManager[Acquisition] | None,
        acquisition: Acquisition | None,
        retry_after: float | None,
        headers: dict[str, str],
        *,
        rejection: Rejection | None = None,
    ) -> None:
        self.admitted = admitted
        self._held = held
        self.acquisition = acquisition
        self.retry_after = retry_after
        self.headers = headers
        self.rejection = rejection

    async def release(self) -> None:
        """Leave the acquisition, if any (it never waits). Idempotent."""
        held, self._held = self._held, None
        if held is not None:
            await held.__aexit__(None, None, None)

    def __repr__(self) -> str:
        what = "admitted" if self.admitted else f"rejected retry_after={self.retry_after!r}"
        return f"<Verdict {what} headers={self.headers!r}>"


_UNLIMITED: Final = Verdict(True, None, None, None, {})


@final
class Gate(Generic[Req]):
    """Decides, per request, whether it may proceed now (or within ``max_wait``).

    Everything it can check about its configuration it checks here, when the integration is
    built, so that a mistake is an error at start-up naming the argument to fix, not a server
    error on every request.

    Args:
        limits: a :class:`LimitSet` (one global quota) or a ``KeyedLimitSet`` (one per client).
        key: for keyed limits, the client's key from the request (None: not limited).
        cost: the ``requested`` mapping from the request (None: the set's defaults).
        max_wait: 0 rejects at once; more waits in the FIFO queue up to that many seconds.
        headers: whether to compute the ``RateLimit`` headers for admitted requests too.
        exempt: a predicate of the request; True lets it through without consulting the limits.
        policy: what the policy names in the headers start with (``policy.key``); None: the
            set's name, or the bare keys for a set without one.
    """

    __slots__ = (
        "_amounts",
        "_cost",
        "_exempt",
        "_headers",
        "_key",
        "_keyed",
        "_limits",
        "_max_wait",
        "_plain",
        "_prefix",
        "_set",
    )

    def __init__(
        self,
        limits: LimitSet | KeyedLimitSet,
        *,
        key: Callable[[Req], str | None] | None,
        cost: Callable[[Req], Requested | None] | None,
        max_wait: float,
        headers: bool,
        exempt: Callable[[Req], bool] | None = None,
        policy: str | None = None,
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
        check_hook("exempt", exempt)
        if not isinstance(headers, bool):
            raise TypeError(f"headers must be a bool, got {describe(headers)}")
        if policy is not None and (not isinstance(policy, str) or not policy):
            raise TypeError(f"policy must be a non-empty str or None, got {describe(policy)}")
        self._max_wait = check_seconds("max_wait", max_wait)
        # RateLimits other than CallLimits are taken only when ``requested`` names them: without
        # cost= every request would raise (semantics §11), so refuse the configuration now.
        self._plain = tuple(limit.key for limit in limits.limits if isinstance(limit, RateLimit))
        if cost is None and self._plain:
            example = ", ".join(f"{key!r}: 1" for key in self._plain)
            raise ValueError(
                f"limits has the RateLimit(s) {', '.join(map(repr, self._plain))}, which a "
                f"request takes only when cost= names them: pass cost=, a function of the "
                f"request returning the amounts, e.g. cost=lambda request: {{{example}}}"
            )
        self._limits = limits
        self._keyed: KeyedLimitSet | None = cast("KeyedLimitSet", limits) if keyed else None
        self._set: LimitSet | None = limits if isinstance(limits, LimitSet) else None
        self._key = key
        self._cost = cost
        self._exempt = exempt
        self._headers = headers
        self._prefix = policy if policy is not None else limits.name
        # What a request takes without cost= naming it: one of each call and resource limit.
        self._amounts: dict[str, float] = {
            limit.key: 1 for limit in limits.limits if not isinstance(limit, RateLimit)
        }

    @property
    def limits(self) -> LimitSet | KeyedLimitSet:
        return self._limits

    async def enter(self, request: Req) -> Verdict:
        """Admit ``request`` (the verdict then holds an acquisition: ``await verdict.release()``
        when the response is done) or reject it. Raises what ``key``, ``cost`` and ``exempt``
        raise, and ``ValueError`` / ``TypeError`` for a ``requested`` the limits refuse."""
        if self._exempt is not None and self._exempt(request):
            return _UNLIMITED
        requested = self._cost(request) if self._cost is not None else None
        if requested is None and self._cost is not None and self._plain:
            raise ValueError(
                f"cost() returned None for a request, but the RateLimit(s) "
                f"{', '.join(map(repr, self._plain))} are taken only when named: make cost "
                "return a mapping naming them (an amount of 0 skips a limit)"
            )
        if self._keyed is None:
            assert self._set is not None
            return await self._decide(
                self._set.attempt, self._set.acquire, self._set.get_stats, requested, None
            )
        assert self._key is not None
        key = self._key(request)
        if key is None:
            return _UNLIMITED
        if not isinstance(key, str):
            raise TypeError(f"key() must return a str or None, got {describe(key)}")
        keyed = self._keyed
        return await self._decide(
            partial(keyed.attempt, key),
            partial(keyed.acquire, key),
            partial(keyed.get_stats, key),
            requested,
            key,
        )

    def _admitted(self, held: Any, acq: Acquisition, stats: Mapping[str, Any]) -> Verdict:
        limits = self._limits.limits
        headers = (
            ratelimit_headers(limits, stats, None, prefix=self._prefix) if self._headers else {}
        )
        return Verdict(True, held, acq, None, headers)

    def _rejected(
        self, answer: Attempt, requested: Requested | None, client: str | None
    ) -> Verdict:
        limits = self._limits.limits
        amounts = self._amounts if requested is None else {**self._amounts, **requested}
        refused = refusing_limit(limits, answer.stats, amounts)
        wait = answer.retry_after
        headers = ratelimit_headers(
            limits, answer.stats, wait, prefix=self._prefix, refused=refused
        )
        remaining = None
        if refused is not None:
            available = float(answer.stats["limits"][refused]["available"])
            remaining = max(0, math.floor(available))
        rejection = Rejection(
            limit=refused,
            policy=None if refused is None else policy_name(self._prefix, refused),
            retry_after=wait if math.isfinite(wait) else None,
            remaining=remaining,
            client=client,
            headers=dict(headers),
            stats=answer.stats,
        )
        return Verdict(False, None, None, wait, headers, rejection=rejection)

    async def _decide(
        self,
        attempt: Callable[[Requested | None], Awaitable[Attempt]],
        acquire: Callable[..., AbstractAsyncContextManager[Acquisition]],
        get_stats: Callable[[], dict[str, Any]],
        requested: Requested | None,
        client: str | None,
    ) -> Verdict:
        held: AbstractAsyncContextManager[Acquisition]
        if self._max_wait == 0:
            # One awaited decision: the verdict, Retry-After and the headers of one answer.
            answer = await attempt(requested)
            if not answer.acquisition.successful:
                return self._rejected(answer, requested, client)
            return self._admitted(answer.acquisition, answer.acquisition, answer.stats)
        held = acquire(requested, timeout=self._max_wait)
        try:
            acq = await held.__aenter__()
        except TimeoutError:
            # Asked once more, awaited: admitted if that became possible meanwhile, else the
            # Retry-After and the headers of that answer.
            answer = await attempt(requested)
            if answer.acquisition.successful:
                return self._admitted(answer.acquisition, answer.acquisition, answer.stats)
            return self._rejected(answer, requested, client)
        return self._admitted(held, acq, get_stats() if self._headers else {})
