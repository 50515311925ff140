"""Uncontended acquire+release cost, as a ratio to the standard semaphore of each runtime.

Each measurement is repeated and the median, min and max ratios are printed. Absolute times on a
shared machine drift; ratios measured in the same run, interleaved, drift much less.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import anyio

from aiolimits import LimitSet

from ._common import Summary, one_rate, three


async def _time_async(body: Callable[[], Awaitable[None]]) -> float:
    t = time.perf_counter()
    await body()
    return time.perf_counter() - t


async def _async_suite(
    n: int, repeats: int, semaphore: Callable[[], object]
) -> dict[str, list[float]]:
    ratios: dict[str, list[float]] = {"1 RateLimit": [], "Call+Rate+Resource": []}
    for _ in range(repeats):
        sem = semaphore()

        async def base(sem: object = sem) -> None:
            for _ in range(n):
                async with sem:  # type: ignore[attr-defined]
                    pass

        base_t = await _time_async(base)
        for name, make in (("1 RateLimit", one_rate), ("Call+Rate+Resource", three)):
            limits, req = make()

            async def ours(limits: LimitSet = limits, req: dict[str, float] = req) -> None:
                for _ in range(n):
                    async with limits.acquire(req):
                        pass

            ratios[name].append(await _time_async(ours) / base_t)
    return ratios


def _sync_suite(n: int, repeats: int) -> dict[str, list[float]]:
    ratios: dict[str, list[float]] = {"1 RateLimit": [], "Call+Rate+Resource": []}
    for _ in range(repeats):
        sem = threading.Semaphore(10)
        t = time.perf_counter()
        for _ in range(n):
            with sem:
                pass
        base_t = time.perf_counter() - t
        for name, make in (("1 RateLimit", one_rate), ("Call+Rate+Resource", three)):
            limits, req = make()
            t = time.perf_counter()
            for _ in range(n):
                with limits.acquire_sync(req):
                    pass
            ratios[name].append((time.perf_counter() - t) / base_t)
    return ratios


def _report(runtime: str, baseline: str, ratios: dict[str, list[float]]) -> None:
    for name, values in ratios.items():
        print(f"{runtime:8} {name:20} vs {baseline:20} {Summary.of(values).fmt(unit='x')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="acquisitions per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    def asyncio_sem() -> object:
        return asyncio.Semaphore(10)

    def trio_sem() -> object:
        import trio

        return trio.Semaphore(10)

    _report(
        "asyncio",
        "asyncio.Semaphore",
        anyio.run(_async_suite, args.n, args.repeats, asyncio_sem, backend="asyncio"),
    )
    _report(
        "uvloop",
        "asyncio.Semaphore",
        anyio.run(
            _async_suite,
            args.n,
            args.repeats,
            asyncio_sem,
            backend="asyncio",
            backend_options={"use_uvloop": True},
        ),
    )
    _report(
        "trio",
        "trio.Semaphore",
        anyio.run(_async_suite, args.n, args.repeats, trio_sem, backend="trio"),
    )
    _report("threads", "threading.Semaphore", _sync_suite(args.n, args.repeats))


if __name__ == "__main__":
    main()
