"""``limited``: a decorator that runs a function inside an acquisition of a LimitSet or LimitPool.

One implementation serves both doors: it needs only ``acquire`` (async), ``acquire_sync``
(threads) and ``retry_after`` (to validate a fixed ``requested`` once, at decoration time, so a
typo in a key fails at import rather than at the first call).

An ``async def`` function is wrapped in ``async with limits.acquire(requested)``; a plain function
in ``with limits.acquire_sync(requested)``, so calling it blocks the calling thread (and raises
``RuntimeError`` on a thread that runs an event loop, as ``acquire_sync`` does). Generator
functions are refused: the limit would be held only while the generator object is created, not
while it runs.

The wrapper keeps the function's name, docstring and signature (``functools.wraps``) and, for type
checkers, its parameters and return type (``ParamSpec``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import MappingProxyType
from typing import Any, ParamSpec, Protocol, TypeVar, final, overload

__all__ = ["Limited", "Limiter", "limited"]

P = ParamSpec("P")
R = TypeVar("R")

Requested = Mapping[str, int | float]


class Limiter(Protocol):
    """What ``limited`` needs: the verbs of :class:`LimitSet` and :class:`LimitPool`."""

    def acquire(
        self, requested: Requested | None = None, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[Any]: ...

    def acquire_sync(
        self, requested: Requested | None = None, *, timeout: float | None = None
    ) -> AbstractContextManager[Any]: ...

    def retry_after(self, requested: Requested | None = None) -> float: ...


@final
class Limited:
    """A decorator made by ``limits.limited(...)``: apply it to ``async def`` or plain functions.

    It may decorate any number of functions; they all share the limits.
    """

    __slots__ = ("_cost", "_limiter", "_requested")

    def __init__(
        self,
        limiter: Limiter,
        requested: Requested | None,
        cost: Callable[..., Requested | None] | None,
    ) -> None:
        self._limiter = limiter
        self._requested = requested
        self._cost = cost

    @overload
    def __call__(
        self, func: Callable[P, Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> Callable[P, R]: ...

    def __call__(self, func: Callable[..., Any], /) -> Callable[..., Any]:
        if not callable(func):
            raise TypeError(f"limited() decorates a function, got {type(func).__name__} {func!r}")
        if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
            raise TypeError(
                f"limited() cannot decorate the generator function {func!r}: the limit would be "
                "held only while the generator is created; acquire inside the generator instead"
            )
        limiter, requested, cost = self._limiter, self._requested, self._cost

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                asked = requested if cost is None else cost(*args, **kwargs)
                async with limiter.acquire(asked):
                    return await func(*args, **kwargs)

            return run_async

        @functools.wraps(func)
        def run_sync(*args: Any, **kwargs: Any) -> Any:
            asked = requested if cost is None else cost(*args, **kwargs)
            with limiter.acquire_sync(asked):
                return func(*args, **kwargs)

        return run_sync

    def __repr__(self) -> str:
        what = (
            f"cost={self._cost!r}" if self._cost is not None else f"requested={self._requested!r}"
        )
        return f"<limited {what} by {self._limiter!r}>"


def limited(
    limiter: Limiter,
    requested: Requested | None = None,
    *,
    cost: Callable[..., Requested | None] | None = None,
) -> Limited:
    """The decorator behind ``LimitSet.limited`` and ``LimitPool.limited``.

    Args:
        limiter: the LimitSet or LimitPool to acquire from.
        requested: the amounts every call takes; validated now.
        cost: instead of ``requested``, a callable receiving the call's arguments (as the function
            does) and returning the ``requested`` mapping (or None) for that call.

    Raises:
        ValueError: both ``requested`` and ``cost`` given, or a bad ``requested``.
        TypeError: ``cost`` is not callable, or a bad ``requested``.
    """
    if cost is not None:
        if requested is not None:
            raise ValueError(
                "pass either requested= (the same for every call) or cost= (computed from the "
                "call's arguments), not both"
            )
        if not callable(cost):
            raise TypeError(
                f"cost must be a callable returning the requested mapping, "
                f"got {type(cost).__name__} {cost!r}"
            )
        return Limited(limiter, None, cost)
    # Validates keys and amounts (and requested=None against plain RateLimits) once, now.
    limiter.retry_after(requested)
    if requested is not None:
        # A snapshot: mutating the caller's dict later cannot bypass the check above.
        requested = MappingProxyType(dict(requested))
    return Limited(limiter, requested, None)
