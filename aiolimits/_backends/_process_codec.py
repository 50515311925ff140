"""Algorithm states as plain tuples for the process backend, and back, *into the same objects*.

The process backend keeps one set of state objects per attached LimitSet and reloads the shared
state into them whenever another process has changed it. They must be the same objects, not new
ones: the request items (``(state, amount)``) of the set and of queued waiters point at them.

Two algorithms share lists between their state and the receipts of acquisitions: SlidingWindow's
log entries ``[expiry, amount]`` and LeakyBucket's slots ``[end, units]`` are the very lists a
receipt holds, and a refund edits them in place. To keep that working across processes, every
such entry is numbered by its position (a log only loses entries at its head, as they expire, and
gains them at its tail); a reload writes the values into the process's existing list for that
number (so a receipt still edits the live entry), and marks the lists of entries that are gone
from the shared state as over (expired, nothing held), which is what they are: a refund skips
expired entries. Dumping and loading a log is a few list operations per entry.

The other states copy their slots. Everything is float, int, None, list and tuple, for
``marshal``; every float is finite (``-inf``, "not started", is stored as None).

Each state is stored as ``(capacity, window, value)``: the limit's numbers now travel with its
state, so a change of the limit in one process (semantics §4) is the state every other process
loads.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from .._algorithms import (
    FixedWindowState,
    LeakyBucketState,
    RateState,
    SemaphoreState,
    SlidingWindowState,
    TokenBucketState,
)
from .._algorithms._base import PeakLog

__all__ = ["StateCodec"]

_NEG_INF = -math.inf


def _dump_peaks(peaks: PeakLog | int) -> int | tuple[int, list[int], list[float]]:
    if isinstance(peaks, int):  # the number that stands for a log (TokenBucketState.__init__)
        return peaks
    # The live list of numbers, not a copy: it is marshalled at once, under the lock. The log is
    # itself the list of levels, a list subclass, which marshal refuses: a plain copy of it.
    return peaks._seq, peaks._seqs, peaks[:]


def _load_peaks(state: TokenBucketState, data: Any) -> None:
    if isinstance(data, int):
        state._peaks = data
        return
    peaks = state._peaks
    if isinstance(peaks, int):
        peaks = state._peaks = PeakLog()
    # Lists fresh from marshal.loads, owned by nobody else.
    peaks._seq, peaks._seqs, peaks[:] = data


class _Entries:
    """Which shared log position each of this process's entry lists stands for.

    A log only loses entries at its head (they expire) and gains them at its tail, so an entry is
    numbered by its position: the shared state stores the number of the log's first entry and
    the entries' values in order. ``objs`` is the log as of the last sync with the shared state.
    """

    __slots__ = ("first", "objs")

    def __init__(self) -> None:
        self.first = 0  # the number of objs[0]
        self.objs: deque[list[float]] = deque()

    def dump(self, log: deque[list[float]]) -> tuple[int, list[float], list[float]]:
        objs = self.objs
        if objs:
            # Entries popped at the head since the last sync: those before log[0] (all of them
            # when log[0] is new or the log is empty).
            head = log[0] if log else None
            popped = 0
            for entry in objs:
                if entry is head:
                    break
                popped += 1
            self.first += popped
        self.objs = deque(log)
        return self.first, [e[0] for e in log], [e[1] for e in log]

    def load(self, value: Any) -> deque[list[float]]:
        first, ends, amounts = value
        objs = self.objs
        gone = first - self.first
        if gone < 0 or gone > len(objs):
            gone = len(objs)
        for _ in range(gone):
            # Left the shared log: expired, so a receipt that still holds it gives nothing back.
            entry = objs.popleft()
            entry[0], entry[1] = _NEG_INF, 0
        while len(objs) > len(ends):  # cannot happen (logs only grow at the tail): be safe
            entry = objs.pop()
            entry[0], entry[1] = _NEG_INF, 0
        kept = len(objs)
        for entry, end, amount in zip(objs, ends, amounts, strict=False):  # ends may be longer
            entry[0] = end
            entry[1] = amount
        objs.extend(map(list, zip(ends[kept:], amounts[kept:], strict=True)))
        self.first = first
        return deque(objs)  # the state's own deque; objs stays the snapshot of this sync


def _dumper(state: RateState, entries: _Entries) -> Callable[[], Any]:
    """A function dumping ``state`` as ``(capacity, window, value)``."""
    if isinstance(state, SemaphoreState):
        return lambda: (state.capacity, state.window, state.in_use)
    if isinstance(state, TokenBucketState):  # and GCRAState, the same maths and state
        return lambda: (
            state.capacity,
            state.window,
            (
                state._level,
                state._stamp,
                peaks if type(peaks := state._peaks) is int else _dump_peaks(peaks),
            ),
        )
    if isinstance(state, FixedWindowState):
        # -inf ("not started") is stored as None: a state file holds finite numbers only.
        return lambda: (
            state.capacity,
            state.window,
            (
                state._count,
                state._index,
                None if state._start == _NEG_INF else state._start,
                None if state._end == _NEG_INF else state._end,
                state._shift,
            ),
        )
    if isinstance(state, SlidingWindowState):
        return lambda: (state.capacity, state.window, (state._total, entries.dump(state._log)))
    if isinstance(state, LeakyBucketState):
        return lambda: (state.capacity, state.window, entries.dump(state._slots))
    raise TypeError(f"cannot share {state!r}")  # pragma: no cover - all algorithms are above


class StateCodec:
    """Dumps and loads the states of one LimitSet (in their order)."""

    __slots__ = ("_dumpers", "_entries", "_loaders", "_states")

    def __init__(self, states: tuple[RateState, ...]) -> None:
        self._states = states
        self._entries = [_Entries() for _ in states]
        self._dumpers = [_dumper(s, e) for s, e in zip(states, self._entries, strict=True)]
        self._loaders = [_loader(s, e) for s, e in zip(states, self._entries, strict=True)]

    def dump(self) -> list[Any]:
        """The states as marshal-able values: ``(capacity, window, value)`` each."""
        return [dump() for dump in self._dumpers]

    def load(self, data: list[Any]) -> list[RateState]:
        """Write ``data`` (from :meth:`dump`, in any process) into the states in place. Returns
        the states whose limit another process changed (new capacity or window)."""
        changed = []
        for state, load, (capacity, window, value) in zip(
            self._states, self._loaders, data, strict=True
        ):
            if capacity != state.capacity or window != state.window:
                state.capacity, state.window = capacity, window
                if isinstance(state, LeakyBucketState):
                    state._interval = window / capacity  # as its change() computes it
                changed.append(state)
            load(value)
        return changed


def _loader(state: RateState, entries: _Entries) -> Callable[[Any], None]:
    """A function loading a value dumped by ``_dumper`` into ``state``."""
    if isinstance(state, SemaphoreState):

        def semaphore(value: Any) -> None:
            state.in_use = value

        return semaphore
    if isinstance(state, TokenBucketState):  # and GCRAState

        def bucket(value: Any) -> None:
            state._level, state._stamp = value[0], value[1]
            _load_peaks(state, value[2])

        return bucket
    if isinstance(state, FixedWindowState):

        def fixed(value: Any) -> None:
            state._count, state._index, start, end, state._shift = value
            state._start = _NEG_INF if start is None else start
            state._end = _NEG_INF if end is None else end

        return fixed
    if isinstance(state, SlidingWindowState):

        def sliding(value: Any) -> None:
            state._total = value[0]
            state._log = entries.load(value[1])

        return sliding
    if isinstance(state, LeakyBucketState):

        def leaky(value: Any) -> None:
            state._slots = entries.load(value)

        return leaky
    raise TypeError(f"cannot share {state!r}")  # pragma: no cover - all algorithms are above
