"""Starlette (and FastAPI) apps: an ASGI middleware that limits incoming HTTP requests.

:class:`LimitMiddleware` is a pure ASGI middleware (it does not buffer bodies or run the app in
another task). Per HTTP request it asks the limits (see ``_common.Gate``):

* admitted: the app runs while the acquisition is held (a ``ResourceLimit`` counts requests in
  progress), and the response carries ``RateLimit-Policy`` and ``RateLimit`` headers;
* rejected: ``429 Too Many Requests``, body ``{"detail":"Too Many Requests"}`` (JSON, as the
  FastAPI dependency answers), with ``Retry-After``, the same headers (the refusing limit's item
  first) and ``RateLimit-Refused-By`` naming it; the app does not run. ``on_reject=`` builds
  another response from a :class:`Rejection`.

``exempt=`` lets chosen requests through without consulting the limits.

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

import inspect
from collections.abc import Awaitable, Callable

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._keyed import KeyedLimitSet
from .._limitset import LimitSet
from .._numbers import describe
from ._common import DEFAULT_BODY, DEFAULT_MEDIA_TYPE, Gate, Rejection, Requested, check_hook

__all__ = ["LimitMiddleware", "Rejection", "client_ip", "default_rejection", "header"]

OnReject = Callable[[HTTPConnection, Rejection], Response | Awaitable[Response]]


def default_rejection(conn: HTTPConnection, rejection: Rejection) -> Response:
    """The answer to a refused request when no ``on_reject`` is given: ``429`` with the body
    ``{"detail":"Too Many Requests"}`` (``application/json``) and ``rejection.headers``."""
    return Response(
        DEFAULT_BODY,
        status_code=429,
        headers=dict(rejection.headers),
        media_type=DEFAULT_MEDIA_TYPE,
    )


async def build_rejection(
    on_reject: OnReject, conn: HTTPConnection, rejection: Rejection
) -> Response:
    """Call the ``on_reject`` hook (sync or async) and check that it answered a Response."""
    response = on_reject(conn, rejection)
    if inspect.isawaitable(response):
        response = await response
    if not isinstance(response, Response):
        raise TypeError(f"on_reject must return a starlette Response, got {describe(response)}")
    return response


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
        exempt: a predicate of the connection; True lets it through, the limits not consulted.
        on_reject: builds the answer to a refused request from the connection and a
            :class:`Rejection` (which limit, retry-after, remaining, default headers); may be
            async. Default: :func:`default_rejection`.
        policy: what the policy names in the headers start with (``policy.key``); None: the
            set's name, or the bare keys for a set without one.

    Raises:
        TypeError, ValueError: when built with a configuration that could not serve a request
            (e.g. a plain ``RateLimit`` without ``cost=``), naming the argument to fix.

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
        exempt: Callable[[HTTPConnection], bool] | None = None,
        on_reject: OnReject | None = None,
        policy: str | None = None,
    ) -> None:
        check_hook("on_reject", on_reject)
        self.app = app
        self.gate: Gate[HTTPConnection] = Gate(
            limits,
            key=key,
            cost=cost,
            max_wait=max_wait,
            headers=headers,
            exempt=exempt,
            policy=policy,
        )
        self.on_reject: OnReject = on_reject if on_reject is not None else default_rejection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        verdict = await self.gate.enter(conn)
        if verdict.rejection is not None:
            response = await build_rejection(self.on_reject, conn, verdict.rejection)
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
