"""FastAPI: a dependency that limits the routes it is attached to.

:class:`LimitDependency` is a FastAPI dependency with ``yield``: it decides like the Starlette
middleware (``_common.Gate``), raises ``HTTPException(429)`` with ``Retry-After`` and the
``RateLimit`` headers when rejected, adds ``RateLimit-Policy`` / ``RateLimit`` to the response
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

from collections.abc import AsyncIterator, Callable

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from .._acquisition import Acquisition
from .._keyed import KeyedLimitSet
from .._limitset import LimitSet
from ._common import Gate, Requested
from .starlette import client_ip, header

__all__ = ["LimitDependency", "client_ip", "header"]


class LimitDependency:
    """A FastAPI dependency (use with ``Depends``) that admits a request or answers 429.

    Args:
        limits: a :class:`LimitSet` or a ``KeyedLimitSet`` (with ``key``).
        key: the client's key from the request (required with a KeyedLimitSet); None leaves
            the request unlimited.
        cost: ``requested`` from the request (None: the set's defaults, one call).
        max_wait: seconds a request may wait for the limits; 0 rejects at once.
        headers: add ``RateLimit-Policy`` and ``RateLimit`` to admitted responses too.
    """

    def __init__(
        self,
        limits: LimitSet | KeyedLimitSet,
        *,
        key: Callable[[HTTPConnection], str | None] | None = None,
        cost: Callable[[HTTPConnection], Requested | None] | None = None,
        max_wait: float = 0.0,
        headers: bool = True,
    ) -> None:
        self.gate: Gate[HTTPConnection] = Gate(
            limits, key=key, cost=cost, max_wait=max_wait, headers=headers
        )

    async def __call__(
        self, request: Request, response: Response
    ) -> AsyncIterator[Acquisition | None]:
        verdict = await self.gate.enter(request)
        if not verdict.admitted:
            raise HTTPException(429, detail="Too Many Requests", headers=verdict.headers)
        response.headers.update(verdict.headers)
        try:
            yield verdict.acquisition
        finally:
            await verdict.release()

    def __repr__(self) -> str:
        return f"<LimitDependency limits={self.gate.limits!r}>"
