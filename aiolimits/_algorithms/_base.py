"""The interface every algorithm implements, and the one piece of float care they share.

Each algorithm is a small state machine over float seconds on a monotonic clock. The caller passes
``now``; nothing here reads a clock, sleeps, locks or awaits, so the maths can be tested with a
table of times and reused unchanged by every backend (the Redis backend's Lua mirrors it).

The questions an algorithm answers, for an amount ``n <= capacity``:

* ``earliest(n, now)``: ``now`` when ``n`` can be taken now, otherwise the earliest time it can be,
  assuming nothing else happens. The answer is *exact*: re-asked at that time, the answer is that
  time (never a wake-up that fails), and the float just before it would not admit (never late by
  more than one float step of the time).
* ``take(n, now)``: take ``n``; returns a receipt the acquisition keeps for later usage updates.
* ``refund(receipt, n, now)``: give back up to ``n`` units of that acquisition, as far as the
  algorithm can honestly give them back; returns the units actually given back.
* ``charge(receipt, n, now)``: consume ``n`` more units for that acquisition, at ``now``.
* ``available(now)``, ``is_fresh(now)``: for statistics and for dropping idle keyed state.

Receipts are owned by one acquisition. For the buckets (TokenBucket, GCRA) a receipt is
``[operation number, units still remembered]`` (see :class:`PeakLog`); for the others a small list
of ``[time, amount]`` parts, newest last. A charge adds a part; a refund takes from the newest part
first, so a later ``update`` can undo an earlier overage exactly.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable
from typing import Any, TypeAlias

Receipt: TypeAlias = Any  # None, or a list of [time, amount] parts owned by one acquisition


def too_large(key: str, amount: float, capacity: float) -> ValueError:
    return ValueError(
        f"requested[{key!r}] = {amount!r} exceeds the capacity {capacity!r} of limit {key!r}; "
        "it could never be admitted"
    )


class RateState:
    """Base of the per-limit state machines. Subclasses define ``__slots__`` and the verbs."""

    __slots__ = ("capacity", "key")

    def __init__(self, key: str, capacity: float, window: float, now: float) -> None:
        self.key = key
        self.capacity = capacity

    def check(self, amount: float) -> None:
        """Raise ValueError for an amount this limit could never admit."""
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)

    def earliest(self, amount: float, now: float) -> float:
        raise NotImplementedError

    def take(self, amount: float, now: float) -> Receipt:
        raise NotImplementedError

    def refund(self, receipt: Receipt, amount: float, now: float) -> float:
        raise NotImplementedError

    def charge(self, receipt: Receipt, amount: float, now: float) -> Receipt:
        raise NotImplementedError

    def available(self, now: float) -> float:
        raise NotImplementedError

    def is_fresh(self, now: float) -> bool:
        raise NotImplementedError


class PeakLog:
    """The highest level a bucket reached since a given operation: what makes bucket refunds honest.

    A bucket caps its level at the capacity, so a refund cannot simply put the units back: once
    the level has climbed to within ``x`` of full after an acquisition took ``n``, the cap has
    absorbed all but ``x`` of that acquisition's units, just as it would have had the acquisition
    taken less. Only ``min(n, capacity - peak)`` is still "remembered" and can be given back, where
    ``peak`` is the highest level since the take (SPEC §3: give back what can honestly be given
    back; without this, a late refund lets the bucket admit more than its capacity at once).

    Between operations a bucket's level only rises, so its peaks are the levels just before the
    operations that lower it (takes and charges) and the level now. This keeps those levels in a
    stack that decreases from oldest to newest (a level hides every older, lower one), with an
    operation number each: the highest level after operation ``s`` is the first entry after ``s``.
    The stack stays short (a full bucket empties it); past ``LIMIT`` entries its oldest half is
    folded into a floor that answers conservatively (a higher peak: a smaller refund) for the
    receipts that old.
    """

    __slots__ = ("_floor_level", "_floor_seq", "_levels", "_seq", "_seqs")

    LIMIT = 512

    def __init__(self) -> None:
        self._seq = 0
        self._seqs: list[int] = []
        self._levels: list[float] = []
        self._floor_seq = 0
        self._floor_level = -math.inf

    def record(self, level: float) -> int:
        """Note the level just before an operation that lowers it; returns that operation's
        number, which a receipt keeps: the peaks that matter to it are the ones after it."""
        self._seq += 1
        levels, seqs = self._levels, self._seqs
        while levels and levels[-1] <= level:
            levels.pop()
            seqs.pop()
        levels.append(level)
        seqs.append(self._seq)
        if len(levels) > self.LIMIT:
            half = self.LIMIT // 2
            if levels[0] > self._floor_level:
                self._floor_level = levels[0]
            self._floor_seq = seqs[half - 1]
            del levels[:half], seqs[:half]
        return self._seq

    def now(self) -> int:
        """The number of the latest operation."""
        return self._seq

    def peak_since(self, seq: int) -> float:
        """The highest level recorded by an operation after ``seq`` (-inf: none)."""
        peak = self._floor_level if seq < self._floor_seq else -math.inf
        i = bisect_right(self._seqs, seq)
        if i < len(self._levels) and self._levels[i] > peak:
            peak = self._levels[i]
        return peak


def remembered(log: PeakLog, receipt: list[float], level: float, full: float) -> float:
    """How much of a bucket receipt the bucket still remembers, in the units of ``level``/``full``:
    what an honest refund may give back. ``level`` is the level now."""
    peak = log.peak_since(int(receipt[0]))
    if level > peak:
        peak = level
    room = full - peak
    held = receipt[1]
    return held if held < room else (room if room > 0 else 0.0)


def add_up(a: float, b: float) -> float:
    """``a + b`` rounded up: the smallest float that is not below the exact sum.

    GCRA and LeakyBucket store times as large as the clock (1e7 s after four months of uptime),
    where one float step is about 2 ns. A sum rounded to nearest could lose a short interval
    entirely, so a unit would cost no time and could be admitted again and again; rounded up, the
    error is at most one step and always on the side of refusing.
    """
    s = a + b
    # Two-sum: `err` is the exact rounding error, s + err == a + b (barring overflow).
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return math.nextafter(s, math.inf) if err > 0 else s


def first_true(pred: Callable[[float], bool], approx: float, lo: float) -> float:
    """The smallest float ``t >= lo`` with ``pred(t)``, for ``pred`` monotone in ``t``.

    ``approx`` is the algebraic answer, off by a few float steps at most; this corrects it in
    both directions so that the answer agrees with ``pred`` itself, which is what the decisions use.
    That is the whole defence against the wake-up-then-fail loop of rounded wait times.
    """
    if pred(lo):
        return lo
    hi = max(approx, lo)
    if not pred(hi):
        # Too early: step up, doubling the step, until it holds.
        below = hi
        step = math.ulp(hi) if hi else math.ulp(1.0)
        hi = hi + step
        while not pred(hi):
            below = hi
            step *= 2
            hi = hi + step
    else:
        # Maybe too late: step down, doubling the step, until it fails (lo is known to fail).
        below = math.nextafter(hi, -math.inf)
        step = math.ulp(hi) if hi else math.ulp(1.0)
        while below > lo and pred(below):
            hi = below
            step *= 2
            below = max(lo, hi - step)
        below = max(below, lo)
    # Now pred(below) is false and pred(hi) is true: bisect down to adjacent floats.
    while True:
        mid = below + (hi - below) / 2
        if mid <= below or mid >= hi:
            return hi
        if pred(mid):
            hi = mid
        else:
            below = mid
