"""Redis backend: throughput as a ratio to a raw redis-py INCR loop, and the script's server time.

One round trip per uncontended acquisition is the design; the baseline is the cheapest possible
round trip (``INCR``) through the same client library, measured in the same repeat, from one task
and from ``--tasks`` concurrent tasks, and from 4 processes of ``--tasks`` tasks each on one set.
The script's own time in Redis is read from ``INFO commandstats`` (``usec_per_call`` summed over
the script calls of the acquisitions, per acquisition), beside ``INCR``'s in the same run, and the
memory of a KeyedLimitSet's client key from ``MEMORY USAGE``. Every figure is printed beside its
target (issue #14). The peers that can use Redis (limits, throttled-py; the ``bench`` extra) run
against the same server in the same run. A ``redis-server`` is started on a free loopback port
unless ``--url`` names one.

    .venv/bin/python -m benchmarks.redis --n 5000 --tasks 50
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiolimits import CallLimit, KeyedLimitSet, LimitSet, RateLimit, ResourceLimit
from aiolimits._limits import Limit

from ._common import BIG, Summary

Op = Callable[[], Awaitable[object]]

#: name of a figure -> (target, "min" when the figure must reach it, "max" when stay below it)
TARGETS: dict[str, tuple[float, str]] = {
    "aiolimits RedisBackend, 1 task": (0.85, "min"),
    "aiolimits RedisBackend, {tasks} tasks": (1.2, "min"),
    "aiolimits KeyedLimitSet, 1,000 keys, {tasks} tasks": (0.8, "min"),
    "Redis µs per acquisition, TokenBucket": (6.0, "max"),
    "Redis µs per acquisition, GCRA": (6.0, "max"),
    "Redis µs per acquisition, Call + Rate + Resource": (12.0, "max"),
    "bytes per client key of a KeyedLimitSet (one limit)": (200.0, "max"),
}

#: The sets whose server time is measured, and the request each acquisition makes: every
#: algorithm family alone (the targets are for the buckets), and the mix of issue #14. The window
#: algorithms' windows are short so that their logs stay as small as an uncontended caller's.
SETS: dict[str, tuple[Sequence[Limit], dict[str, float]]] = {
    "TokenBucket": ([RateLimit("tokens", 1, BIG)], {"tokens": 1}),
    "GCRA": ([RateLimit("tokens", 1, BIG, "gcra")], {"tokens": 1}),
    "LeakyBucket": ([RateLimit("tokens", 1, BIG, "leaky_bucket")], {"tokens": 1}),
    "SlidingWindow": ([RateLimit("tokens", 1e-3, BIG, "sliding_window")], {"tokens": 1}),
    "FixedWindow": ([RateLimit("tokens", 1e-3, BIG, "fixed_window")], {"tokens": 1}),
    "ResourceLimit (acquire and release)": ([ResourceLimit("r", 10)], {}),
    "Call + Rate + Resource": (
        [CallLimit(1, BIG), RateLimit("tokens", 1, BIG), ResourceLimit("r", 10)],
        {"tokens": 1},
    ),
}


#: The function whose time is FCALL's own (Redis 7).
FLOOR = "aiolimits_bench_floor"


def _start_server() -> tuple[subprocess.Popen[str], str]:
    if shutil.which("redis-server") is None:
        raise SystemExit("no redis-server on PATH: install it or pass --url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    proc = subprocess.Popen(
        [*args, "--appendonly", "no"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            break
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    return proc, f"redis://127.0.0.1:{port}/0"


async def _rate(op: Op, n: int, tasks: int) -> float:
    """Operations per second: ``tasks`` tasks doing ``n // tasks`` operations each."""
    each = n // tasks

    async def worker() -> None:
        for _ in range(each):
            await op()

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return each * tasks / (time.perf_counter() - t)


def _keyed_name() -> str:
    return f"bench-{uuid.uuid4().hex}"


async def _ops(url: str) -> dict[str, Op]:
    import redis.asyncio

    from aiolimits.redis import RedisBackend

    client = redis.asyncio.Redis.from_url(url)
    counter = f"bench:{uuid.uuid4().hex}"

    async def incr() -> None:
        await client.incr(counter)

    limits = LimitSet([RateLimit("tokens", 1, BIG)], backend=RedisBackend(url), name="bench")
    request = {"tokens": 1}

    async def ours() -> None:
        async with limits.acquire(request):
            pass

    async def ours_try() -> None:
        with limits.try_acquire(request):
            pass

    # A keyed set: each acquisition on one of 1,000 client keys, at random (each key its own
    # hash, its own script call).
    keyed = KeyedLimitSet(
        [RateLimit("tokens", 1, BIG)], backend=RedisBackend(url), name=_keyed_name()
    )
    clients = [f"client-{i}" for i in range(1000)]
    pick = random.Random(1).choice

    async def ours_keyed() -> None:
        async with keyed.acquire(pick(clients), request):
            pass

    ops: dict[str, Op] = {
        "redis-py INCR (baseline)": incr,
        "aiolimits RedisBackend": ours,
        "aiolimits try_acquire (blocks the loop)": ours_try,
        "aiolimits KeyedLimitSet, 1,000 keys": ours_keyed,
    }
    try:
        from limits import parse
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import FixedWindowRateLimiter

        hit = FixedWindowRateLimiter(RedisStorage(f"async+{url}", implementation="redispy")).hit
        item = parse(f"{int(BIG)}/second")

        async def limits_op() -> None:
            await hit(item, "bench")

        ops["limits FixedWindow hit (redispy)"] = limits_op
    except ImportError:
        pass
    try:
        from throttled.asyncio import RedisStore, Throttled, per_sec

        th = Throttled(key="bench", quota=per_sec(10**12), store=RedisStore(server=url))

        async def throttled_op() -> None:
            await th.limit("bench")

        ops["throttled-py Throttled.limit (aio)"] = throttled_op
    except ImportError:
        pass
    return ops


async def _suite(
    url: str, n: int, tasks: int, repeats: int, keyed_only: bool = False
) -> dict[str, list[float]]:
    ops = await _ops(url)
    ratios: dict[str, list[float]] = {}
    names = [name for name in list(ops)[1:] if not keyed_only or name.startswith("aiolimits Keyed")]
    for concurrency in (tasks,) if keyed_only else (1, tasks):
        for _ in range(repeats):
            base = await _rate(ops["redis-py INCR (baseline)"], n, concurrency)
            random.shuffle(names)
            for name in names:
                key = f"{name}, {concurrency} task{'s' if concurrency > 1 else ''}"
                ratios.setdefault(key, []).append(await _rate(ops[name], n, concurrency) / base)
    return ratios


def _threads(url: str, n: int, repeats: int) -> list[float]:
    import redis

    from aiolimits.redis import RedisBackend

    client = redis.Redis.from_url(url)
    limits = LimitSet([RateLimit("tokens", 1, BIG)], backend=RedisBackend(url), name="bench-t")
    ratios = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            client.incr("bench:sync")
        base = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            with limits.acquire_sync({"tokens": 1}):
                pass
        ratios.append(base / (time.perf_counter() - t))
    return ratios


# -- the script's time in Redis, and the memory of a keyed set's client key ----------------------


def _script_usec(stats: dict[str, Any]) -> tuple[float, int]:
    """Total µs and calls of the script (as a function or, on Redis < 7, as a script)."""
    usec, calls = 0.0, 0
    for name in ("cmdstat_fcall", "cmdstat_evalsha", "cmdstat_eval"):
        if name in stats:
            usec += stats[name]["usec"]
            calls += stats[name]["calls"]
    return usec, calls


async def _server_time(url: str, n: int, repeats: int) -> dict[str, list[float]]:
    """Redis µs per uncontended acquisition (from one task) of each of SETS, and of one INCR."""
    import redis
    import redis.asyncio

    from aiolimits.redis import RedisBackend

    admin = redis.Redis.from_url(url)
    admin.function_load(
        f"#!lua name={FLOOR}\nredis.register_function('{FLOOR}', function() return 1 end)",
        replace=True,
    )
    client = redis.asyncio.Redis.from_url(url)
    sets = {
        label: (
            LimitSet(limits, backend=RedisBackend(url), name=f"bench-cpu-{uuid.uuid4().hex}"),
            request,
        )
        for label, (limits, request) in SETS.items()
    }
    out: dict[str, list[float]] = {}
    for _ in range(repeats):
        for label, (limits, request) in sets.items():
            async with limits.acquire(request):  # declared, script loaded
                pass
            admin.config_resetstat()
            for _ in range(n):
                async with limits.acquire(request):
                    pass
            usec, calls = _script_usec(admin.info("commandstats"))
            out.setdefault(f"Redis µs per acquisition, {label}", []).append(usec / n)
            out.setdefault(f"  script calls per acquisition, {label}", []).append(calls / n)
            out.setdefault(f"  as a multiple of INCR's, {label}", []).append(0.0)
        # The floor of any script: a function that does nothing, called with as many arguments
        # as an acquisition of one limit (what FCALL itself costs on this server).
        admin.config_resetstat()
        for _ in range(n):
            await client.fcall(FLOOR, 1, "{bench:floor}", *["x"] * 10)
        usec, calls = _script_usec(admin.info("commandstats"))
        out.setdefault("Redis µs per call of an empty function (FCALL's floor)", []).append(
            usec / calls
        )
        admin.config_resetstat()
        for _ in range(n):
            await client.incr("bench:cpu")
        stats: Any = admin.info("commandstats")
        incr = stats["cmdstat_incrby"]["usec"] / n
        out.setdefault("Redis µs per INCR (INCRBY, baseline)", []).append(incr)
        # Each also as a multiple of INCR's in the same run: a loaded machine stretches both.
        for label in sets:
            multiples = out[f"  as a multiple of INCR's, {label}"]
            multiples[-1] = out[f"Redis µs per acquisition, {label}"][-1] / incr
    await client.aclose()
    admin.close()
    return out


async def _keyed_memory(url: str) -> float:
    """The mean ``MEMORY USAGE`` of a client key's hash of a KeyedLimitSet of one RateLimit."""
    import redis

    from aiolimits.redis import RedisBackend

    name = f"m{uuid.uuid4().hex[:7]}"  # a set name of 8 characters, client keys of 8-10
    keyed = KeyedLimitSet([RateLimit("tokens", 3600, 10)], backend=RedisBackend(url), name=name)
    for i in range(200):
        async with keyed.acquire(f"client-{i}", {"tokens": 1}):
            pass
    admin = redis.Redis.from_url(url)
    sizes = [
        admin.memory_usage(key) or 0
        for key in admin.scan_iter(match=f"*{name}:client-*", count=1000)
    ]
    admin.close()
    if len(sizes) != 200:
        raise SystemExit(f"expected 200 client hashes of {name}, found {len(sizes)}")
    return sum(sizes) / len(sizes)


# -- 4 processes on one set ------------------------------------------------------------------------


def _process(job: tuple[str, str, str, int, int], barrier: Any, results: Any) -> None:
    """One process of the multi-process row, ``job`` = (url, kind, set name, n, tasks):
    ``tasks`` tasks doing ``n // tasks`` operations (``"incr"``, or acquisitions of the set),
    started with the other processes (``barrier``); puts (start, end, operations) on ``results``."""
    url, kind, name, n, tasks = job

    async def main() -> None:
        import redis.asyncio

        from aiolimits.redis import RedisBackend

        if kind == "incr":
            client = redis.asyncio.Redis.from_url(url)

            async def op() -> None:
                await client.incr(f"bench:{name}")

        else:
            limits = LimitSet([RateLimit("tokens", 1, BIG)], backend=RedisBackend(url), name=name)

            async def op() -> None:
                async with limits.acquire({"tokens": 1}):
                    pass

        await _rate(op, 200, tasks)  # warmed up: connected, declared
        await asyncio.to_thread(barrier.wait)
        start = time.monotonic()
        await _rate(op, n, tasks)
        results.put((start, time.monotonic(), (n // tasks) * tasks))

    asyncio.run(main())


def _processes(url: str, kind: str, n: int, tasks: int, procs: int) -> float:
    """Aggregate operations per second of ``procs`` processes (``tasks`` tasks each)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    name = f"bench-procs-{uuid.uuid4().hex}"
    workers = [
        ctx.Process(target=_process, args=((url, kind, name, n, tasks), barrier, results))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    spans: list[tuple[float, float, int]] = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    total = sum(done for _, _, done in spans)
    return total / (max(end for _, end, _ in spans) - min(start for start, _, _ in spans))


def _multi(url: str, n: int, tasks: int, repeats: int, procs: int) -> list[float]:
    ratios = []
    for _ in range(repeats):
        base = _processes(url, "incr", n, tasks, procs)
        ratios.append(_processes(url, "ours", n, tasks, procs) / base)
    return ratios


# -- report ----------------------------------------------------------------------------------------


def _line(name: str, summary: Summary, unit: str, spec: str, tasks: int) -> str:
    text = f"  {name:58} {summary.fmt(spec, unit=unit)}"
    for pattern, (target, sense) in TARGETS.items():
        if pattern.format(tasks=tasks) == name:
            met = summary.median >= target if sense == "min" else summary.median <= target
            bound = "≥" if sense == "min" else "≤"
            text += f"   target {bound} {target:g}{unit}: {'met' if met else 'MISSED'}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="operations per measurement")
    parser.add_argument("--tasks", type=int, default=50, help="concurrent tasks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=4, help="processes of the multi row")
    parser.add_argument("--url", help="an existing Redis (default: start one)")
    parser.add_argument(
        "--keyed-only",
        action="store_true",
        help="only the KeyedLimitSet row at --tasks tasks (and its INCR baseline)",
    )
    args = parser.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = _start_server()
    try:
        # Beside every figure: the machine's load, which stretches everything measured.
        print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        ratios = asyncio.run(_suite(url, args.n, args.tasks, args.repeats, args.keyed_only))
        print(f"ops/s as a ratio to redis-py INCR at the same concurrency (n={args.n}):")
        for name, values in sorted(ratios.items()):
            print(_line(name, Summary.of(values), "x", ".2f", args.tasks))
        if args.keyed_only:
            print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
            return
        thread = Summary.of(_threads(url, args.n, args.repeats))
        print(_line("aiolimits acquire_sync, 1 thread (vs sync INCR)", thread, "x", ".2f", 0))
        multi = Summary.of(_multi(url, args.n, args.tasks, args.repeats, args.processes))
        print(
            _line(
                f"aiolimits RedisBackend, {args.processes} processes x {args.tasks} tasks, one set",
                multi,
                "x",
                ".2f",
                args.tasks,
            )
        )
        print("Redis server time (INFO commandstats, from one task):")
        for name, values in asyncio.run(_server_time(url, min(args.n, 3000), args.repeats)).items():
            print(_line(name, Summary.of(values), "", ".2f", args.tasks))
        print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        memory = asyncio.run(_keyed_memory(url))
        print("Redis memory (MEMORY USAGE):")
        print(
            _line(
                "bytes per client key of a KeyedLimitSet (one limit)",
                Summary.of([memory]),
                "",
                ".0f",
                args.tasks,
            )
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
