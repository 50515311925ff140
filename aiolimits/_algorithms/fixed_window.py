"""FixedWindow: windows ``[k·W, (k+1)·W)`` on the limiter's clock, each admitting at most C.

The simplest and cheapest algorithm, with the well-known edge burst: up to 2·C can pass within a
short span straddling a boundary. Window k starts at the float ``k * W``; the index of a time is
corrected after the division so that a time equal to a boundary always belongs to the window that
starts there, which is what makes "wait until the next boundary" exact.

Amounts are whole units. A refund lowers the current window's count when the acquisition was counted
in that window; a charge is counted in the window current when it is reported.

A change of the limit at ``t`` keeps the count of the current window, which admits at most
``C'`` from then on (nothing, until it ends, when it already counts more). A change of the window
keeps the current window going until the first boundary ``k·W'`` at or after its old end (it
never ends earlier than it would have), then windows follow the new grid. A window index is
never used twice (indices go on from the old ones), so a refund can only lower the count of the
window its units were counted in.
"""

from __future__ import annotations

import math

from ._base import RateState, Receipt, too_large


def window_index(t: float, window: float) -> int:
    """The k with ``k * window <= t < (k + 1) * window``, with the float products the windows'
    boundaries are computed with (the division alone can land one window off)."""
    k = math.floor(t / window)
    while k * window > t:
        k -= 1
    while (k + 1) * window <= t:
        k += 1
    return k


class FixedWindowState(RateState):
    __slots__ = ("_count", "_end", "_index", "_shift", "_start")

    def __init__(self, key: str, capacity: float, window: float, now: float) -> None:
        super().__init__(key, capacity, window, now)
        self._count: float = 0
        self._index = -1
        self._start = self._end = -math.inf
        self._shift = 0  # added to grid indices after a change of window, so none repeats
        self._roll(now)

    def window_index(self, t: float) -> int:
        """The k with ``k * W <= t < (k + 1) * W``, computed with the same float products."""
        return window_index(t, self.window)

    def _roll(self, now: float) -> None:
        if now >= self._end:
            k = self.window_index(now)
            self._index = k + self._shift
            self._start = k * self.window
            self._end = (k + 1) * self.window
            self._count = 0

    def earliest(self, amount: float, now: float) -> float:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        self._roll(now)
        return now if self._count + amount <= self.capacity else self._end

    def take(self, amount: float, now: float) -> Receipt:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        self._roll(now)
        self._count += amount
        return [[self._index, amount]]

    def refund(self, receipt: Receipt, amount: float, now: float) -> float:
        self._roll(now)
        given: float = 0
        for part in reversed(receipt or ()):
            if amount <= 0:
                break
            if part[0] != self._index or part[1] <= 0:
                continue  # counted in a window that is over
            x = part[1] if part[1] < amount else amount
            part[1] -= x
            self._count -= x
            amount -= x
            given += x
        return given

    def charge(self, receipt: Receipt, amount: float, now: float) -> Receipt:
        self._roll(now)
        self._count += amount
        parts: list[list[float]] = receipt if receipt is not None else []
        parts.append([self._index, amount])
        return parts

    def available(self, now: float) -> float:
        self._roll(now)
        return self.capacity - self._count

    def is_fresh(self, now: float) -> bool:
        self._roll(now)
        return self._count == 0

    def change(self, capacity: float, window: float, now: float) -> None:
        self._roll(now)
        self.capacity = capacity
        if window == self.window:
            return
        # The current window ends at the first boundary of the new grid at or after its old
        # end; the window starting there gets the next index.
        k = window_index(self._end, window)
        if k * window < self._end:
            k += 1
        self.window = window
        self._end = k * window
        self._shift = self._index + 1 - k

    def __repr__(self) -> str:
        return (
            f"<FixedWindowState {self.key!r} window={self._index} "
            f"used={self._count:g}/{self.capacity:g}>"
        )
