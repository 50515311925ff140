"""What every backend is: something a LimitSet attaches its state to.

A backend turns a set's declaration (its limits, ``name`` and clock) into the :class:`Scheduler`
that decides for it. The memory backend hands out a plain scheduler over in-process state; shared
backends return a scheduler whose state lives outside the process. The doors (``_limitset.py``)
only ever talk to the scheduler, so they are the same for every backend.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from .._algorithms import RateState
from .._limits import Limit
from .._scheduler import Scheduler

__all__ = ["Backend"]


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
