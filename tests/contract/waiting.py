"""Waiting: FIFO, no barging, refunds, pause, cancellation, stats with waiters.

The tests are in two parts, :class:`WaitingOrderContract` here and
:class:`~tests.contract.waiting_outcomes.WaitingOutcomesContract`; :class:`WaitingContract`
is both.
"""

from __future__ import annotations

import pytest

from aiolimits import CallLimit, RateLimit, ResourceLimit
from aiolimits.testing import ManualClock

from ._support import MakeLimitSet, crowd, settle, stats_of
from .waiting_outcomes import WaitingOutcomesContract


class WaitingOrderContract:
    """Waiters in line: FIFO, no barging, refunds that wake them, pauses; exact grant times."""

    pytestmark = pytest.mark.anyio

    async def test_acquire_admits_at_once_when_every_limit_has_room(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset(
            [CallLimit(10, 5), RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)],
            clock=clock,
        )
        async with limits.acquire({"tokens": 4}) as acq:
            assert acq.successful
            assert acq.waited == 0.0
            assert dict(acq.requested) == {"call_count": 1, "tokens": 4, "conn": 1}
            assert stats_of(limits, "conn")["in_use"] == 1
        assert stats_of(limits, "conn")["in_use"] == 0
        assert stats_of(limits, "tokens")["available"] == 6
        assert limits.get_stats()["granted"] == 1

    async def test_empty_limitset_acquire_admits_at_once(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([], clock=ManualClock())
        async with limits.acquire() as acq:
            assert acq.successful
            assert acq.waited == 0.0

    async def test_fifo_large_request_is_granted_in_turn_behind_a_stream_of_small_ones(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 100, 100)], clock=clock)  # 1 token/s
        assert limits.try_acquire({"tokens": 100}).successful
        async with crowd(limits, clock) as c:
            await c.arrive("s1", {"tokens": 1})
            await c.arrive("s2", {"tokens": 1})
            big = await c.arrive("big", {"tokens": 50})
            # One more small request arrives every second while the big one waits.
            for second in range(1, 58):
                clock.advance(1)
                await settle()
                await c.arrive(f"s{second + 2}", {"tokens": 1})
            assert c.grants == [
                ("s1", 1),
                ("s2", 2),
                ("big", 52),  # 50 tokens after s2's, although 1 token was there each second
                ("s3", 53),  # the small ones behind it did not overtake it
                ("s4", 54),
                ("s5", 55),
                ("s6", 56),
                ("s7", 57),
            ]
            assert big.acquisition is not None
            assert big.acquisition.waited == 52.0
            assert limits.get_stats()["waiting"] == 57 - 5

    async def test_only_the_head_sleeps_on_a_timer(self, make_limitset: MakeLimitSet) -> None:
        # Scheduled, not polled: the head sleeps until its time, the others until they lead.
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            for i in range(20):
                await c.arrive(f"w{i}", {"tokens": 1})
            assert clock.pending_timers() == 1
            clock.advance(1)
            await settle()
            assert c.grants == [("w0", 1)]
            assert clock.pending_timers() == 1  # now w1's

    async def test_fifo_order_with_mixed_sizes_on_a_resource(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([ResourceLimit("conn", 3)], clock=clock)
        holders = [limits.try_acquire() for _ in range(3)]
        async with crowd(limits, clock) as c:
            one = await c.arrive("one", {"conn": 1}, hold=True)
            three = await c.arrive("three", {"conn": 3}, hold=True)
            small = await c.arrive("small", {"conn": 1}, hold=True)
            holders[0].release()
            await settle()
            assert [name for name, _ in c.grants] == ["one"]
            holders[1].release()
            holders[2].release()
            await settle()
            # Two slots are free and "small" would fit, but "three" is ahead of it.
            assert [name for name, _ in c.grants] == ["one"]
            assert stats_of(limits, "conn")["in_use"] == 1
            one.leave.set()
            await settle()
            assert [name for name, _ in c.grants] == ["one", "three"]
            three.leave.set()
            await settle()
            assert [name for name, _ in c.grants] == ["one", "three", "small"]
            small.leave.set()
        assert stats_of(limits, "conn")["in_use"] == 0

    async def test_try_acquire_does_not_barge_past_a_queued_rate_waiter(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            waiter = await c.arrive("waiter", {"tokens": 5})
            clock.advance(1)
            await settle()
            assert stats_of(limits, "tokens")["available"] == 1  # room for 1 ...
            assert not limits.try_acquire({"tokens": 1}).successful  # ... but it waits in line
            assert limits.retry_after({"tokens": 1}) > 0
            clock.advance(4)
            await settle()
            assert waiter.state == "done"
            assert waiter.granted_at == 5
        clock.advance(1)
        assert limits.try_acquire({"tokens": 1}).successful  # nobody queued any more

    async def test_try_acquire_does_not_barge_past_a_queued_resource_waiter(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 2)], clock=ManualClock())
        holder = limits.try_acquire()
        async with crowd(limits) as c:
            both = await c.arrive("both", {"conn": 2}, hold=True)
            assert stats_of(limits, "conn")["in_use"] == 1
            assert not limits.try_acquire().successful  # one slot free, but "both" is first
            assert limits.retry_after() > 0
            holder.release()
            await settle()
            assert both.state == "held"
            assert stats_of(limits, "conn")["in_use"] == 2

    async def test_refund_wakes_a_queued_waiter_it_makes_admissible(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        holder = limits.try_acquire({"tokens": 10})
        async with crowd(limits, clock) as c:
            first = await c.arrive("first", {"tokens": 5})  # due at 5
            holder.update({"tokens": 8})  # 2 back: now due at 3
            await settle()
            assert first.state == "waiting"
            clock.advance(2.75)
            await settle()
            assert first.state == "waiting"
            clock.advance(0.25)
            await settle()
            assert first.state == "done"
            assert first.acquisition is not None
            assert first.acquisition.waited == 3.0
            second = await c.arrive("second", {"tokens": 5})  # due at 8
            holder.update({"tokens": 3})  # 5 more back: admissible now
            await settle()
            assert second.state == "done"
            assert second.granted_at == 3
            assert second.acquisition is not None
            assert second.acquisition.waited == 0.0
        assert limits.get_stats()["refunded"] == 7

    async def test_all_or_nothing_waiter_holds_nothing_while_it_waits(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset(
            [RateLimit("a", 10, 10), RateLimit("b", 10, 10), ResourceLimit("conn", 1)],
            clock=clock,
        )
        assert limits.try_acquire({"b": 10, "conn": 0}).successful
        async with crowd(limits, clock) as c:
            both = await c.arrive("both", {"a": 5, "b": 5}, hold=True)  # b is due at 5
            clock.advance(4.5)
            await settle()
            assert both.state == "waiting"
            assert stats_of(limits, "a")["available"] == 10
            assert stats_of(limits, "conn")["in_use"] == 0
            clock.advance(0.5)
            await settle()
            assert both.state == "held"
            assert stats_of(limits, "a")["available"] == 5
            assert stats_of(limits, "b")["available"] == 0
            assert stats_of(limits, "conn")["in_use"] == 1

    async def test_pause_holds_waiters_until_its_end_in_their_order(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        limits.pause(5)
        async with crowd(limits, clock) as c:
            for name, amount in (("a", 3), ("b", 8), ("c", 2)):
                await c.arrive(name, {"tokens": amount})
            clock.advance(4.75)
            await settle()
            assert c.grants == []
            # Each row: move the clock to t, then these have been granted (with their times).
            for t, granted in [
                (5, {"a": 5}),  # b needs 8 of the 7 tokens left; c (2) would fit, but is behind b
                (5.75, {"a": 5}),
                (6, {"a": 5, "b": 6}),
                (7.75, {"a": 5, "b": 6}),
            ]:
                clock.set(t)
                await settle()
                assert dict(c.grants) == granted
            clock.set(8)
            await settle()
            # Tasks granted at the same instant may run in any order (trio shuffles them), so
            # the order shows in the grant times: b at 6, and c (2 would fit at 5) after b.
            assert dict(c.grants) == {"a": 5, "b": 6, "c": 8}

    async def test_pause_postpones_a_waiter_already_due_earlier(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            waiter = await c.arrive("waiter", {"tokens": 2})  # due at 2
            limits.pause(6)
            clock.advance(2)
            await settle()
            assert waiter.state == "waiting"
            limits.pause(1)  # ends at 3, before the first pause: ignored
            clock.advance(3.75)
            await settle()
            assert waiter.state == "waiting"
            clock.advance(0.25)
            await settle()
            assert waiter.state == "done"
            assert waiter.granted_at == 6

    async def test_pause_extended_while_waiting_wakes_at_the_later_end(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        limits.pause(3)
        async with crowd(limits, clock) as c:
            waiter = await c.arrive("waiter", {"tokens": 1})
            limits.pause(8)
            clock.advance(3)
            await settle()
            assert waiter.state == "waiting"
            clock.advance(5)
            await settle()
            assert waiter.granted_at == 8


# The bases are listed last part first: pytest runs inherited tests in reverse MRO order, so
# this runs WaitingOrderContract's tests first, in the order they had as one class.
class WaitingContract(WaitingOutcomesContract, WaitingOrderContract):
    """Async waiters on a ManualClock: exact grant times and order, on every anyio backend."""
