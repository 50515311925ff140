"""The waiting path's shortcuts: a waiter granted while asleep finishes without the lock, except
on a scheduler that keeps its own books when a waiter wakes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from aiolimits import LimitSet, ResourceLimit
from aiolimits._scheduler import Scheduler
from tests.test_cancellation import queued

pytestmark = pytest.mark.anyio


async def _three_waiters_granted_by_releases(limits: LimitSet) -> list[int]:
    """One task holds the only slot while three queue; each release grants the next."""
    order: list[int] = []
    held = limits.try_acquire()
    assert held.successful

    async def waiter(i: int) -> None:
        async with limits.acquire():
            order.append(i)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(waiter, i)
                await queued(limits, i + 1)
            held.release()
    return order


async def test_a_waiter_granted_while_asleep_finishes_without_after_wake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []
    original = Scheduler.after_wake

    def counting(self: Scheduler, waiter: Any, now: float) -> float | None:
        calls.append(waiter)
        return original(self, waiter, now)

    monkeypatch.setattr(Scheduler, "after_wake", counting)
    limits = LimitSet([ResourceLimit("slots", 1)])
    assert await _three_waiters_granted_by_releases(limits) == [0, 1, 2]
    assert calls == []  # each was granted by a release while it slept: nothing to ask
    assert limits.get_stats()["waiting"] == 0


class _BookkeepingScheduler(Scheduler):
    """A scheduler that notes every wake-up (as a remote backend's does)."""

    __slots__ = ()
    woken: list[object] = []  # noqa: RUF012 - one list for the test

    def after_wake(self, waiter: Any, now: float) -> float | None:
        self.woken.append(waiter)
        return super().after_wake(waiter, now)


async def test_a_scheduler_that_keeps_books_on_wake_up_is_still_asked() -> None:
    limits = LimitSet([ResourceLimit("slots", 1)])
    limits._scheduler.__class__ = _BookkeepingScheduler
    _BookkeepingScheduler.woken = []
    assert await _three_waiters_granted_by_releases(limits) == [0, 1, 2]
    assert len(_BookkeepingScheduler.woken) == 3
