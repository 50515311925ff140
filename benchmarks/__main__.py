"""aiolimits against its peers, as ratios to baselines measured in the same run.

``python -m benchmarks [--quick]`` runs every scenario, prints the tables and writes
``docs/benchmarks.md`` and ``docs/benchmarks.png``. Measurements of different libraries are
interleaved (a fresh shuffled order in every repeat) and repeated; tables give the median and the
min-max, because absolute times on a shared machine drift by tens of percent within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs

from aiolimits import LimitSet, RateLimit

from . import keyed, peers
from ._common import Summary, kendall_tau, most_in_window
from ._report import write_chart, write_markdown
from .contended import scale_run


@attrs.frozen
class Settings:
    quick: bool
    n: int  # acquisitions per uncontended measurement
    repeats: int  # uncontended repeats
    tasks: int  # contended tasks
    per_task: int
    rate: float
    contended_repeats: int
    floor_iterations: int
    scale_waiters: tuple[int, ...]  # queue lengths, the first the baseline of the ratios
    scale_rate: float
    scale_grants: int  # grants measured in steady state per queue length and repeat
    scale_repeats: int
    cancel_waiters: int
    keys: int  # distinct keys in the keyed scenario


QUICK = Settings(
    True, 20_000, 5, 200, 5, 1000.0, 3, 1000, (100, 10_000), 2000.0, 4000, 3, 1000, 200_000
)
FULL = Settings(
    False,
    100_000,
    11,
    1000,
    5,
    1000.0,
    5,
    3000,
    (100, 1000, 10_000, 100_000),
    2000.0,
    20_000,
    3,
    2000,
    1_000_000,
)
LOOPS: tuple[tuple[str, dict[str, Any]], ...] = (("asyncio", {}), ("uvloop", {"use_uvloop": True}))


def available(package: str | None) -> bool:
    return package is None or importlib.util.find_spec(package) is not None


# --- uncontended -------------------------------------------------------------------------------


async def _uncontended(
    candidates: dict[str, tuple[Callable[[], peers.Op], str | None]], n: int, repeats: int
) -> dict[str, list[float]]:
    """Ratio of each candidate's time for ``n`` operations to the first candidate's, per repeat."""
    names = [name for name, (_, pkg) in candidates.items() if available(pkg)]
    baseline = names[0]
    times: dict[str, list[float]] = {name: [] for name in names}
    rng = random.Random(1)
    for _ in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            op = candidates[name][0]()
            for _ in range(n // 20):  # warm up: caches, first-use allocations
                await op()
            t = time.perf_counter()
            for _ in range(n):
                await op()
            times[name].append(time.perf_counter() - t)
    ratios = {
        name: [t / b for t, b in zip(times[name], times[baseline], strict=True)] for name in names
    }
    ratios["_baseline_ns"] = [b / n * 1e9 for b in times[baseline]]
    return ratios


# --- contended ---------------------------------------------------------------------------------


@attrs.frozen
class Contended:
    wall_ratio: float  # wall time ÷ (grants ÷ rate)
    cpu_us: float  # process CPU per grant
    most_per_second: int  # most grants in any 1-second window
    tau: float  # Kendall's tau, queue order against grant order
    finished: bool  # False when the run hit its time limit


async def contended_run(grant: peers.Op, tasks: int, per_task: int, rate: float) -> Contended:
    """``tasks`` tasks each take ``per_task`` grants; timings and order of the grants."""
    n = tasks * per_task
    ideal = n / rate
    arrivals = iter(range(n))
    granted: list[int] = []
    grant_times: list[float] = []

    async def worker() -> None:
        for _ in range(per_task):
            ticket = next(arrivals)  # taken just before joining the queue
            await grant()
            grant_times.append(time.monotonic())
            granted.append(ticket)

    cpu0, t0 = time.process_time(), time.monotonic()
    with anyio.move_on_after(ideal * 4 + 10) as scope:  # a poller that cannot keep up stops here
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(worker)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    done = len(granted)
    return Contended(
        wall / (done / rate) if done else float("inf"),
        cpu / max(done, 1) * 1e6,
        most_in_window(grant_times),
        kendall_tau(granted),
        not scope.cancelled_caught,
    )


async def cpu_floor(iterations: int) -> float:
    """CPU µs per ``await asyncio.sleep(0.001)``: the least a wake-up per grant at 1000/s costs."""
    cpu0 = time.process_time()
    for _ in range(iterations):
        await asyncio.sleep(0.001)
    return (time.process_time() - cpu0) / iterations * 1e6


async def _contended_suite(s: Settings) -> tuple[dict[str, list[Contended]], list[float]]:
    names = [name for name, (_, pkg) in peers.CONTENDED.items() if available(pkg)]
    results: dict[str, list[Contended]] = {name: [] for name in names}
    floors: list[float] = []
    rng = random.Random(2)
    for _ in range(s.contended_repeats):
        order = [*names, "_floor"]
        rng.shuffle(order)
        for name in order:
            if name == "_floor":
                floors.append(await cpu_floor(s.floor_iterations))
                continue
            grant = await peers.CONTENDED[name][0](s.rate)
            results[name].append(await contended_run(grant, s.tasks, s.per_task, s.rate))
    return results, floors


# --- scale and cancellation (aiolimits only) ---------------------------------------------------


async def _scale_suite(s: Settings) -> dict[int, list[Contended]]:
    """Each queue length in steady state (``contended.scale_run``), interleaved in a new
    shuffled order in every repeat."""
    results: dict[int, list[Contended]] = {w: [] for w in s.scale_waiters}
    rng = random.Random(2)
    for _ in range(s.scale_repeats):
        order = list(s.scale_waiters)
        rng.shuffle(order)
        for waiters in order:
            wall, cpu, tau = await scale_run(waiters, s.scale_rate, s.scale_grants)
            results[waiters].append(Contended(wall, cpu, 0, tau, True))
    return results


@attrs.frozen
class Cancelled:
    rate_ratio: float  # grants per second after the last cancellation ÷ configured rate
    cancelled: int
    granted: int
    waiting_after: int  # waiters left queued at the end (must be 0)


async def cancellation_run(waiters: int, rate: float, seed: int) -> Cancelled:
    """Half of ``waiters`` are cancelled at seeded random moments; the survivors' rate after."""
    limits = LimitSet([RateLimit("r", 1, rate)])
    assert limits.try_acquire({"r": rate}).successful  # use up the burst
    rng = random.Random(seed)
    victims = set(rng.sample(range(waiters), waiters // 2))
    span = waiters / rate / 4  # cancellations fall in the first quarter of the ideal run
    deadlines = {i: rng.uniform(0, span) for i in victims}
    grant_times: list[float] = []
    cancelled = 0

    async def waiter(i: int) -> None:
        nonlocal cancelled
        with anyio.move_on_after(deadlines.get(i, float("inf"))) as scope:
            async with limits.acquire({"r": 1}):
                grant_times.append(time.monotonic())
        cancelled += scope.cancelled_caught

    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        for i in range(waiters):
            tg.start_soon(waiter, i)
            await anyio.lowlevel.checkpoint()  # join the queue in index order
    after = [t for t in grant_times if t >= t0 + span]
    ratio = (len(after) - 1) / (after[-1] - after[0]) / rate if len(after) > 1 else float("nan")
    waiting = int(limits.get_stats()["waiting"])
    return Cancelled(ratio, cancelled, len(grant_times), waiting)


async def _cancellation_suite(s: Settings) -> list[Cancelled]:
    return [await cancellation_run(s.cancel_waiters, s.rate, seed) for seed in range(3)]


# --- main --------------------------------------------------------------------------------------


@attrs.define
class Results:
    settings: Settings
    uncontended: dict[str, dict[str, list[float]]] = attrs.Factory(dict)
    contended: dict[str, dict[str, list[Contended]]] = attrs.Factory(dict)
    floors: dict[str, list[float]] = attrs.Factory(dict)
    scale: dict[int, list[Contended]] = attrs.Factory(dict)
    cancellation: dict[str, list[Cancelled]] = attrs.Factory(dict)
    keyed: list[keyed.KeyedResult] = attrs.Factory(list)
    wall_seconds: float = 0.0


def _step(label: str, fn: Callable[..., Awaitable[Any]], *args: Any, **run: Any) -> Any:
    t = time.monotonic()
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    out = anyio.run(fn, *args, **run)
    print(f" {time.monotonic() - t:.1f} s", file=sys.stderr)
    return out


def run_all(s: Settings) -> Results:
    res = Results(s)
    t0 = time.monotonic()
    res.uncontended["asyncio"] = _step(
        "uncontended asyncio",
        _uncontended,
        peers.ASYNCIO_UNCONTENDED,
        s.n,
        s.repeats,
        backend="asyncio",
    )
    res.uncontended["trio"] = _step(
        "uncontended trio", _uncontended, peers.TRIO_UNCONTENDED, s.n, s.repeats, backend="trio"
    )
    for loop, options in LOOPS:
        res.contended[loop], res.floors[loop] = _step(
            f"contended {loop}",
            _contended_suite,
            s,
            backend="asyncio",
            backend_options=options,
        )
    res.scale = _step("scale asyncio", _scale_suite, s, backend="asyncio")
    for backend in ("asyncio", "trio"):
        res.cancellation[backend] = _step(
            f"cancellation {backend}", _cancellation_suite, s, backend=backend
        )
    t = time.monotonic()
    print(f"  keyed ({s.keys:,} keys) ...", end="", flush=True, file=sys.stderr)
    res.keyed = keyed.run_all(s.keys, min(s.keys, 100_000), 3 if s.quick else 5)
    print(f" {time.monotonic() - t:.1f} s", file=sys.stderr)
    res.wall_seconds = time.monotonic() - t0
    return res


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller N and fewer repeats (~2 min)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the report goes")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    started = datetime.now(timezone.utc)
    print(f"{command}: {started:%Y-%m-%d %H:%M} UTC", file=sys.stderr)
    results = run_all(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    chart = write_chart(results, args.out / "benchmarks.png")
    text = write_markdown(results, args.out / "benchmarks.md", command, started, chart.name)
    print(text)


if __name__ == "__main__":
    main()

__all__ = ["Cancelled", "Contended", "Results", "Settings", "Summary"]
