"""Many tasks sharing one rate limit: wall ÷ ideal, CPU per grant, and FIFO order of grants.

``--tasks`` tasks each make ``--per-task`` acquisitions of 1 unit from a TokenBucket of ``--rate``
units per second whose burst has been used up, so every grant is scheduled. Kendall's tau compares
the order in which requests joined the queue with the order in which they were granted (1.0: the
same order).

On asyncio and uvloop each ``--timer-slack`` value (default 0, 0.001, 0.005, 0.02, 0.1) runs
beside aiolimiter's ``AsyncLimiter`` (when installed) and the bare event loop at each ``--bare``
slack (:func:`bare_grant`: the floor under any limiter), interleaved over ``--repeats`` repeats
in a new shuffled order each time; CPU per grant is also shown as a ratio to aiolimiter's median.
trio runs aiolimits alone (aiolimiter is asyncio-only). ``--loops`` picks the loops.

``--scale 100 100000`` measures instead how the CPU per grant grows with the number of waiters
(asyncio): each size of queue runs ``--grants`` grants in steady state (:func:`scale_run`),
interleaved over the repeats, and is shown as a ratio to the first size's median.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio

from aiolimits import LimitSet, RateLimit

from ._common import Summary, kendall_tau

Grant = Callable[[], Awaitable[object]]

# A scale run whose wall time exceeds the ideal by more than this fell behind the rate.
_KEPT_UP = 1.05


def aiolimits_grant(rate: float, timer_slack: float) -> Grant:
    limits = LimitSet([RateLimit("r", 1, rate)], timer_slack=timer_slack)
    assert limits.try_acquire({"r": rate}).successful  # use up the burst

    async def grant() -> None:
        async with limits.acquire({"r": 1}):
            pass

    return grant


async def aiolimiter_grant(rate: float) -> Grant:
    from aiolimiter import AsyncLimiter  # optional: the bench extra

    lim = AsyncLimiter(rate, 1)
    while lim.has_capacity():  # use up the burst
        await lim.acquire()
    return lim.acquire


def bare_grant(rate: float, slack: float) -> Grant:
    """The floor under any limiter on asyncio: no limiter at all, only what granting costs the
    event loop. Each call queues a future; one timer per wake-up, at the first multiple of
    ``slack`` at or after the next grant's exact time (the exact time when ``slack`` is 0),
    resolves every future due by then, in order. What remains is the wake-up (the timer, a
    blocking ``epoll_wait``, the loop iterations) and each task's resumption."""
    loop = asyncio.get_running_loop()
    queue: deque[asyncio.Future[None]] = deque()
    t0 = loop.time()
    granted = 0
    armed = False

    def arm() -> None:
        nonlocal armed
        at = t0 + (granted + 1) / rate
        loop.call_at(at + (-at) % slack if slack else at, wake)
        armed = True

    def wake() -> None:
        nonlocal granted, armed
        due = int((loop.time() - t0) * rate)
        while granted < due and queue:
            queue.popleft().set_result(None)
            granted += 1
        armed = False
        if queue:
            arm()

    async def grant() -> None:
        fut = loop.create_future()
        queue.append(fut)
        if not armed:
            arm()
        await fut

    return grant


async def run(
    tasks: int, per_task: int, rate: float, slack: float | str | None
) -> tuple[float, float, float]:
    """``(wall / ideal, CPU µs per grant, Kendall tau)``; ``slack`` None runs aiolimiter,
    ``"bare S"`` the bare event loop with slack S (:func:`bare_grant`)."""
    if slack is None:
        grant = await aiolimiter_grant(rate)
    elif isinstance(slack, str):
        grant = bare_grant(rate, float(slack.split()[1]))
    else:
        grant = aiolimits_grant(rate, slack)
    arrivals = iter(range(tasks * per_task))
    granted: list[int] = []

    async def worker() -> None:
        for _ in range(per_task):
            ticket = next(arrivals)  # taken just before joining the queue
            await grant()
            granted.append(ticket)

    cpu0, t0 = time.process_time(), time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    n = tasks * per_task
    return wall / (n / rate), cpu / n * 1e6, kendall_tau(granted)


async def scale_run(waiters: int, rate: float, grants: int) -> tuple[float, float, float]:
    """``(wall / ideal, CPU µs per grant, Kendall tau)`` of ``grants`` grants made while
    ``waiters`` tasks wait on one TokenBucket of ``rate`` per second, in steady state.

    Every task acquires 1 unit in a loop, so a granted task joins the tail again and the queue
    stays ``waiters`` long. The clock starts once every task has joined the queue (making the
    tasks is not the limiter's cost) and stops after ``grants`` grants: every grant measured
    includes the granted task's release and its next arrival at the tail."""
    limits = LimitSet([RateLimit("r", 1, rate)])
    assert limits.try_acquire({"r": rate}).successful  # use up the burst
    tickets = iter(range(1 << 62))
    granted: list[int] = []
    done, all_queued = anyio.Event(), anyio.Event()
    counting = False
    started = 0

    window = [0.0, 0.0, 0.0, 0.0]  # CPU and wall time at the start and at the last grant counted

    async def worker() -> None:
        nonlocal started, counting
        started += 1
        if started == waiters:  # it joins the queue in this step, as every task before it did
            all_queued.set()
        while True:
            ticket = next(tickets)  # taken just before joining the queue
            async with limits.acquire({"r": 1}):
                if counting:
                    granted.append(ticket)
                    if len(granted) == grants:  # the window closes: the teardown is not in it
                        window[2:] = time.process_time(), time.monotonic()
                        counting = False
                        done.set()

    async with anyio.create_task_group() as tg:
        for _ in range(waiters):
            tg.start_soon(worker)
        await all_queued.wait()
        # Collect the garbage of making the tasks, then let the grants that it and the collection
        # delayed go by (the bucket refilled meanwhile): the window sees the steady state only.
        gc.collect()
        await anyio.sleep(2.0)
        counting = True
        window[:2] = time.process_time(), time.monotonic()
        await done.wait()
        tg.cancel_scope.cancel()
    cpu, wall = window[2] - window[0], window[3] - window[1]
    return wall / (grants / rate), cpu / grants * 1e6, kendall_tau(granted)


def scale_main(sizes: list[int], rate: float, grants: int, repeats: int) -> None:
    """Print CPU per grant against the number of waiters, as a ratio to the first size.

    Two ratios, both robust to a machine whose load changes during the measurement: the ratio
    of medians over all repeats, and the median over the repeats of the ratio within one repeat
    (every size runs once per repeat, back to back, in a new shuffled order, so the sizes of
    one repeat share its load). A run that fell behind the rate (wall/ideal above 1.05: the
    process was starved of CPU, the bucket overflowed and the tasks went cold) is marked, and
    the medians are also given without such runs."""
    rng = random.Random(3)
    results: dict[int, list[tuple[float, float, float]]] = {n: [] for n in sizes}
    for _ in range(repeats):
        order = sizes[:]
        rng.shuffle(order)
        for n in order:
            results[n].append(anyio.run(scale_run, n, rate, grants, backend="asyncio"))
            wall, cpu, tau = results[n][-1]
            starved = "  (fell behind)" if wall > _KEPT_UP else ""
            print(
                f"  {n:,} waiters: {cpu:.1f} us, wall/ideal {wall:.4f}, tau {tau:.3f}, "
                f"load {os.getloadavg()[0]:.1f}{starved}"
            )
    base_runs = results[sizes[0]]
    base = statistics.median(c for _, c, _ in base_runs)
    for n, runs in results.items():
        cpu = Summary.of([c for _, c, _ in runs])
        paired = Summary.of([r[1] / b[1] for r, b in zip(runs, base_runs, strict=True)])
        kept = [
            r[1] / b[1]
            for r, b in zip(runs, base_runs, strict=True)
            if r[0] <= _KEPT_UP and b[0] <= _KEPT_UP
        ]
        kept_text = f"{statistics.median(kept):.2f}x of {len(kept)}" if kept else "none"
        print(
            f"waiters {n:>9,}  wall/ideal {Summary.of([w for w, _, _ in runs]).fmt('.4f')}"
            f"  CPU per grant {cpu.fmt('.1f')} us ({cpu.median / base:.2f}x {sizes[0]:,} waiters;"
            f" within a repeat {paired.fmt('.2f', 'x')}, runs that kept up {kept_text};"
            f" target <= 1.1x)  Kendall tau {Summary.of([t for _, _, t in runs]).fmt('.3f')}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--per-task", type=int, default=5)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--timer-slack",
        type=float,
        nargs="+",
        default=[0.0, 0.001, 0.005, 0.02, 0.1],
        metavar="SECONDS",
    )
    parser.add_argument(
        "--bare",
        type=float,
        nargs="*",
        default=[0.0, 0.005],
        metavar="SECONDS",
        help="slacks of the bare event loop (the floor, asyncio and uvloop) to run beside",
    )
    parser.add_argument(
        "--loops",
        nargs="+",
        choices=["asyncio", "uvloop", "trio"],
        default=["asyncio", "uvloop", "trio"],
        help="the event loops to run on",
    )
    parser.add_argument("--scale", type=int, nargs="+", metavar="WAITERS", help="see above")
    parser.add_argument("--grants", type=int, default=20_000, help="grants per --scale run")
    args = parser.parse_args()
    if args.scale:
        scale_main(args.scale, args.rate, args.grants, args.repeats)
        return
    with_peer = importlib.util.find_spec("aiolimiter") is not None
    rng = random.Random(3)
    for label, backend, options in (
        ("asyncio", "asyncio", {}),
        ("uvloop", "asyncio", {"use_uvloop": True}),
        ("trio", "trio", {}),
    ):
        if label not in args.loops:
            continue
        rows: list[float | str | None] = list(args.timer_slack)
        if backend == "asyncio":
            rows += [f"bare {slack:g}" for slack in args.bare]
            if with_peer:
                rows.append(None)
        results: dict[float | str | None, list[tuple[float, float, float]]] = {r: [] for r in rows}
        for _ in range(args.repeats):
            order = rows[:]
            rng.shuffle(order)
            for slack in order:
                results[slack].append(
                    anyio.run(
                        run,
                        args.tasks,
                        args.per_task,
                        args.rate,
                        slack,
                        backend=backend,
                        backend_options=options,
                    )
                )
        peer = results.get(None)
        peer_cpu = statistics.median(c for _, c, _ in peer) if peer else None
        for slack, runs in results.items():
            name = (
                "aiolimiter"
                if slack is None
                else slack.replace(" ", " loop, slack ")
                if isinstance(slack, str)
                else f"timer_slack={slack:g}"
            )
            cpu = Summary.of([c for _, c, _ in runs])
            ratio = "" if peer_cpu is None else f" ({cpu.median / peer_cpu:.2f}x aiolimiter)"
            print(
                f"{label:8} {name:18} wall/ideal {Summary.of([w for w, _, _ in runs]).fmt('.4f')}"
                f"  CPU per grant {cpu.fmt('.1f')} us{ratio}"
                f"  Kendall tau {Summary.of([t for _, _, t in runs]).fmt('.3f')}"
            )


if __name__ == "__main__":
    main()
