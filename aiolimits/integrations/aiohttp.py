"""aiohttp servers: a middleware that limits incoming requests, like the Starlette one.

:func:`limit_middleware` returns an aiohttp middleware. Per request it asks the limits (see
``_common.Gate``): admitted, the handler runs while the acquisition is held and the response gets
``RateLimit-Policy`` / ``RateLimit`` headers; rejected, the answer is ``429 Too Many Requests``
with ``Retry-After`` and the same headers, and the handler does not run. ``max_wait`` makes a
request wait in the FIFO queue up to that long first.

The acquisition is released when the handler returns (or raises): for a response the handler
returns, aiohttp writes the body just after, outside the middleware; a streaming response that
the handler writes itself is written while held.

aiohttp runs on asyncio only.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .._keyed import KeyedLimitSet
from .._limitset import LimitSet
from ._common import Gate, Requested

__all__ = ["client_ip", "header", "limit_middleware"]


def client_ip(request: web.Request) -> str:
    """The peer's IP address (``request.remote``; ``"unknown"`` when aiohttp does not know it).

    Behind a proxy, set ``request.remote`` from the forwarded headers first (e.g. with
    ``aiohttp_remotes``) so that it is the client's address.
    """
    return request.remote or "unknown"


def header(name: str) -> Callable[[web.Request], str | None]:
    """A key function reading request header ``name``; requests without it are not limited."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty header name, got {name!r}")

    def key(request: web.Request) -> str | None:
        return request.headers.get(name)

    key.__name__ = f"header({name!r})"
    return key


def limit_middleware(
    limits: LimitSet | KeyedLimitSet,
    *,
    key: Callable[[web.Request], str | None] | None = None,
    cost: Callable[[web.Request], Requested | None] | None = None,
    max_wait: float = 0.0,
    headers: bool = True,
) -> Middleware:
    """An aiohttp middleware answering 429 (or waiting up to ``max_wait``) beyond the limits.

    Args:
        limits: a :class:`LimitSet` (one quota for all) or a ``KeyedLimitSet`` (one per client).
        key: the client's key from the request (required with a KeyedLimitSet, refused with a
            LimitSet); None leaves the request unlimited.
        cost: ``requested`` from the request (None: the set's defaults, one call).
        max_wait: seconds a request may wait for the limits; 0 rejects at once.
        headers: add ``RateLimit-Policy`` and ``RateLimit`` to admitted responses too.

    Examples:
        >>> app = web.Application(middlewares=[limit_middleware(per_ip, key=client_ip)])
    """
    gate: Gate[web.Request] = Gate(limits, key=key, cost=cost, max_wait=max_wait, headers=headers)

    @web.middleware
    async def aiolimits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        verdict = await gate.enter(request)
        if not verdict.admitted:
            return web.Response(status=429, text="Too Many Requests", headers=verdict.headers)
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # raised answers (404, 400, ...) get the headers too
            exc.headers.update(verdict.headers)
            raise
        finally:
            await verdict.release()
        if not response.prepared:  # a streamed response has already sent its headers
            response.headers.update(verdict.headers)
        return response

    return aiolimits_middleware
