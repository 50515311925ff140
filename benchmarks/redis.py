"""Redis backend throughput, as a ratio to a raw redis-py INCR loop on the same server.

One round trip per uncontended acquisition is the design; the baseline is the cheapest possible
round trip (``INCR``) through the same client library, measured in the same repeat, from one task
and from ``--tasks`` concurrent tasks. The peers that can use Redis (limits, throttled-py; the
``bench`` extra) run against the same server in the same run. A ``redis-server`` is started on a
free loopback port unless ``--url`` names one.

    .venv/bin/python -m benchmarks.redis --n 5000 --tasks 50
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable

from aiolimits import KeyedLimitSet, LimitSet, RateLimit

from ._common import BIG, Summary

Op = Callable[[], Awaitable[object]]


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
        [RateLimit("tokens", 1, BIG)], backend=RedisBackend(url), name=f"bench-{uuid.uuid4().hex}"
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


async def _suite(url: str, n: int, tasks: int, repeats: int) -> dict[str, list[float]]:
    ops = await _ops(url)
    ratios: dict[str, list[float]] = {}
    names = list(ops)[1:]
    for concurrency in (1, tasks):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="operations per measurement")
    parser.add_argument("--tasks", type=int, default=50, help="concurrent tasks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--url", help="an existing Redis (default: start one)")
    args = parser.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = _start_server()
    try:
        ratios = asyncio.run(_suite(url, args.n, args.tasks, args.repeats))
        print(f"ops/s as a ratio to redis-py INCR at the same concurrency (n={args.n}):")
        for name, values in sorted(ratios.items()):
            print(f"  {name:52} {Summary.of(values).fmt(unit='x')}")
        thread = Summary.of(_threads(url, args.n, args.repeats))
        print(f"  {'aiolimits acquire_sync, 1 thread (vs sync INCR)':52} {thread.fmt(unit='x')}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
