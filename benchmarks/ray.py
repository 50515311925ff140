"""The Ray backend against a no-op call of a Ray actor, measured in the same run.

    python -m benchmarks.ray

Targets (issue 17): an uncontended acquisition from one caller <= 1.5x a no-op actor call
(``ray.get`` of an ``async def`` method that returns at once); from 50 concurrent asyncio tasks
of one driver, >= 2x the no-op call's throughput (needs coalescing, which this backend does not
do yet: see docs/ray.md). Prints the figures and the ratios; asserts nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import ray

from aiolimits import LimitSet, RateLimit, ResourceLimit
from aiolimits.ray import RayBackend

ROUNDS = 300
TASKS = 50
PER_TASK = 20


class Noop:
    async def noop(self) -> None:
        return None


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        noop = ray.remote(Noop).options(num_cpus=0).remote()
        ray.get(noop.noop.remote())
        limits = LimitSet(
            [RateLimit("tokens", 1, 1e12), ResourceLimit("conn", 10_000)],
            backend=RayBackend("aiolimits-bench"),
            name=uuid.uuid4().hex,
        )
        with limits.acquire_sync({"tokens": 1}):
            pass

        def one_noop() -> None:
            ray.get(noop.noop.remote())

        def one_acquire() -> None:
            with limits.acquire_sync({"tokens": 1}):
                pass

        for label, fn in (("no-op actor call", one_noop), ("acquire_sync + release", one_acquire)):
            start = time.perf_counter()
            for _ in range(ROUNDS):
                fn()
            per = (time.perf_counter() - start) / ROUNDS
            print(f"{label:>28}: {per * 1e6:8.0f} us per call")
            if fn is one_noop:
                base = per
            else:
                print(f"{'uncontended ratio':>28}: {per / base:8.2f}x (target <= 1.5x)")

        async def noop_task() -> None:
            for _ in range(PER_TASK):
                await noop.noop.remote()

        async def acquire_task() -> None:
            for _ in range(PER_TASK):
                async with limits.acquire({"tokens": 1}):
                    pass

        async def run(task: object) -> float:
            start = time.perf_counter()
            await asyncio.gather(*(task() for _ in range(TASKS)))  # type: ignore[operator]
            return TASKS * PER_TASK / (time.perf_counter() - start)

        noop_rate = asyncio.run(run(noop_task))
        acquire_rate = asyncio.run(run(acquire_task))
        print(f"{'50 tasks, no-op calls':>28}: {noop_rate:8.0f} /s")
        print(f"{'50 tasks, acquisitions':>28}: {acquire_rate:8.0f} /s")
        print(f"{'concurrent ratio':>28}: {acquire_rate / noop_rate:8.2f}x (target >= 2x)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
