"""Starlette (and FastAPI) apps: an ASGI middleware that limits incoming HTTP requests.

:class:`LimitMiddleware` is a pure ASGI middleware (it does not buffer bodies or run the app in
another task). Per HTTP request it asks the limits (see ``_common.Gate``):

* admitted: the app runs while the acquisition is held (a ``ResourceLimit`` counts requests in
  progress), and the response carries ``RateLimit-Policy`` and ``RateLimit`` headers;
* rejected: ``429 Too Many Requests`` with ``Retry-After`` and the same headers; the app does not
  run.

With ``max_wait=0`` (default) it rejects at once; with ``max_wait > 0`` a request waits in the
limits' FIFO queue up to that long, then is rejected (or at once, when the rate limits already
place it after the deadline).

One quota for everyone: pass a :class:`LimitSet`. One per client: pass a ``KeyedLimitSet`` and
``key=``, a function of the :class:`~starlette.requests.HTTPConnection` (:func:`client_ip`,
:func:`header`, or your own, e.g. ``lambda conn: conn.user.identity`` after authentication);
a key of None leaves that request unlimited. ``cost=`` computes ``requested`` from the
connection (headers, path); the body is not read. WebSocket and lifespan scopes pass through.

For FastAPI, the dependency in :mod:`aiolimits.integrations.fastapi` limits single routes.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._keyed import KeyedLimitSet
from .._limitset import LimitSet
from ._common import Gate, Requested

__all__ = ["LimitMiddleware", "client_ip", "header"]


def client_ip(conn: HTTPConnection) -> str:
    """The client's IP address as the server saw it (``"unknown"`` when the server does not say).

    Behind a proxy this is the proxy's address: run the server with its proxy-headers option
    (uvicorn ``--forwarded-allow-ips``) so that it is the client's again.
    """
    return conn.client.host if conn.client is not None else "unknown"


def header(name: str) -> Callable[[HTTPConnection], str | None]:
    """A key function reading request header ``name`` (e.g. ``"x-api-key"``); requests without
    it are not limited (combine with authentication that rejects them)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty header name, got {name!r}")

    def key(conn: HTTPConnection) -> str | None:
        return conn.headers.get(name)

    key.__name__ = f"header({name!r})"
    return key


class LimitMiddleware:
    """An ASGI middleware answering 429 (or waiting up to ``max_wait``) beyond the limits.

    Args:
        app: the ASGI app to protect.
        limits: a :class:`LimitSet` (one quota for all clients) or a ``KeyedLimitSet`` (one per
            client, with ``key``).
        key: the client's key from the connection (required with a KeyedLimitSet, refused with a
            LimitSet); None leaves the request unlimited.
        cost: ``requested`` from the connection (None: the set's defaults, one call).
        max_wait: seconds a request may wait for the limits; 0 rejects at once.
        headers: add ``RateLimit-Policy`` and ``RateLimit`` to admitted responses too.

    Examples:
        >>> app = Starlette(routes=...)
        >>> app.add_middleware(
        ...     LimitMiddleware,
        ...     limits=KeyedLimitSet([CallLimit(window_seconds=60, capacity=100)]),
        ...     key=client_ip,
        ... )
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: LimitSet | KeyedLimitSet,
        *,
        key: Callable[[HTTPConnection], str | None] | None = None,
        cost: Callable[[HTTPConnection], Requested | None] | None = None,
        max_wait: float = 0.0,
        headers: bool = True,
    ) -> None:
        self.app = app
        self.gate: Gate[HTTPConnection] = Gate(
            limits, key=key, cost=cost, max_wait=max_wait, headers=headers
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        verdict = await self.gate.enter(HTTPConnection(scope))
        if not verdict.admitted:
            response = PlainTextResponse(
                "Too Many Requests", status_code=429, headers=verdict.headers
            )
            await response(scope, receive, send)
            return
        extra = verdict.headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and extra:
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    headers.append(name, value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            await verdict.release()

    def __repr__(self) -> str:
        return f"<LimitMiddleware limits={self.gate.limits!r}>"
