"""Limits that change at run time (semantics §4): ``LimitSet.change_limit`` on every backend.

Each test changes a limit of a live set and checks what the rules promise: what is in use stays
in use, a limit that grows admits its waiters at once, one that shrinks admits nothing either
limit would refuse, a waiter asking more than the new capacity leaves with ``ValueError``, the
queue-aware timeouts see the new numbers, and ``limits`` and the statistics show them.
"""

from __future__ import annotations

import math

import anyio
import pytest

from aiolimits import CallLimit, RateLimit, RateLimitAlgorithm, ResourceLimit
from aiolimits.testing import ManualClock

from ._support import FIXED, SLIDING, TB, MakeLimitSet, crowd, eventually, settle, stats_of


class ChangeLimitContract:
    """``change_limit`` on a live set, on a :class:`ManualClock`."""

    pytestmark = pytest.mark.anyio

    def test_shrinking_keeps_what_is_in_use_and_shows_the_new_numbers(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset(
            [RateLimit("tokens", 10, 100), ResourceLimit("conn", 3)], clock=clock
        )
        held = limits.try_acquire({"tokens": 60, "conn": 2})
        assert held.successful
        limits.change_limit("tokens", capacity=50)
        limits.change_limit("conn", capacity=1)
        assert limits.limits == (RateLimit("tokens", 10, 50), ResourceLimit("conn", 1))
        tokens, conn = stats_of(limits, "tokens"), stats_of(limits, "conn")
        assert (tokens["capacity"], tokens["available"]) == (50, -10)  # 60 in use of 50
        assert (conn["capacity"], conn["in_use"]) == (1, 2)
        assert not limits.try_acquire({"tokens": 1, "conn": 0}).successful
        clock.advance(2)  # 5 tokens/s now: the debt of 10 is paid at t=2
        assert not limits.try_acquire({"tokens": 1, "conn": 0}).successful
        clock.advance(0.25)
        assert limits.try_acquire({"tokens": 1, "conn": 0}).successful
        held.release()
        assert stats_of(limits, "conn")["in_use"] == 0

    async def test_growing_admits_a_waiter_at_once(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            waiter = await c.arrive("w", {"tokens": 8})
            assert waiter.state == "waiting"
            limits.change_limit("tokens", capacity=20)  # 10 more tokens, now
            await settle()
            await eventually(lambda: waiter.state != "waiting")
            assert c.grants == [("w", 0.0)]
        assert stats_of(limits, "tokens")["available"] == 2

    async def test_a_shorter_window_brings_the_head_forward(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)  # 1 token/s
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            waiter = await c.arrive("w", {"tokens": 4})
            limits.change_limit("tokens", window_seconds=5)  # 2 tokens/s: due at t=2, not 4
            await settle()
            clock.advance(1.5)
            await settle()
            assert waiter.state == "waiting"
            clock.advance(0.5)
            await settle()
            await eventually(lambda: waiter.state != "waiting")
            assert c.grants == [("w", 2.0)]

    async def test_a_waiter_above_the_new_capacity_leaves_with_value_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        failed: list[BaseException] = []

        async def ask() -> None:
            try:
                async with limits.acquire({"tokens": 8}):
                    pass
            except ValueError as exc:
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await settle()
            limits.change_limit("tokens", capacity=5)
            await settle()
            await eventually(lambda: bool(failed))
        assert "capacity 5" in str(failed[0])
        assert limits.get_stats()["waiting"] == 0
        with pytest.raises(ValueError, match="capacity 5"):
            limits.try_acquire({"tokens": 8})

    def test_bad_changes_change_nothing(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock()
        declared = (RateLimit("tokens", 10, 100), CallLimit(1, 5), ResourceLimit("conn", 2))
        limits = make_limitset(declared, clock=clock)
        bad: list[tuple[object, dict[str, object], type[Exception], str]] = [
            ("nope", {"capacity": 1}, ValueError, "'nope'"),
            (7, {"capacity": 1}, TypeError, "key"),
            ("tokens", {"capacity": 0}, ValueError, "capacity"),
            ("tokens", {"capacity": math.nan}, ValueError, "capacity"),
            ("tokens", {"capacity": 1e13}, ValueError, "capacity"),
            ("tokens", {"capacity": "5"}, TypeError, "capacity"),
            ("tokens", {"capacity": 5, "window_seconds": -1}, ValueError, "window_seconds"),
            ("tokens", {"window_seconds": math.inf}, ValueError, "window_seconds"),
            ("conn", {"window_seconds": 1}, ValueError, "window_seconds"),
            ("conn", {"capacity": 1.5}, (ValueError, TypeError), "capacity"),  # type: ignore[list-item]
            ("call_count", {"capacity": True}, TypeError, "capacity"),
        ]
        for key, changes, error, word in bad:
            with pytest.raises(error, match=word):
                limits.change_limit(key, **changes)  # type: ignore[arg-type]
        assert limits.limits == declared
        assert stats_of(limits, "tokens")["capacity"] == 100
        limits.change_limit("tokens")  # nothing to change
        assert limits.limits == declared

    @pytest.mark.parametrize("algorithm", [TB, SLIDING, FIXED], ids=lambda a: a.value)
    def test_shrinking_admits_no_more_than_the_new_limit(
        self, make_limitset: MakeLimitSet, algorithm: RateLimitAlgorithm
    ) -> None:
        clock = ManualClock(100.0)  # on a window boundary for FixedWindow
        limits = make_limitset([RateLimit("n", 10, 10, algorithm)], clock=clock)
        assert limits.try_acquire({"n": 4}).successful
        limits.change_limit("n", capacity=6)
        assert limits.try_acquire({"n": 2}).successful  # 6 in use of 6
        assert not limits.try_acquire({"n": 1}).successful
        assert limits.retry_after({"n": 1}) > 0
        assert stats_of(limits, "n")["available"] == 0

    async def test_the_queue_forecast_follows_a_change(
        self, make_limitset: MakeLimitSet, request: pytest.FixtureRequest
    ) -> None:
        missing = getattr(self, "queue_forecast_missing", None)
        if missing is not None:
            request.applymarker(pytest.mark.xfail(reason=missing, strict=True))
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)  # 1 token/s
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            await c.arrive("a", {"tokens": 10})  # due at 10
            await c.arrive("b", {"tokens": 5}, timeout=100)  # due at 15: builds the forecast
            limits.change_limit("tokens", window_seconds=20)  # 0.5 token/s: a at 20, b at 30
            late = await c.arrive("c", {"tokens": 10}, timeout=45)  # at 50: out of reach
            assert late.state == "timed out"
            assert clock() == 0.0
            limits.change_limit("tokens", window_seconds=5)  # 2 tokens/s: a at 5, b at 7.5
            ok = await c.arrive("d", {"tokens": 10}, timeout=15)  # at 12.5: within reach
            assert ok.state == "waiting"
            for step, granted in ((5, 1), (2.5, 2), (5, 3)):
                clock.advance(step)
                await settle()
                await eventually(lambda n=granted: len(c.grants) >= n)  # type: ignore[misc]
            assert c.grants == [("a", 5.0), ("b", 7.5), ("d", 12.5)]
