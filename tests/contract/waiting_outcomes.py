"""Waiting, continued: cancelled waiters, stats with waiters, async misuse and bad input."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from aiolimits import CallLimit, RateLimit, ResourceLimit
from aiolimits.testing import ManualClock

from ._support import MakeLimitSet, crowd, settle, stats_of
from .validation import BAD_REQUESTS, BAD_TIMEOUTS, validation_limits


class WaitingOutcomesContract:
    """Cancelled waiters, stats with waiters, async acquisitions misused or given bad input."""

    pytestmark = pytest.mark.anyio

    async def test_cancelled_head_leaves_and_the_next_waiter_gets_its_own_time(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            big = await c.arrive("big", {"tokens": 8})  # due at 8
            small = await c.arrive("small", {"tokens": 2})  # behind it
            big.scope.cancel()
            await settle()
            assert big.state == "cancelled"
            clock.advance(2)
            await settle()
            assert small.state == "done"
            assert small.granted_at == 2
        stats = limits.get_stats()
        assert (stats["cancelled"], stats["granted"], stats["waiting"]) == (1, 2, 0)

    async def test_cancelled_waiter_in_the_middle_keeps_the_others_in_order(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        holder = limits.try_acquire()
        async with crowd(limits) as c:
            a = await c.arrive("a", hold=True)
            b = await c.arrive("b", hold=True)
            await c.arrive("c", hold=True)
            b.scope.cancel()
            await settle()
            assert b.state == "cancelled"
            assert limits.get_stats()["waiting"] == 2
            holder.release()
            await settle()
            a.leave.set()
            await settle()
            assert [name for name, _ in c.grants] == ["a", "c"]
            assert stats_of(limits, "conn")["in_use"] == 1

    async def test_waiter_cancelled_as_it_is_granted_passes_the_slot_on(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        holder = limits.try_acquire()
        async with crowd(limits) as c:
            first = await c.arrive("first", hold=True)
            second = await c.arrive("second", hold=True)
            holder.release()  # grants "first" ...
            first.scope.cancel()  # ... which is cancelled before it runs
            await settle()
            assert first.state == "cancelled"
            assert second.state == "held"
            assert stats_of(limits, "conn")["in_use"] == 1
            second.leave.set()
            await settle()
        assert stats_of(limits, "conn")["in_use"] == 0
        assert limits.try_acquire().successful

    async def test_get_stats_counts_waiters_and_outcomes(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock()
        limits = make_limitset(
            [CallLimit(10, 100), RateLimit("tokens", 10, 10), ResourceLimit("conn", 2)],
            clock=clock,
        )
        holder = limits.try_acquire({"tokens": 10})
        async with crowd(limits, clock) as c:

            def waiting() -> tuple[int, int, int, int]:
                s = limits.get_stats()
                per = s["limits"]
                return (
                    s["waiting"],
                    per["call_count"]["waiting"],
                    per["tokens"]["waiting"],
                    per["conn"]["waiting"],
                )

            def totals() -> tuple[int, int, int, float]:
                s = limits.get_stats()
                return (s["granted"], s["timed_out"], s["cancelled"], s["refunded"])

            a = await c.arrive("a", {"tokens": 5}, hold=True)
            b = await c.arrive("b", {"conn": 0}, hold=True)  # needs only a call
            d = await c.arrive("d", {"tokens": 1})
            assert waiting() == (3, 3, 2, 2)
            assert totals() == (1, 0, 0, 0)
            assert stats_of(limits, "conn")["in_use"] == 1
            # Behind a (due at 5): timed out at once, or at its deadline where the backend
            # does not count the queue ahead (see QueueTimeoutContract).
            await c.arrive("c", {"tokens": 1}, timeout=2)
            clock.advance(2)  # c's deadline
            await settle()
            assert waiting() == (3, 3, 2, 2)
            assert totals() == (1, 1, 0, 0)
            d.scope.cancel()
            await settle()
            assert waiting() == (2, 2, 1, 1)
            assert totals() == (1, 1, 1, 0)
            holder.update({"tokens": 4})  # 2 refilled + 6 refunded = 8: a and b go
            await settle()
            assert (a.state, b.state) == ("held", "held")
            assert waiting() == (0, 0, 0, 0)
            assert totals() == (3, 1, 1, 6)
            assert stats_of(limits, "tokens")["available"] == 3
            assert stats_of(limits, "tokens")["refunded"] == 6
            assert stats_of(limits, "conn")["in_use"] == 2  # holder and a
            a.leave.set()
            b.leave.set()
            await settle()
            assert stats_of(limits, "conn")["in_use"] == 1
        holder.release()
        assert stats_of(limits, "conn")["in_use"] == 0

    async def test_entering_a_released_async_acquisition_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        acq = limits.acquire()
        async with acq:
            pass
        with pytest.raises(RuntimeError):
            async with acq:
                pytest.fail("entered a released acquisition")
        assert stats_of(limits, "conn")["in_use"] == 0
        assert limits.get_stats()["granted"] == 1

    async def test_failed_try_acquire_as_async_context_manager_releases_nothing(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        holder = limits.try_acquire()
        async with limits.try_acquire() as failed:
            assert not failed.successful
        assert stats_of(limits, "conn")["in_use"] == 1
        holder.release()
        assert stats_of(limits, "conn")["in_use"] == 0

    @pytest.mark.parametrize(("requested", "error", "match"), BAD_REQUESTS)
    async def test_acquire_rejects_bad_request_at_once_and_takes_nothing(
        self, make_limitset: MakeLimitSet, requested: Any, error: type[Exception], match: str
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        before = limits.get_stats()
        with anyio.fail_after(5), pytest.raises(error, match=match) as info:
            async with limits.acquire(requested):
                pytest.fail("admitted a bad request")
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before

    @pytest.mark.parametrize(("bad_timeout", "error"), BAD_TIMEOUTS)
    async def test_acquire_rejects_bad_timeout_and_takes_nothing(
        self, make_limitset: MakeLimitSet, bad_timeout: Any, error: type[Exception]
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        before = limits.get_stats()
        with pytest.raises(error, match="timeout") as info:
            async with limits.acquire({"tokens": 1}, timeout=bad_timeout):
                pytest.fail("admitted with a bad timeout")
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before
