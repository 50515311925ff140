"""``change_limit`` beyond one LimitSet (semantics §4): keyed sets, pools, threads.

The rules themselves are in the contract (``tests/contract/changes.py``, every backend) and in
the algorithm tables (``test_algorithms_changes.py``).
"""

from __future__ import annotations

import multiprocessing
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aiolimits import KeyedLimitSet, LimitPool, LimitSet, ProcessBackend, RateLimit, ResourceLimit
from aiolimits._backends._process_keyed import HISTORY
from aiolimits._limits import Limit
from aiolimits.testing import ManualClock

from . import _process_workers as workers

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "changing-limits.md"


def _keyed(limits: list[Limit], backend: str, tmp_path: Path, clock: Any = None) -> KeyedLimitSet:
    if backend == "memory":
        return KeyedLimitSet(limits, clock=clock or time.monotonic)
    return KeyedLimitSet(
        limits, clock=clock or time.monotonic, backend=ProcessBackend(tmp_path), name="keyed"
    )


_BACKENDS = pytest.mark.parametrize("backend", ["memory", "process"])


@_BACKENDS
def test_keyed_change_applies_to_every_client_key_held_and_new(
    backend: str, tmp_path: Path
) -> None:
    clock = ManualClock()
    keyed = _keyed([RateLimit("req", 10, 10), ResourceLimit("conn", 2)], backend, tmp_path, clock)
    assert keyed.try_acquire("alice", {"req": 6}).successful
    keyed.change_limit("req", capacity=4)
    assert keyed.limits[0] == RateLimit("req", 10, 4)
    alice = keyed.get_stats("alice")["limits"]["req"]
    assert (alice["capacity"], alice["available"]) == (4, -2)  # 6 in use of 4
    assert keyed.get_stats("bob")["limits"]["req"]["available"] == 4  # a new key: full, of 4
    assert keyed.try_acquire("bob", {"req": 4}).successful
    with pytest.raises(ValueError, match="capacity 4"):
        keyed.try_acquire("carol", {"req": 5})
    keyed.change_limit("conn", capacity=1)
    assert keyed.get_stats("alice")["limits"]["conn"] == {
        "kind": "resource",
        "capacity": 1,
        "available": 0,
        "in_use": 1,
        "waiting": 0,
    }
    clock.advance(5)  # alice's deficit refills at 4 per 10 s from the change
    assert keyed.get_stats("alice")["limits"]["req"]["available"] == 0
    keyed.change_limit("req", capacity=8, window_seconds=20)
    alice = keyed.get_stats("alice")["limits"]["req"]
    assert (alice["capacity"], alice["available"]) == (8, 4)  # the deficit of 4 kept


@_BACKENDS
def test_keyed_bad_change_changes_nothing(backend: str, tmp_path: Path) -> None:
    keyed = _keyed([RateLimit("req", 10, 10)], backend, tmp_path)
    with pytest.raises(ValueError, match="'alice'"):
        keyed.change_limit("alice", capacity=1)  # a client key is not a limit's key
    with pytest.raises(ValueError, match="window_seconds"):
        keyed.change_limit("req", window_seconds=0)
    with pytest.raises(TypeError, match="capacity"):
        keyed.change_limit("req", capacity="5")  # type: ignore[arg-type]
    assert keyed.limits == (RateLimit("req", 10, 10),)
    assert keyed.get_stats("alice")["limits"]["req"]["capacity"] == 10


@_BACKENDS
def test_keyed_shrinking_refuses_a_waiter_above_the_new_capacity(
    backend: str, tmp_path: Path
) -> None:
    keyed = _keyed([RateLimit("r", 3600, 4)], backend, tmp_path)
    assert keyed.try_acquire("a", {"r": 4}).successful
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            with keyed.acquire_sync("a", {"r": 3}):
                pass
        except ValueError as exc:
            failed.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    _until(lambda: keyed.get_stats("a")["waiting"] == 1)
    keyed.change_limit("r", capacity=2)
    thread.join(60)
    assert len(failed) == 1
    assert "capacity 2" in str(failed[0])


def test_keyed_process_key_catches_up_each_change_at_its_own_time(tmp_path: Path) -> None:
    # Two sets of one table (two "processes" on one clock) against a set in memory: a key last
    # written before two changes made by the other set decides as the memory set's key does.
    clock = ManualClock()
    declared = [RateLimit("r", 10, 10)]
    memory = KeyedLimitSet(declared, clock=clock)
    first, second = (
        KeyedLimitSet(declared, clock=clock, backend=ProcessBackend(tmp_path), name="twice")
        for _ in range(2)
    )
    assert memory.try_acquire("a", {"r": 10}).successful
    assert first.try_acquire("a", {"r": 10}).successful
    clock.advance(5)
    memory.change_limit("r", capacity=4)
    second.change_limit("r", capacity=4)  # "a" had 5 back: 1 missing of 4, refilled at 0.4/s
    clock.advance(5)
    memory.change_limit("r", window_seconds=20)
    second.change_limit("r", window_seconds=20)  # 3 missing now, refilled at 0.2/s
    clock.advance(2)
    expected = memory.get_stats("a")["limits"]["r"]
    assert 1.39 < expected["available"] < 1.41
    assert first.get_stats("a")["limits"]["r"] == expected
    assert second.get_stats("a")["limits"]["r"] == expected
    assert first.limits == second.limits == memory.limits == (RateLimit("r", 20, 4),)


def test_keyed_process_change_keeps_what_another_process_changed(tmp_path: Path) -> None:
    first, second = (
        KeyedLimitSet([RateLimit("r", 10, 10)], backend=ProcessBackend(tmp_path), name="both")
        for _ in range(2)
    )
    first.change_limit("r", window_seconds=20)
    second.change_limit("r", capacity=5)  # second had not seen the window change yet
    assert second.limits == (RateLimit("r", 20, 5),)
    assert first.get_stats("a")["limits"]["r"]["window_seconds"] == 20
    assert first.limits == (RateLimit("r", 20, 5),)


def test_keyed_process_key_behind_every_kept_change_catches_up_in_one_step(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    keyed = _keyed([RateLimit("r", 10, 10)], "process", tmp_path, clock)
    assert keyed.try_acquire("a", {"r": 6}).successful
    for i in range(HISTORY + 3):  # more changes than kept, all at one instant
        keyed.change_limit("r", capacity=4 if i % 2 == 0 else 10)
    keyed.change_limit("r", capacity=4)
    stats = keyed.get_stats("a")["limits"]["r"]
    assert (stats["capacity"], stats["available"]) == (4, -2)  # the deficit of 6 kept


def test_pool_member_change_is_its_own_and_requests_are_checked_against_it() -> None:
    clock = ManualClock()
    sets = [LimitSet([RateLimit("tokens", 60, 100)], clock=clock) for _ in range(2)]
    pool = LimitPool(sets, load_balancing="least_wait")
    assert pool.try_acquire({"tokens": 80}).successful
    pool.limit_sets[1].change_limit("tokens", capacity=50)
    assert sets[0].limits[0].capacity == 100
    # Valid for set 0, above set 1's capacity now: refused whichever set would be picked.
    with pytest.raises(ValueError, match="capacity 50"):
        pool.try_acquire({"tokens": 60})
    pool.limit_sets[1].change_limit("tokens", capacity=100)
    assert pool.try_acquire({"tokens": 60}).successful


def test_growing_wakes_a_waiting_thread() -> None:
    limits = LimitSet([RateLimit("tokens", 3600, 10)])  # nothing refills for minutes
    assert limits.try_acquire({"tokens": 10}).successful
    got = threading.Event()

    def wait() -> None:
        with limits.acquire_sync({"tokens": 5}):
            got.set()

    thread = threading.Thread(target=wait)
    thread.start()
    for _ in range(60_000):
        if limits.get_stats()["waiting"]:
            break
        threading.Event().wait(0.001)
    assert limits.get_stats()["waiting"] == 1
    limits.change_limit("tokens", capacity=20)
    thread.join(60)
    assert got.is_set()


# -- the process backend: a change in one process is the limit of every process ----------------

_spawn = multiprocessing.get_context("spawn")


def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(60_000):
        if predicate():
            return
        threading.Event().wait(0.001)
    raise AssertionError("not within 60 s")


def test_process_change_is_seen_by_another_process(tmp_path: Path) -> None:
    limits = LimitSet([RateLimit("r", 3600, 4)], backend=ProcessBackend(tmp_path), name="seen")
    assert limits.try_acquire({"r": 3}).successful
    go, out = _spawn.Event(), _spawn.Queue()
    proc = _spawn.Process(target=workers.report_limits_after, args=(limits, go, out), daemon=True)
    proc.start()
    limits.change_limit("r", capacity=2)
    go.set()
    seen, stats = out.get(timeout=60)
    proc.join(10)
    assert seen == (RateLimit("r", 3600, 2),)
    assert stats["capacity"] == 2
    assert -1 <= stats["available"] < -0.9  # 3 in use of 2 (refilled by a few seconds at most)


def test_process_growing_wakes_a_waiter_of_another_process(tmp_path: Path) -> None:
    limits = LimitSet([RateLimit("r", 3600, 1)], backend=ProcessBackend(tmp_path), name="grow")
    assert limits.try_acquire({"r": 1}).successful
    events = _spawn.Queue()
    proc = _spawn.Process(target=workers.wait_for_tokens, args=(limits, events), daemon=True)
    proc.start()
    _until(lambda: limits.get_stats()["waiting"] == 1)
    limits.change_limit("r", capacity=2)  # one token now: the waiter, due in an hour, is told
    assert events.get(timeout=60) == "granted"
    proc.join(10)
    assert limits.get_stats()["granted"] == 2


def test_keyed_process_change_is_obeyed_by_another_process(tmp_path: Path) -> None:
    keyed = _keyed([RateLimit("r", 3600, 4)], "process", tmp_path)
    assert keyed.try_acquire("old", {"r": 3}).successful
    go, out = _spawn.Event(), _spawn.Queue()
    proc = _spawn.Process(target=workers.keyed_report_after, args=(keyed, go, out), daemon=True)
    proc.start()
    keyed.change_limit("r", capacity=2)
    go.set()
    stats, seen = out.get(timeout=60)
    proc.join(10)
    assert seen == (RateLimit("r", 3600, 2),)
    assert stats["old"]["capacity"] == stats["new"]["capacity"] == 2
    assert -1 <= stats["old"]["available"] < -0.9  # 3 in use of 2
    assert stats["new"]["available"] == 2


def test_keyed_process_growing_wakes_a_waiter_of_another_process(tmp_path: Path) -> None:
    keyed = _keyed([RateLimit("r", 3600, 1)], "process", tmp_path)
    assert keyed.try_acquire("a", {"r": 1}).successful
    events = _spawn.Queue()
    proc = _spawn.Process(target=workers.keyed_wait_for_token, args=(keyed, events), daemon=True)
    proc.start()
    _until(lambda: keyed.get_stats("a")["waiting"] == 1)
    keyed.change_limit("r", capacity=2)  # one token now: the waiter, due in an hour, is told
    assert events.get(timeout=60) == "granted"
    proc.join(10)
    assert keyed.get_stats("a")["granted"] == 2


def test_the_guide_example_runs_as_written() -> None:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, str(GUIDE), "exec"), namespace)
    stats = namespace["limits"].get_stats()["limits"]
    assert stats["tokens"]["capacity"] == 45_000
    assert 15_000 <= stats["tokens"]["available"] < 15_100  # 30,000 still in use
    assert (stats["call_count"]["capacity"], stats["call_count"]["window_seconds"]) == (1_000, 120)
