"""FastAPI: a dependency that limits the routes it is attached to.

:class:`LimitDependency` is a FastAPI dependency with ``yield``: it decides like the Starlette
middleware (``_common.Gate``), raises ``HTTPException(429, "Too Many Requests")`` with
``Retry-After``, the ``RateLimit`` headers and ``RateLimit-Refused-By`` when rejected (FastAPI
renders it as the middleware's body, ``{"detail":"Too Many Requests"}``; ``on_reject=`` returns
another exception to raise), adds ``RateLimit-Policy`` / ``RateLimit`` to the response
when admitted, gives the route the :class:`Acquisition` (or None for an unlimited key) and
releases it when the request is done. It needs only Starlette's types, which FastAPI re-exports.

Example:
    >>> per_user = LimitDependency(
    ...     KeyedLimitSet([CallLimit(window_seconds=60, capacity=30)], max_keys=100_000),
    ...     key=header("x-api-key"),
    ... )
    >>> @app.post("/summarize")
    ... async def summarize(acq: Annotated[Acquisition | None, Depends(per_user)]) -> dict: ...
    >>> @app.get("/search", dependencies=[Depends(per_user)])
    ... async def search() -> dict: ...
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from .._acquisition import Acquisition
from .._keyed import KeyedLimitSet
from .._limitset import LimitSet
from .._numbers import describe
from ._common import DEFAULT_DETAIL, Gate, Rejection, Requested, check_hook
from .starlette import client_ip, header

__all__ = ["LimitDependency", "Rejection", "client_ip", "default_rejection", "header"]

OnReject = Callable[[Request, Rejection], BaseException | Awaitable[BaseException]]


def default_rejection(request: Request, rejection: Rejection) -> HTTPException:
    """The exception a refused request raises when no ``on_reject`` is given:
    ``HTTPException(429, "Too Many Requests")`` with ``rejection.headers``."""
    return HTTPException(429, detail=DEFAULT_DETAIL, headers=dict(rejection.headers))


class LimitDependency:
    """A FastAPI dependency (use with ``Depends``) that admits a request or answers 429.

    Args:
        limits: a :class:`LimitSet` or a ``KeyedLimitSet`` (with ``key``).
        key: the client's key from the request (required with a KeyedLimitSet); None leaves
            the request unlimited.
        cost: ``requested`` from the request (None: the set's defaults, one call).
        max_wait: seconds a request may wait for the limits; 0 rejects at once.
        headers: add ``RateLimit-Policy`` and ``RateLimit`` to admitted responses too.
        exempt: a predicate of the request; True lets it through, the limits not consulted.
        on_reject: returns the exception to raise for a refused request (or raises it), given
            the request and a :class:`Rejection`; may be async. A dependency cannot send a
            response itself: FastAPI renders what it raises (``HTTPException``: ``{"detail":
            ...}``; another exception: through your ``app.exception_handler``). Default:
            :func:`default_rejection`.
        policy: what the policy names in the headers start with (``policy.key``); None: the
            set's name, or the bare keys for a set without one.

    Raises:
        TypeError, ValueError: when built with a configuration that could not serve a request
            (e.g. a plain ``RateLimit`` without ``cost=``), naming the argument to fix.
    """

    def __init__(
        self,
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

    async def __call__(
        self, request: Request, response: Response
    ) -> AsyncIterator[Acquisition | None]:
        verdict = await self.gate.enter(request)
        if verdict.rejection is not None:
            exc = self.on_reject(request, verdict.rejection)
            if inspect.isawaitable(exc):
                exc = await exc
            if not isinstance(exc, BaseException):
                raise TypeError(f"on_reject must return an exception to raise, got {describe(exc)}")
            raise exc
        response.headers.update(verdict.headers)
        try:
            yield verdict.acquisition
        finally:
            await verdict.release()

    def __repr__(self) -> str:
        return f"<LimitDependency limits={self.gate.limits!r}>"
