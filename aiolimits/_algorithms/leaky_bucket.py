"""LeakyBucket (as a meter): admissions are smoothed out, one unit every ``1/r`` seconds, no burst.

An amount n admitted at t occupies the schedule over ``[t, t + n/r)``; the next admission starts no
earlier than the end of that slot. The state is that end, ``next_free``. Fractional amounts are
allowed: a slot is just shorter.

A refund gives back the unused tail of the acquisition's slot, as far as that tail still lies in the
future (time already passed cannot be handed to anyone). A charge occupies the schedule from
``max(next_free, now)`` for the excess, as if that much more had been admitted when it was reported.
"""

from __future__ import annotations

from ._base import RateState, Receipt, too_large


class LeakyBucketState(RateState):
    __slots__ = ("_interval", "_next_free")

    def __init__(self, key: str, capacity: float, window: float, now: float) -> None:
        super().__init__(key, capacity, window, now)
        self._interval = window / capacity  # seconds per unit
        self._next_free = now

    def earliest(self, amount: float, now: float) -> float:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        nf = self._next_free
        return nf if nf > now else now

    def take(self, amount: float, now: float) -> Receipt:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        start = self._next_free if self._next_free > now else now
        end = start + amount * self._interval
        self._next_free = end
        return [[end, amount]]

    def refund(self, receipt: Receipt, amount: float, now: float) -> float:
        given = 0.0
        parts: list[list[float]] = receipt or []
        for part in reversed(parts):
            if amount <= 0:
                break
            end, held = part
            if end <= now or held <= 0:
                continue  # this part of the slot has passed: it was used, nothing to give back
            future = (end - now) / self._interval
            if future <= min(held, amount):
                x, new_end = future, now
            else:
                x = held if held < amount else amount
                new_end = end - x * self._interval
            nf = self._next_free - (end - new_end)
            self._next_free = nf if nf > now else now
            part[0] = new_end
            part[1] = held - x
            amount -= x
            given += x
        return given

    def charge(self, receipt: Receipt, amount: float, now: float) -> Receipt:
        start = self._next_free if self._next_free > now else now
        end = start + amount * self._interval
        self._next_free = end
        parts: list[list[float]] = receipt if receipt is not None else []
        parts.append([end, amount])
        return parts

    def available(self, now: float) -> float:
        return self.capacity if self._next_free <= now else 0.0

    def is_fresh(self, now: float) -> bool:
        return self._next_free <= now

    def __repr__(self) -> str:
        return f"<LeakyBucketState {self.key!r} next_free={self._next_free:g}>"
