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
* ``change(capacity, window, now)``: the limit changes at ``now`` (validated numbers; ``window``
  is ignored by a semaphore). What is in use stays in use, counted against the new numbers; see
  each algorithm, and semantics §4 "Limits that change at run time".

Receipts are owned by one acquisition: a small list of parts, newest last, one for the take and
one per charge. For the buckets (TokenBucket, GCRA) a part is ``[operation number, units]`` (see
:class:`PeakLog`); for the others ``[time, amount]``. A refund takes from the newest part first,
so a later ``update`` can undo an earlier overage exactly.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable
from typing import Any, TypeAlias

Receipt: TypeAlias = Any  # None, or a list of parts owned by one acquisition (see above)


def too_large(key: str, amount: float, capacity: float) -> ValueError:
    return ValueError(
        f"requested[{key!r}] = {amount!r} exceeds the capacity {capacity!r} of limit {key!r}; "
        "it could never be admitted"
    )


class RateState:
    """Base of the per-limit state machines. Subclasses define ``__slots__`` and the verbs."""

    __slots__ = ("capacity", "key", "window")

    def __init__(self, key: str, capacity: float, window: float, now: float) -> None:
        self.key = key
        #: The limit's numbers now (a change of the limit updates them): units, and seconds
        #: (0.0 for a semaphore, which has no time in it).
        self.capacity = capacity
        self.window = window

    def check(self, amount: float) -> None:
        """Raise ValueError for an amount this limit could never admit."""
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)

    def earliest(self, amount: float, now: float) -> float:
        raise NotImplementedError

    def admits(self, amount: float, now: float) -> bool:
        """Whether ``amount`` (validated: at most the capacity) can be taken at ``now``: the
        fast path's question, the same answer as ``earliest(amount, now) <= now``."""
        return self.earliest(amount, now) <= now

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

    def change(self, capacity: float, window: float, now: float) -> None:
        raise NotImplementedError


#: PeakLog.LIMIT, as a global for the hot path.
_PEAK_LIMIT = 512


class PeakLog(list[float]):
    """The highest level a bucket reached since a given operation: what makes bucket refunds honest.

    A bucket caps its level at the capacity, so a refund cannot simply put the units back: once
    the level has climbed to within ``x`` of full after an acquisition took ``n``, the cap has
    absorbed all but ``x`` of that acquisition's units, just as it would have had the acquisition
    taken less. Only ``min(n, capacity - peak)`` is still "remembered" and can be given back, where
    ``peak`` is the highest level since the take (semantics §3: give back what can honestly be given
    back; without this, a late refund lets the bucket admit more than its capacity at once).

    The levels are those of the bucket *as if the units refunded so far had never been taken*:
    a refund of ``x`` units taken at operation ``s`` lifts every level recorded
    after ``s`` by ``x`` (:meth:`lift`). Otherwise two acquisitions could each claim the same room
    below the cap: one held the level down while the other's units were absorbed, then both get
    their units back. With the lifts, the bucket after any refunds is exactly the bucket in which
    the acquisitions had taken, from the start, only what they kept.

    Between operations a bucket's level only rises, so its peaks are the levels just before the
    operations that lower it (takes and charges) and the level now. This keeps those levels in a
    stack that decreases from oldest to newest (a level hides every older, lower one), with an
    operation number each: the highest level after operation ``s`` is the first entry after ``s``.
    The stack stays short (a full bucket empties it). Past ``LIMIT`` entries, neighbours are
    merged in pairs, each keeping the older (higher) level with the newer operation number: an
    answer can only come out higher than the truth, so a refund smaller, never larger, and the
    loss grows slowly (it doubles the coarseness of the older entries, one merge at a time).
    """

    # The log is itself the list of levels (one object less per bucket: keyed sets hold a
    # million buckets), with the operation numbers beside it.
    __slots__ = ("_seq", "_seqs")

    LIMIT = _PEAK_LIMIT

    def __init__(self) -> None:
        super().__init__()
        self._seq = 0
        self._seqs: list[int] = []

    @classmethod
    def after(cls, seq: int, level: float) -> PeakLog:
        """The log after operation ``seq`` (0: none yet) found the bucket at ``level``, a
        level no earlier one reached (a full bucket): that one entry hides every older one."""
        log = cls()
        log._seq = seq
        if seq:
            log.append(level)
            log._seqs.append(seq)
        return log

    @property
    def seq(self) -> int:
        """The number of the last operation recorded."""
        return self._seq

    def record(self, level: float) -> int:
        """Note the level just before an operation that lowers it; returns that operation's
        number, which a receipt keeps: the peaks that matter to it are the ones after it."""
        seq = self._seq = self._seq + 1
        seqs = self._seqs
        if seqs:
            if level >= self[0]:  # the common case: the new level hides every recorded one
                self.clear()
                seqs.clear()
            else:
                while self[-1] <= level:
                    self.pop()
                    seqs.pop()
        self.append(level)
        seqs.append(seq)
        if len(seqs) > _PEAK_LIMIT:
            self._merge()
        return seq

    def _merge(self) -> None:
        """Past ``LIMIT`` entries: pairs (0, 1), (2, 3), ... become one entry each, the older
        level with the newer number; an odd last one stays."""
        levels, seqs = self, self._seqs
        n = len(levels)
        levels[:] = levels[0 : n - 1 : 2] + ([levels[-1]] if n % 2 else [])
        self._seqs = seqs[1:n:2] + ([seqs[-1]] if n % 2 else [])

    def peak_since(self, seq: int) -> float:
        """The highest level recorded by an operation after ``seq`` (-inf: none)."""
        i = bisect_right(self._seqs, seq)
        return self[i] if i < len(self) else -math.inf

    def lift(self, seq: int, by: float) -> None:
        """Raise every level recorded after operation ``seq`` by ``by``: ``by`` units taken at
        ``seq`` were given back, so the bucket's past is now that of a bucket that never took them.
        Levels no newer than ``seq`` that the lifted ones now hide are dropped."""
        levels, seqs = self, self._seqs
        i = bisect_right(seqs, seq)
        if i == len(levels):
            return
        for j in range(i, len(levels)):
            levels[j] += by
        top, k = levels[i], i
        while k > 0 and levels[k - 1] <= top:
            k -= 1
        del levels[k:i], seqs[k:i]


def give_back(
    log: PeakLog, parts: list[list[float]], amount: float, level: float, full: float
) -> float:
    """Give back up to ``amount`` of a bucket receipt, as far as the bucket still remembers it.

    ``parts`` are the receipt's ``[operation number, units]``, oldest first; ``level`` is the level
    now, and every quantity is in its units. Units of a part can come back only while the levels
    since that part, lifted by what comes back from it and the older parts, stay within ``full``;
    so the most that can come back is, oldest part first, ``keep = min(keep + units, room)`` with
    ``room = full - (highest level since the part)``. What is given is taken from the newest
    parts first (an overage before the take) and lifted out of the log's past. Returns it.
    """
    keep = 0.0
    for seq, units in parts:
        peak = log.peak_since(int(seq))
        room = full - (level if level > peak else peak)
        keep += units
        if keep > room:
            keep = room if room > 0 else 0.0
    given = amount if amount < keep else keep
    left = given
    for part in reversed(parts):
        if left <= 0:
            break
        x = part[1] if part[1] < left else left
        part[1] -= x
        left -= x
        log.lift(int(part[0]), x)
    # A part with nothing left constrains nothing that its older parts do not (its room is larger).
    parts[:] = [part for part in parts if part[1] > 0]
    return given


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
    if not hi < math.inf:  # nan or inf: only a state out of the number range gets here
        return math.inf
    if not pred(hi):
        # Too early: step up, doubling the step, until it holds. The step doubles, so this
        # runs at most about 2,100 times (the exponent range of a float), whatever the numbers;
        # and it stops at infinity, where nothing finite holds.
        below = hi
        step = math.ulp(hi) if hi else math.ulp(1.0)
        hi = hi + step
        while not pred(hi):
            if hi == math.inf:
                return math.inf
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
