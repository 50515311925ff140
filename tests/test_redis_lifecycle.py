"""RedisBackend's life cycle and names: nothing leaks (threads, file descriptors, connections),
``close()``, keys that no two (prefix, name) pairs share, and a declaration Redis lost (#13, #14).
"""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid
from typing import Any

import anyio
import pytest

from aiolimits import CallLimit, KeyedLimitSet, LimitSet, RateLimit, ResourceLimit

from ._redis_server import RedisServer, cli, own_server, require_redis

__all__ = ["own_server"]  # the fixture

pytestmark = pytest.mark.filterwarnings("error")


def redis_backend(server: RedisServer, **kwargs: Any) -> Any:
    require_redis()
    from aiolimits.redis import RedisBackend

    return RedisBackend(server.url, **kwargs)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def clients(server: RedisServer) -> int:
    """Connections the server has, but the one asking."""
    return len(cli(server.port, "client", "list").strip().splitlines()) - 1


def settled(
    baseline: tuple[set[threading.Thread], int], server: RedisServer, clients0: int
) -> None:
    """Collect garbage until every thread started since ``baseline`` ended, and the file
    descriptors and the server's connections are back to theirs (bounded: a hang fails)."""
    threads0, fds0 = baseline
    for _ in range(200):
        gc.collect()
        extra = [t for t in threading.enumerate() if t not in threads0]
        if not extra and open_fds() <= fds0 and clients(server) <= clients0:
            return
        if extra:
            extra[0].join(0.05)
        else:
            time.sleep(0.05)  # sockets closing: the server drops them as it reads the close
    assert [t.name for t in threading.enumerate() if t not in threads0] == []
    assert open_fds() <= fds0
    assert clients(server) <= clients0


@pytest.mark.slow
@pytest.mark.anyio
async def test_hundreds_of_sets_with_waiters_leave_no_thread_fd_or_connection(
    own_server: RedisServer,
) -> None:
    gc.collect()
    baseline = (set(threading.enumerate()), open_fds())
    clients0 = clients(own_server)

    async def one(i: int) -> None:
        backend = redis_backend(own_server, lease_seconds=60)
        name = uuid.uuid4().hex
        limits = LimitSet([ResourceLimit("c", 1)], backend=backend, name=name)
        held = limits.try_acquire()
        assert held.successful
        with pytest.raises(TimeoutError):
            async with limits.acquire(timeout=0.02):  # a waiter: dispatcher, subscriber
                pytest.fail("admitted beyond the limit")
        held.release()
        if i % 2:
            await backend.aclose()  # closed explicitly; the others are only dropped

    for i in range(200):
        await one(i)
    settled(baseline, own_server, clients0)


@pytest.mark.slow
def test_keyed_sets_with_waiters_leave_nothing_once_closed_or_dropped(
    own_server: RedisServer,
) -> None:
    gc.collect()
    baseline = (set(threading.enumerate()), open_fds())
    clients0 = clients(own_server)
    for i in range(100):
        with redis_backend(own_server) as backend:
            keyed = KeyedLimitSet([ResourceLimit("c", 1)], backend=backend, name=uuid.uuid4().hex)
            held = keyed.try_acquire("k")
            with pytest.raises(TimeoutError):
                keyed.acquire_sync("k", timeout=0.02)
            held.release()
            if i % 2:
                del keyed, held  # dropped before the backend is closed
    settled(baseline, own_server, clients0)


def test_a_closed_backend_fails_fast_under_its_policy(own_server: RedisServer) -> None:
    from aiolimits import BackendUnavailable

    backend = redis_backend(own_server)
    limits = LimitSet([CallLimit(60, 5)], backend=backend, name=uuid.uuid4().hex)
    assert limits.try_acquire().successful
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(BackendUnavailable, match="closed"):
        limits.try_acquire()
    lenient = redis_backend(own_server, on_unavailable="allow")
    limits = LimitSet([CallLimit(60, 1)], backend=lenient, name=uuid.uuid4().hex)
    lenient.close()
    assert limits.try_acquire().successful  # fails open, without Redis
    assert limits.try_acquire().successful


# --- names (#13) ----------------------------------------------------------------------------


def test_no_two_prefix_and_name_pairs_share_a_hash(own_server: RedisServer) -> None:
    a = LimitSet([CallLimit(60, 1)], backend=redis_backend(own_server, prefix="app"), name="x:y")
    b = LimitSet([CallLimit(60, 2)], backend=redis_backend(own_server, prefix="app:x"), name="y")
    assert a.try_acquire().successful
    assert not a.try_acquire().successful
    assert b.try_acquire().successful  # its own limit: another hash
    assert b.try_acquire().successful
    backend = redis_backend(own_server, prefix="app:x")
    assert backend.hash_key("y") != redis_backend(own_server, prefix="app").hash_key("x:y")
    assert redis_backend(own_server).hash_key("n") == "{aiolimits:n}"  # the default: unchanged


def test_prefixes_that_differ_by_escaping_do_not_share_keys(own_server: RedisServer) -> None:
    backends = [redis_backend(own_server, prefix=p) for p in ("a:b", "a%3Ab", "a%253Ab")]
    keys = {b.hash_key("n") for b in backends} | {b.key_hash_key("n", "k") for b in backends}
    assert len(keys) == 6


# --- a declaration Redis lost (#13) ---------------------------------------------------------


def test_after_redis_lost_the_declaration_the_next_call_declares_it_again(
    own_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    limits = LimitSet([RateLimit("tokens", 60, 10)], backend=redis_backend(own_server), name=name)
    assert limits.try_acquire({"tokens": 10}).successful
    cli(own_server.port, "flushall")  # Redis lost its data
    assert limits.try_acquire({"tokens": 10}).successful  # a fresh state, declared again
    other = LimitSet([RateLimit("tokens", 60, 10)], backend=redis_backend(own_server), name=name)
    assert not other.try_acquire({"tokens": 1}).successful  # shared, as declared


def test_after_redis_lost_the_declaration_another_one_under_the_name_fails_the_next_call(
    own_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    limits = LimitSet([RateLimit("tokens", 60, 10)], backend=redis_backend(own_server), name=name)
    assert limits.try_acquire({"tokens": 1}).successful
    cli(own_server.port, "flushall")
    # Another process declares the name otherwise: nothing there to disagree with.
    LimitSet([RateLimit("tokens", 60, 99)], backend=redis_backend(own_server), name=name)
    with pytest.raises(ValueError, match="tokens"):
        limits.try_acquire({"tokens": 1})  # as it would have failed at attach


@pytest.mark.anyio
async def test_a_task_after_redis_lost_the_declaration_gets_the_mismatch(
    own_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    limits = LimitSet([RateLimit("tokens", 60, 10)], backend=redis_backend(own_server), name=name)
    async with limits.acquire({"tokens": 1}):
        pass
    cli(own_server.port, "flushall")
    LimitSet([RateLimit("tokens", 60, 99)], backend=redis_backend(own_server), name=name)
    with anyio.fail_after(30), pytest.raises(ValueError, match="tokens"):
        async with limits.acquire({"tokens": 1}, timeout=10):
            pytest.fail("admitted under another declaration")
