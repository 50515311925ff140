"""Uncontended acquire+release cost, as a ratio to the standard semaphore of each runtime.

Each measurement is repeated and the median, min and max ratios are printed. Absolute times on a
shared machine drift; ratios measured in the same run, interleaved, drift much less.

``--builds both`` measures the compiled build (the modules ``hatch_build.py`` compiles) and the
pure-Python one in the same run: one child process per build and repeat, in a shuffled order,
the pure one importing a copy of the package without its compiled files. ``--callgrind`` adds
the instructions per acquisition, counted by valgrind's callgrind (the difference between two
runs of different lengths, so that start-up cancels out), beside the times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

import aiolimits
from aiolimits import LimitSet

from ._common import Summary, one_rate, three

#: The targets of the compiled core (issue 19), as the largest ratio to the runtime's semaphore.
TARGETS = {
    ("asyncio", "1 RateLimit"): 1.5,
    ("asyncio", "Call+Rate+Resource"): 2.5,
    ("trio", "1 RateLimit"): 1.0,
}

ROOT = Path(__file__).resolve().parent.parent


async def _time_async(body: Callable[[], Awaitable[None]]) -> float:
    t = time.perf_counter()
    await body()
    return time.perf_counter() - t


def _aiolimiter() -> object | None:
    try:
        from aiolimiter import AsyncLimiter
    except ImportError:  # the bench extra is not installed
        return None
    return AsyncLimiter(1e12, 1)


async def _async_suite(
    n: int, repeats: int, semaphore: Callable[[], object], peers: bool
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
        limiter = _aiolimiter() if peers else None
        if limiter is not None:

            async def peer(limiter: object = limiter) -> None:
                await _loop(limiter, n)

            ratios.setdefault("aiolimiter", []).append(await _time_async(peer) / base_t)
    return ratios


async def _loop(cm: object, n: int) -> None:
    for _ in range(n):
        async with cm:  # type: ignore[attr-defined]
            pass


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


def _asyncio_sem() -> object:
    return asyncio.Semaphore(10)


def _trio_sem() -> object:
    import trio

    return trio.Semaphore(10)


RUNTIMES = ("asyncio", "uvloop", "trio", "threads")
BASELINES = {
    "asyncio": "asyncio.Semaphore",
    "uvloop": "asyncio.Semaphore",
    "trio": "trio.Semaphore",
    "threads": "threading.Semaphore",
}


def measure(n: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Every runtime's ratios, in this process (whichever build it imports)."""
    return {
        "asyncio": anyio.run(_async_suite, n, repeats, _asyncio_sem, True, backend="asyncio"),
        "uvloop": anyio.run(
            _async_suite,
            n,
            repeats,
            _asyncio_sem,
            True,
            backend="asyncio",
            backend_options={"use_uvloop": True},
        ),
        "trio": anyio.run(_async_suite, n, repeats, _trio_sem, False, backend="trio"),
        "threads": _sync_suite(n, repeats),
    }


def _target(runtime: str, name: str, values: list[float], peer: list[float] | None) -> str:
    limit = TARGETS.get((runtime, name))
    if limit is None:
        return ""
    median = Summary.of(values).median
    verdict = f"target <= {limit:g}x: {'met' if median <= limit else 'MISSED'}"
    if runtime == "asyncio" and name == "1 RateLimit" and peer:
        below = median < Summary.of(peer).median
        verdict += f"; below aiolimiter: {'met' if below else 'MISSED'}"
    return verdict


def _report(builds: dict[str, dict[str, dict[str, list[float]]]]) -> None:
    for runtime in RUNTIMES:
        names = list(next(iter(builds.values()))[runtime])
        for name in names:
            for build, results in builds.items():
                values = results[runtime][name]
                peer = results[runtime].get("aiolimiter")
                target = "" if name == "aiolimiter" else _target(runtime, name, values, peer)
                print(
                    f"{runtime:8} {name:20} {build:9} vs {BASELINES[runtime]:20} "
                    f"{Summary.of(values).fmt(unit='x'):24} {target}"
                )


# -- both builds in one run ----------------------------------------------------------------


def _pure_copy() -> Path:
    """A directory holding the package's sources without compiled files, and this package."""
    where = Path(tempfile.mkdtemp(prefix="aiolimits-pure-"))
    skip = shutil.ignore_patterns("*.so", "*.pyd", "__pycache__")
    shutil.copytree(ROOT / "aiolimits", where / "aiolimits", ignore=skip)
    shutil.copytree(ROOT / "benchmarks", where / "benchmarks", ignore=skip)
    return where


def _child(build: str, cwd: Path, args: list[str]) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.uncontended", *args, "--json"],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    answer: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    if answer["compiled"] != (build == "compiled"):
        raise SystemExit(f"the {build} child imported aiolimits.COMPILED={answer['compiled']}")
    return answer


def both_builds(n: int, repeats: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    if not aiolimits.COMPILED:
        raise SystemExit("--builds both needs the compiled build installed (pip install -e .)")
    pure = _pure_copy()
    builds: dict[str, dict[str, dict[str, list[float]]]] = {"compiled": {}, "pure": {}}
    try:
        for _ in range(repeats):
            order = ["compiled", "pure"]
            random.shuffle(order)
            for build in order:
                cwd = ROOT if build == "compiled" else pure
                answer = _child(build, cwd, ["--n", str(n), "--repeats", "1"])
                ratios = answer["ratios"]
                assert isinstance(ratios, dict)
                for runtime, named in ratios.items():
                    for name, values in named.items():
                        builds[build].setdefault(runtime, {}).setdefault(name, []).extend(values)
    finally:
        shutil.rmtree(pure, ignore_errors=True)
    return builds


# -- instructions (callgrind) --------------------------------------------------------------

# One process per row. Only the loop is counted: callgrind collects while inside the C function
# of ``sorted``, which drives the loop's coroutine (it never suspends: nothing waits), inside a
# running event loop; the start-up and the imports are not counted.
_CALLGRIND_BODY = """
import asyncio, sys
n, which = int(sys.argv[1]), sys.argv[2]
if which == "asyncio.Semaphore":
    cm = asyncio.Semaphore(10)
elif which == "aiolimiter":
    from aiolimiter import AsyncLimiter
    cm = AsyncLimiter(1e12, 1)
else:
    from aiolimits import CallLimit, LimitSet, RateLimit, ResourceLimit
    limits = LimitSet([RateLimit("tokens", 1, 1e12)]) if which == "1 RateLimit" else LimitSet(
        [CallLimit(1, 1e12), RateLimit("tokens", 1, 1e12), ResourceLimit("r", 10)]
    )
    req = {"tokens": 1}
async def body(n):
    if which in ("asyncio.Semaphore", "aiolimiter"):
        for _ in range(n):
            async with cm:
                pass
    else:
        for _ in range(n):
            async with limits.acquire(req):
                pass
def drive(coro):
    try:
        coro.send(None)
    except StopIteration:
        return 0
    raise RuntimeError("the loop waited")
async def main():
    drive(body(100))  # warm up
    sorted([body(n)], key=drive)
asyncio.run(main())
"""


def _instructions(cwd: Path, n: int, which: str) -> int:
    run = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            "--collect-atstart=no",
            "--toggle-collect=builtin_sorted",
            sys.executable,
            "-c",
            _CALLGRIND_BODY,
            str(n),
            which,
        ],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(cwd)),
        check=True,
        capture_output=True,
        text=True,
    )
    found = re.search(r"Collected : (\d+)", run.stderr)
    if found is None:
        raise SystemExit(f"callgrind printed no count:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def callgrind(n: int) -> None:
    """Instructions per acquire+release on asyncio, counted by callgrind over ``n`` of them."""
    if shutil.which("valgrind") is None:
        print("callgrind: valgrind is not installed (apt-get install valgrind)")
        return
    pure = _pure_copy()
    try:
        rows = [("asyncio.Semaphore", "-"), ("aiolimiter", "-")]
        rows += [
            (name, build)
            for name in ("1 RateLimit", "Call+Rate+Resource")
            for build in ("compiled", "pure")
        ]
        print(f"\ninstructions per acquire+release (callgrind, asyncio, n={n}):")
        base = 0.0
        for which, build in rows:
            cwd = pure if build == "pure" else ROOT
            per = _instructions(cwd, n, which) / n
            base = base or per  # the first row is asyncio.Semaphore
            print(
                f"  {which:20} {build:9} {per:10.0f}  {per / base:5.2f}x asyncio.Semaphore",
                flush=True,
            )
    finally:
        shutil.rmtree(pure, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="acquisitions per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--builds",
        choices=("current", "both"),
        default="current",
        help="the build this Python imports, or the compiled and pure ones side by side",
    )
    parser.add_argument(
        "--callgrind", action="store_true", help="also count instructions with callgrind"
    )
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:
        ratios = measure(args.n, args.repeats)
        print(json.dumps({"compiled": aiolimits.COMPILED, "ratios": ratios}))
        return
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.builds == "both":
        builds = both_builds(args.n, args.repeats)
    else:
        build = "compiled" if aiolimits.COMPILED else "pure"
        builds = {build: measure(args.n, args.repeats)}
    _report(builds)
    if args.callgrind:
        callgrind(10_000)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
