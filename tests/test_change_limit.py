"""``change_limit`` beyond one LimitSet (semantics §4): keyed sets, pools, threads.

The rules themselves are in the contract (``tests/contract/changes.py``, every backend) and in
the algorithm tables (``test_algorithms_changes.py``).
"""

from __future__ import annotations

import threading

import pytest

from aiolimits import KeyedLimitSet, LimitPool, LimitSet, RateLimit, ResourceLimit
from aiolimits.testing import ManualClock


def test_keyed_change_applies_to_every_client_key_held_and_new() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([RateLimit("req", 10, 10), ResourceLimit("conn", 2)], clock=clock)
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


def test_keyed_bad_change_changes_nothing() -> None:
    keyed = KeyedLimitSet([RateLimit("req", 10, 10)])
    with pytest.raises(ValueError, match="'alice'"):
        keyed.change_limit("alice", capacity=1)  # a client key is not a limit's key
    with pytest.raises(ValueError, match="window_seconds"):
        keyed.change_limit("req", window_seconds=0)
    assert keyed.limits == (RateLimit("req", 10, 10),)


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
