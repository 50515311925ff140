"""acquire_sync from threads, and the few tests that wait on the real clock."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import anyio
import anyio.to_thread
import pytest

from aiolimits import RateLimit, ResourceLimit
from aiolimits.testing import ManualClock

from ._support import MakeLimitSet, crowd, eventually, settle, stats_of, worker_threads


class ThreadContract:
    """acquire_sync: threads join the same FIFO queue; never on an event loop thread."""

    pytestmark = pytest.mark.anyio

    #: Whether a release made on the event loop is handed to the backend's I/O path (a shared
    #: backend: Redis, Ray) instead of granting the next waiter before the releaser next blocks.
    release_hands_off: ClassVar[bool] = False

    async def test_acquire_sync_from_a_worker_thread(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)], clock=ManualClock()
        )

        def work() -> tuple[bool, dict[str, float], float, int]:
            with limits.acquire_sync({"tokens": 3}) as acq:
                in_use = stats_of(limits, "conn")["in_use"]
                return acq.successful, dict(acq.requested), acq.waited, in_use

        assert await anyio.to_thread.run_sync(work) == (True, {"tokens": 3, "conn": 1}, 0.0, 1)
        assert stats_of(limits, "conn")["in_use"] == 0
        assert stats_of(limits, "tokens")["available"] == 7

    async def test_acquire_sync_on_the_event_loop_thread_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        with pytest.raises(RuntimeError):
            limits.acquire_sync()
        assert limits.get_stats()["granted"] == 0
        assert limits.try_acquire().successful

    async def test_thread_waiter_is_granted_by_a_release_and_waited_is_the_clock_advance(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([ResourceLimit("conn", 1)], clock=clock)
        holder = limits.try_acquire()

        def work() -> float:
            with limits.acquire_sync(timeout=5) as acq:
                return acq.waited

        async with worker_threads(clock) as threads:
            threads.start(work)
            await eventually(lambda: limits.get_stats()["waiting"] == 1)
            clock.advance(2.5)
            holder.release()
            await eventually(lambda: bool(threads.results))
        assert threads.results == [2.5]
        assert stats_of(limits, "conn")["in_use"] == 0

    async def test_thread_waiter_times_out_on_the_manual_clock(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)], clock=clock)
        assert limits.try_acquire({"tokens": 1}).successful

        def work() -> str:
            try:
                with limits.acquire_sync({"tokens": 5}, timeout=2):
                    return "granted"
            except TimeoutError as exc:
                return type(exc).__name__

        async with worker_threads(clock) as threads:
            threads.start(work)
            await eventually(lambda: limits.get_stats()["waiting"] == 1)
            clock.advance(1.75)
            await anyio.sleep(0.01)
            assert threads.results == []
            clock.advance(0.25)
            await eventually(lambda: bool(threads.results))
        assert threads.results == ["TimeoutError"]
        stats = limits.get_stats()
        assert (stats["timed_out"], stats["waiting"]) == (1, 0)
        assert stats["limits"]["tokens"]["available"] == 10  # 9 + 2 refilled, capped; none taken

    async def test_threads_and_tasks_share_one_fifo_queue(
        self, make_limitset: MakeLimitSet
    ) -> None:
        # The real clock: a resource wait does not depend on time, and the thread's (long)
        # timeout keeps it from blocking forever if this test fails.
        limits = make_limitset([ResourceLimit("conn", 1)])
        holder = limits.try_acquire()
        order: list[str] = []
        lock = threading.Lock()

        def work() -> None:
            with limits.acquire_sync(timeout=20), lock:
                order.append("thread")

        async with crowd(limits) as c, worker_threads() as threads:
            first = await c.arrive("task-1", hold=True)
            threads.start(work)
            await eventually(lambda: limits.get_stats()["waiting"] == 2)
            last = await c.arrive("task-2", hold=True)
            await eventually(lambda: limits.get_stats()["waiting"] == 3)
            holder.release()
            if self.release_hands_off:
                # A shared backend hands a release made on the loop to its I/O path and returns
                # (semantics §7): the grant reaches the next waiter a round trip later.
                await eventually(lambda: first.state == "held")
            else:
                await settle()
                assert first.state == "held"  # granted before the releasing task next blocks
            with lock:
                order.append("task-1")
            first.leave.set()  # the thread is next, then task-2
            await eventually(lambda: last.state == "held")
            with lock:
                order.append("task-2")
            last.leave.set()
        assert order == ["task-1", "thread", "task-2"]


class RealClockContract:
    """The thin waiting layer on the real clock: short waits, only lower bounds asserted."""

    pytestmark = pytest.mark.anyio

    async def test_rate_wait_on_the_real_clock_is_granted_no_earlier_than_due(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([RateLimit("tokens", 0.05, 1)])  # one every 50 ms
        start = time.monotonic()
        with anyio.fail_after(10):
            async with limits.acquire({"tokens": 1}):
                pass
            async with limits.acquire({"tokens": 1}) as acq:
                assert acq.waited > 0
        assert time.monotonic() - start >= 0.05
        assert limits.get_stats()["granted"] == 2

    async def test_timeout_on_the_real_clock_raises_builtin_timeout_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)])
        holder = limits.try_acquire()
        start = time.monotonic()
        with anyio.fail_after(10), pytest.raises(TimeoutError) as info:
            async with limits.acquire(timeout=0.05):
                pytest.fail("admitted while the resource is full")
        assert info.type is TimeoutError
        assert time.monotonic() - start >= 0.05
        assert (limits.get_stats()["timed_out"], limits.get_stats()["waiting"]) == (1, 0)
        holder.release()
        assert limits.try_acquire().successful

    async def test_cancel_scope_cancels_a_waiter_holding_nothing(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)])
        holder = limits.try_acquire({"tokens": 1})
        with anyio.move_on_after(0.05) as scope:
            async with limits.acquire({"tokens": 5}):
                pytest.fail("admitted while the resource is full")
        assert scope.cancelled_caught
        stats = limits.get_stats()
        assert (stats["cancelled"], stats["waiting"], stats["granted"]) == (1, 0, 1)
        assert stats["limits"]["conn"]["in_use"] == 1
        holder.release()
        assert limits.try_acquire({"tokens": 9}).successful
