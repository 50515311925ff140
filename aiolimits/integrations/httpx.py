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

Works on asyncio and trio (httpx runs on both). There is no sync transport: threads can use
``acquire_sync`` around a sync client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import cast, final

import httpx

from .._acquisition import Acquisition
from .._limitset import LimitSet
from .._pool import LimitPool
from .._requests import check_timeout, describe
from ._common import KeyedLimits, Requested, is_keyed, parse_retry_after

__all__ = ["LimitedTransport"]

_Limits = LimitSet | LimitPool | KeyedLimits


@final
class LimitedTransport(httpx.AsyncBaseTransport):
    """Wraps an httpx transport so that every request first acquires from the limits.

    Args:
        limits: a :class:`LimitSet`, a :class:`LimitPool` (each request uses the set it is
            given; ``acq.config``, e.g. the API key, is in ``request.extensions["aiolimits"]``
            for an inner transport or ``cost`` to use) or a ``KeyedLimitSet`` (with ``key``).
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
        cost: Callable[[httpx.Request], Requested | None] | None = None,
        usage: Callable[[httpx.Request, httpx.Response], Requested | None] | None = None,
        key: Callable[[httpx.Request], str] | None = None,
        retries: int = 2,
        timeout: float | None = None,
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
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(
                f"transport must be an httpx.AsyncBaseTransport, got {describe(transport)}"
            )
        for name, fn in (("cost", cost), ("usage", usage), ("key", key)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable or None, got {describe(fn)}")
        if not isinstance(retries, int) or isinstance(retries, bool):
            raise TypeError(f"retries must be an int, got {describe(retries)}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self._timeout = None if timeout is None else check_timeout(timeout)
        self._limits = limits
        self._keyed: KeyedLimits | None = cast("KeyedLimits", limits) if keyed else None
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._cost = cost
        self._usage = usage
        self._key = key
        self._retries = retries
        self._paused = 0
        self._retried = 0

    @property
    def stats(self) -> dict[str, int]:
        """``{"paused": n, "retried": n}``: 429s that paused the limits, and requests sent again."""
        return {"paused": self._paused, "retried": self._retried}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._retries:
            await request.aread()  # a retry sends the same body again
        requested = self._cost(request) if self._cost is not None else None
        key = self._request_key(request)
        attempt = 0
        waited = 0.0
        while True:
            pending = self._acquire(key, requested)
            acq = await pending.__aenter__()
            waited += acq.waited
            try:
                request.extensions = {**request.extensions, "aiolimits": acq.config}
                response = await self._transport.handle_async_request(request)
            except BaseException:
                await pending.__aexit__(None, None, None)
                raise
            if response.status_code == 429 and attempt < self._retries:
                wait = _retry_after(response)
                if wait is not None:
                    try:
                        await response.aclose()
                    finally:
                        await pending.__aexit__(None, None, None)
                    self._pause(acq, key, wait)
                    attempt += 1
                    self._retried += 1
                    continue
            response.extensions = {**response.extensions, "aiolimits_waited": waited}
            return await self._settle(request, response, acq, pending)

    async def aclose(self) -> None:
        await self._transport.aclose()

    # -- helpers -----------------------------------------------------------------------------

    def _request_key(self, request: httpx.Request) -> str | None:
        if self._key is None:
            return None
        key = self._key(request)
        if not isinstance(key, str):
            raise TypeError(f"key() must return a str, got {describe(key)}")
        return key

    def _acquire(
        self, key: str | None, requested: Requested | None
    ) -> AbstractAsyncContextManager[Acquisition]:
        if self._keyed is not None:
            assert key is not None
            return self._keyed.acquire(key, requested, timeout=self._timeout)
        limits = self._limits
        assert isinstance(limits, (LimitSet, LimitPool))
        return limits.acquire(requested, timeout=self._timeout)

    def _pause(self, acq: Acquisition, key: str | None, seconds: float) -> None:
        """Pause what the 429 was about: the key, the pool's chosen set, or the set."""
        self._paused += 1
        limits = self._limits
        if self._keyed is not None:
            self._keyed.pause(seconds, key=key)
        elif isinstance(limits, LimitPool):
            for limit_set in limits.limit_sets:
                if limit_set.config is acq.config:  # the set this acquisition came from
                    limit_set.pause(seconds)
                    return
            limits.pause(seconds)
        else:
            assert isinstance(limits, LimitSet)
            limits.pause(seconds)

    async def _settle(
        self,
        request: httpx.Request,
        response: httpx.Response,
        acq: Acquisition,
        pending: AbstractAsyncContextManager[Acquisition],
    ) -> httpx.Response:
        if self._usage is None:
            if response.is_stream_consumed:  # already in memory: nothing left to hold
                await pending.__aexit__(None, None, None)
                return response
            # Held until the caller closes the response (or reads it to the end).
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_ReleasingStream(response, pending),
                request=request,
                extensions=response.extensions,
            )
        if response.is_stream_consumed:
            # Already in memory (a response built with its content, as mock transports do):
            # it is its own decoded view.
            try:
                self._report(request, response, acq)
            finally:
                await pending.__aexit__(None, None, None)
            return response
        try:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
            # A decoded view for the usage function; the caller gets the raw bytes, which its
            # client decodes as it would have (content-encoding intact).
            view = httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=httpx.ByteStream(raw),
                request=request,
            )
            await view.aread()
            self._report(request, view, acq)
        finally:
            try:
                await response.aclose()
            finally:
                await pending.__aexit__(None, None, None)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=httpx.ByteStream(raw),
            request=request,
            extensions=response.extensions,
        )

    def _report(self, request: httpx.Request, response: httpx.Response, acq: Acquisition) -> None:
        assert self._usage is not None
        used = self._usage(request, response)
        if used is not None:
            acq.update(used)

    def __repr__(self) -> str:
        return (
            f"<LimitedTransport limits={self._limits!r} retries={self._retries} "
            f"paused={self._paused} retried={self._retried}>"
        )


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to back off: ``retry-after-ms`` (as some LLM providers send) or ``Retry-After``."""
    ms = parse_retry_after(response.headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    return parse_retry_after(response.headers.get("retry-after"))


@final
class _ReleasingStream(httpx.AsyncByteStream):
    """The inner response's body; closing it releases the acquisition."""

    __slots__ = ("_pending", "_response")

    def __init__(
        self, response: httpx.Response, pending: AbstractAsyncContextManager[Acquisition]
    ) -> None:
        self._response = response
        self._pending: AbstractAsyncContextManager[Acquisition] | None = pending

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_raw():
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            pending, self._pending = self._pending, None
            if pending is not None:
                await pending.__aexit__(None, None, None)
