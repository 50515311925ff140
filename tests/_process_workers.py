"""Code run in spawned child processes by ``test_process_backend.py``.

Each child attaches to the shared state by backend and name, exactly as an unrelated process
would (a LimitSet is also sent pickled, to show that it re-attaches).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from typing import Any

import anyio

from aiolimits import CallLimit, LimitSet, ProcessBackend, RateLimit, ResourceLimit

HAMMER_LIMITS = (
    CallLimit(window_seconds=3600, capacity=240),
    RateLimit("tokens", window_seconds=3600, capacity=500),
    RateLimit("log", window_seconds=3600, capacity=180, algorithm="sliding_window"),
    RateLimit("gcra", window_seconds=3600, capacity=400, algorithm="gcra"),
    RateLimit("fixed", window_seconds=7200, capacity=300, algorithm="fixed_window"),
    ResourceLimit("conn", capacity=3),
)


def hammer(limits: LimitSet, inside: Any, peak: Any, threads: int, tasks: int) -> list[Any]:
    """Acquire from ``threads`` threads and ``tasks`` asyncio tasks until the limits run dry
    (an acquisition times out). Returns one ``(tokens used, log, gcra, fixed)`` per grant.
    ``inside``/``peak`` are shared counters of holders, for the resource limit."""
    grants: list[Any] = []
    lock = threading.Lock()

    def hold() -> None:
        with inside.get_lock():
            inside.value += 1
            if inside.value > peak.value:
                peak.value = inside.value

    def unhold() -> None:
        with inside.get_lock():
            inside.value -= 1

    def work(i: int) -> tuple[dict[str, int], dict[str, int]]:
        n = 1 + (i * 7 + os.getpid()) % 5
        requested = {"tokens": n, "log": 1, "gcra": 1 + i % 2, "fixed": 1}
        usage = {"tokens": max(0, n - i % 3)}  # a refund now and then
        return requested, usage

    def thread_main(t: int) -> None:
        for i in itertools.count(t):
            requested, usage = work(i)
            try:
                with limits.acquire_sync(requested, timeout=2.0) as acq:
                    hold()
                    time.sleep(0.0005)
                    acq.update(usage)
                    unhold()
            except TimeoutError:
                return
            with lock:
                grants.append((usage["tokens"], 1, requested["gcra"], 1))

    async def task_main(t: int) -> None:
        for i in itertools.count(100 + t):
            requested, usage = work(i)
            try:
                async with limits.acquire(requested, timeout=2.0) as acq:
                    hold()
                    await asyncio.sleep(0.0005)
                    acq.update(usage)
                    unhold()
            except TimeoutError:
                return
            with lock:
                grants.append((usage["tokens"], 1, requested["gcra"], 1))

    async def all_tasks() -> None:
        await asyncio.gather(*(task_main(t) for t in range(tasks)))

    workers = [threading.Thread(target=thread_main, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    asyncio.run(all_tasks())
    for w in workers:
        w.join()
    return grants


def hammer_child(limits: LimitSet, inside: Any, peak: Any, out: Any, go: Any) -> None:
    out.put("ready")
    go.wait()
    out.put(hammer(limits, inside, peak, threads=2, tasks=3))


def hold_slot_forever(location: str, name: str, ready: Any) -> None:
    """Take the only slot of ``conn`` and never give it back (the parent kills us)."""
    limits = LimitSet(
        [ResourceLimit("conn", capacity=1)], backend=ProcessBackend(location), name=name
    )
    acq = limits.try_acquire()
    assert acq.successful
    ready.set()
    time.sleep(3600)


def hold_lock_forever(location: str, name: str, ready: Any) -> None:
    """Enter the set's lock (the state file's flock) and never leave (the parent kills us)."""
    limits = LimitSet(
        [ResourceLimit("conn", capacity=1)], backend=ProcessBackend(location), name=name
    )
    sched = limits._scheduler
    with sched.lock:
        ready.set()
        time.sleep(3600)


def queue_then_report(limits: LimitSet, events: Any, release: Any) -> None:
    """Wait for a slot, report the grant, hold it until told."""
    with limits.acquire_sync(timeout=60):
        events.put("child")
        release.wait(60)


def attach_with(location: str, name: str, limits: Any, out: Any) -> None:
    try:
        LimitSet(limits, backend=ProcessBackend(location), name=name)
    except ValueError as exc:
        out.put(str(exc))
    else:
        out.put(None)


def queue_for_two(limits: LimitSet, events: Any) -> None:
    """Queue a request that the rate limit admits only in an hour (the parent kills us)."""
    with limits.acquire_sync({"r": 2}, timeout=3600):
        events.put("child")


def ping_pong(limits: LimitSet, rounds: int, out: Any) -> None:
    """Take the only slot ``rounds`` times: from a thread, an asyncio task, a trio task in turn."""

    async def take() -> None:
        async with limits.acquire(timeout=60):
            await anyio.sleep(0.0002)

    for i in range(rounds):
        if i % 3 == 1:
            anyio.run(take, backend="asyncio")
        elif i % 3 == 2:
            anyio.run(take, backend="trio")
        else:
            with limits.acquire_sync(timeout=60):
                time.sleep(0.0002)
    out.put(rounds)


def wait_for_tokens(limits: LimitSet, events: Any) -> None:
    """Wait (no timeout) for 1 token of a bucket that refills in an hour; report the grant."""
    with limits.acquire_sync({"r": 1}):
        events.put("granted")


def wait_then_time_out(limits: LimitSet, events: Any) -> None:
    """Queue for a token and a slot (the slot stays taken); time out after 1 s; report it."""
    try:
        with limits.acquire_sync({"r": 1}, timeout=1.0):
            events.put("granted")
    except TimeoutError:
        events.put("timed out")


def race_to_create(location: str, name: str, go: Any, done: Any, out: Any) -> None:
    """Attach to a state that does not exist yet, at the same moment as others; hold the only
    slot if it can, until ``done``."""
    go.wait(60)
    limits = LimitSet([ResourceLimit("conn", 1)], backend=ProcessBackend(location), name=name)
    held = limits.try_acquire()
    out.put(held.successful)
    done.wait(60)


def report_limits_after(limits: LimitSet, go: Any, out: Any) -> None:
    """Once ``go`` is set, report ``limits.limits`` and the statistics of ``"r"``: what another
    process's change of a limit left in the shared state."""
    go.wait(60)
    out.put((limits.limits, limits.get_stats()["limits"]["r"]))


def keyed_report_after(keyed: Any, go: Any, out: Any) -> None:
    """Once ``go`` is set, report the statistics of limit ``"r"`` of keys ``"old"`` (used by
    the parent before) and ``"new"`` (never used), then ``keyed.limits``."""
    go.wait(60)
    stats = {key: keyed.get_stats(key)["limits"]["r"] for key in ("old", "new")}
    out.put((stats, keyed.limits))


def keyed_wait_for_token(keyed: Any, events: Any) -> None:
    """Wait (no timeout) for 1 token of key ``"a"``, whose bucket refills in an hour."""
    with keyed.acquire_sync("a", {"r": 1}):
        events.put("granted")
