"""TokenBucket: a bucket of C tokens, full at creation, refilled continuously at C/W per second.

State is kept as a level in *unit-seconds* (tokens * W) and the time it was last brought up to
date. In those units the refill rate is C per second and an amount n costs n * W, so deciding needs
no division: with whole or binary-fraction times and amounts every comparison is exact, and the
only rounded value is the wait time, which :func:`first_true` corrects against the decision itself.

Refunds put back the tokens the bucket still remembers: never above the capacity, and never what
the cap has absorbed since the take (a bucket that refilled to within x of full has forgotten all
but x of an earlier take; see :class:`~._base.PeakLog`), so that after a refund the bucket is the
one in which the acquisition had taken less from the start. Charges (usage above what was taken)
may drive the level below zero, a debt the refill pays off before anything else is admitted.
"""

from __future__ import annotations

from fractions import Fraction

from ._base import PeakLog, RateState, Receipt, first_true, give_back, too_large


class TokenBucketState(RateState):
    __slots__ = ("_full", "_level", "_peaks", "_stamp", "_window")

    def __init__(self, key: str, capacity: float, window: float, now: float) -> None:
        super().__init__(key, capacity, window, now)
        self._window = window
        self._full = capacity * window  # the level of a full bucket, in unit-seconds
        self._level = self._full
        self._stamp = now
        self._peaks = PeakLog()  # levels in unit-seconds, for honest refunds

    def _level_at(self, now: float) -> float:
        elapsed = now - self._stamp
        if elapsed <= 0:
            return self._level
        level = self._level + self.capacity * elapsed
        return level if level < self._full else self._full

    def _set(self, level: float, now: float) -> None:
        self._level = level
        if now > self._stamp:
            self._stamp = now

    def _has(self, need: float, now: float) -> bool:
        """Whether the level at ``now`` is at least ``need`` (<= the full level).

        ``level + C * elapsed >= need`` is asked as ``C * elapsed >= need - level``: a product
        rounded to nearest lies on the same side of any float as the exact product unless it equals
        it, so the answer is exact whenever the deficit is (binary-fraction levels and amounts).
        Summing first would round up to ``need`` a few float steps before the exact time, and a
        clock that starts at 0 would show a wait of 0.12499999999999997 s instead of 0.125 s.
        """
        deficit = need - self._level
        if deficit <= 0:
            return True
        elapsed = now - self._stamp
        if elapsed <= 0:
            return False
        refill = self.capacity * elapsed
        if refill != deficit:
            return refill > deficit
        return Fraction(self.capacity) * Fraction(elapsed) >= deficit

    def earliest(self, amount: float, now: float) -> float:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        need = amount * self._window
        if self._has(need, now):
            return now
        approx = now + (need - self._level_at(now)) / self.capacity
        return first_true(lambda t: self._has(need, t), approx, now)

    def admits(self, amount: float, now: float) -> bool:
        need = amount * self._window
        # Enough without the refill since the last operation (the common case): no call.
        return need <= self._level or self._has(need, now)

    def take(self, amount: float, now: float) -> Receipt:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        # _level_at and _set, inline: this is every acquisition's path.
        level = self._level
        elapsed = now - self._stamp
        if elapsed > 0:
            level += self.capacity * elapsed
            if level >= self._full:
                level = self._full
            self._stamp = now
        seq = self._peaks.record(level)
        cost = amount * self._window
        self._level = level - cost
        return [[seq, cost]]

    def refund(self, receipt: Receipt, amount: float, now: float) -> float:
        if receipt is None:
            return 0.0
        level = self._level_at(now)
        # Only what the cap has not absorbed since the take can honestly come back (PeakLog).
        back = give_back(self._peaks, receipt, amount * self._window, level, self._full)
        after = level + back  # within full, up to the rounding of full - peak: clamp that away
        self._set(after if after < self._full else self._full, now)
        return amount if back == amount * self._window else back / self._window

    def charge(self, receipt: Receipt, amount: float, now: float) -> Receipt:
        level = self._level_at(now)
        seq = self._peaks.record(level)
        more = amount * self._window
        self._set(level - more, now)
        parts: list[list[float]] = receipt if receipt is not None else []
        parts.append([seq, more])
        return parts

    def available(self, now: float) -> float:
        return self._level_at(now) / self._window

    def is_fresh(self, now: float) -> bool:
        # The decision's own exact question: a rounded refilled level could read full a few
        # float steps before ``earliest`` admits the whole capacity.
        return self._has(self._full, now)

    def __repr__(self) -> str:
        return (
            f"<TokenBucketState {self.key!r} tokens={self._level / self._window:g}/"
            f"{self.capacity:g} at t={self._stamp:g}>"
        )
