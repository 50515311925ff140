"""ProcessBackend against MemoryBackend, measured in the same run: cost, throughput, wake-ups.

``python -m benchmarks.process [--quick] [--keyed]`` prints five tables (``--keyed``: the first):

* a KeyedLimitSet on ProcessBackend holding 100,000 live keys (``--keys``): the shared memory
  per live key (the table file's allocated blocks), and ``async with keyed.acquire(key, ...)``
  over random live keys ÷ ``async with limits.acquire(...)`` on a plain ProcessBackend set of
  the same limits, interleaved; likewise ``try_acquire`` + ``release``;

* uncontended acquire + release (one thread, nothing waits), per operation, process-shared vs
  in-memory, and their ratio, for one RateLimit and for CallLimit + RateLimit + ResourceLimit,
  in wall time and in the thread's CPU time (which a loaded machine disturbs less);
* aggregate throughput of 4 processes hammering one shared set (never waiting), beside 4
  processes each with its own in-memory set (which shares nothing: the ceiling);
* cross-process wake latency: a holder in one process releases the only slot while the other
  process waits for it; the time from just before ``release()`` to the waiter's grant, on
  CLOCK_MONOTONIC (one clock for the whole machine), beside the same ping-pong between two
  threads of one process on the memory backend;
* CPU used by a process whose 100 tasks wait for a slot held by another process, per second.

Absolute times on a shared machine drift; the ratios are measured interleaved in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import tempfile
import threading
import time
from typing import Any

from aiolimits import (
    CallLimit,
    KeyedLimitSet,
    LimitSet,
    ProcessBackend,
    RateLimit,
    ResourceLimit,
)

from ._common import BIG, Summary
from .keyed import CONFIGS, client_keys

_spawn = multiprocessing.get_context("spawn")


def _sets(
    backend: ProcessBackend | None, name: str
) -> dict[str, tuple[LimitSet, dict[str, float]]]:
    def make(limits: list[Any], suffix: str) -> LimitSet:
        if backend is None:
            return LimitSet(limits)
        return LimitSet(limits, backend=backend, name=name + suffix)

    return {
        "1 RateLimit": (make([RateLimit("tokens", 1, BIG)], "-one"), {"tokens": 1}),
        "Call+Rate+Resource": (
            make([CallLimit(1, BIG), RateLimit("tokens", 1, BIG), ResourceLimit("r", 10)], "-3"),
            {"tokens": 1},
        ),
    }


#: The targets of the process backend (issue 19), beside each measured ratio.
TARGETS = {"1 RateLimit": 2.0, "Call+Rate+Resource": 3.0}
THROUGHPUT_TARGET = 0.25


def _per_op_sync(limits: LimitSet, req: dict[str, float], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        with limits.acquire_sync(req):
            pass
    return (time.perf_counter() - t) / n


def _cpu_per_op_sync(limits: LimitSet, req: dict[str, float], n: int) -> float:
    """CPU time of this thread per operation: on a loaded machine, unlike the wall time, it
    does not count the time other processes ran."""
    t = time.thread_time()
    for _ in range(n):
        with limits.acquire_sync(req):
            pass
    return (time.thread_time() - t) / n


async def _per_op_async(limits: LimitSet, req: dict[str, float], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        async with limits.acquire(req):
            pass
    return (time.perf_counter() - t) / n


def uncontended(directory: str, n: int, repeats: int) -> None:
    print(
        f"uncontended acquire+release, {n} ops x {repeats} repeats (median (min-max)), "
        f"load {os.getloadavg()[0]:.1f}"
    )
    memory = _sets(None, "")
    shared = _sets(ProcessBackend(directory), "uncontended")
    for door in ("sync", "asyncio"):
        for case in memory:
            mem_us: list[float] = []
            proc_us: list[float] = []
            for r in range(repeats):
                order = [(memory, mem_us), (shared, proc_us)]
                if r % 2:
                    order.reverse()
                for sets, out in order:
                    limits, req = sets[case]
                    if door == "sync":
                        out.append(_per_op_sync(limits, req, n) * 1e6)
                    else:
                        out.append(asyncio.run(_per_op_async(limits, req, n)) * 1e6)
            ratios = [p / m for p, m in zip(proc_us, mem_us, strict=True)]
            print(
                f"  {door:8} {case:20} process {Summary.of(proc_us).fmt(unit=' us')}  "
                f"memory {Summary.of(mem_us).fmt(unit=' us')}  "
                f"ratio {Summary.of(ratios).fmt(unit='x')} (target <= {TARGETS[case]:g}x)"
            )
    for case in memory:
        mem_cpu: list[float] = []
        proc_cpu: list[float] = []
        for r in range(repeats):
            order = [(memory, mem_cpu), (shared, proc_cpu)]
            if r % 2:
                order.reverse()
            for sets, out in order:
                limits, req = sets[case]
                out.append(_cpu_per_op_sync(limits, req, n) * 1e6)
        ratios = [p / m for p, m in zip(proc_cpu, mem_cpu, strict=True)]
        print(
            f"  {'cpu':8} {case:20} process {Summary.of(proc_cpu).fmt(unit=' us')}  "
            f"memory {Summary.of(mem_cpu).fmt(unit=' us')}  "
            f"ratio {Summary.of(ratios).fmt(unit='x')} (sync, CPU time of the thread)"
        )


def _throughput_child(location: str | None, seconds: float, go: Any, out: Any) -> None:
    if location is None:
        limits, req = _sets(None, "")["1 RateLimit"]
    else:
        limits, req = _sets(ProcessBackend(location), "throughput")["1 RateLimit"]
    out.put("ready")
    go.wait()
    done = 0
    cpu = time.process_time()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(100):
            with limits.acquire_sync(req):
                pass
        done += 100
    out.put((done, time.process_time() - cpu))


def _throughput(location: str | None, procs: int, seconds: float) -> tuple[float, float]:
    """Operations per second of ``procs`` processes together, and their CPU time per operation
    (seconds; all of it, the kernel's included: what limits the throughput when the cores are
    busy, and less disturbed by the machine's load than the throughput itself)."""
    go, out = _spawn.Event(), _spawn.Queue()
    children = [
        _spawn.Process(target=_throughput_child, args=(location, seconds, go, out))
        for _ in range(procs)
    ]
    for c in children:
        c.start()
    for _ in children:
        assert out.get(timeout=60) == "ready"
    go.set()
    results = [out.get(timeout=60 + seconds) for _ in children]
    for c in children:
        c.join(10)
    total = sum(done for done, _cpu in results)
    return total / seconds, sum(cpu for _done, cpu in results) / total


def throughput(directory: str, seconds: float, repeats: int) -> None:
    print(f"aggregate throughput, 4 processes x {seconds:g} s, 1 RateLimit, never waiting")
    shared: list[float] = []
    memory: list[float] = []
    shared_cpu: list[float] = []
    memory_cpu: list[float] = []
    for r in range(repeats):
        order = [(directory, shared, shared_cpu), (None, memory, memory_cpu)]
        if r % 2:
            order.reverse()
        for location, out, cpu_out in order:
            ops, cpu = _throughput(location, 4, seconds)
            out.append(ops)
            cpu_out.append(cpu * 1e6)
    ratios = [s / m for s, m in zip(shared, memory, strict=True)]
    cpu_ratios = [m / s for s, m in zip(shared_cpu, memory_cpu, strict=True)]
    print(
        f"  one shared set   {Summary.of(shared).fmt('.0f', ' ops/s')}, CPU "
        f"{Summary.of(shared_cpu).fmt(unit=' us/op')}\n"
        f"  4 memory sets    {Summary.of(memory).fmt('.0f', ' ops/s')}, CPU "
        f"{Summary.of(memory_cpu).fmt(unit=' us/op')} (nothing shared)\n"
        f"  CPU per op, memory / shared {Summary.of(cpu_ratios).fmt(unit='x')}\n"
        f"  ratio            {Summary.of(ratios).fmt(unit='x')} (target >= "
        f"{THROUGHPUT_TARGET:g}x; cores: {os.cpu_count()}, load {os.getloadavg()[0]:.1f})"
    )


def _ping_pong(limits: LimitSet, rounds: int, hold: float, log: list[tuple[str, float]]) -> None:
    """Take the slot ``rounds`` times; hold it ``hold`` seconds; log each grant and release."""
    for _ in range(rounds):
        with limits.acquire_sync(timeout=60):
            log.append(("grant", time.monotonic()))
            time.sleep(hold)
            log.append(("release", time.monotonic()))


def _ping_pong_child(location: str, name: str, rounds: int, go: Any, out: Any) -> None:
    limits = LimitSet([ResourceLimit("slot", 1)], backend=ProcessBackend(location), name=name)
    log: list[tuple[str, float]] = []
    out.put("ready")
    go.wait()
    _ping_pong(limits, rounds, 0.002, log)
    out.put(log)


def _latencies(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> list[float]:
    """For each grant, the time since the other side's latest release before it."""
    events = sorted([(t, side, kind) for side, log in ((0, a), (1, b)) for kind, t in log])
    last_release: dict[int, float] = {}
    out: list[float] = []
    for t, side, kind in events:
        if kind == "release":
            last_release[side] = t
        elif 1 - side in last_release:
            out.append(t - last_release.pop(1 - side))
    return out


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def wake_latency(directory: str, rounds: int) -> None:
    print(f"wake latency: release in one process -> grant in the other, {rounds} x 2 handovers")
    name = "latency"
    limits = LimitSet([ResourceLimit("slot", 1)], backend=ProcessBackend(directory), name=name)
    go, out = _spawn.Event(), _spawn.Queue()
    child = _spawn.Process(target=_ping_pong_child, args=(directory, name, rounds, go, out))
    child.start()
    assert out.get(timeout=60) == "ready"
    mine: list[tuple[str, float]] = []
    go.set()
    _ping_pong(limits, rounds, 0.002, mine)
    theirs = out.get(timeout=120)
    child.join(10)
    shared = [x * 1e6 for x in _latencies(mine, theirs)]

    memory_set = LimitSet([ResourceLimit("slot", 1)])
    logs: list[list[tuple[str, float]]] = [[], []]
    threads = [
        threading.Thread(target=_ping_pong, args=(memory_set, rounds, 0.002, logs[i]))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    memory = [x * 1e6 for x in _latencies(logs[0], logs[1])]
    for label, values in (("process, 2 processes", shared), ("memory, 2 threads", memory)):
        print(
            f"  {label:22} p50 {statistics.median(values):7.0f} us  p99 {_pct(values, 0.99):7.0f}"
            f" us  max {max(values):7.0f} us  (n={len(values)})"
        )


def _hold_child(location: str, name: str, seconds: float, ready: Any) -> None:
    limits = LimitSet([ResourceLimit("slot", 1)], backend=ProcessBackend(location), name=name)
    with limits.acquire_sync():
        ready.set()
        time.sleep(seconds)


def idle_cpu(directory: str, seconds: float) -> None:
    name = "idle"
    limits = LimitSet([ResourceLimit("slot", 1)], backend=ProcessBackend(directory), name=name)
    ready = _spawn.Event()
    child = _spawn.Process(target=_hold_child, args=(directory, name, seconds + 1.0, ready))
    child.start()
    assert ready.wait(60)

    async def main() -> float:
        async def waiter() -> None:
            async with limits.acquire(timeout=60):
                pass

        tasks = [asyncio.create_task(waiter()) for _ in range(100)]
        await asyncio.sleep(0.2)  # all queued
        cpu = time.process_time()
        await asyncio.sleep(seconds)
        used = time.process_time() - cpu
        await asyncio.gather(*tasks)  # granted one by one once the holder lets go
        return used

    used = asyncio.run(main())
    child.join(10)
    print(
        f"idle CPU: 100 tasks waiting {seconds:g} s for a slot held by another process: "
        f"{used / seconds * 1e3:.2f} ms of CPU per second (whole process, listener included)"
    )


def _keyed_async(keyed: KeyedLimitSet, keys: list[str], req: dict[str, float]) -> float:
    async def run() -> float:
        t = time.perf_counter()
        for key in keys:
            async with keyed.acquire(key, req):
                pass
        return (time.perf_counter() - t) / len(keys)

    return asyncio.run(run())


def keyed(directory: str, n_keys: int, n: int, repeats: int) -> None:
    """A KeyedLimitSet on ProcessBackend holding ``n_keys`` live keys: the shared memory per key,
    and an acquisition of a random one of them beside a plain ProcessBackend acquisition."""
    print(
        f"keyed on ProcessBackend: {n_keys:,} live keys, {n} ops x {repeats} repeats "
        "(median (min-max))"
    )
    backend = ProcessBackend(directory)
    for i, (case, (declared, req)) in enumerate(CONFIGS.items()):
        limits = LimitSet(declared, backend=backend, name=f"keyed-plain-{i}")
        per_key = KeyedLimitSet(declared, max_keys=n_keys, backend=backend, name=f"keyed-{i}")
        keys = client_keys(n_keys)
        t = time.perf_counter()
        for key in keys:
            per_key.try_acquire(key, req).release()
        fill = (time.perf_counter() - t) / n_keys
        assert per_key._shared.table.live_keys() == n_keys, "keys were dropped"  # type: ignore[union-attr]
        path = os.path.join(directory, f"keyed-{i}.keyed")
        used = os.stat(path).st_blocks * 512
        rng = random.Random(5)
        timed = rng.sample(keys, n)
        keyed_us: list[float] = []
        plain_us: list[float] = []
        sync_ratios: list[float] = []
        for _ in range(repeats):
            keyed_us.append(_keyed_async(per_key, timed, req) * 1e6)
            plain_us.append(asyncio.run(_per_op_async(limits, req, n)) * 1e6)
            t = time.perf_counter()
            for key in timed:
                per_key.try_acquire(key, req).release()
            t_keyed = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(n):
                limits.try_acquire(req).release()
            sync_ratios.append(t_keyed / (time.perf_counter() - t))
        ratios = [k / p for k, p in zip(keyed_us, plain_us, strict=True)]
        print(
            f"  {case:22} shared memory {used / n_keys:.0f} bytes/key "
            f"(limit 1024), first use {fill * 1e6:.1f} us/key"
        )
        print(
            f"  {'':22} async acquire keyed {Summary.of(keyed_us).fmt(unit=' us')}  "
            f"plain {Summary.of(plain_us).fmt(unit=' us')}  "
            f"ratio {Summary.of(ratios).fmt(unit='x')} (target <= 3x)"
        )
        print(f"  {'':22} try_acquire+release ratio {Summary.of(sync_ratios).fmt(unit='x')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keyed", action="store_true", help="only the keyed table")
    parser.add_argument("--keys", type=int, default=100_000, help="live keys of the keyed table")
    args = parser.parse_args()
    n, repeats, seconds, rounds = (5000, 3, 1.0, 100) if args.quick else (20000, 7, 2.0, 500)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        keyed(d, args.keys, n, repeats)
        if args.keyed:
            return
        uncontended(d, n, repeats)
        throughput(d, seconds, max(1, repeats // 2))
        wake_latency(d, rounds)
        idle_cpu(d, 2.0)


if __name__ == "__main__":
    main()
