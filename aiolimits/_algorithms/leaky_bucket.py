"""LeakyBucket (as a meter): admissions are smoothed out, one unit every ``1/r`` seconds, no burst.

An amount n admitted at t occupies the schedule over ``[t, t + n/r)``; the next admission starts no
earlier than the end of that slot. Fractional amounts are allowed: a slot is just shorter.

A refund gives back the unused tail of the acquisition's slot, as far as that tail still lies in the
future (time already passed cannot be handed to anyone); the slots scheduled after it move up by the
time given back. A charge occupies the schedule from the end of the last slot, or from ``now`` if
that is later, for the excess, as if that much more had been admitted when it was reported.

The state is the slots that have not ended yet, oldest first: a take at ``now`` needs the schedule
to be over, so these are at most the newest admission and the charges reported during it, and the
end of the schedule is the end of the last one. The slot ends are as large as the clock, so they
are summed rounded up (:func:`add_up`): a slot is never shorter than its amount, even when the
amount is worth less than a float step of a clock at 1e7 s.

A change of the limit at ``t`` keeps the units in use in use: the part of each slot still ahead
of ``t`` holds ``(end - t)/I`` units at the old interval ``I = W/C``, and keeps holding them at
the new one, so it now ends at ``t + (end - t)·I'/I`` (rounded later). A slower limit pushes the
schedule back, a faster one brings it forward, and from then on each unit costs ``I'``: the
schedule is the one the new limit would have made for the units not yet drained, and never
ahead of the old one when the change slows it down.
"""

from __future__ import annotations

import math
from collections import deque
from fractions import Fraction

from ._base import RateState, Receipt, add_up, too_large


def _scaled_up(x: float, new: float, old: float) -> float:
    """``x * new / old`` rounded up: the smallest float not below the exact value (a change of
    the limit is rare, so the exact check costs nothing that matters)."""
    y = x / old * new
    exact = Fraction(x) * Fraction(new) / Fraction(old)
    while Fraction(y) < exact:  # two roundings: at most a few steps below
        y = math.nextafter(y, math.inf)
    return y


class LeakyBucketState(RateState):
    __slots__ = ("_interval", "_slots")

    def __init__(self, key: str, capacity: float, window: float, now: float) -> None:
        super().__init__(key, capacity, window, now)
        self._interval = window / capacity  # seconds per unit
        # [end, units held]: the same lists as in the receipts, so a refund can find what follows.
        self._slots: deque[list[float]] = deque()

    def _next_free(self) -> float:
        return self._slots[-1][0] if self._slots else -math.inf

    def _prune(self, now: float) -> None:
        slots = self._slots
        while slots and slots[0][0] <= now:
            slots.popleft()

    def _occupy(self, amount: float, now: float) -> list[float]:
        self._prune(now)
        nf = self._next_free()
        part = [add_up(nf if nf > now else now, amount * self._interval), amount]
        self._slots.append(part)
        return part

    def earliest(self, amount: float, now: float) -> float:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        nf = self._next_free()
        return nf if nf > now else now

    def take(self, amount: float, now: float) -> Receipt:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        return [self._occupy(amount, now)]

    def refund(self, receipt: Receipt, amount: float, now: float) -> float:
        self._prune(now)
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
                new_end = add_up(end, -x * self._interval)
            freed = end - new_end
            part[0] = new_end
            part[1] = held - x
            # Everything scheduled after this slot moves up by the time given back.
            after = False
            for other in self._slots:
                if after:
                    other[0] = add_up(other[0], -freed)
                after = after or other is part
            amount -= x
            given += x
        return given

    def charge(self, receipt: Receipt, amount: float, now: float) -> Receipt:
        parts: list[list[float]] = receipt if receipt is not None else []
        parts.append(self._occupy(amount, now))
        return parts

    def available(self, now: float) -> float:
        return self.capacity if self._next_free() <= now else 0.0

    def change(self, capacity: float, window: float, now: float) -> None:
        self._prune(now)
        old, new = self._interval, window / capacity
        if new != old:
            for slot in self._slots:  # the same lists as the receipts: their refunds follow
                slot[0] = add_up(now, _scaled_up(slot[0] - now, new, old))
        self.capacity = capacity
        self.window = window
        self._interval = new

    def is_fresh(self, now: float) -> bool:
        return self._next_free() <= now

    def __repr__(self) -> str:
        return (
            f"<LeakyBucketState {self.key!r} next_free={self._next_free():g} "
            f"slots={len(self._slots)}>"
        )
