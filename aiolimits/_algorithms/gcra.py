"""GCRA, the generic cell rate algorithm: a token bucket kept as a theoretical arrival time.

Each unit is due ``T = W / C`` seconds after the previous one; the *theoretical arrival time*
(TAT) is when the bucket would be full again, and an amount n is admitted at t when
``TAT - W + n·T <= t``. It admits exactly the sequences TokenBucket admits (burst C, rate C/W).

The TAT is kept exactly, as the pair TokenBucket keeps: ``TAT = s + (C - L)·W/C`` for the level
``L`` at the stamp ``s``. A single float TAT cannot be exact: ``T`` itself is rarely a float
(``1/3`` s for capacity 3 in a 1 s window), so the TAT after a take is rounded, and at one instant
a full bucket admitted a burst of 2 instead of 3 (rounded up), or let units through early
(rounded down). With the pair, the decision ``TAT - W + n·T <= t`` is TokenBucket's exact
``(t - s)·C >= (n - L)·W``, and the two algorithms are one piece of maths (this class adds only the
TAT view); the Redis backend stores the same pair.

Refunds move the TAT back by the units returned, as far as the bucket still remembers them (never
before ``now``, which would be above a full bucket, and never what the cap has absorbed since the
take, see :class:`~._base.PeakLog`): the same units TokenBucket gives back. Charges move it
forward, as a debt.
"""

from __future__ import annotations

from .token_bucket import TokenBucketState


class GCRAState(TokenBucketState):
    __slots__ = ()

    @property
    def tat(self) -> float:
        """The theoretical arrival time, rounded to a float (the state keeps it exactly)."""
        owed = self.capacity - self._level
        return self._stamp + owed * self.window / self.capacity if owed > 0 else self._stamp

    def __repr__(self) -> str:
        return f"<GCRAState {self.key!r} tat={self.tat:g} T={self.window / self.capacity:g}>"
