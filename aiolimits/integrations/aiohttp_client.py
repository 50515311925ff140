"""An aiohttp *client* middleware: acquire, send, settle, follow the provider, back off on 429.

Many LLM clients use ``aiohttp.ClientSession``. :class:`LimitedClientMiddleware` is its
counterpart of the httpx transport (:mod:`aiolimits.integrations.httpx`), for aiohttp 3.12 and
later, which run client middlewares around every request::

    middleware = LimitedClientMiddleware(limits, cost=estimate, usage=real_usage, adapt=True)
    async with aiohttp.ClientSession(middlewares=(middleware,)) as session:
        async with session.post(url, json=...) as response:
            ...

For each request it acquires ``cost(request)`` from the limits (a :class:`~aiolimits.LimitSet`
or a :class:`~aiolimits.LimitPool`; a middleware placed after this one reads the chosen set's
``config``, e.g. the API key, with :meth:`LimitedClientMiddleware.chosen`), sends it, and with
``adapt=`` brings the set in line with the answer's rate-limit headers or adapts with AIMD (see
:class:`~aiolimits.Adaptation`). A ``429`` with ``Retry-After`` pauses the set and sends the
request again, up to ``retries`` times. With ``usage`` the body is read (aiohttp keeps it, so
``await response.json()`` still works) and ``usage(request, response, body)`` is reported; the
acquisition is released when the middleware returns the response, so a ``ResourceLimit`` counts
requests until their headers (and, with ``usage``, their body) are in.

asyncio only, as aiohttp is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, final

import aiohttp

from .._acquisition import Acquisition
from .._adaptive import (
    Adaptation,
    adaptation_of,
    follow_answer,
    follower_for,
    set_of,
    settle_with,
)
from .._limitset import LimitSet
from .._numbers import check_timeout, describe
from .._pool import LimitPool
from ._common import Requested
from .headers import read_retry_after

__all__ = ["LimitedClientMiddleware"]

Cost = Callable[[aiohttp.ClientRequest], Requested | None]
Usage = Callable[[aiohttp.ClientRequest, aiohttp.ClientResponse, bytes], Requested | None]
Handler = Callable[[aiohttp.ClientRequest], Any]


@final
class LimitedClientMiddleware:
    """Every request of an ``aiohttp.ClientSession`` first acquires from the limits.

    Args:
        limits: a :class:`~aiolimits.LimitSet` or :class:`~aiolimits.LimitPool`.
        cost: ``requested`` for a request (None: the limits' defaults, e.g. one call).
        usage: the real usage from the final answer and its body (None: what was requested).
        retries: how many times a request answered 429 with ``Retry-After`` is paused and sent
            again (0: never), before the 429 is returned.
        timeout: seconds to wait for the limits at most, per attempt; then ``TimeoutError``.
        adapt: follow the provider's rate-limit headers, and AIMD on 429s without them
            (``True`` for the defaults, or an :class:`~aiolimits.Adaptation`).
    """

    __slots__ = (
        "_adaptation",
        "_chosen",
        "cost",
        "limits",
        "retried",
        "retries",
        "timeout",
        "usage",
    )

    def __init__(
        self,
        limits: LimitSet | LimitPool,
        *,
        cost: Cost | None = None,
        usage: Usage | None = None,
        retries: int = 2,
        timeout: float | None = None,
        adapt: bool | Adaptation = False,
    ) -> None:
        if not isinstance(limits, (LimitSet, LimitPool)):
            raise TypeError(f"limits must be a LimitSet or LimitPool, got {describe(limits)}")
        for name, fn in (("cost", cost), ("usage", usage)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable or None, got {describe(fn)}")
        if not isinstance(retries, int) or isinstance(retries, bool):
            raise TypeError(f"retries must be an int, got {describe(retries)}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self.timeout = None if timeout is None else check_timeout(timeout)
        self._adaptation = adaptation_of(adapt, keyed=False)
        self.limits = limits
        self.cost = cost
        self.usage = usage
        self.retries = retries
        self.retried = 0
        self._chosen: dict[int, Any] = {}

    def chosen(self, request: aiohttp.ClientRequest) -> Any:
        """The ``config`` of the set admitting ``request`` (e.g. a pool's API key), while it is
        in flight; for a middleware placed after this one."""
        return self._chosen.get(id(request))

    async def __call__(
        self, request: aiohttp.ClientRequest, handler: Handler
    ) -> aiohttp.ClientResponse:
        requested = self.cost(request) if self.cost is not None else None
        attempt = 0
        while True:
            async with self.limits.acquire(requested, timeout=self.timeout) as acq:
                response, wait = await self._attempt(request, handler, acq, attempt)
                if wait is None:
                    return response
            set_of(self.limits, acq).pause(wait)
            self.retried += 1
            attempt += 1

    async def _attempt(
        self,
        request: aiohttp.ClientRequest,
        handler: Handler,
        acq: Acquisition,
        attempt: int,
    ) -> tuple[aiohttp.ClientResponse, float | None]:
        follower = None
        self._chosen[id(request)] = acq.config
        try:
            if self._adaptation is not None:
                follower = follower_for(set_of(self.limits, acq), self._adaptation)
                follower.sent(acq)
            response: aiohttp.ClientResponse = await handler(request)
        except BaseException:
            if follower is not None:
                follower.abandoned(acq)
            raise
        finally:
            self._chosen.pop(id(request), None)
        try:
            settle: dict[str, float] = {}
            if follower is not None:
                settle = await follow_answer(
                    follower, acq, response.status, response.headers.items()
                )
            wait = None
            if response.status == 429 and attempt < self.retries:
                said = read_retry_after(response.headers, time.time())
                wait = None if said is None else said.retry_after
            if wait is not None:
                settle_with(acq, None, settle)
                response.release()
                return response, wait
            used = None
            if self.usage is not None:
                body = await response.read()
                used = self.usage(request, response, body)
            settle_with(acq, used, settle)
        except BaseException:
            response.release()
            raise
        return response, None

    def __repr__(self) -> str:
        return (
            f"<LimitedClientMiddleware limits={self.limits!r} retries={self.retries} "
            f"retried={self.retried}>"
        )
