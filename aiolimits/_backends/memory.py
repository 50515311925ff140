"""The default backend: state in this process's memory.

Shared safely by every task, event loop and thread of the process that holds the LimitSet: the
scheduler guards it with one lock and wakes each waiter through its own loop's thread-safe
mechanism.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import final

from .._algorithms import RateState
from .._limits import Limit
from .._scheduler import Scheduler
from ._base import Backend, KeyFactory

__all__ = ["MemoryBackend"]


@final
class MemoryBackend(Backend):
    """State in this process's memory (the default). One process; any number of tasks, event
    loops and threads. For several processes or machines see the process and Redis backends."""

    __slots__ = ()

    def attach(
        self,
        limits: tuple[Limit, ...],
        states: tuple[RateState, ...],
        clock: Callable[[], float],
        name: str | None,
    ) -> Scheduler:
        """The scheduler that holds a new LimitSet's state (``name`` only labels it here)."""
        return Scheduler(states, clock)

    def attach_keyed(
        self,
        limits: tuple[Limit, ...],
        clock: Callable[[], float],
        name: str | None,
        max_keys: int = 100_000,
    ) -> KeyFactory | None:
        """None: a KeyedLimitSet keeps its keys in this process."""
        return None

    def __repr__(self) -> str:
        return "MemoryBackend()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryBackend)

    def __hash__(self) -> int:
        return hash(MemoryBackend)
