"""The LimitSet contract (``tests/contract/``) run against RayBackend on a local Ray cluster.

Every LimitSet gets its own ``name`` in one limits actor. Under a
:class:`~aiolimits.testing.ManualClock` the set in the actor runs on a manual clock moved to the
caller's reading on every call (the backend's hook: the same code, injected time).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from ._ray_cluster import ray_cluster
from .contract import LimitSetContract, MakeLimitSet, limitset_factory

__all__ = ["ray_cluster"]  # the session fixture


@pytest.fixture
def make_limitset(ray_cluster: Any) -> MakeLimitSet:
    from aiolimits.ray import RayBackend

    return limitset_factory(RayBackend("aiolimits-contract"), lambda: uuid.uuid4().hex)


_NO_TIMER_SLACK = (
    "timer_slack is not forwarded to the limits actor yet: its set wakes each head at its exact "
    "time, which the slack tests tell apart (never early either way)"
)


class TestRayBackend(LimitSetContract):
    """Every contract test, on RayBackend."""

    @pytest.fixture(autouse=True)
    def _timer_slack_not_forwarded(self, request: pytest.FixtureRequest) -> None:
        name = request.node.name
        if name.startswith(
            (
                "test_timer_slack_keeps_a_large_request_in_its_turn",
                "test_timer_slack_never_delays_a_grant_a_release_or_an_arrival_makes",
                "test_timer_slack_never_carries_a_wake_up_past_the_waiters_deadline",
            )
        ) or (name.startswith("test_timer_slack_grants_nearby") and name.endswith("-0.25]")):
            request.applymarker(pytest.mark.xfail(reason=_NO_TIMER_SLACK, strict=True))

    async def test_threads_and_tasks_share_one_fifo_queue(
        self, make_limitset: MakeLimitSet
    ) -> None:
        # The contract's version, with the one difference of a remote backend on the real
        # clock: a release is handed to Ray and returns (semantics §7), so the grant it makes
        # reaches the next waiter a round trip later, not by the time the tasks settle.
        import threading

        import anyio

        from aiolimits import ResourceLimit

        from .contract import crowd, worker_threads
        from .contract._support import eventually

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
            await eventually(lambda: first.state == "held")
            await anyio.sleep(0.05)
            with lock:
                order.append("task-1")
            first.leave.set()  # the thread is next, then task-2
            await eventually(lambda: last.state == "held")
            with lock:
                order.append("task-2")
            last.leave.set()
        assert order == ["task-1", "thread", "task-2"]
