"""Algorithm states as plain tuples for the process backend, and back, *into the same objects*.

The process backend keeps one set of state objects per attached LimitSet and reloads the shared
state into them whenever another process has changed it. They must be the same objects, not new
ones: the request items (``(state, amount)``) of the set and of queued waiters point at them.

Two algorithms share lists between their state and the receipts of acquisitions: SlidingWindow's
log entries ``[expiry, amount]`` and LeakyBucket's slots ``[end, units]`` are the very lists a
receipt holds, and a refund edits them in place. To keep that working across processes, every
such entry gets a number in the shared state; a reload writes the values into the process's
existing list for that number (so a receipt still edits the live entry), and marks the lists of
entries that are gone from the shared state as over (expired, nothing held), which is what they
are: entries leave a log only once they have expired, and a refund skips expired entries.

The other states copy their slots. Everything is float, int, list and tuple, for ``marshal``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from .._algorithms import (
    FixedWindowState,
    GCRAState,
    LeakyBucketState,
    RateState,
    SemaphoreState,
    SlidingWindowState,
    TokenBucketState,
)
from .._algorithms._base import PeakLog

__all__ = ["StateCodec"]

_NEG_INF = -math.inf


def _dump_peaks(peaks: PeakLog) -> tuple[int, list[int], list[float]]:
    # The live lists, not copies: they are marshalled at once, under the lock.
    return peaks._seq, peaks._seqs, peaks._levels


def _load_peaks(peaks: PeakLog, data: Any) -> None:
    # Lists fresh from marshal.loads, owned by nobody else.
    peaks._seq, peaks._seqs, peaks._levels = data


class _Entries:
    """The numbering of one state's shared log entries in this process."""

    __slots__ = ("by_id", "by_obj")

    def __init__(self) -> None:
        self.by_id: dict[int, list[float]] = {}  # entry number -> this process's list
        self.by_obj: dict[int, int] = {}  # id(list) -> entry number (lists kept alive by by_id)

    def dump(self, log: deque[list[float]], next_id: int) -> tuple[list[float], int]:
        flat: list[float] = []
        by_id: dict[int, list[float]] = {}
        by_obj: dict[int, int] = {}
        old = self.by_obj
        for entry in log:
            number = old.get(id(entry))
            if number is None:
                number = next_id
                next_id += 1
            flat += (number, entry[0], entry[1])
            by_id[number] = entry
            by_obj[id(entry)] = number
        self.by_id, self.by_obj = by_id, by_obj
        return flat, next_id

    def load(self, flat: list[float]) -> deque[list[float]]:
        old = self.by_id
        by_id: dict[int, list[float]] = {}
        by_obj: dict[int, int] = {}
        log: deque[list[float]] = deque()
        for i in range(0, len(flat), 3):
            number = int(flat[i])
            entry = old.pop(number, None)
            if entry is None:
                entry = [flat[i + 1], flat[i + 2]]
            else:
                entry[0], entry[1] = flat[i + 1], flat[i + 2]
            log.append(entry)
            by_id[number] = entry
            by_obj[id(entry)] = number
        for gone in old.values():
            # Left the shared log: expired, so a receipt that still holds it gives nothing back.
            gone[0], gone[1] = _NEG_INF, 0
        self.by_id, self.by_obj = by_id, by_obj
        return log


def _dumper(state: RateState, entries: _Entries) -> Callable[[int], tuple[Any, int]]:
    """A function dumping ``state`` (given and returning the next free entry number)."""
    if isinstance(state, SemaphoreState):
        return lambda n: (state.in_use, n)
    if isinstance(state, TokenBucketState):
        return lambda n: ((state._level, state._stamp, _dump_peaks(state._peaks)), n)
    if isinstance(state, GCRAState):
        return lambda n: ((state._tat, _dump_peaks(state._peaks)), n)
    if isinstance(state, FixedWindowState):
        return lambda n: ((state._count, state._index, state._start, state._end), n)
    if isinstance(state, SlidingWindowState):

        def dump_log(n: int) -> tuple[Any, int]:
            flat, n = entries.dump(state._log, n)
            return (state._total, flat), n

        return dump_log
    if isinstance(state, LeakyBucketState):
        return lambda n: entries.dump(state._slots, n)
    raise TypeError(f"cannot share {state!r}")  # pragma: no cover - all algorithms are above


class StateCodec:
    """Dumps and loads the states of one LimitSet (in their order)."""

    __slots__ = ("_dumpers", "_entries", "_states")

    def __init__(self, states: tuple[RateState, ...]) -> None:
        self._states = states
        self._entries = [_Entries() for _ in states]
        self._dumpers = [_dumper(s, e) for s, e in zip(states, self._entries, strict=True)]

    def dump(self, next_id: int) -> tuple[list[Any], int]:
        """The states as marshal-able values, and the next free entry number."""
        out: list[Any] = []
        for dump in self._dumpers:
            value, next_id = dump(next_id)
            out.append(value)
        return out, next_id

    def load(self, data: list[Any]) -> None:
        """Write ``data`` (from :meth:`dump`, in any process) into the states in place."""
        for state, entries, value in zip(self._states, self._entries, data, strict=True):
            if isinstance(state, SemaphoreState):
                state.in_use = value
            elif isinstance(state, TokenBucketState):
                state._level, state._stamp = value[0], value[1]
                _load_peaks(state._peaks, value[2])
            elif isinstance(state, GCRAState):
                state._tat = value[0]
                _load_peaks(state._peaks, value[1])
            elif isinstance(state, FixedWindowState):
                state._count, state._index, state._start, state._end = value
            elif isinstance(state, SlidingWindowState):
                state._total = value[0]
                state._log = entries.load(value[1])
            elif isinstance(state, LeakyBucketState):
                state._slots = entries.load(value)
