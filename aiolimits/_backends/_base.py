"""What every backend is: something a LimitSet attaches its state to.

A backend turns a set's declaration (its limits, ``name`` and clock) into the :class:`Scheduler`
that decides for it. The memory backend hands out a plain scheduler over in-process state; shared
backends return a scheduler whose state lives outside the process. The doors (``_limitset.py``)
only ever talk to the scheduler, so they are the same for every backend.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TypeAlias

from .._algorithms import RateState
from .._limits import Limit
from .._scheduler import Scheduler

__all__ = ["Backend", "KeyFactory", "KeyProxy"]


class KeyProxy(Scheduler):
    """A shared backend's scheduler of one key of a KeyedLimitSet: this process's proxy of the
    key's state, which lives in the backend (the FIFO queue of this process's waiters, and what
    a shared scheduler keeps locally). Dropping a proxy forgets nothing: the backend holds the
    state, and a proxy made again for the key finds it there."""

    __slots__ = ()

    def idle(self) -> bool:
        """Nothing queued, nothing being decided, nothing held that the proxy must keep up
        (leases): the keyed set may drop it, if no door is working on it."""
        raise NotImplementedError


#: Makes the proxy of a key from its fresh local states (the fallback of a shared scheduler).
#: A factory that can change a limit of every key in the store has a method
#: ``change_limit(index, capacity, window)`` (the limit's position; None: that number
#: unchanged); without it ``KeyedLimitSet.change_limit`` raises NotImplementedError.
KeyFactory: TypeAlias = Callable[[str, tuple[RateState, ...]], KeyProxy]


class Backend(abc.ABC):
    """Where a LimitSet's state lives. Backends are small, picklable descriptions of a place
    (a directory, a Redis URL); the state itself is created by :meth:`attach`."""

    __slots__ = ()

    @abc.abstractmethod
    def attach(
        self,
        limits: tuple[Limit, ...],
        states: tuple[RateState, ...],
        clock: Callable[[], float],
        name: str | None,
    ) -> Scheduler:
        """The scheduler for a new LimitSet with these ``limits`` (fresh ``states`` made at the
        clock's current time; a shared backend may load existing state into them instead).

        Raises:
            ValueError: the shared state under ``name`` was declared with different limits.
        """

    def attach_keyed(
        self,
        limits: tuple[Limit, ...],
        clock: Callable[[], float],
        name: str | None,
        max_keys: int = 100_000,
    ) -> KeyFactory | None:
        """How a KeyedLimitSet with these ``limits`` makes the scheduler of each key: None to keep
        every key in this process, or the factory of a shared backend's per-key proxies.
        ``max_keys`` is the set's: a backend that keeps keys in a table of its own may size it so.

        Raises:
            TypeError: this backend cannot hold a KeyedLimitSet.
            ValueError: the shared state under ``name`` was declared otherwise.
        """
        raise TypeError(
            f"backend {self!r} cannot hold a KeyedLimitSet: use MemoryBackend(), "
            "ProcessBackend(...), aiolimits.redis.RedisBackend(...) or "
            "aiolimits.ray.RayBackend(...)"
        )
