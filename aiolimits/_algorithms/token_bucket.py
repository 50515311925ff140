"""TokenBucket: a bucket of C tokens, full at creation, refilled continuously at C/W per second.

The state is a level ``L`` in tokens at a time ``s`` (the stamp): the level at ``t >= s`` is
``min(C, L + (t - s)·C/W)``. Exactness at the windows people write (0.1 s, 0.3 s, 60 s, whatever
their float is) rests on three choices:

* **Tokens, not unit-seconds.** A full bucket is ``C`` itself and a take subtracts the amount, so
  a burst taken at one instant, in any split of whole units, is integer arithmetic: capacity 3 in
  a 0.3 s window admits 2 then 1 (kept as ``3·0.3 - 2·0.3`` unit-seconds it rounded below
  ``0.3`` and refused the last unit).
* **Exact decisions.** ``level(t) >= n`` is asked as ``(t - s)·C >= (n - L)·W`` and answered
  exactly for the floats involved: by floats when they are clearly apart, by integers otherwise
  (``_has``; the Lua has the same answer from error-free float transformations).
  The earliest time is then the first float at which the exact answer turns true
  (:func:`~._base.first_true`), never one before.
* **The refill is never rounded up.** The refill is left implicit in ``(L, s)`` between
  operations, so it is never rounded; takes subtract with rounding down; the bucket refilled to
  the brim is ``C`` exactly (and the stamp moves to now), and only when a bucket has not been full
  for 1024 windows is the refill folded into the level, rounded down to a float. So the level kept
  is never above the exact level of the same history: nothing is ever admitted before the exact
  time. It can fall below it by one float step of the level per fractional take or fold, which
  makes an admission late by at most that many float steps of the level's worth of time (about
  2e-16·W each; none at all with whole amounts, until a bucket is 1024 windows behind).

Refunds put back the tokens the bucket still remembers: never above the capacity, and never what
the cap has absorbed since the take (a bucket that refilled to within x of full has forgotten all
but x of an earlier take; see :class:`~._base.PeakLog`), so that after a refund the bucket is the
one in which the acquisition had taken less from the start. Charges (usage above what was taken)
may drive the level below zero, a debt the refill pays off before anything else is admitted.

A change of the limit at ``t`` keeps the tokens in use in use: the deficit ``C - level(t)``
(units taken and not yet refilled, debt included) is carried over, so the new level is
``C' - (C - level(t))``, rounded down, and the refill runs at ``C'/W'`` from ``t``. Growing the
capacity adds ``C' - C`` tokens at once; shrinking it takes ``C - C'`` away, into debt if need be.
When the change tightens both the capacity and the rate, the level at every later moment is at
most the old bucket's and at most ``C'`` minus what is in use: nothing is admitted that either
would have refused. The peak log moves with the level, so a refund gives back the same units it
would have before the change.
"""

from __future__ import annotations

import math
from math import nextafter

from ._base import PeakLog, RateState, Receipt, first_true, give_back, too_large

#: When the float answer of ``_has`` is certain. Each side is a difference of two floats (one
#: correctly rounded operation: within 2**-53 of the exact difference, relative, whatever the
#: cancellation) times a float (another 2**-53), so within about 2**-52 of its exact value,
#: relative: sides further apart than ``_APART`` (2**-49, relative) compare as their exact values
#: do. Below ``_NORMAL`` (subnormal territory, which the number range keeps away from but a
#: clock near 0 could reach) rounding is no longer relative, and the exact path decides.
_APART = 1.0 + 2.0**-49
_NORMAL = 2.0**-1000

_NEG = -math.inf

#: A bucket not full for this many windows has its refill folded into its level (see ``_bring``).
_FOLD_AFTER = 1024


def sub_down(a: float, b: float) -> float:
    """``a - b`` rounded down: the largest float that is not above the exact difference."""
    s = a - b
    # Two-sum of a and -b: `err` is the exact rounding error, s + err == a - b.
    bb = s - a
    err = (a - (s - bb)) + (-b - bb)
    return math.nextafter(s, -math.inf) if err < 0 else s


class TokenBucketState(RateState):
    __slots__ = ("_level", "_peaks", "_stamp")

    def __init__(self, key: str, capacity: float, window: float, now: float) -> None:
        super().__init__(key, capacity, window, now)
        self._level: float = capacity  # tokens at _stamp: full
        self._stamp = now
        # The levels before the operations that lowered it, in tokens, for honest refunds
        # (PeakLog). While the last such operation found the bucket full, no older receipt can
        # get anything back and the log is that operation's number alone, an int (0: none yet):
        # a bucket used now and then, as most keys of a keyed set are, then holds no log.
        self._peaks: PeakLog | int = 0

    # -- the exact questions -------------------------------------------------------------------

    def _has(self, need: float, now: float) -> bool:
        """Whether the level at ``now`` is at least ``need`` (``need <= C``), exactly."""
        level = self._level
        if need <= level:
            return True
        start = self._stamp
        if now <= start:
            return False
        # (now - start)·C >= (need - level)·W, exactly: the floats decide when they are clearly
        # apart (the common case), integers otherwise. The Lua gets the same exact answer from
        # error-free float transformations.
        c, w = self.capacity, self.window
        lhs = (now - start) * c  # > 0
        rhs = (need - level) * w  # > 0
        if lhs > rhs * _APART and rhs > _NORMAL:
            return True
        if rhs > lhs * _APART and lhs > _NORMAL:
            return False
        # Exact, in integers: every float (and int) is a ratio of integers with a power-of-two
        # denominator; comparing the cross products is exact and several times faster than
        # Fraction, which matters because a waiter woken at its time asks right at the tie.
        tn, td = now.as_integer_ratio()
        sn, sd = start.as_integer_ratio()
        nn, nd = need.as_integer_ratio()
        ln, ld = level.as_integer_ratio()
        cn, cd = c.as_integer_ratio()
        wn, wd = w.as_integer_ratio()
        # (tn/td - sn/sd)·cn/cd >= (nn/nd - ln/ld)·wn/wd, all denominators positive
        return (tn * sd - sn * td) * cn * (nd * ld * wd) >= (nn * ld - ln * nd) * wn * (
            td * sd * cd
        )

    def _level_at(self, now: float) -> float:
        """The level at ``now`` as a float, for statistics and refunds (rounded, capped at C)."""
        elapsed = now - self._stamp
        if elapsed <= 0:
            return self._level
        level = self._level + elapsed * self.capacity / self.window
        return level if level < self.capacity else self.capacity

    def _bring(self, now: float) -> None:
        """Bring the state to ``now`` before changing it: full is ``C`` exactly (stamp now);
        a bucket not full for ``_FOLD_AFTER`` windows has its refill folded into the level,
        rounded down (so that the level, which the takes since then have lowered by about the
        refill, stays within about 1024 capacities of the true level and keeps its precision);
        otherwise the refill stays implicit, and unrounded."""
        if now <= self._stamp:
            return
        if self._has(self.capacity, now):
            self._level = self.capacity
            self._stamp = now
        elif now - self._stamp >= _FOLD_AFTER * self.window:
            # The largest float not above the exact level now, searched from the float estimate
            # (which cancellation can put far off, after a debt) with every step decided exactly:
            # the first -v from -C (not full) at which the level is at least v.
            estimate = self._level_at(now)
            self._level = -first_true(lambda u: self._has(-u, now), -estimate, -self.capacity)
            self._stamp = now

    def _log(self) -> PeakLog:
        """The log of peaks, made from the number that stands for it if need be (see
        ``__init__``): the log of one entry, the full bucket before that operation."""
        peaks = self._peaks
        if isinstance(peaks, int):
            peaks = self._peaks = PeakLog.after(peaks, self.capacity)
        return peaks

    # -- the verbs -----------------------------------------------------------------------------

    def earliest(self, amount: float, now: float) -> float:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        if self._has(amount, now):
            return now
        approx = self._stamp + (amount - self._level) * self.window / self.capacity
        return first_true(lambda t: self._has(amount, t), approx, now)

    def admits(self, amount: float, now: float) -> bool:
        return self._has(amount, now)

    def take(self, amount: float, now: float) -> Receipt:
        capacity = self.capacity
        if amount > capacity:
            raise too_large(self.key, amount, capacity)
        # _bring and _level_at, with the float fast path inline: this is every acquisition's path.
        level, start = self._level, self._stamp
        if now > start:
            w = self.window
            refill = (now - start) * capacity
            short = (capacity - level) * w
            if short <= 0 or (refill > short * _APART and short > _NORMAL):  # full: C from now
                self._level = level = capacity
                self._stamp = now
                peak = level
            elif short > refill * _APART and refill > _NORMAL and now - start < _FOLD_AFTER * w:
                peak = level + refill / w
                if peak > capacity:
                    peak = capacity
            else:
                self._bring(now)
                level = self._level
                peak = self._level_at(now)
        else:
            peak = level
        peaks = self._peaks
        if peak < capacity:
            seq = self._log().record(peak)
        else:  # full: the log is the number of this operation (see __init__)
            seq = self._peaks = (peaks if isinstance(peaks, int) else peaks.seq) + 1
        # level - amount, rounded down (sub_down, inline)
        left = level - amount
        bb = left - level
        self._level = left if (level - (left - bb)) + (-amount - bb) >= 0 else nextafter(left, _NEG)
        return [[seq, amount]]

    def refund(self, receipt: Receipt, amount: float, now: float) -> float:
        if receipt is None:
            return 0.0
        self._bring(now)
        level = self._level_at(now)
        # Only what the cap has not absorbed since the take can honestly come back (PeakLog).
        given = give_back(self._log(), receipt, amount, level, self.capacity)
        if given > 0:
            # Rounded down, so the level stays below the exact one; full is full exactly.
            self._level = sub_down(self._level, -given)
            if self._has(self.capacity, now):
                self._level = self.capacity
                self._stamp = now
        return given

    def charge(self, receipt: Receipt, amount: float, now: float) -> Receipt:
        self._bring(now)
        level = self._level_at(now)
        peaks = self._peaks
        if level < self.capacity:
            seq = self._log().record(level)
        else:
            seq = self._peaks = (peaks if isinstance(peaks, int) else peaks.seq) + 1
        self._level = sub_down(self._level, amount)
        parts: list[list[float]] = receipt if receipt is not None else []
        parts.append([seq, amount])
        return parts

    def available(self, now: float) -> float:
        return self._level_at(now)

    def change(self, capacity: float, window: float, now: float) -> None:
        old = self.capacity
        if now > self._stamp and not self._has(old, now):
            # Fold the refill into the level, rounded down (as ``_bring`` does after 1024 windows):
            # the deficit must be the one at ``now`` before the rate changes.
            estimate = self._level_at(now)
            self._level = -first_true(lambda u: self._has(-u, now), -estimate, -old)
            self._stamp = now
        self._bring(now)
        # C' - (C - level), rounded down twice: never above the exact level.
        level = sub_down(sub_down(self._level, old), -capacity)
        self._level = capacity if level >= capacity else level
        self._stamp = max(now, self._stamp)
        self.capacity = capacity
        self.window = window
        # A number for the log (the bucket was full at its last take) stands for the log at the
        # capacity of the moment, so it follows the change by itself.
        if capacity != old and not isinstance(self._peaks, int):
            self._peaks.lift(0, capacity - old)

    def is_fresh(self, now: float) -> bool:
        # The decision's own exact question: a rounded refilled level could read full a few
        # float steps before ``earliest`` admits the whole capacity.
        return self._has(self.capacity, now)

    def __repr__(self) -> str:
        return (
            f"<TokenBucketState {self.key!r} tokens={self._level:g}/{self.capacity:g} "
            f"at t={self._stamp:g}>"
        )
