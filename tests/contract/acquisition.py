"""§5 the Acquisition object, §4/§9 retry_after and pause, and statistics."""

from __future__ import annotations

import math
from typing import Any

import pytest

from aiolimits import (
    CallLimit,
    RateLimit,
    RateLimitStatistics,
    ResourceLimit,
    ResourceLimitStatistics,
)
from aiolimits.testing import ManualClock

from ._support import GCRA, MakeLimitSet, stats_of


class AcquisitionContract:
    """§5: update/release misuse, the context-manager protocols, config and waited."""

    def test_update_after_release_raises_runtime_error(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=ManualClock())
        with limits.try_acquire({"tokens": 6}) as acq:
            pass
        with pytest.raises(RuntimeError):
            acq.update({"tokens": 1})
        assert stats_of(limits, "tokens")["available"] == 4  # no refund happened

    def test_update_on_a_pending_acquisition_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=ManualClock())
        pending = limits.acquire({"tokens": 6})  # not entered: holds nothing yet
        with pytest.raises(RuntimeError):
            pending.update({"tokens": 1})
        assert stats_of(limits, "tokens")["available"] == 10

    def test_update_on_a_failed_acquisition_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=ManualClock())
        assert limits.try_acquire({"tokens": 10}).successful
        failed = limits.try_acquire({"tokens": 5})
        assert not failed.successful
        with pytest.raises(RuntimeError):
            failed.update({"tokens": 0})
        assert stats_of(limits, "tokens")["available"] == 0

    def test_release_is_idempotent(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([ResourceLimit("conn", 2)], clock=ManualClock())
        a, b = limits.try_acquire(), limits.try_acquire()
        a.release()
        a.release()
        assert stats_of(limits, "conn")["in_use"] == 1  # b still holds its slot
        assert limits.try_acquire().successful
        assert not limits.try_acquire().successful
        b.release()

    def test_entering_a_released_acquisition_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        with limits.try_acquire() as acq:
            assert acq.successful
        with pytest.raises(RuntimeError), acq:
            pytest.fail("entered a released acquisition")
        assert stats_of(limits, "conn")["in_use"] == 0
        assert limits.get_stats()["granted"] == 1

    def test_failed_try_acquire_as_context_manager_releases_nothing(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        holder = limits.try_acquire()
        with limits.try_acquire() as failed:
            assert not failed.successful
        failed.release()
        assert stats_of(limits, "conn")["in_use"] == 1
        assert not limits.try_acquire().successful
        holder.release()
        assert limits.try_acquire().successful

    def test_sync_with_on_a_pending_async_acquisition_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        pending = limits.acquire()
        with pytest.raises(RuntimeError), pending:
            pytest.fail("entered a pending async acquisition with `with`")
        assert stats_of(limits, "conn")["in_use"] == 0
        assert limits.get_stats()["granted"] == 0

    def test_acquisition_exposes_the_limitset_config_read_only(
        self, make_limitset: MakeLimitSet
    ) -> None:
        config = {"account": "team-a", "region": "eu"}
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock(), config=config)
        config["region"] = "us"  # the set keeps what it was given
        held = limits.try_acquire()
        failed = limits.try_acquire()
        assert dict(held.config) == {"account": "team-a", "region": "eu"}
        assert dict(failed.config) == dict(held.config)
        writable: Any = held.config
        with pytest.raises(TypeError):
            writable["region"] = "ap"
        assert held.config["region"] == "eu"

    def test_immediate_acquisition_waited_zero(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock(5.0)
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 1}).waited == 0.0
        with limits.acquire_sync({"tokens": 1}) as acq:
            assert acq.waited == 0.0
            assert dict(acq.requested) == {"tokens": 1}


# -- §4/§9 questions: retry_after, pause -----------------------------------------------------


class PauseAndRetryAfterContract:
    """retry_after answers 0.0, exact seconds or inf; pause holds everybody back until its end."""

    def test_retry_after_is_zero_when_admissible_now(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [CallLimit(10, 5), RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)],
            clock=ManualClock(),
        )
        assert limits.retry_after({"tokens": 10}) == 0.0
        assert limits.retry_after({"tokens": 10}) == 0.0  # asking takes nothing
        assert limits.try_acquire({"tokens": 10}).successful

    def test_retry_after_takes_the_slowest_limit(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [CallLimit(10, 1), RateLimit("tokens", 100, 10)], clock=ManualClock()
        )
        assert limits.try_acquire({"tokens": 10}).successful
        assert limits.retry_after({"tokens": 1}) == 10.0  # both: tokens refill 1 per 10 s
        assert limits.retry_after({"tokens": 2}) == 20.0
        assert limits.retry_after({"tokens": 0}) == 10.0  # the call alone
        assert limits.retry_after({"tokens": 0, "call_count": 0}) == 0.0

    def test_retry_after_is_inf_while_a_resource_is_full(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)], clock=ManualClock()
        )
        holder = limits.try_acquire({"tokens": 10})
        assert limits.retry_after({"tokens": 1}) == math.inf
        assert limits.retry_after({"tokens": 1, "conn": 0}) == 1.0
        holder.release()
        assert limits.retry_after({"tokens": 1}) == 1.0

    def test_retry_after_includes_a_pause(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        limits.pause(7)
        assert limits.retry_after({"tokens": 1}) == 7.0
        clock.set(2)
        assert limits.retry_after({"tokens": 1}) == 5.0
        assert limits.get_stats()["paused_for"] == 5.0
        clock.set(7)
        assert limits.try_acquire({"tokens": 10}).successful
        limits.pause(3)  # the bucket needs 5 s for 5 tokens, longer than the pause
        assert limits.retry_after({"tokens": 5}) == 5.0
        assert limits.retry_after({"tokens": 2}) == 3.0

    def test_pause_admits_nobody_before_its_end(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10), ResourceLimit("conn", 5)], clock=clock)
        limits.pause(5)
        assert not limits.try_acquire({"tokens": 1}).successful
        assert not limits.try_acquire({"conn": 1}).successful
        clock.set(4.75)
        assert not limits.try_acquire({"tokens": 1}).successful
        clock.set(5)
        assert limits.try_acquire({"tokens": 1}).successful
        assert limits.get_stats()["paused_for"] == 0.0

    def test_overlapping_pauses_keep_the_later_end(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        limits.pause(10)
        limits.pause(3)  # ends earlier: ignored
        assert limits.retry_after({"tokens": 1}) == 10.0
        clock.set(4)
        limits.pause(8)  # ends at 12: later, so it wins
        assert limits.retry_after({"tokens": 1}) == 8.0
        clock.set(11.75)
        assert not limits.try_acquire({"tokens": 1}).successful
        clock.set(12)
        assert limits.try_acquire({"tokens": 1}).successful


# -- statistics --------------------------------------------------------------------------------


class StatsContract:
    """get_stats() and statistics(): per key and totals, without waiters (the async part is in
    WaitingContract)."""

    def test_get_stats_describes_each_limit(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [CallLimit(60, 500), RateLimit("tokens", 60, 90_000, GCRA), ResourceLimit("conn", 4)],
            clock=ManualClock(),
        )
        acq = limits.try_acquire({"tokens": 1000, "conn": 2})
        stats = limits.get_stats()
        calls, tokens, conn = (stats["limits"][k] for k in ("call_count", "tokens", "conn"))
        assert (calls["kind"], calls["algorithm"], calls["capacity"]) == (
            "call",
            "token_bucket",
            500,
        )
        assert (calls["window_seconds"], calls["available"], calls["waiting"]) == (60, 499, 0)
        assert (tokens["kind"], tokens["algorithm"], tokens["capacity"]) == ("rate", "gcra", 90_000)
        assert (tokens["available"], tokens["refunded"]) == (89_000, 0)
        assert (conn["kind"], conn["capacity"], conn["in_use"], conn["available"]) == (
            "resource",
            4,
            2,
            2,
        )
        assert (stats["granted"], stats["waiting"], stats["timed_out"], stats["cancelled"]) == (
            1,
            0,
            0,
            0,
        )
        acq.update({"tokens": 400})
        acq.release()
        stats = limits.get_stats()
        assert stats["limits"]["tokens"]["refunded"] == 600
        assert stats["refunded"] == 600
        assert stats["limits"]["tokens"]["available"] == 89_600
        assert stats["limits"]["conn"]["in_use"] == 0

    def test_statistics_is_get_stats_typed_with_ints_for_counts(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset(
            [CallLimit(60, 500), RateLimit("tokens", 3, 1), ResourceLimit("conn", 4)], clock=clock
        )
        acq = limits.try_acquire({"tokens": 1, "conn": 3})
        assert acq.successful
        acq.update({"tokens": 0.3})
        limits.pause(0.1 + 0.2)
        clock.advance(0.1)
        stats = limits.statistics()
        assert stats.as_dict() == limits.get_stats()
        tokens, conn = stats.limits["tokens"], stats.limits["conn"]
        assert isinstance(tokens, RateLimitStatistics)
        assert isinstance(conn, ResourceLimitStatistics)
        # 0.7 back, then 0.1 s at a third of a unit per second: rounded down to a millionth.
        assert (tokens.refunded, tokens.available) == (0.7, 0.733333)
        assert (conn.in_use, conn.available) == (3, 1)
        assert stats.paused_for == 0.200001  # rounded up: never shorter than it is
        for count in (stats.waiting, stats.granted, stats.timed_out, stats.cancelled):
            assert type(count) is int
        assert (type(conn.in_use), type(conn.available), type(conn.waiting)) == (int, int, int)
        acq.release()
        conn_after = limits.statistics().limits["conn"]
        assert isinstance(conn_after, ResourceLimitStatistics)
        assert (conn_after.in_use, type(conn_after.in_use)) == (0, int)

    def test_get_stats_shows_debt_as_negative_available(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=ManualClock())
        limits.try_acquire({"tokens": 10}).update({"tokens": 13})
        assert stats_of(limits, "tokens")["available"] == -3
