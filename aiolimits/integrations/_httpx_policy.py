"""What the httpx transports share: the policy (checks, keys, pauses, settlement) and the bodies
that release their acquisition when closed. See :mod:`aiolimits.integrations.httpx`."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import cast, final

import httpx

from .._acquisition import Acquisition
from .._adaptive import (
    Adaptation,
    Follower,
    adaptation_of,
    follower_for,
    set_of,
    settle_with,
)
from .._keyed import KeyedLimitSet
from .._limitset import LimitSet
from .._numbers import check_timeout, describe
from .._pool import LimitPool
from ._common import Requested, is_keyed
from .headers import read_retry_after

__all__ = [
    "Adaptation",
    "Cost",
    "Key",
    "Limits",
    "Policy",
    "ReleasingAsyncStream",
    "ReleasingSyncStream",
    "Usage",
    "rebuilt",
    "view",
]

Limits = LimitSet | LimitPool | KeyedLimitSet
Cost = Callable[[httpx.Request], Requested | None]
Usage = Callable[[httpx.Request, httpx.Response], Requested | None]
Key = Callable[[httpx.Request], str]


@final
class Policy:
    """What both transports share: validated options, how to acquire, pause and settle."""

    __slots__ = (
        "_lock",
        "adaptation",
        "cost",
        "key",
        "keyed",
        "limits",
        "paused",
        "retried",
        "retries",
        "timeout",
        "usage",
    )

    def __init__(
        self,
        limits: Limits,
        *,
        cost: Cost | None,
        usage: Usage | None,
        key: Key | None,
        retries: int,
        timeout: float | None,
        adapt: bool | Adaptation = False,
    ) -> None:
        keyed = is_keyed(limits)
        self.adaptation = adaptation_of(adapt, keyed=keyed)
        if not keyed and not isinstance(limits, (LimitSet, LimitPool)):
            raise TypeError(
                f"limits must be a LimitSet, LimitPool or KeyedLimitSet, got {describe(limits)}"
            )
        if keyed and key is None:
            raise ValueError("limits is a KeyedLimitSet: pass key=, a function of the request")
        if not keyed and key is not None:
            raise ValueError("key= needs a KeyedLimitSet; a LimitSet or LimitPool has no keys")
        for name, fn in (("cost", cost), ("usage", usage), ("key", key)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable or None, got {describe(fn)}")
        if not isinstance(retries, int) or isinstance(retries, bool):
            raise TypeError(f"retries must be an int, got {describe(retries)}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self.timeout = None if timeout is None else check_timeout(timeout)
        self.limits = limits
        self.keyed: KeyedLimitSet | None = cast("KeyedLimitSet", limits) if keyed else None
        self.cost = cost
        self.usage = usage
        self.key = key
        self.retries = retries
        self.paused = 0
        self.retried = 0
        self._lock = threading.Lock()  # the counters, shared by threads in the sync transport

    def requested_and_key(self, request: httpx.Request) -> tuple[Requested | None, str | None]:
        requested = self.cost(request) if self.cost is not None else None
        if self.key is None:
            return requested, None
        key = self.key(request)
        if not isinstance(key, str):
            raise TypeError(f"key() must return a str, got {describe(key)}")
        return requested, key

    def acquire(
        self, key: str | None, requested: Requested | None
    ) -> AbstractAsyncContextManager[Acquisition]:
        if self.keyed is not None:
            assert key is not None
            return self.keyed.acquire(key, requested, timeout=self.timeout)
        limits = self.limits
        assert isinstance(limits, (LimitSet, LimitPool))
        return limits.acquire(requested, timeout=self.timeout)

    def acquire_sync(
        self, key: str | None, requested: Requested | None
    ) -> AbstractContextManager[Acquisition]:
        if self.keyed is not None:
            assert key is not None
            return self.keyed.acquire_sync(key, requested, timeout=self.timeout)
        limits = self.limits
        assert isinstance(limits, (LimitSet, LimitPool))
        return limits.acquire_sync(requested, timeout=self.timeout)

    def backoff(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to pause for a 429 that may be retried, else None (return the response)."""
        if response.status_code != 429 or attempt >= self.retries:
            return None
        return _retry_after(response)

    def pause(self, acq: Acquisition, key: str | None, seconds: float) -> None:
        """Pause what the 429 was about: the key, the pool's chosen set, or the set."""
        with self._lock:
            self.paused += 1
            self.retried += 1
        if self.keyed is not None:
            self.keyed.pause(seconds, key=key)
        else:
            set_of(self.limits, acq).pause(seconds)

    def follower(self, acq: Acquisition) -> Follower | None:
        """The follower of the set ``acq`` came from, when following the provider."""
        if self.adaptation is None:
            return None
        return follower_for(set_of(self.limits, acq), self.adaptation)

    def report(
        self,
        request: httpx.Request,
        response: httpx.Response | None,
        acq: Acquisition,
        settle: Mapping[str, float],
    ) -> None:
        """Settle ``acq``: the real usage (when ``usage`` is given and there is a response) plus
        for the keys of ``settle``, what brings the set in line with the provider, in one update."""
        used = (
            self.usage(request, response)
            if self.usage is not None and response is not None
            else None
        )
        settle_with(acq, used, settle)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"paused": self.paused, "retried": self.retried}


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to back off: ``retry-after-ms`` (as some LLM providers send) or ``Retry-After``
    (delta-seconds or an HTTP date); None when absent, malformed or out of range."""
    said = read_retry_after(response.headers, time.time())  # httpx.Headers ignore case
    return None if said is None else said.retry_after


def rebuilt(
    response: httpx.Response,
    request: httpx.Request,
    stream: httpx.ByteStream | httpx.AsyncByteStream | httpx.SyncByteStream,
) -> httpx.Response:
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=stream,
        request=request,
        extensions=response.extensions,
    )


def view(response: httpx.Response, request: httpx.Request, raw: bytes) -> httpx.Response:
    """A response over ``raw`` that decodes as the original would (content-encoding intact)."""
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        request=request,
    )


@final
class ReleasingAsyncStream(httpx.AsyncByteStream):
    """The inner response's body; closing it releases the acquisition."""

    __slots__ = ("_held", "_response")

    def __init__(
        self, response: httpx.Response, held: AbstractAsyncContextManager[Acquisition]
    ) -> None:
        self._response = response
        self._held: AbstractAsyncContextManager[Acquisition] | None = held

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_raw():
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            held, self._held = self._held, None
            if held is not None:
                await held.__aexit__(None, None, None)


@final
class ReleasingSyncStream(httpx.SyncByteStream):
    """The inner response's body; closing it releases the acquisition."""

    __slots__ = ("_held", "_response")

    def __init__(self, response: httpx.Response, held: AbstractContextManager[Acquisition]) -> None:
        self._response = response
        self._held: AbstractContextManager[Acquisition] | None = held

    def __iter__(self) -> Iterator[bytes]:
        yield from self._response.iter_raw()

    def close(self) -> None:
        try:
            self._response.close()
        finally:
            held, self._held = self._held, None
            if held is not None:
                held.__exit__(None, None, None)
