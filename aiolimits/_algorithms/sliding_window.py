"""SlidingWindow (exact log): in every half-open interval of length W, admissions sum to at most C.

Not the weighted two-counter approximation: the state is a log with one entry per acquisition
(not per unit), each stored with the time it *expires* (admission time + W) and its amount, plus the
running total. An entry counts at time t exactly when ``t < expiry``; storing the expiry rather than
the admission time makes the wait time and the decision the same float comparison, so the earliest
time returned is always admissible. Memory is bounded by the acquisitions inside one window.

Amounts are whole units (fractions would make the running total drift); refunds reduce the
acquisition's own entry while it is still in the window; charges add an entry at the time they
are reported.

A change of the limit at ``t`` keeps every entry still in the log: an admission at ``a > t - W``
now counts until ``a + W'`` (each expiry moves by ``W' - W``, rounded later), against the capacity
``C'``; one that had expired by ``t`` stays forgotten. So every interval of length ``W'`` that
holds an admission made after ``t`` holds at most ``C'`` units, counting those admitted in
``(t - W, t]``; when ``C' <= C`` and ``W' >= W`` that also keeps every interval of length ``W``
within ``C``.
"""

from __future__ import annotations

from collections import deque

from ._base import RateState, Receipt, add_up, too_large


class SlidingWindowState(RateState):
    __slots__ = ("_log", "_total")

    def __init__(self, key: str, capacity: float, window: float, now: float) -> None:
        super().__init__(key, capacity, window, now)
        self._log: deque[list[float]] = deque()  # [expiry, amount], oldest first
        self._total: float = 0

    def _prune(self, now: float) -> None:
        log = self._log
        while log and log[0][0] <= now:
            self._total -= log.popleft()[1]
        if not log:
            self._total = 0  # no drift can survive an empty log

    def earliest(self, amount: float, now: float) -> float:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        self._prune(now)
        excess = self._total + amount - self.capacity
        if excess <= 0:
            return now
        for expiry, held in self._log:
            excess -= held
            if excess <= 0:
                return expiry
        raise AssertionError("unreachable: an amount <= capacity fits an empty window")

    def _add(self, amount: float, now: float) -> list[float]:
        entry = [now + self.window, amount]
        self._log.append(entry)
        self._total += amount
        return entry

    def take(self, amount: float, now: float) -> Receipt:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        self._prune(now)
        return [self._add(amount, now)]

    def refund(self, receipt: Receipt, amount: float, now: float) -> float:
        self._prune(now)
        given: float = 0
        for entry in reversed(receipt or ()):
            if amount <= 0:
                break
            if entry[0] <= now or entry[1] <= 0:
                continue  # expired: it already left the window
            x = entry[1] if entry[1] < amount else amount
            entry[1] -= x
            self._total -= x
            amount -= x
            given += x
        return given

    def charge(self, receipt: Receipt, amount: float, now: float) -> Receipt:
        self._prune(now)
        parts: list[list[float]] = receipt if receipt is not None else []
        parts.append(self._add(amount, now))
        return parts

    def available(self, now: float) -> float:
        self._prune(now)
        return self.capacity - self._total

    def is_fresh(self, now: float) -> bool:
        self._prune(now)
        return self._total == 0

    def change(self, capacity: float, window: float, now: float) -> None:
        self._prune(now)
        shift = window - self.window
        if shift:
            for entry in self._log:  # the same lists as the receipts: their refunds follow
                entry[0] = add_up(entry[0], shift)
        self.capacity = capacity
        self.window = window
        self._prune(now)

    def __len__(self) -> int:
        return len(self._log)

    def __repr__(self) -> str:
        return (
            f"<SlidingWindowState {self.key!r} used={self._total:g}/{self.capacity:g} "
            f"entries={len(self._log)}>"
        )
