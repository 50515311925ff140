"""KeyedLimitSet at scale: memory per live key and acquisition cost with many distinct keys.

``python -m benchmarks.keyed [--keys 1000000]`` fills a KeyedLimitSet with that many distinct
client keys (IPv4-like strings, made beforehand), all kept live by a long window, then measures:

* memory per key: the growth of the process's resident set while the keys are created, and
  the bytes tracemalloc attributes to a sample of 100,000 keys; neither counts the key strings;
* time per ``async with keyed.acquire(key, ...)`` cycling over every key, as a ratio to ``async
  with limits.acquire(...)`` on a plain LimitSet of the same limits, in the same repeat
  (interleaved, median and min-max), and the same for ``try_acquire`` + ``release``.

Two configurations: one RateLimit, and CallLimit + RateLimit.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
import tracemalloc
from collections.abc import Sequence

import anyio
import attrs

from aiolimits import CallLimit, KeyedLimitSet, LimitSet, RateLimit
from aiolimits._limits import Limit

from ._common import Summary

# A unit comes back only after 1000 s, so no key recovers (and is dropped) during the run, and
# the capacity is never reached.
WINDOW, CAPACITY = 1e9, 1e6
CONFIGS: dict[str, tuple[tuple[Limit, ...], dict[str, float]]] = {
    "1 RateLimit": ((RateLimit("requests", WINDOW, CAPACITY),), {"requests": 1}),
    "CallLimit + RateLimit": (
        (CallLimit(WINDOW, CAPACITY), RateLimit("tokens", WINDOW, CAPACITY)),
        {"tokens": 1},
    ),
}


@attrs.frozen
class KeyedResult:
    config: str
    keys: int
    rss_bytes_per_key: float
    traced_bytes_per_key: float
    key_string_bytes: float
    async_ratio: Summary
    sync_ratio: Summary
    plain_async_ns: float


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def client_keys(n: int) -> list[str]:
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:{i >> 24}" for i in range(n)]


def _traced_per_key(limits: Sequence[Limit], requested: dict[str, float], n: int) -> float:
    keyed = KeyedLimitSet(limits, max_keys=n + 1)
    keys = client_keys(n)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for key in keys:
        keyed.try_acquire(key, requested).release()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(keyed) == n
    return (after - before) / n


async def _time_async(
    keyed: KeyedLimitSet, plain: LimitSet, keys: list[str], req: dict[str, float], n: int
) -> tuple[float, float]:
    t = time.perf_counter()
    for key in keys[:n]:
        async with keyed.acquire(key, req):
            pass
    t_keyed = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n):
        async with plain.acquire(req):
            pass
    return t_keyed, time.perf_counter() - t


def run(config: str, n_keys: int, n_timed: int, repeats: int) -> KeyedResult:
    limits, req = CONFIGS[config]
    keys = client_keys(n_keys)
    key_bytes = sum(sys.getsizeof(k) for k in keys[:1000]) / 1000
    gc.collect()
    rss0 = _rss()
    keyed = KeyedLimitSet(limits, max_keys=n_keys + 1)
    for key in keys:
        keyed.try_acquire(key, req).release()
    gc.collect()
    rss_per_key = (_rss() - rss0) / n_keys
    assert len(keyed) == n_keys, "keys were dropped: the window is too short"
    plain = LimitSet(limits)
    rng = random.Random(3)
    timed = rng.sample(keys, n_timed)
    async_ratios: list[float] = []
    sync_ratios: list[float] = []
    plain_ns: list[float] = []
    for _ in range(repeats):
        t_keyed, t_plain = anyio.run(_time_async, keyed, plain, timed, req, n_timed)
        async_ratios.append(t_keyed / t_plain)
        plain_ns.append(t_plain / n_timed * 1e9)
        t = time.perf_counter()
        for key in timed:
            keyed.try_acquire(key, req).release()
        t_keyed = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n_timed):
            plain.try_acquire(req).release()
        sync_ratios.append(t_keyed / (time.perf_counter() - t))
    del keyed
    gc.collect()
    traced = _traced_per_key(limits, req, min(n_keys, 100_000))
    return KeyedResult(
        config,
        n_keys,
        rss_per_key,
        traced,
        key_bytes,
        Summary.of(async_ratios),
        Summary.of(sync_ratios),
        Summary.of(plain_ns).median,
    )


def run_all(n_keys: int, n_timed: int, repeats: int) -> list[KeyedResult]:
    return [run(config, n_keys, n_timed, repeats) for config in CONFIGS]


def table(results: Sequence[KeyedResult]) -> str:
    n = results[0].keys
    out = [
        "## Keyed limits: many distinct clients\n",
        f"A KeyedLimitSet holding {n:,} live keys (a unit comes back only after 1000 s, so "
        "none recovers). Memory per key: resident-set growth while creating them (RSS) and "
        "tracemalloc over 100,000 keys; neither includes the key strings (about "
        f"{results[0].key_string_bytes:.0f} bytes each here). Time: `async with "
        "keyed.acquire(key, ...)` over random keys of those ÷ `async with limits.acquire(...)` "
        "on a plain LimitSet of the same limits, and `try_acquire` + `release` likewise; median "
        "(min-max) of interleaved repeats.\n",
        "| limits | bytes/key (RSS) | bytes/key (traced) | async acquire ÷ LimitSet "
        "| try_acquire ÷ LimitSet | LimitSet async acquire |",
        "|---|---|---|---|---|---|",
    ]
    out.extend(
        f"| {r.config} | {r.rss_bytes_per_key:.0f} | {r.traced_bytes_per_key:.0f} "
        f"| {r.async_ratio.fmt(unit='x')} | {r.sync_ratio.fmt(unit='x')} "
        f"| {r.plain_async_ns:.0f} ns |"
        for r in results
    )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.keyed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--timed", type=int, default=100_000, help="acquisitions per timing")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(table(run_all(args.keys, args.timed, args.repeats)))


if __name__ == "__main__":
    main()
