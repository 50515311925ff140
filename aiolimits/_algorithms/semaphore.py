"""The maths of a ResourceLimit: ``capacity`` slots, taken and given back, with no time in it.

Only a release makes a full semaphore admissible again, so its earliest time is ``inf`` rather than
a moment a waiter could sleep until.

A change of the capacity keeps the slots in use held; below them, nothing is admitted until
enough are released.
"""

from __future__ import annotations

import math

from ._base import RateState, Receipt, too_large


class SemaphoreState(RateState):
    __slots__ = ("in_use",)

    def __init__(self, key: str, capacity: float, window: float, now: float) -> None:
        super().__init__(key, capacity, window, now)
        self.in_use: float = 0

    def earliest(self, amount: float, now: float) -> float:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        return now if self.in_use + amount <= self.capacity else math.inf

    def admits(self, amount: float, now: float) -> bool:
        return self.in_use + amount <= self.capacity

    def take(self, amount: float, now: float) -> Receipt:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        self.in_use += amount
        return None

    def release(self, amount: float) -> None:
        assert amount <= self.in_use, (amount, self.in_use)
        self.in_use -= amount

    def refund(self, receipt: Receipt, amount: float, now: float) -> float:
        raise TypeError(f"resource limit {self.key!r} cannot be updated; release the acquisition")

    def charge(self, receipt: Receipt, amount: float, now: float) -> Receipt:
        raise TypeError(f"resource limit {self.key!r} cannot be updated; release the acquisition")

    def available(self, now: float) -> float:
        return self.capacity - self.in_use

    def is_fresh(self, now: float) -> bool:
        return self.in_use == 0

    def change(self, capacity: float, window: float, now: float) -> None:
        self.capacity = capacity

    def __repr__(self) -> str:
        return f"<SemaphoreState {self.key!r} in_use={self.in_use:g}/{self.capacity:g}>"
