"""``change_limit`` on Redis (semantics §4): a change made by one client is every client's.

The contract (``tests/contract/changes.py``) checks the rules on one client under a simulated
clock; these tests run on Redis time with several clients: one in another process, attaching
after the change with the limits as declared, and one in this process whose waiter a growing
limit admits. The same for a KeyedLimitSet: two sets with one name stand for two processes (each
has its own proxies, threads and subscription); a change reaches the keys already in Redis and
the keys made later, and a client that has not heard of it (its notices cut off) is refused by
every key carried over, then reads the numbers. Last, the same declaration checks under a
simulated clock, whose time rides with the digest.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
import uuid
from typing import Any

import anyio
import pytest

from aiolimits import KeyedLimitSet, LimitSet, RateLimit, ResourceLimit

from ._redis_server import RedisClusterNodes, RedisServer, redis_cluster, redis_server

__all__ = ["redis_cluster", "redis_server"]  # the session fixtures

DECLARED = [RateLimit("r", 3600, 4)]  # nothing refills during a test

WORKER = textwrap.dedent(
    """
    import json, sys
    from aiolimits import LimitSet, RateLimit
    from aiolimits.redis import RedisBackend
    backend = RedisBackend(sys.argv[1])
    limits = LimitSet([RateLimit("r", 3600, 4)], backend=backend, name=sys.argv[2])
    stats = limits.get_stats()["limits"]["r"]
    print(json.dumps([limits.limits[0].capacity, stats["capacity"], stats["available"]]))
    """
)


def test_a_change_is_seen_by_a_process_that_attaches_with_the_declared_limits(
    redis_server: RedisServer,
) -> None:
    from aiolimits.redis import RedisBackend

    name = uuid.uuid4().hex
    limits = LimitSet(DECLARED, backend=RedisBackend(redis_server.url), name=name)
    assert limits.try_acquire({"r": 3}).successful
    limits.change_limit("r", capacity=2)
    out = subprocess.run(
        [sys.executable, "-c", WORKER, redis_server.url, name],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    capacity, shown, available = json.loads(out.stdout)
    assert (capacity, shown) == (2, 2)
    assert -1 <= available < -0.99  # 3 in use of 2


def test_a_change_reaches_a_client_attached_before_it(redis_server: RedisServer) -> None:
    from aiolimits.redis import RedisBackend

    name = uuid.uuid4().hex
    first = LimitSet(DECLARED, backend=RedisBackend(redis_server.url), name=name)
    second = LimitSet(DECLARED, backend=RedisBackend(redis_server.url), name=name)
    assert first.try_acquire({"r": 3}).successful
    first.change_limit("r", capacity=2)
    assert not second.try_acquire({"r": 1}).successful  # 3 in use of 2
    assert second.get_stats()["limits"]["r"]["capacity"] == 2
    assert second.limits == (RateLimit("r", 3600, 2),)
    second.change_limit("r", capacity=6)  # from the numbers it read: 3 in use of 6
    # A client hears of a change at its next call to Redis; until then it validates amounts
    # against the numbers it knows (a statistics call is one).
    assert first.get_stats()["limits"]["r"]["capacity"] == 6
    assert first.try_acquire({"r": 3}).successful


def test_growing_admits_the_waiter_of_another_client(redis_server: RedisServer) -> None:
    from aiolimits.redis import RedisBackend

    name = uuid.uuid4().hex
    first = LimitSet([RateLimit("r", 3600, 1)], backend=RedisBackend(redis_server.url), name=name)
    second = LimitSet([RateLimit("r", 3600, 1)], backend=RedisBackend(redis_server.url), name=name)
    assert first.try_acquire({"r": 1}).successful
    got = threading.Event()

    def wait() -> None:
        with second.acquire_sync({"r": 1}):  # due in an hour
            got.set()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    for _ in range(60_000):
        if second.get_stats()["waiting"]:
            break
        threading.Event().wait(0.001)
    first.change_limit("r", capacity=2)  # one token more, now: the script wakes every client
    assert got.wait(60)
    thread.join(10)


def test_a_shrink_by_another_client_sends_away_only_the_waiters_above_it(
    redis_server: RedisServer,
) -> None:
    from aiolimits.redis import RedisBackend

    name = uuid.uuid4().hex
    first = LimitSet(DECLARED, backend=RedisBackend(redis_server.url), name=name)
    second = LimitSet(DECLARED, backend=RedisBackend(redis_server.url), name=name)
    assert first.try_acquire({"r": 4}).successful
    outcomes: dict[str, str] = {}

    def wait(label: str, amount: int) -> None:
        try:
            with second.acquire_sync({"r": amount}):
                outcomes[label] = "granted"
        except ValueError as exc:
            outcomes[label] = str(exc)

    threads = [
        threading.Thread(target=wait, args=("big", 3), daemon=True),
        threading.Thread(target=wait, args=("small", 1), daemon=True),
    ]
    for i, thread in enumerate(threads):
        thread.start()
        for _ in range(60_000):
            if second.get_stats()["waiting"] > i:
                break
            threading.Event().wait(0.001)
    first.change_limit("r", capacity=2)  # 4 in use of 2: "big" can never be admitted now
    threads[0].join(60)
    assert "capacity 2" in outcomes["big"]
    assert "small" not in outcomes
    first.change_limit("r", capacity=10)  # 6 free: "small" is admitted at once
    threads[1].join(60)
    assert outcomes["small"] == "granted"


def eventually(predicate: Any, within: float = 30.0) -> None:
    """Wait in real time until ``predicate()`` holds (another client's thread makes it so)."""
    for _ in range(int(within / 0.005)):
        if predicate():
            return
        threading.Event().wait(0.005)
    raise AssertionError("never held")


def _keyed(
    redis_server: RedisServer | RedisClusterNodes, name: str, limits: Any = DECLARED
) -> KeyedLimitSet:
    from aiolimits.redis import RedisBackend

    return KeyedLimitSet(limits, backend=RedisBackend(redis_server.url), name=name)


def _deaf(keyed: KeyedLimitSet) -> KeyedLimitSet:
    """``keyed`` hears no notice of a change any more (a process that missed it)."""
    keyed._shared._notices._keys = lambda: None  # type: ignore[union-attr]
    return keyed


def _capacity(keyed: KeyedLimitSet, key: str) -> tuple[float, float]:
    """The capacity of "r" for ``key``, and what it admits, to whole units (it refills at one
    unit in 15 minutes or so meanwhile)."""
    stats = keyed.get_stats(key)["limits"]["r"]
    return stats["capacity"], math.floor(stats["available"] + 0.01)


def test_a_keyed_change_reaches_the_keys_in_redis_and_the_keys_made_later(
    redis_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    first, second = _keyed(redis_server, name), _keyed(redis_server, name)
    assert first.try_acquire("alice", {"r": 3}).successful
    first.change_limit("r", capacity=2)
    assert first.limits == (RateLimit("r", 3600, 2),)
    eventually(lambda: second.limits == (RateLimit("r", 3600, 2),))  # it heard the notice
    assert not second.try_acquire("alice", {"r": 1}).successful  # 3 in use of 2
    assert _capacity(second, "alice") == (2, -1)
    assert _capacity(first, "alice") == (2, -1)
    with pytest.raises(ValueError, match="capacity 2"):
        second.try_acquire("bob", {"r": 3})
    assert second.try_acquire("bob", {"r": 2}).successful  # a new key: full, of 2
    assert not first.try_acquire("bob", {"r": 1}).successful
    # A third client attaching now starts from the numbers changed.
    assert _keyed(redis_server, name).limits == (RateLimit("r", 3600, 2),)


def test_a_keyed_client_that_missed_a_change_is_refused_by_a_key_carried_over(
    redis_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    first, stale = _keyed(redis_server, name), _deaf(_keyed(redis_server, name))
    assert first.try_acquire("alice", {"r": 3}).successful
    first.change_limit("r", capacity=2)
    assert _capacity(first, "alice") == (2, -1)  # first's call carried "alice" over
    assert stale.limits == tuple(DECLARED)  # it has not heard
    # Its call names the numbers it knows; "alice" refuses them; it reads the set's and asks
    # again: 3 in use of 2, where the declared 4 would have admitted 1.
    assert not stale.try_acquire("alice", {"r": 1}).successful
    assert stale.limits == (RateLimit("r", 3600, 2),)
    assert _capacity(stale, "alice") == (2, -1)


def test_two_keyed_clients_changing_at_once_each_change_only_their_number(
    redis_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    first, stale = _keyed(redis_server, name), _deaf(_keyed(redis_server, name))
    first.change_limit("r", capacity=2)
    stale.change_limit("r", window_seconds=1800)  # from the numbers it did not know yet
    assert stale.limits == (RateLimit("r", 1800, 2),)
    eventually(lambda: first.limits == (RateLimit("r", 1800, 2),))
    assert _keyed(redis_server, name).limits == (RateLimit("r", 1800, 2),)


def test_a_keyed_key_behind_several_changes_is_carried_over_once_to_the_last(
    redis_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    first = _keyed(redis_server, name, [RateLimit("r", 3600, 4), ResourceLimit("conn", 3)])
    second = _keyed(redis_server, name, [RateLimit("r", 3600, 4), ResourceLimit("conn", 3)])
    held = first.try_acquire("alice", {"r": 3})
    assert held.successful  # and one "conn" slot
    first.change_limit("r", capacity=8)
    first.change_limit("conn", capacity=1)
    first.change_limit("r", capacity=2)
    eventually(lambda: second.limits[0] == RateLimit("r", 3600, 2))
    # second carries "alice" over from the numbers declared to the last ones in one go.
    assert not second.try_acquire("alice", {"r": 1}).successful
    stats = second.get_stats("alice")["limits"]
    assert stats["r"]["capacity"] == 2
    assert -1 <= stats["r"]["available"] < -0.99
    assert (stats["conn"]["capacity"], stats["conn"]["in_use"]) == (1, 1)
    held.release()
    assert second.get_stats("alice")["limits"]["conn"]["available"] == 1


def test_a_keyed_limit_that_grows_admits_the_waiter_of_another_client(
    redis_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    declared = [RateLimit("r", 3600, 1)]
    first, second = _keyed(redis_server, name, declared), _keyed(redis_server, name, declared)
    assert first.try_acquire("alice", {"r": 1}).successful
    got = threading.Event()

    def wait() -> None:
        with second.acquire_sync("alice", {"r": 1}):  # due in an hour
            got.set()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    eventually(lambda: second.get_stats("alice")["waiting"] == 1)
    first.change_limit("r", capacity=2)  # one more now: second hears it and asks again
    assert got.wait(60)
    thread.join(10)


def test_a_keyed_shrink_never_admits_more_than_the_stricter_limit(
    redis_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    first, second = _keyed(redis_server, name), _keyed(redis_server, name)
    for client in ("alice", "bob"):
        assert first.try_acquire(client, {"r": 2}).successful
    first.change_limit("r", capacity=3)
    eventually(lambda: second.limits == (RateLimit("r", 3600, 3),))
    for client in ("alice", "bob", "carol"):
        admitted = 0
        for keyed in (first, second, first, second):
            admitted += keyed.try_acquire(client, {"r": 1}).successful
        # 2 in use of the old 4 would admit 2 more; of the new 3, 1 more; a new key 3.
        assert admitted == (3 if client == "carol" else 1)


def test_a_keyed_key_made_after_a_change_is_carried_over_from_its_own_numbers(
    redis_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    first, second = _keyed(redis_server, name), _keyed(redis_server, name)
    first.change_limit("r", capacity=2)
    eventually(lambda: second.limits == (RateLimit("r", 3600, 2),))
    assert second.try_acquire("bob", {"r": 2}).successful  # made with the numbers of 2
    first.change_limit("r", capacity=3)
    # 2 in use of 2 carried over to 3: 1 admissible (from the declared 4 it would be -1).
    assert _capacity(first, "bob") == (3, 1)
    assert first.try_acquire("bob", {"r": 1}).successful
    assert not second.try_acquire("bob", {"r": 1}).successful


def test_a_keyed_change_reaches_the_keys_on_every_node_of_a_cluster(
    redis_cluster: RedisClusterNodes,
) -> None:
    name = uuid.uuid4().hex
    first, second = _keyed(redis_cluster, name), _keyed(redis_cluster, name)
    clients = [f"client-{i}" for i in range(12)]  # spread over the three masters
    for client in clients:
        assert first.try_acquire(client, {"r": 3}).successful
    first.change_limit("r", capacity=2)
    eventually(lambda: second.limits == (RateLimit("r", 3600, 2),))
    for client in clients:
        assert not second.try_acquire(client, {"r": 1}).successful  # 3 in use of 2
    assert second.try_acquire("new", {"r": 2}).successful
    assert not first.try_acquire("new", {"r": 1}).successful


@pytest.mark.anyio
async def test_a_keyed_change_from_an_event_loop_is_made_off_it(
    redis_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    first, second = _keyed(redis_server, name), _keyed(redis_server, name)
    async with first.acquire("alice", {"r": 3}):
        first.change_limit("r", capacity=2)  # no round trip on this thread
        with anyio.fail_after(30):
            while second.limits != (RateLimit("r", 3600, 2),):  # noqa: ASYNC110 (a thread's)
                await anyio.sleep(0.005)
        assert not (await second.attempt("alice", {"r": 1})).acquisition.successful
    assert first.limits == (RateLimit("r", 3600, 2),)


# --- under a simulated clock: the same declaration checks (the time rides with the digest) ---


def test_a_keyed_change_on_redis_under_a_simulated_clock_reaches_another_client(
    redis_server: RedisServer,
) -> None:
    from aiolimits.redis import RedisBackend
    from aiolimits.testing import ManualClock

    name, clock = uuid.uuid4().hex, ManualClock()
    first, stale = (
        KeyedLimitSet(DECLARED, backend=RedisBackend(redis_server.url), name=name, clock=clock)
        for _ in range(2)
    )
    _deaf(stale)  # it learns of the change from the key that refuses its numbers
    assert first.try_acquire("alice", {"r": 3}).successful
    first.change_limit("r", capacity=2)
    assert first.limits == (RateLimit("r", 3600, 2),)
    assert _capacity(first, "alice") == (2, -1)  # carried over: 3 in use of 2
    assert not stale.try_acquire("alice", {"r": 1}).successful  # the declared 4 admits 1
    assert stale.limits == (RateLimit("r", 3600, 2),)
    assert _capacity(stale, "alice") == (2, -1)


def test_a_plain_set_whose_hash_lost_its_declaration_declares_it_again_under_a_simulated_clock(
    redis_server: RedisServer,
) -> None:
    import redis

    from aiolimits.redis import RedisBackend
    from aiolimits.testing import ManualClock

    name, clock = uuid.uuid4().hex, ManualClock()
    backend = RedisBackend(redis_server.url)
    limits = LimitSet(DECLARED, backend=backend, name=name, clock=clock)
    assert limits.try_acquire({"r": 4}).successful
    client = redis.Redis.from_url(redis_server.url)
    client.delete(backend.hash_key(name))  # Redis lost the set's data
    assert limits.try_acquire({"r": 4}).successful  # a fresh state, declared again
    assert client.hexists(backend.hash_key(name), "!d")
    with pytest.raises(ValueError, match="capacity"):  # the name is declared: others differ
        LimitSet([RateLimit("r", 3600, 9)], backend=RedisBackend(redis_server.url), name=name)


@pytest.mark.anyio
async def test_a_task_finds_a_lost_declaration_declared_otherwise_under_a_simulated_clock(
    redis_server: RedisServer,
) -> None:
    import redis

    from aiolimits.redis import RedisBackend
    from aiolimits.testing import ManualClock

    name, backend = uuid.uuid4().hex, RedisBackend(redis_server.url)
    limits = LimitSet(DECLARED, backend=backend, name=name, clock=ManualClock())
    async with limits.acquire({"r": 1}):
        pass
    redis.Redis.from_url(redis_server.url).delete(backend.hash_key(name))
    LimitSet([RateLimit("r", 3600, 9)], backend=RedisBackend(redis_server.url), name=name)
    with anyio.fail_after(30), pytest.raises(ValueError, match="other limit"):
        async with limits.acquire({"r": 1}, timeout=10):
            pytest.fail("admitted under another declaration")


def test_a_change_by_another_client_is_adopted_under_a_simulated_clock(
    redis_server: RedisServer,
) -> None:
    from aiolimits.redis import RedisBackend
    from aiolimits.testing import ManualClock

    name, clock = uuid.uuid4().hex, ManualClock()
    first, second = (
        LimitSet(DECLARED, backend=RedisBackend(redis_server.url), name=name, clock=clock)
        for _ in range(2)
    )
    assert first.try_acquire({"r": 3}).successful
    first.change_limit("r", capacity=2)
    assert not second.try_acquire({"r": 1}).successful  # 3 in use of 2
    assert second.limits == (RateLimit("r", 3600, 2),)


KEYED_WORKER = textwrap.dedent(
    """
    import json, sys
    from aiolimits import KeyedLimitSet, RateLimit
    from aiolimits.redis import RedisBackend
    backend = RedisBackend(sys.argv[1])
    keyed = KeyedLimitSet([RateLimit("r", 3600, 4)], backend=backend, name=sys.argv[2])
    taken = keyed.try_acquire("alice", {"r": 1}).successful
    stats = keyed.get_stats("alice")["limits"]["r"]
    print(json.dumps([keyed.limits[0].capacity, taken, stats["capacity"], stats["available"]]))
    """
)


def test_a_keyed_change_is_seen_by_a_process_that_attaches_with_the_declared_limits(
    redis_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    keyed = _keyed(redis_server, name)
    assert keyed.try_acquire("alice", {"r": 3}).successful  # "alice" is in Redis, as declared
    keyed.change_limit("r", capacity=2)
    out = subprocess.run(
        [sys.executable, "-c", KEYED_WORKER, redis_server.url, name],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    capacity, taken, shown, available = json.loads(out.stdout)
    assert (capacity, taken, shown) == (2, False, 2)  # 3 in use of 2: refused
    assert -1 <= available < -0.99
