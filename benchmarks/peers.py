"""The libraries compared, each wrapped as one awaitable "take one unit" operation.

Uncontended candidates return an ``op`` that acquires and releases (or hits) once and never waits;
contended candidates return a ``grant`` that waits until one unit at ``rate`` per second is
admitted, after the burst has been used up so that every grant is scheduled. Peers are imported
lazily so that the suite still runs, without them, where they are not installed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from ._common import BIG, one_rate, three

Op = Callable[[], Awaitable[None]]
HUGE_RATE = 10**12  # a rate the uncontended loops can never reach


def asyncio_semaphore() -> Op:
    import asyncio

    sem = asyncio.Semaphore(10)

    async def op() -> None:
        async with sem:
            pass

    return op


def anyio_capacity_limiter() -> Op:
    import anyio

    lim = anyio.CapacityLimiter(10)

    async def op() -> None:
        async with lim:
            pass

    return op


def trio_semaphore() -> Op:
    import trio

    sem = trio.Semaphore(10)

    async def op() -> None:
        async with sem:
            pass

    return op


def trio_capacity_limiter() -> Op:
    import trio

    lim = trio.CapacityLimiter(10)

    async def op() -> None:
        async with lim:
            pass

    return op


def aiolimiter_op() -> Op:
    from aiolimiter import AsyncLimiter

    lim = AsyncLimiter(HUGE_RATE, 1)

    async def op() -> None:
        async with lim:
            pass

    return op


def limits_op() -> Op:
    # Fixed window: the moving window keeps one timestamp per hit, so with a never-reached limit
    # it would grow with the loop and measure the loop length rather than one hit.
    from limits import RateLimitItemPerSecond
    from limits.aio.storage import MemoryStorage
    from limits.aio.strategies import FixedWindowRateLimiter

    limiter = FixedWindowRateLimiter(MemoryStorage())
    item = RateLimitItemPerSecond(HUGE_RATE)

    async def op() -> None:
        await limiter.hit(item, "bench")

    return op


def pyrate_op() -> Op:
    import pyrate_limiter as pr

    limiter = pr.Limiter(pr.InMemoryBucket([pr.Rate(HUGE_RATE, pr.Duration.SECOND)]))

    async def op() -> None:
        await limiter.try_acquire_async("bench")

    return op


def throttled_op() -> Op:
    from throttled.asyncio import MemoryStore, Throttled, per_sec

    th = Throttled(key="bench", quota=per_sec(HUGE_RATE), store=MemoryStore())

    async def op() -> None:
        await th.limit()

    return op


def concurry_op() -> Op:
    from concurry import CallLimit, LimitSet

    limits = LimitSet(
        [CallLimit(window_seconds=1, capacity=HUGE_RATE)], shared=True, mode="asyncio"
    )

    async def op() -> None:
        async with await limits.async_acquire():
            pass

    return op


def aiolimits_one_rate() -> Op:
    limits, req = one_rate()

    async def op() -> None:
        async with limits.acquire(req):
            pass

    return op


def aiolimits_three() -> Op:
    limits, req = three()

    async def op() -> None:
        async with limits.acquire(req):
            pass

    return op


# name -> (factory, package whose absence skips it)
ASYNCIO_UNCONTENDED: dict[str, tuple[Callable[[], Op], str | None]] = {
    "asyncio.Semaphore": (asyncio_semaphore, None),
    "anyio.CapacityLimiter": (anyio_capacity_limiter, None),
    "aiolimiter AsyncLimiter": (aiolimiter_op, "aiolimiter"),
    "limits FixedWindow hit (aio)": (limits_op, "limits"),
    "pyrate-limiter try_acquire_async": (pyrate_op, "pyrate_limiter"),
    "throttled-py Throttled.limit (aio)": (throttled_op, "throttled"),
    "concurry LimitSet.async_acquire": (concurry_op, "concurry"),
    "aiolimits 1 RateLimit": (aiolimits_one_rate, None),
    "aiolimits Call+Rate+Resource": (aiolimits_three, None),
}
TRIO_UNCONTENDED: dict[str, tuple[Callable[[], Op], str | None]] = {
    "trio.Semaphore": (trio_semaphore, None),
    "trio.CapacityLimiter": (trio_capacity_limiter, None),
    "aiolimits 1 RateLimit": (aiolimits_one_rate, None),
    "aiolimits Call+Rate+Resource": (aiolimits_three, None),
}


# Contended: each factory is awaited inside the event loop, uses up the burst, and returns grant().


async def aiolimits_grant(rate: float, timer_slack: float = 0.0) -> Op:
    from aiolimits import LimitSet, RateLimit

    limits = LimitSet([RateLimit("r", 1, rate)], timer_slack=timer_slack)
    assert limits.try_acquire({"r": rate}).successful  # use up the burst

    async def grant() -> None:
        async with limits.acquire({"r": 1}):
            pass

    return grant


async def aiolimiter_grant(rate: float) -> Op:
    from aiolimiter import AsyncLimiter

    lim = AsyncLimiter(rate, 1)
    while lim.has_capacity():
        await lim.acquire()

    async def grant() -> None:
        await lim.acquire()

    return grant


async def pyrate_grant(rate: float) -> Op:
    import pyrate_limiter as pr

    limiter = pr.Limiter(pr.InMemoryBucket([pr.Rate(int(rate), pr.Duration.SECOND)]))
    while limiter.try_acquire("bench", blocking=False):
        pass

    async def grant() -> None:
        assert await limiter.try_acquire_async("bench")

    return grant


async def throttled_grant(rate: float) -> Op:
    from throttled.asyncio import MemoryStore, Throttled, per_sec

    th = Throttled(key="bench", quota=per_sec(int(rate)), store=MemoryStore(), timeout=3600)
    while not (await th.limit(timeout=-1)).limited:
        pass

    async def grant() -> None:
        assert not (await th.limit()).limited

    return grant


async def concurry_grant(rate: float) -> Op:
    from concurry import CallLimit, LimitSet

    limits = LimitSet(
        [CallLimit(window_seconds=1, capacity=int(rate))], shared=True, mode="asyncio"
    )
    while True:
        acq = limits.try_acquire()
        if not acq.successful:
            break
        acq.release()

    async def grant() -> None:
        (await limits.async_acquire()).release()

    return grant


CONTENDED: dict[str, tuple[Callable[[float], Awaitable[Op]], str | None]] = {
    "aiolimits": (aiolimits_grant, None),
    # Waiters due within 1 ms / 5 ms of each other granted by one wake-up (docs/limitset.md).
    "aiolimits timer_slack=0.001": (partial(aiolimits_grant, timer_slack=0.001), None),
    "aiolimits timer_slack=0.005": (partial(aiolimits_grant, timer_slack=0.005), None),
    "aiolimiter": (aiolimiter_grant, "aiolimiter"),
    "pyrate-limiter": (pyrate_grant, "pyrate_limiter"),
    "throttled-py": (throttled_grant, "throttled"),
    "concurry": (concurry_grant, "concurry"),
}

__all__ = ["ASYNCIO_UNCONTENDED", "BIG", "CONTENDED", "TRIO_UNCONTENDED", "Op"]
