"""Many tasks sharing one rate limit: wall ÷ ideal, CPU per grant, and FIFO order of grants.

``--tasks`` tasks each make ``--per-task`` acquisitions of 1 unit from a TokenBucket of ``--rate``
units per second whose burst has been used up, so every grant is scheduled. Kendall's tau compares
the order in which requests joined the queue with the order in which they were granted (1.0: the
same order).
"""

from __future__ import annotations

import argparse
import time

import anyio

from aiolimits import LimitSet, RateLimit

from ._common import kendall_tau


async def run(tasks: int, per_task: int, rate: float) -> tuple[float, float, float]:
    limits = LimitSet([RateLimit("r", 1, rate)])
    assert limits.try_acquire({"r": rate}).successful  # use up the burst
    arrivals = iter(range(tasks * per_task))
    granted: list[int] = []

    async def worker() -> None:
        for _ in range(per_task):
            ticket = next(arrivals)  # taken just before joining the queue
            async with limits.acquire({"r": 1}):
                granted.append(ticket)

    cpu0, t0 = time.process_time(), time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    n = tasks * per_task
    return wall / (n / rate), cpu / n * 1e6, kendall_tau(granted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--per-task", type=int, default=5)
    parser.add_argument("--rate", type=float, default=1000.0)
    args = parser.parse_args()
    for label, backend, options in (
        ("asyncio", "asyncio", {}),
        ("uvloop", "asyncio", {"use_uvloop": True}),
        ("trio", "trio", {}),
    ):
        ratio, cpu, tau = anyio.run(
            run, args.tasks, args.per_task, args.rate, backend=backend, backend_options=options
        )
        print(
            f"{label:8} wall/ideal {ratio:.4f}  CPU per grant {cpu:6.1f} us  Kendall tau {tau:.3f}"
        )


if __name__ == "__main__":
    main()
