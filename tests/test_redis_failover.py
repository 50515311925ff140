"""RedisBackend through a Cluster failover: a master is killed and its replica takes over.

Each test starts its own Cluster of 3 masters with 1 replica each (``cluster-node-timeout``
1000 ms, on loopback ports) and kills the master that owns its set's hash slot. The test helpers
wait, by polling the nodes, for the Cluster to converge (an external event); the library itself
is only called.

Replication is asynchronous: a write the master acknowledged just before it died may never reach
the replica, and then the promoted replica has forgotten it (units acknowledged to a caller are
available again, so up to those unreplicated units can be admitted twice; nothing in the library
can prevent that short of WAIT on every call). These tests therefore kill a master only after its
replica has processed everything the master wrote (their replication offsets are equal, and the
test makes no call in between; the only other writer, the lease renewer, runs every 10 s and
changes no count). The state after the failover is then exactly the state before it, and the
tests assert the counts exactly: what was admitted before plus what is admitted after never
exceeds any limit, and exactly the remainder is admitted after.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import pytest

from aiolimits import BackendUnavailable, CallLimit, LimitSet, RateLimit, ResourceLimit

from ._redis_server import RedisFailoverCluster, cli, redis_failover_cluster, wait_reachable
from .contract._support import eventually

if TYPE_CHECKING:
    from aiolimits.redis import RedisBackend

__all__ = ["redis_failover_cluster"]  # the fixture

pytestmark = pytest.mark.filterwarnings("error")

T = TypeVar("T")

HANG = 30.0  # seconds after which a call that should have failed within its timeout has hung


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    # One event loop is enough here: each test costs a Cluster and a failover (the doors of the
    # other loops are the same code, tested against Redis in test_redis_backend.py).
    return ("asyncio", {})


def backend(cluster: RedisFailoverCluster, **kwargs: Any) -> RedisBackend:
    from aiolimits.redis import RedisBackend

    return RedisBackend(cluster.url, timeout=0.5, **kwargs)


def declared() -> list[RateLimit | CallLimit | ResourceLimit]:
    # Sliding windows of an hour: nothing comes back during a test, so every count is exact.
    return [
        RateLimit("tokens", 3600, 10, "sliding_window"),
        CallLimit(3600, 5, "sliding_window"),
        ResourceLimit("conns", 2),
    ]


def library_exists(port: int) -> bool:
    """The node has the script's function library (FUNCTION LIST of its name)."""
    from aiolimits.redis._script import FUNCTION

    return FUNCTION in cli(port, "function", "list", "libraryname", FUNCTION)


def available(limits: LimitSet) -> dict[str, float]:
    stats = limits.get_stats()["limits"]
    return {
        "tokens": stats["tokens"]["available"],
        "call_count": stats["call_count"]["available"],
        "conns": stats["conns"]["available"],
    }


def bounded(call: Callable[[], T]) -> T:
    """``call()`` in a thread, failing the test if it has not returned or raised after ``HANG``
    seconds (a generous guard against a hang, not a measure of speed)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG)
    if not outcome:
        pytest.fail(f"{call} hung for {HANG} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result


def fail_over(cluster: RedisFailoverCluster, key: str) -> tuple[int, int]:
    """Kill the master of ``key`` once its replica has all its writes, and wait until the replica
    serves the slot. Returns the ports of the killed master and of the promoted replica."""
    master = cluster.master_of(key)
    replica = cluster.replica_of(master)
    cluster.wait_replicated(master)
    os.kill(master.pid, signal.SIGKILL)
    master.process.wait()
    cluster.wait_converged()
    assert cluster.master_of(key) is replica
    return master.port, replica.port


@pytest.mark.anyio
async def test_the_promoted_replica_keeps_the_counts_and_serves_the_script(
    redis_failover_cluster: RedisFailoverCluster,
) -> None:
    cluster = redis_failover_cluster
    name = uuid.uuid4().hex
    limits = LimitSet(declared(), backend=backend(cluster), name=name)
    key = backend(cluster).hash_key(name)
    held = limits.try_acquire({"tokens": 3})  # call 1, 3 tokens, a slot held over the failover
    assert held.successful
    async with limits.acquire({"tokens": 3}, timeout=5):  # call 2, 6 tokens
        pass
    # The library was loaded on the master by the first call: FUNCTION LOAD is replicated (a
    # library is part of the data set), so the promoted replica serves it as it is.
    replica = cluster.replica_of(cluster.master_of(key)).port

    fail_over(cluster, key)
    # Everything acknowledged before the failover is still counted on the promoted replica.
    assert available(limits) == {"tokens": 4, "call_count": 3, "conns": 1}
    assert library_exists(replica)

    # Exactly the remainder is admitted, through every door, and no more.
    async with limits.acquire({"tokens": 2}, timeout=5):  # call 3, 8 tokens (the dispatcher)
        pass
    # Call 4, 10 tokens, the second slot: from a thread.
    second = await anyio.to_thread.run_sync(partial(limits.acquire_sync, {"tokens": 2}, timeout=5))
    assert second.successful
    assert not limits.try_acquire({"tokens": 0}).successful  # both slots are held
    second.release()
    held.release()  # the lease taken before the failover ends on the promoted replica
    assert available(limits) == {"tokens": 0, "call_count": 1, "conns": 2}
    assert not limits.try_acquire({"tokens": 1}).successful  # 10 of 10 tokens
    with pytest.raises(TimeoutError):
        async with limits.acquire({"tokens": 1}, timeout=0.2):
            pytest.fail("admitted beyond the token limit")

    # The promoted node forgets the library (FUNCTION FLUSH): it is loaded again.
    cli(replica, "function", "flush")
    assert not library_exists(replica)
    last = limits.try_acquire({"tokens": 0})  # call 5 of 5
    assert last.successful
    last.release()
    assert not limits.try_acquire({"tokens": 0}).successful
    assert library_exists(replica)
    assert available(limits) == {"tokens": 0, "call_count": 0, "conns": 2}
    assert limits.get_stats()["granted"] == 5


def test_a_release_made_first_after_a_completed_failover_is_not_lost(
    redis_failover_cluster: RedisFailoverCluster,
) -> None:
    cluster = redis_failover_cluster
    name = uuid.uuid4().hex
    limits = LimitSet(declared(), backend=backend(cluster), name=name)
    held = limits.try_acquire({"tokens": 3})
    assert held.successful
    fail_over(cluster, backend(cluster).hash_key(name))
    # The Cluster serves the slot again, from the promoted replica. The first call still goes to
    # the dead master and is refused before anything is sent; ending a lease is idempotent, so
    # the release is made once more, on the new master, and not lost (a lost release would keep
    # the slot until its lease expires).
    held.release()
    assert available(limits) == {"tokens": 7, "call_count": 4, "conns": 2}


@pytest.mark.anyio
async def test_during_a_failover_raise_raises_and_allow_admits_then_limits_are_shared_again(
    redis_failover_cluster: RedisFailoverCluster,
) -> None:
    cluster = redis_failover_cluster
    name = uuid.uuid4().hex
    strict = LimitSet(declared(), backend=backend(cluster), name=name)
    lenient = LimitSet(declared(), backend=backend(cluster, on_unavailable="allow"), name=name)
    held = strict.try_acquire({"tokens": 3})  # call 1, 3 tokens, a slot held over the failover
    assert held.successful
    with lenient.try_acquire({"tokens": 3}) as acq:  # call 2, 6 tokens
        assert acq.successful
    key = backend(cluster).hash_key(name)
    master = cluster.master_of(key)
    replica = cluster.replica_of(master)
    cluster.wait_replicated(master)
    # The window is held open: with the replica stopped no election can end it, and with the
    # master stopped (not killed) its connections stay open and answer nothing, so every call
    # must end on the backend's own timeout.
    os.kill(replica.pid, signal.SIGSTOP)
    os.kill(master.pid, signal.SIGSTOP)
    try:
        with pytest.raises(BackendUnavailable):
            bounded(partial(strict.try_acquire, {"tokens": 1}))
        with pytest.raises(BackendUnavailable):
            bounded(partial(strict.acquire_sync, {"tokens": 1}, timeout=HANG))
        with pytest.raises(BackendUnavailable), anyio.fail_after(HANG):
            async with strict.acquire({"tokens": 1}, timeout=HANG):
                pytest.fail("admitted while the slot had no master")
        with pytest.raises(BackendUnavailable):
            bounded(strict.get_stats)
        # Fail open: admitted at once, counting nothing.
        with bounded(partial(lenient.try_acquire, {"tokens": 10})) as acq:
            assert acq.successful
        with anyio.fail_after(HANG):
            async with lenient.acquire({"tokens": 10}, timeout=HANG):
                pass
        with bounded(partial(lenient.acquire_sync, {"tokens": 10}, timeout=HANG)) as acq:
            assert acq.successful
    finally:
        # The window ends: the master is gone for good, and the replica takes over (the
        # validity factor 0 lets it, however long it was stopped).
        os.kill(master.pid, signal.SIGKILL)
        master.process.wait()
        os.kill(replica.pid, signal.SIGCONT)
    cluster.wait_converged()
    assert cluster.master_of(key) is replica
    for limits in (strict, lenient):  # the backends' probes find the Cluster back
        wait_reachable(limits._backend)

    # The shared limits again, with exactly the state from before the window: the calls that
    # timed out never ran (their master never resumed), and what was allowed counted nothing.
    assert available(strict) == {"tokens": 4, "call_count": 3, "conns": 1}
    with lenient.try_acquire({"tokens": 4}) as acq:  # call 3, 10 tokens
        assert acq.successful
    assert not lenient.try_acquire({"tokens": 1}).successful
    assert not strict.try_acquire({"tokens": 1}).successful
    async with strict.acquire({"tokens": 0}, timeout=5):  # call 4
        pass
    # From a thread, the release is made before it returns; calls 3 and 4 left their blocks on
    # the event loop, where a release is handed to the dispatcher thread and seen by the other
    # set a round trip later: wait for all three.
    await anyio.to_thread.run_sync(held.release)
    expected = {"tokens": 0, "call_count": 1, "conns": 2}
    await eventually(lambda: available(lenient) == expected, within=HANG)


@pytest.mark.anyio
async def test_a_release_in_another_process_wakes_a_waiter_after_a_failover(
    redis_failover_cluster: RedisFailoverCluster,
) -> None:
    cluster = redis_failover_cluster
    name = uuid.uuid4().hex
    # Leases far longer than the test: only the publication of the release can wake the waiter.
    waiting = LimitSet(
        [ResourceLimit("conns", 1)], backend=backend(cluster, lease_seconds=600), name=name
    )
    holding = LimitSet(
        [ResourceLimit("conns", 1)], backend=backend(cluster, lease_seconds=600), name=name
    )
    held = holding.try_acquire()
    assert held.successful
    admitted = anyio.Event()

    async def wait() -> None:
        async with waiting.acquire():
            admitted.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.2)  # the waiter is queued and subscribed
        await anyio.to_thread.run_sync(fail_over, cluster, backend(cluster).hash_key(name))
        await anyio.to_thread.run_sync(held.release)  # made before it returns, from a thread
        # A generous bound on a wake-up (the subscriber reconnects within a second; the machine
        # may be loaded).
        with anyio.move_on_after(10):
            await admitted.wait()
        tg.cancel_scope.cancel()
    assert admitted.is_set()


def test_a_cluster_with_no_node_left_is_unavailable(
    redis_failover_cluster: RedisFailoverCluster,
) -> None:
    cluster = redis_failover_cluster
    limits = LimitSet(declared(), backend=backend(cluster), name=uuid.uuid4().hex)
    with limits.try_acquire({"tokens": 1}) as acq:
        assert acq.successful
    cluster.stop()
    with pytest.raises(BackendUnavailable):
        bounded(partial(limits.try_acquire, {"tokens": 1}))


def test_the_first_acquisition_after_a_completed_failover_is_answered(
    redis_failover_cluster: RedisFailoverCluster,
) -> None:
    cluster = redis_failover_cluster
    name = uuid.uuid4().hex
    limits = LimitSet(declared(), backend=backend(cluster), name=name)
    with limits.try_acquire({"tokens": 1}) as acq:
        assert acq.successful
    fail_over(cluster, backend(cluster).hash_key(name))
    with limits.try_acquire({"tokens": 1}) as acq:
        assert acq.successful
