"""An httpx transport for client-side fan-out: acquire, send, settle, and back off together on 429.

:class:`LimitedTransport` wraps another ``httpx.AsyncBaseTransport`` (default:
``httpx.AsyncHTTPTransport()``). For each request it

1. computes ``requested`` with the user's ``cost(request)`` (e.g. prompt tokens + ``max_tokens``)
   and acquires it from the limits (waiting in their FIFO queue), holding the acquisition while
   the request is in flight;
2. sends the request;
3. on ``429 Too Many Requests`` with ``Retry-After`` (or ``retry-after-ms``), calls ``pause()`` on
   the limits (the set that was used: the whole LimitSet, the chosen set of a LimitPool, or the
   key of a KeyedLimitSet), so every caller sharing them stops until then; releases; and
   acquires again — the scheduler sleeps exactly until the pause ends, in FIFO order, there is
   no polling — up to ``retries`` times. After that the 429 is returned to the caller;
4. otherwise reads the body when ``usage`` is given, reports ``usage(request, response)`` with
   ``acq.update(...)`` (e.g. ``usage.total_tokens`` of an LLM answer) and releases; without
   ``usage`` the acquisition is released when the response is closed (streaming stays
   streaming).

The response's ``extensions["aiolimits_waited"]`` holds the seconds the request waited for the
limits (all attempts together); ``request.extensions["aiolimits"]`` the ``acq.config`` of the
set that admitted it (a pool's chosen API key, for instance).

Requests with a body are read into memory before the first attempt when ``retries > 0``, so a
retry can send them again. A 429 without a readable ``Retry-After`` is returned as it is: the
transport does not guess how long to back off.

Works on asyncio and trio (httpx runs on both). :class:`LimitedSyncTransport` is the twin for
``httpx.Client`` in threads: it waits with ``acquire_sync`` in the same FIFO queues, so threads
and tasks can share one set of limits. Both keep their checks, keys, pauses and settlement in one
``_Policy``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import cast, final

import httpx

from .._acquisition import Acquisition
from .._limitset import LimitSet
from .._pool import LimitPool
from .._requests import check_timeout, describe
from ._common import KeyedLimits, Requested, is_keyed, parse_retry_after

__all__ = ["LimitedSyncTransport", "LimitedTransport"]

_Limits = LimitSet | LimitPool | KeyedLimits
Cost = Callable[[httpx.Request], Requested | None]
Usage = Callable[[httpx.Request, httpx.Response], Requested | None]
Key = Callable[[httpx.Request], str]


@final
class _Policy:
    """What both transports share: validated options, how to acquire, pause and settle."""

    __slots__ = (
        "_lock",
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
        limits: _Limits,
        *,
        cost: Cost | None,
        usage: Usage | None,
        key: Key | None,
        retries: int,
        timeout: float | None,
    ) -> None:
        keyed = is_keyed(limits)
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
        self.keyed: KeyedLimits | None = cast("KeyedLimits", limits) if keyed else None
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
        limits = self.limits
        if self.keyed is not None:
            self.keyed.pause(seconds, key=key)
        elif isinstance(limits, LimitPool):
            for limit_set in limits.limit_sets:
                if limit_set.config is acq.config:  # the set this acquisition came from
                    limit_set.pause(seconds)
                    return
            limits.pause(seconds)
        else:
            assert isinstance(limits, LimitSet)
            limits.pause(seconds)

    def report(self, request: httpx.Request, response: httpx.Response, acq: Acquisition) -> None:
        assert self.usage is not None
        used = self.usage(request, response)
        if used is not None:
            acq.update(used)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"paused": self.paused, "retried": self.retried}


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to back off: ``retry-after-ms`` (as some LLM providers send) or ``Retry-After``."""
    ms = parse_retry_after(response.headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    return parse_retry_after(response.headers.get("retry-after"))


def _rebuilt(
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


def _view(response: httpx.Response, request: httpx.Request, raw: bytes) -> httpx.Response:
    """A response over ``raw`` that decodes as the original would (content-encoding intact)."""
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        request=request,
    )


@final
class LimitedTransport(httpx.AsyncBaseTransport):
    """Wraps an httpx transport so that every request first acquires from the limits.

    Args:
        limits: a :class:`LimitSet`, a :class:`LimitPool` (each request uses the set it is
            given; ``acq.config``, e.g. the API key, is in ``request.extensions["aiolimits"]``
            for an inner transport to use) or a ``KeyedLimitSet`` (with ``key``).
        transport: the transport that sends; default ``httpx.AsyncHTTPTransport()``.
        cost: ``requested`` for a request (None: the limits' defaults, e.g. one call).
        usage: the real usage from the final response (None: keep what was requested); when
            given, the body is read before the response is returned.
        key: for a KeyedLimitSet, the key of a request (e.g. the tenant header); required then.
        retries: how many times a request answered 429 with ``Retry-After`` is paused and sent
            again (0: never), before the 429 is returned.
        timeout: seconds to wait for the limits at most, per attempt (None: no limit); then
            ``TimeoutError``.

    Example:
        >>> limits = LimitSet([CallLimit(60, 500), RateLimit("tokens", 60, 90_000)])
        >>> transport = LimitedTransport(
        ...     limits,
        ...     cost=lambda request: {"tokens": estimate_tokens(request)},
        ...     usage=lambda request, response: {
        ...         "tokens": response.json()["usage"]["total_tokens"]
        ...     },
        ... )
        >>> async with httpx.AsyncClient(transport=transport) as client:
        ...     await client.post("https://llm.example/v1/chat/completions", json=...)
    """

    def __init__(
        self,
        limits: _Limits,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        cost: Cost | None = None,
        usage: Usage | None = None,
        key: Key | None = None,
        retries: int = 2,
        timeout: float | None = None,
    ) -> None:
        self._policy = _Policy(
            limits, cost=cost, usage=usage, key=key, retries=retries, timeout=timeout
        )
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(
                f"transport must be an httpx.AsyncBaseTransport, got {describe(transport)}"
            )
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()

    @property
    def stats(self) -> dict[str, int]:
        """``{"paused": n, "retried": n}``: 429s that paused the limits, and requests sent again."""
        return self._policy.stats()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        policy = self._policy
        if policy.retries:
            await request.aread()  # a retry sends the same body again
        requested, key = policy.requested_and_key(request)
        attempt = 0
        waited = 0.0
        while True:
            held = policy.acquire(key, requested)
            acq = await held.__aenter__()
            waited += acq.waited
            try:
                request.extensions = {**request.extensions, "aiolimits": acq.config}
                response = await self._transport.handle_async_request(request)
            except BaseException:
                await held.__aexit__(None, None, None)
                raise
            wait = policy.backoff(response, attempt)
            if wait is None:
                response.extensions = {**response.extensions, "aiolimits_waited": waited}
                return await self._settle(request, response, acq, held)
            try:
                await response.aclose()
            finally:
                await held.__aexit__(None, None, None)
            policy.pause(acq, key, wait)
            attempt += 1

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _settle(
        self,
        request: httpx.Request,
        response: httpx.Response,
        acq: Acquisition,
        held: AbstractAsyncContextManager[Acquisition],
    ) -> httpx.Response:
        policy = self._policy
        if response.is_stream_consumed:
            # Already in memory (a response built with its content, as mock transports do):
            # nothing left to hold, and it is its own decoded view.
            try:
                if policy.usage is not None:
                    policy.report(request, response, acq)
            finally:
                await held.__aexit__(None, None, None)
            return response
        if policy.usage is None:
            # Held until the caller closes the response (or reads it to the end).
            return _rebuilt(response, request, _ReleasingAsyncStream(response, held))
        try:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
            view = _view(response, request, raw)
            await view.aread()
            policy.report(request, view, acq)
        finally:
            try:
                await response.aclose()
            finally:
                await held.__aexit__(None, None, None)
        return _rebuilt(response, request, httpx.ByteStream(raw))

    def __repr__(self) -> str:
        policy = self._policy
        return (
            f"<LimitedTransport limits={policy.limits!r} retries={policy.retries} "
            f"stats={policy.stats()!r}>"
        )


@final
class LimitedSyncTransport(httpx.BaseTransport):
    """The twin of :class:`LimitedTransport` for ``httpx.Client``: waits with ``acquire_sync``.

    Same arguments, with ``transport`` an ``httpx.BaseTransport`` (default
    ``httpx.HTTPTransport()``). Sending blocks the calling thread while it waits for the limits
    (and raises ``RuntimeError`` on a thread that runs an event loop, as ``acquire_sync`` does).
    """

    def __init__(
        self,
        limits: _Limits,
        *,
        transport: httpx.BaseTransport | None = None,
        cost: Cost | None = None,
        usage: Usage | None = None,
        key: Key | None = None,
        retries: int = 2,
        timeout: float | None = None,
    ) -> None:
        self._policy = _Policy(
            limits, cost=cost, usage=usage, key=key, retries=retries, timeout=timeout
        )
        if transport is not None and not isinstance(transport, httpx.BaseTransport):
            raise TypeError(f"transport must be an httpx.BaseTransport, got {describe(transport)}")
        self._transport = transport if transport is not None else httpx.HTTPTransport()

    @property
    def stats(self) -> dict[str, int]:
        """``{"paused": n, "retried": n}``: 429s that paused the limits, and requests sent again."""
        return self._policy.stats()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        policy = self._policy
        if policy.retries:
            request.read()
        requested, key = policy.requested_and_key(request)
        attempt = 0
        waited = 0.0
        while True:
            held = policy.acquire_sync(key, requested)
            acq = held.__enter__()
            waited += acq.waited
            try:
                request.extensions = {**request.extensions, "aiolimits": acq.config}
                response = self._transport.handle_request(request)
            except BaseException:
                held.__exit__(None, None, None)
                raise
            wait = policy.backoff(response, attempt)
            if wait is None:
                response.extensions = {**response.extensions, "aiolimits_waited": waited}
                return self._settle(request, response, acq, held)
            try:
                response.close()
            finally:
                held.__exit__(None, None, None)
            policy.pause(acq, key, wait)
            attempt += 1

    def close(self) -> None:
        self._transport.close()

    def _settle(
        self,
        request: httpx.Request,
        response: httpx.Response,
        acq: Acquisition,
        held: AbstractContextManager[Acquisition],
    ) -> httpx.Response:
        policy = self._policy
        if response.is_stream_consumed:
            try:
                if policy.usage is not None:
                    policy.report(request, response, acq)
            finally:
                held.__exit__(None, None, None)
            return response
        if policy.usage is None:
            return _rebuilt(response, request, _ReleasingSyncStream(response, held))
        try:
            raw = b"".join(response.iter_raw())
            view = _view(response, request, raw)
            view.read()
            policy.report(request, view, acq)
        finally:
            try:
                response.close()
            finally:
                held.__exit__(None, None, None)
        return _rebuilt(response, request, httpx.ByteStream(raw))

    def __repr__(self) -> str:
        policy = self._policy
        return (
            f"<LimitedSyncTransport limits={policy.limits!r} retries={policy.retries} "
            f"stats={policy.stats()!r}>"
        )


@final
class _ReleasingAsyncStream(httpx.AsyncByteStream):
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
class _ReleasingSyncStream(httpx.SyncByteStream):
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
