"""GCRA, the generic cell rate algorithm: a token bucket kept as one theoretical arrival time.

Each unit is due ``T = W / C`` seconds after the previous one; the state is the *theoretical arrival
time* (TAT) at which the bucket would be full again. An amount n is admitted at t when
``TAT - W + n·T <= t``: the n units fit within the burst tolerance of one window. It admits exactly
the sequences TokenBucket admits (burst C, rate C/W), up to the rounding of ``T``; its appeal is one
float of state, which is what the Redis backend stores.

Refunds move the TAT back by the units returned, as far as the bucket still remembers them (never
before ``now``, which would be above a full bucket, and never what the cap has absorbed since the
take, see :class:`~._base.PeakLog`): the same units TokenBucket gives back. Charges move it forward
from ``max(TAT, now)``, as a debt.

The TAT is as large as the clock, so its sums are rounded up (:func:`add_up`): at 1e7 s a float step
is about 2 ns, and a sum rounded to nearest would let an amount worth less than a step cost nothing.
"""

from __future__ import annotations

from ._base import PeakLog, RateState, Receipt, add_up, give_back, too_large


class GCRAState(RateState):
    __slots__ = ("_interval", "_peaks", "_tat", "_window")

    def __init__(self, key: str, capacity: float, window: float, now: float) -> None:
        super().__init__(key, capacity, window, now)
        self._window = window
        self._interval = window / capacity  # T, seconds per unit
        self._tat = now  # full bucket
        self._peaks = PeakLog()  # levels in units, for honest refunds

    def _allow_at(self, amount: float) -> float:
        tat = self._tat
        at = add_up(add_up(tat, -self._window), amount * self._interval)
        # n <= C always fits a full bucket, even when n·T rounds above W.
        return at if at < tat else tat

    def earliest(self, amount: float, now: float) -> float:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        at = self._allow_at(amount)
        return at if at > now else now

    def _level(self, now: float) -> float:
        owed = self._tat - now
        return self.capacity - (owed / self._interval if owed > 0 else 0.0)

    def take(self, amount: float, now: float) -> Receipt:
        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        seq = self._peaks.record(self._level(now))
        tat = self._tat
        self._tat = add_up(tat if tat > now else now, amount * self._interval)
        return [[seq, amount]]

    def refund(self, receipt: Receipt, amount: float, now: float) -> float:
        if receipt is None:
            return 0.0
        # Only what the cap has not absorbed since the take can honestly come back (PeakLog);
        # that also keeps the TAT from moving before now (a bucket above full).
        given = give_back(self._peaks, receipt, amount, self._level(now), self.capacity)
        if given > 0:
            back = add_up(self._tat, -given * self._interval)
            self._tat = back if back > now else now
        return given

    def charge(self, receipt: Receipt, amount: float, now: float) -> Receipt:
        seq = self._peaks.record(self._level(now))
        tat = self._tat
        self._tat = add_up(tat if tat > now else now, amount * self._interval)
        parts: list[list[float]] = receipt if receipt is not None else []
        parts.append([seq, amount])
        return parts

    def available(self, now: float) -> float:
        return self._level(now)

    def is_fresh(self, now: float) -> bool:
        return self._tat <= now

    def __repr__(self) -> str:
        return f"<GCRAState {self.key!r} tat={self._tat:g} T={self._interval:g}>"
