"""The Ray backend against a no-op call of a Ray actor, measured in the same run.

    python -m benchmarks.ray

Targets (issue 17): an uncontended acquisition (``acquire_sync`` and its release) from one
caller <= 1.5x a no-op actor call (``ray.get`` of an ``async def`` method that returns at once);
from 50 concurrent asyncio tasks of one driver, >= 2x the no-op call's throughput (the requests
of one process share round trips to the actor: see docs/ray.md).

The two sides are measured in alternation (one call each, or one round of 50 tasks each), so
that a busy machine slows both alike; the ratios compare medians. Prints the figures and the
ratios; asserts nothing.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import ray

from aiolimits import LimitSet, RateLimit, ResourceLimit
from aiolimits.ray import RayBackend

ROUNDS = 400
TASKS = 50
PER_TASK = 20
CONCURRENT_ROUNDS = 5


class Noop:
    async def noop(self) -> None:
        return None


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="bench")
    try:
        noop: Any = ray.remote(Noop).options(num_cpus=0).remote()
        ray.get(noop.noop.remote())
        limits = LimitSet(
            [RateLimit("tokens", 1, 1e12), ResourceLimit("conn", 10_000)],
            backend=RayBackend("aiolimits-bench"),
            name=uuid.uuid4().hex,
        )

        def one_noop() -> None:
            ray.get(noop.noop.remote())

        def one_acquire() -> None:
            with limits.acquire_sync({"tokens": 1}):
                pass

        for _ in range(20):  # warm both up
            one_noop()
            one_acquire()
        noops, acquires = [], []
        for _ in range(ROUNDS):
            noops.append(_timed(one_noop))
            acquires.append(_timed(one_acquire))
        base, per = statistics.median(noops), statistics.median(acquires)
        print(f"{'no-op actor call':>28}: {base * 1e6:8.0f} us per call (median)")
        print(f"{'acquire_sync + release':>28}: {per * 1e6:8.0f} us per call (median)")
        print(f"{'uncontended ratio':>28}: {per / base:8.2f}x (target <= 1.5x)")

        async def noop_task() -> None:
            for _ in range(PER_TASK):
                await noop.noop.remote()

        async def acquire_task() -> None:
            for _ in range(PER_TASK):
                async with limits.acquire({"tokens": 1}):
                    pass

        async def run(task: Callable[[], Coroutine[Any, Any, None]]) -> float:
            start = time.perf_counter()
            await asyncio.gather(*(task() for _ in range(TASKS)))
            return TASKS * PER_TASK / (time.perf_counter() - start)

        async def both() -> tuple[list[float], list[float]]:
            await run(noop_task)  # warm-up
            await run(acquire_task)
            noop_rates, acquire_rates = [], []
            for _ in range(CONCURRENT_ROUNDS):
                noop_rates.append(await run(noop_task))
                acquire_rates.append(await run(acquire_task))
            return noop_rates, acquire_rates

        noop_rates, acquire_rates = asyncio.run(both())
        noop_rate, acquire_rate = statistics.median(noop_rates), statistics.median(acquire_rates)
        print(f"{'50 tasks, no-op calls':>28}: {noop_rate:8.0f} /s (median)")
        print(f"{'50 tasks, acquisitions':>28}: {acquire_rate:8.0f} /s (median)")
        print(f"{'concurrent ratio':>28}: {acquire_rate / noop_rate:8.2f}x (target >= 2x)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
