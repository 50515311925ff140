"""Brute-force reference models of the rate algorithms, for the property tests.

Each model keeps the whole history in exact rational arithmetic (:class:`fractions.Fraction`) and
answers every question from its definition, by scanning that history. They are slow and meant to be
obviously right; the implementations in ``aiolimits._algorithms`` are fast, keep a few floats, and
must make the same decisions.

A model has the same verbs as an algorithm state (``earliest``, ``take``, ``refund``, ``charge``,
``is_fresh``), with Fractions for times and amounts. Receipts are the model's own objects: a test
keeps one receipt per acquisition for the implementation and one for the model.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Protocol

__all__ = [
    "BucketModel",
    "FixedWindowModel",
    "LeakyBucketModel",
    "Model",
    "SlidingWindowModel",
]


class BucketModel:
    """TokenBucket and GCRA: burst C, refill at r = C/W, never above C; charges may go into debt.

    The history is the list of takes and charges, as entries ``(time, amount)`` in order; a
    receipt is the list of its acquisition's own entries. A refund adds no event: it *rewrites*
    the history, lowering the acquisition's entries (newest first), so the model is always the
    bucket in which every acquisition had taken, from the start, only what it kept. The level at t
    of a history is

        L(t) = min(C, min over events i of C + r·(t - t_i) - (amounts of events i, i+1, ...))

    because just before any event the bucket held at most C, it gained at most r per second since
    and lost exactly the later events; and the bound for the first event after the bucket was last
    full is attained. No state is carried from one question to the next.

    An honest refund of x gives back what that rewriting gains now: ``L'(now) - L(now)``, where
    ``L'`` is the level of the history with the acquisition's entries lowered by x. Had the
    acquisition taken x less, the bucket would be that much higher now and no higher: what the cap
    absorbed in between (the bucket would have been full) is gone. The gain is ``min(x, d)`` for
    some ``d`` (each term above gains ``min(x, later entries of the acquisition)``), so lowering
    the entries by the gain itself gains all of it: the rewritten history is the bucket's own.
    """

    def __init__(self, capacity: Fraction, window: Fraction, now: Fraction) -> None:
        self.capacity = capacity
        self.rate = capacity / window
        self.events: list[_Entry] = []

    def _suffixes(self) -> list[tuple[Fraction, Fraction]]:
        """(t_i, amount of events i, i+1, ...) for every event i."""
        out: list[tuple[Fraction, Fraction]] = []
        total = Fraction(0)
        for e in reversed(self.events):
            total += e.amount
            out.append((e.at, total))
        return out

    def level(self, now: Fraction) -> Fraction:
        c, r = self.capacity, self.rate
        return min([c] + [c + r * (now - t) - later for t, later in self._suffixes()])

    def boundary(self, n: Fraction) -> Fraction | None:
        """The time from which ``n`` is admissible (None: it always was), even if it is past."""
        # L(t) >= n  <=>  t >= t_i + (n - C + later_i) / r  for every event i.
        bounds = [t + (n - self.capacity + later) / self.rate for t, later in self._suffixes()]
        return max(bounds, default=None)

    def earliest(self, n: Fraction, now: Fraction) -> Fraction:
        b = self.boundary(n)
        return now if b is None or b < now else b

    def take(self, n: Fraction, now: Fraction) -> list[_Entry]:
        return self.charge([], n, now)

    def charge(self, receipt: list[_Entry], n: Fraction, now: Fraction) -> list[_Entry]:
        entry = _Entry(now, n)
        self.events.append(entry)
        receipt.append(entry)
        return receipt

    @staticmethod
    def _lower(receipt: list[_Entry], n: Fraction) -> None:
        for entry in reversed(receipt):
            x = min(entry.amount, n)
            entry.amount -= x
            n -= x

    def level_had_it_taken_less(
        self, receipt: list[_Entry], n: Fraction, now: Fraction
    ) -> Fraction:
        """The level now of the history in which that acquisition had taken ``n`` less."""
        kept = [e.amount for e in receipt]
        self._lower(receipt, n)
        level = self.level(now)
        for e, amount in zip(receipt, kept, strict=True):
            e.amount = amount
        return level

    def refund(self, receipt: list[_Entry], n: Fraction, now: Fraction) -> Fraction:
        before = self.level(now)
        given = self.level_had_it_taken_less(receipt, n, now) - before
        self._lower(receipt, given)
        assert self.level(now) == before + given  # the gain is min(n, d): see above
        return given

    def is_fresh(self, now: Fraction) -> bool:
        return self.level(now) == self.capacity


class _Slot:
    """Part of an acquisition in the LeakyBucket schedule: asked at ``at``, ``length`` long."""

    __slots__ = ("at", "length")

    def __init__(self, at: Fraction, length: Fraction) -> None:
        self.at = at
        self.length = length


class LeakyBucketModel:
    """LeakyBucket as an explicit schedule of slots, one unit every W/C seconds.

    Every take and every charge appends a slot of ``amount · W/C`` seconds. The schedule is packed:
    each slot starts when it was requested or when the slot before it ends, whichever is later.
    An admission needs the whole schedule to be over. A refund shortens the acquisition's own slots,
    newest first, by at most the part of each slot that still lies in the future; the slots after it
    move up, since the schedule is recomputed from the requests and the lengths every time.
    """

    def __init__(self, capacity: Fraction, window: Fraction, now: Fraction) -> None:
        self.per_unit = window / capacity
        self.slots: list[_Slot] = []

    def _spans(self) -> list[tuple[_Slot, Fraction, Fraction]]:
        out: list[tuple[_Slot, Fraction, Fraction]] = []
        end: Fraction | None = None
        for slot in self.slots:
            start = slot.at if end is None else max(slot.at, end)
            end = start + slot.length
            out.append((slot, start, end))
        return out

    def earliest(self, n: Fraction, now: Fraction) -> Fraction:
        spans = self._spans()
        return max(now, spans[-1][2]) if spans else now

    def take(self, n: Fraction, now: Fraction) -> list[_Slot]:
        return self.charge([], n, now)

    def charge(self, receipt: list[_Slot], n: Fraction, now: Fraction) -> list[_Slot]:
        slot = _Slot(now, n * self.per_unit)
        self.slots.append(slot)
        receipt.append(slot)
        return receipt

    def refund(self, receipt: list[_Slot], n: Fraction, now: Fraction) -> Fraction:
        given = Fraction(0)
        for slot in reversed(receipt):
            span = {id(s): (start, end) for s, start, end in self._spans()}
            start, end = span[id(slot)]
            unused = end - max(start, now) if end > now else Fraction(0)
            units = min(n - given, unused / self.per_unit)
            slot.length -= units * self.per_unit
            given += units
        return given

    def is_fresh(self, now: Fraction) -> bool:
        return self.earliest(Fraction(0), now) == now


class _Entry:
    """One admission or charge: ``amount`` units counted from time ``at`` (or window ``at``)."""

    __slots__ = ("amount", "at")

    def __init__(self, at: Fraction, amount: Fraction) -> None:
        self.at = at
        self.amount = amount


class SlidingWindowModel:
    """SlidingWindow: the units counted at t are those admitted in ``(t - W, t]``; at most C.

    The log keeps every admission and charge forever; refunds lower the acquisition's own entries,
    newest first, while they still count.
    """

    def __init__(self, capacity: Fraction, window: Fraction, now: Fraction) -> None:
        self.capacity = capacity
        self.window = window
        self.log: list[_Entry] = []

    def _counts(self, e: _Entry, t: Fraction) -> bool:
        return t - self.window < e.at <= t

    def used(self, t: Fraction) -> Fraction:
        return sum((e.amount for e in self.log if self._counts(e, t)), Fraction(0))

    def earliest(self, n: Fraction, now: Fraction) -> Fraction:
        # The count only drops when an entry leaves the window, at its time + W: try those in order.
        candidates = sorted(
            {now} | {e.at + self.window for e in self.log if e.at + self.window > now}
        )
        return next(t for t in candidates if self.used(t) + n <= self.capacity)

    def take(self, n: Fraction, now: Fraction) -> list[_Entry]:
        return self.charge([], n, now)

    def charge(self, receipt: list[_Entry], n: Fraction, now: Fraction) -> list[_Entry]:
        entry = _Entry(now, n)
        self.log.append(entry)
        receipt.append(entry)
        return receipt

    def refund(self, receipt: list[_Entry], n: Fraction, now: Fraction) -> Fraction:
        given = Fraction(0)
        for entry in reversed(receipt):
            if self._counts(entry, now):
                x = min(entry.amount, n - given)
                entry.amount -= x
                given += x
        return given

    def is_fresh(self, now: Fraction) -> bool:
        return self.used(now) == 0


class FixedWindowModel:
    """FixedWindow: window k is ``[k·W, (k+1)·W)``; the units counted in each are at most C.

    Every admission and charge is logged with the index of its window, ``floor(t / W)``; refunds
    lower the acquisition's own entries, newest first, if they are in the current window.
    """

    def __init__(self, capacity: Fraction, window: Fraction, now: Fraction) -> None:
        self.capacity = capacity
        self.window = window
        self.log: list[_Entry] = []

    def index(self, t: Fraction) -> int:
        return math.floor(t / self.window)

    def used(self, t: Fraction) -> Fraction:
        k = self.index(t)
        return sum((e.amount for e in self.log if e.at == k), Fraction(0))

    def earliest(self, n: Fraction, now: Fraction) -> Fraction:
        if self.used(now) + n <= self.capacity:
            return now
        return (self.index(now) + 1) * self.window

    def take(self, n: Fraction, now: Fraction) -> list[_Entry]:
        return self.charge([], n, now)

    def charge(self, receipt: list[_Entry], n: Fraction, now: Fraction) -> list[_Entry]:
        entry = _Entry(Fraction(self.index(now)), n)
        self.log.append(entry)
        receipt.append(entry)
        return receipt

    def refund(self, receipt: list[_Entry], n: Fraction, now: Fraction) -> Fraction:
        given = Fraction(0)
        k = self.index(now)
        for entry in reversed(receipt):
            if entry.at == k:
                x = min(entry.amount, n - given)
                entry.amount -= x
                given += x
        return given

    def is_fresh(self, now: Fraction) -> bool:
        return self.used(now) == 0


class Model(Protocol):
    """What the property tests need of a model: the verbs of an algorithm state, in Fractions."""

    def earliest(self, n: Fraction, now: Fraction) -> Fraction: ...

    def take(self, n: Fraction, now: Fraction) -> Any: ...

    def charge(self, receipt: Any, n: Fraction, now: Fraction) -> Any: ...

    def refund(self, receipt: Any, n: Fraction, now: Fraction) -> Fraction: ...

    def is_fresh(self, now: Fraction) -> bool: ...
