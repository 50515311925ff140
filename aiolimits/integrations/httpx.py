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
``Policy`` (``_httpx_policy.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TypeVar, final

import httpx

from .._acquisition import Acquisition
from .._adaptive import follow_answer, follow_answer_sync
from .._numbers import describe
from ._httpx_policy import (
    Adaptation,
    Cost,
    Key,
    Limits,
    Policy,
    ReleasingAsyncStream,
    ReleasingSyncStream,
    Usage,
    rebuilt,
    view,
)

__all__ = ["LimitedSyncTransport", "LimitedTransport"]

T = TypeVar("T")


def _inner(transport: object, kind: type[T], default: Callable[[], T]) -> T:
    """The transport that sends: ``transport`` when it is a ``kind``, else the default."""
    if transport is None:
        return default()
    if not isinstance(transport, kind):
        raise TypeError(f"transport must be an httpx.{kind.__name__}, got {describe(transport)}")
    return transport


class _Policied:
    """What both transports share besides their :class:`Policy`: its figures and the repr."""

    _policy: Policy

    @property
    def stats(self) -> dict[str, int]:
        """``{"paused": n, "retried": n}``: 429s that paused the limits, and requests sent again."""
        return self._policy.stats()

    def __repr__(self) -> str:
        policy = self._policy
        return (
            f"<{type(self).__name__} limits={policy.limits!r} retries={policy.retries} "
            f"stats={policy.stats()!r}>"
        )


@final
class LimitedTransport(_Policied, httpx.AsyncBaseTransport):
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
        adapt: follow the provider (a LimitSet or LimitPool): after each answer, bring the set
            in line with what its rate-limit headers say remains and adopt a lower limit they
            announce; on a 429 without them, lower the rate multiplicatively and recover it
            additively (AIMD). ``True`` for the defaults, or an :class:`Adaptation`.

    Examples:
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
        limits: Limits,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        cost: Cost | None = None,
        usage: Usage | None = None,
        key: Key | None = None,
        retries: int = 2,
        timeout: float | None = None,
        adapt: bool | Adaptation = False,
    ) -> None:
        self._policy = Policy(
            limits,
            cost=cost,
            usage=usage,
            key=key,
            retries=retries,
            timeout=timeout,
            adapt=adapt,
        )
        self._transport = _inner(transport, httpx.AsyncBaseTransport, httpx.AsyncHTTPTransport)

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
            follower = None
            try:
                follower = policy.follower(acq)
                if follower is not None:
                    follower.sent(acq)
                request.extensions = {**request.extensions, "aiolimits": acq.config}
                response = await self._transport.handle_async_request(request)
            except BaseException:
                try:
                    if follower is not None:
                        follower.abandoned(acq)
                finally:
                    await held.__aexit__(None, None, None)
                raise
            try:
                settle = {}
                if follower is not None:
                    settle = await follow_answer(
                        follower, acq, response.status_code, response.headers.items()
                    )
            except BaseException:
                try:
                    await response.aclose()
                finally:
                    await held.__aexit__(None, None, None)
                raise
            wait = policy.backoff(response, attempt)
            if wait is None:
                response.extensions = {**response.extensions, "aiolimits_waited": waited}
                return await self._settle(request, response, acq, held, settle)
            try:
                policy.report(request, None, acq, settle)
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
        settle: Mapping[str, float],
    ) -> httpx.Response:
        policy = self._policy
        if response.is_stream_consumed:
            # Already in memory (a response built with its content, as mock transports do):
            # nothing left to hold, and it is its own decoded view.
            try:
                policy.report(request, response, acq, settle)
            finally:
                await held.__aexit__(None, None, None)
            return response
        if policy.usage is None:
            # Held until the caller closes the response (or reads it to the end).
            try:
                policy.report(request, None, acq, settle)
            except BaseException:
                try:
                    await response.aclose()
                finally:
                    await held.__aexit__(None, None, None)
                raise
            return rebuilt(response, request, ReleasingAsyncStream(response, held))
        try:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
            decoded = view(response, request, raw)
            await decoded.aread()
            policy.report(request, decoded, acq, settle)
        finally:
            try:
                await response.aclose()
            finally:
                await held.__aexit__(None, None, None)
        return rebuilt(response, request, httpx.ByteStream(raw))


@final
class LimitedSyncTransport(_Policied, httpx.BaseTransport):
    """The twin of :class:`LimitedTransport` for ``httpx.Client``: waits with ``acquire_sync``.

    Same arguments, with ``transport`` an ``httpx.BaseTransport`` (default
    ``httpx.HTTPTransport()``). Sending blocks the calling thread while it waits for the limits
    (and raises ``RuntimeError`` on a thread that runs an event loop, as ``acquire_sync`` does).
    """

    def __init__(
        self,
        limits: Limits,
        *,
        transport: httpx.BaseTransport | None = None,
        cost: Cost | None = None,
        usage: Usage | None = None,
        key: Key | None = None,
        retries: int = 2,
        timeout: float | None = None,
        adapt: bool | Adaptation = False,
    ) -> None:
        self._policy = Policy(
            limits,
            cost=cost,
            usage=usage,
            key=key,
            retries=retries,
            timeout=timeout,
            adapt=adapt,
        )
        self._transport = _inner(transport, httpx.BaseTransport, httpx.HTTPTransport)

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
            follower = None
            try:
                follower = policy.follower(acq)
                if follower is not None:
                    follower.sent(acq)
                request.extensions = {**request.extensions, "aiolimits": acq.config}
                response = self._transport.handle_request(request)
            except BaseException:
                try:
                    if follower is not None:
                        follower.abandoned(acq)
                finally:
                    held.__exit__(None, None, None)
                raise
            try:
                settle = {}
                if follower is not None:
                    settle = follow_answer_sync(
                        follower, acq, response.status_code, response.headers.items()
                    )
            except BaseException:
                try:
                    response.close()
                finally:
                    held.__exit__(None, None, None)
                raise
            wait = policy.backoff(response, attempt)
            if wait is None:
                response.extensions = {**response.extensions, "aiolimits_waited": waited}
                return self._settle(request, response, acq, held, settle)
            try:
                policy.report(request, None, acq, settle)
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
        settle: Mapping[str, float],
    ) -> httpx.Response:
        policy = self._policy
        if response.is_stream_consumed:
            try:
                policy.report(request, response, acq, settle)
            finally:
                held.__exit__(None, None, None)
            return response
        if policy.usage is None:
            try:
                policy.report(request, None, acq, settle)
            except BaseException:
                try:
                    response.close()
                finally:
                    held.__exit__(None, None, None)
                raise
            return rebuilt(response, request, ReleasingSyncStream(response, held))
        try:
            raw = b"".join(response.iter_raw())
            decoded = view(response, request, raw)
            decoded.read()
            policy.report(request, decoded, acq, settle)
        finally:
            try:
                response.close()
            finally:
                held.__exit__(None, None, None)
        return rebuilt(response, request, httpx.ByteStream(raw))
