"""aiohttp servers: a middleware that limits incoming requests, like the Starlette one.

:func:`limit_middleware` returns an aiohttp middleware. Per request it asks the limits (see
``_common.Gate``): admitted, the handler runs while the acquisition is held and the response gets
``RateLimit-Policy`` / ``RateLimit`` headers; rejected, the answer is ``429`` with the body
``{"detail":"Too Many Requests"}`` (JSON, as the Starlette middleware and the FastAPI dependency
answer), ``Retry-After``, the same headers (the refusing limit's first) and
``RateLimit-Refused-By``, and the handler does not run; ``on_reject=`` builds another response
from a :class:`Rejection`. ``exempt=`` lets chosen requests through, the limits not
consulted. ``max_wait`` makes a request wait in the FIFO queue up to that long first.

The acquisition is released when the handler returns (or raises): for a response the handler
returns, aiohttp writes the body just after, outside the middleware; a streaming response that
the handler writes itself is written while held.

aiohttp runs on asyncio only.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .._keyed import KeyedLimitSet
from .._limitset import LimitSet
from .._numbers import describe
from ._common import DEFAULT_BODY, DEFAULT_MEDIA_TYPE, Gate, Rejection, Requested, check_hook

__all__ = ["Rejection", "client_ip", "default_rejection", "header", "limit_middleware"]

OnReject = Callable[[web.Request, Rejection], web.StreamResponse | Awaitable[web.StreamResponse]]


def default_rejection(request: web.Request, rejection: Rejection) -> web.Response:
    """The answer to a refused request when no ``on_reject`` is given: ``429`` with the body
    ``{"detail":"Too Many Requests"}`` (``application/json``) and ``rejection.headers``."""
    return web.Response(
        status=429,
        body=DEFAULT_BODY,
        content_type=DEFAULT_MEDIA_TYPE,
        headers=dict(rejection.headers),
    )


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
    exempt: Callable[[web.Request], bool] | None = None,
    on_reject: OnReject | None = None,
    policy: str | None = None,
) -> Middleware:
    """An aiohttp middleware answering 429 (or waiting up to ``max_wait``) beyond the limits.

    Args:
        limits: a :class:`LimitSet` (one quota for all) or a ``KeyedLimitSet`` (one per client).
        key: the client's key from the request (required with a KeyedLimitSet, refused with a
            LimitSet); None leaves the request unlimited.
        cost: ``requested`` from the request (None: the set's defaults, one call).
        max_wait: seconds a request may wait for the limits; 0 rejects at once.
        headers: add ``RateLimit-Policy`` and ``RateLimit`` to admitted responses too.
        exempt: a predicate of the request; True lets it through, the limits not consulted.
        on_reject: builds the answer to a refused request from the request and a
            :class:`Rejection` (which limit, retry-after, remaining, default headers); may be
            async. Default: :func:`default_rejection`.
        policy: what the policy names in the headers start with (``policy.key``); None: the
            set's name, or the bare keys for a set without one.

    Raises:
        TypeError, ValueError: when built with a configuration that could not serve a request
            (e.g. a plain ``RateLimit`` without ``cost=``), naming the argument to fix.

    Examples:
        >>> app = web.Application(middlewares=[limit_middleware(per_ip, key=client_ip)])
    """
    check_hook("on_reject", on_reject)
    gate: Gate[web.Request] = Gate(
        limits,
        key=key,
        cost=cost,
        max_wait=max_wait,
        headers=headers,
        exempt=exempt,
        policy=policy,
    )
    reject: OnReject = on_reject if on_reject is not None else default_rejection

    @web.middleware
    async def aiolimits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        verdict = await gate.enter(request)
        if verdict.rejection is not None:
            response = reject(request, verdict.rejection)
            if inspect.isawaitable(response):
                response = await response
            if not isinstance(response, web.StreamResponse):
                raise TypeError(
                    f"on_reject must return an aiohttp web.StreamResponse, got {describe(response)}"
                )
            return response
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
