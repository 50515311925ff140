"""``change_limit`` on Redis (semantics §4): a change made by one client is every client's.

The contract (``tests/contract/changes.py``) checks the rules on one client under a simulated
clock; these tests run on Redis time with several clients: one in another process, attaching
after the change with the limits as declared, and one in this process whose waiter a growing
limit admits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest

from aiolimits import LimitSet, RateLimit

from ._redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the session fixture

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


def test_a_keyed_set_on_redis_says_a_change_is_not_supported_yet(
    redis_server: RedisServer,
) -> None:
    from aiolimits import KeyedLimitSet
    from aiolimits.redis import RedisBackend

    keyed = KeyedLimitSet(DECLARED, backend=RedisBackend(redis_server.url), name=uuid.uuid4().hex)
    with pytest.raises(NotImplementedError, match="KeyedLimitSet"):
        keyed.change_limit("r", capacity=2)
    assert keyed.limits == tuple(DECLARED)
