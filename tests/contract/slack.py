"""Timer slack (§4 ``timer_slack``): wake-ups late by at most the slack, shared, never early.

Limits of 8 units per second: waiter ``i`` (from 0, one unit each, the burst used up at t = 0)
is admissible at ``(i + 1) / 8`` exactly, and a slack of 0.25 s puts the wake-ups on multiples of
0.25, which floats hold exactly. The clock counts the timers armed on it (each one a wake-up).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pytest

from aiolimits import RateLimit, RateLimitAlgorithm
from aiolimits.testing import ManualClock

from ._support import GCRA, TB, MakeLimitSet, crowd, settle


class CountingClock:
    """A ManualClock that records when every timer armed on it is due (one per wake-up)."""

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.armed: list[float] = []

    def __call__(self) -> float:
        return self.clock()

    def call_at(self, when: float, callback: Callable[[], object]) -> object:
        self.armed.append(when)
        return self.clock.call_at(when, callback)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def pending_timers(self) -> int:
        return self.clock.pending_timers()


class TimerSlackContract:
    """Waiters due close together are granted by one wake-up; none early; FIFO kept."""

    pytestmark = pytest.mark.anyio

    #: Whether a head woken at its time hands its decision to the backend's I/O path (a shared
    #: backend) and, until the answer comes, sleeps with a wake-up at its deadline armed, so
    #: that the deadline holds whatever the backend does; the backend may also tell a head its
    #: time again, and it arms the same wake-up again.
    decides_off_the_task: ClassVar[bool] = False

    @pytest.mark.parametrize(
        ("slack", "wake_ups"),
        [
            # The default: every waiter woken at its own exact time.
            pytest.param(0.0, [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0], id="none"),
            # Two waiters per wake-up, on multiples of the slack.
            pytest.param(0.25, [0.25, 0.5, 0.75, 1.0], id="0.25"),
        ],
    )
    # The algorithms that refill continuously, so that each waiter has its own time (a used-up
    # window admits everyone at once when it ends).
    @pytest.mark.parametrize("algorithm", [TB, GCRA])
    async def test_timer_slack_grants_nearby_waiters_in_one_wake_up_never_early(
        self,
        make_limitset: MakeLimitSet,
        algorithm: RateLimitAlgorithm,
        slack: float,
        wake_ups: list[float],
    ) -> None:
        clock = CountingClock()
        limits = make_limitset(
            [RateLimit("tokens", 1, 8, algorithm=algorithm)], clock=clock, timer_slack=slack
        )
        assert limits.timer_slack == slack
        assert limits.try_acquire({"tokens": 8}).successful
        async with crowd(limits, clock) as c:
            for i in range(8):
                await c.arrive(f"w{i}", {"tokens": 1})
            for _ in range(16):
                clock.advance(1 / 16)
                await settle()
            # FIFO, and each grant no later than the first wake-up at or after its own time
            # (a backend whose own work takes the lock after a head's exact time, as a shared
            # backend's notifications do, may grant it then, which is allowed).
            assert [name for name, _ in c.grants] == [f"w{i}" for i in range(8)]
            for i, (_name, at) in enumerate(c.grants):
                due = (i + 1) / 8
                assert due <= at <= min(w for w in wake_ups if w >= due)  # never early
            assert set(clock.armed) <= set(wake_ups)  # wake-ups only on multiples of the slack
            assert clock.pending_timers() == 0

    async def test_timer_slack_keeps_a_large_request_in_its_turn(
        self, make_limitset: MakeLimitSet
    ) -> None:
        # The one wake-up at 0.5 could admit the small waiter behind (due at 0.5) while the
        # large one ahead (due at 0.625) waits: it does not, the order holds.
        clock = CountingClock()
        limits = make_limitset([RateLimit("tokens", 1, 8)], clock=clock, timer_slack=0.25)
        assert limits.try_acquire({"tokens": 8}).successful
        async with crowd(limits, clock) as c:
            await c.arrive("a", {"tokens": 1})  # due 0.125
            await c.arrive("big", {"tokens": 4})  # due 0.625
            await c.arrive("b", {"tokens": 1})  # due 0.75
            for _ in range(16):
                clock.advance(1 / 16)
                await settle()
            assert c.grants == [("a", 0.25), ("big", 0.75), ("b", 0.75)]

    async def test_timer_slack_never_delays_a_grant_a_release_or_an_arrival_makes(
        self, make_limitset: MakeLimitSet
    ) -> None:
        # The slack only delays the head's own timer: anyone taking the lock after the head's
        # exact time (here a new arrival) grants it then.
        clock = CountingClock()
        limits = make_limitset([RateLimit("tokens", 1, 8)], clock=clock, timer_slack=0.25)
        assert limits.try_acquire({"tokens": 8}).successful
        async with crowd(limits, clock) as c:
            await c.arrive("a", {"tokens": 1})  # due 0.125, woken at 0.25 at the latest
            clock.clock.set(0.125)  # the timer (at 0.25) does not fire
            await settle()
            assert c.grants == []
            assert not limits.try_acquire({"tokens": 1}).successful  # behind "a": it catches up
            await settle()
            assert c.grants == [("a", 0.125)]

    async def test_timer_slack_never_carries_a_wake_up_past_the_waiters_deadline(
        self, make_limitset: MakeLimitSet
    ) -> None:
        # Due at 0.125 with a deadline at 0.2: the wake-up at 0.25 would come too late, so it
        # is armed at the exact time instead, and the waiter is granted then.
        clock = CountingClock()
        limits = make_limitset([RateLimit("tokens", 1, 8)], clock=clock, timer_slack=0.25)
        assert limits.try_acquire({"tokens": 8}).successful
        async with crowd(limits, clock) as c:
            a = await c.arrive("a", {"tokens": 1}, timeout=0.2)
            for _ in range(8):
                clock.advance(1 / 16)
                await settle()
            assert a.error is None
            assert c.grants == [("a", 0.125)]
            if self.decides_off_the_task:
                # Re-armed whenever it is told its time again (a wake-up from the backend).
                assert set(clock.armed) == {0.125, 0.2}
            else:
                assert clock.armed == [0.125]
