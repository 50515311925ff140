"""RedisBackend beyond the shared contract: shared state, declarations, wake-ups across
processes, leases, and the failure policies against a stopped, killed and restarted server.

Two LimitSets with the same ``name`` stand for two processes (each has its own scheduler, queue
and subscriber); a real second process is used where dying is the point (leases).
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import pytest

from aiolimits import (
    BackendUnavailable,
    CallLimit,
    LimitSet,
    RateLimit,
    ResourceLimit,
)
from aiolimits.testing import ManualClock

from ._redis_server import RedisServer, own_server, redis_server, require_redis, wait_reachable
from .contract import AnyLimit
from .contract._support import eventually

if TYPE_CHECKING:
    from aiolimits.redis import RedisBackend

__all__ = ["own_server", "redis_server"]  # the fixtures

pytestmark = pytest.mark.filterwarnings("error")


def backend(server: RedisServer, **kwargs: Any) -> RedisBackend:
    from aiolimits.redis import RedisBackend

    return RedisBackend(server.url, **kwargs)


def pair(server: RedisServer, limits: list[AnyLimit], **kwargs: Any) -> tuple[LimitSet, LimitSet]:
    """Two sets on one name: two processes, as far as the limits can tell."""
    name = uuid.uuid4().hex
    a = LimitSet(limits, backend=backend(server, **kwargs), name=name)
    b = LimitSet(limits, backend=backend(server, **kwargs), name=name)
    return a, b


# --- shared state ---------------------------------------------------------------------------------


def test_two_sets_on_one_name_share_every_limit(redis_server: RedisServer) -> None:
    a, b = pair(redis_server, [CallLimit(3600, 3, "sliding_window"), ResourceLimit("conns", 1)])
    first = a.try_acquire()
    assert first.successful
    assert not b.try_acquire().successful  # the slot is held by a
    first.release()
    assert b.try_acquire().successful  # call 2 of 3, and the slot, now held by b
    assert b.get_stats()["limits"]["call_count"]["available"] == 1
    assert a.get_stats()["limits"]["conns"]["in_use"] == 1


def test_a_different_declaration_under_one_name_says_what_differs(
    redis_server: RedisServer,
) -> None:
    name = uuid.uuid4().hex
    LimitSet([RateLimit("tokens", 60, 1000)], backend=backend(redis_server), name=name)
    with pytest.raises(ValueError, match=r"capacity=2000.* where it has .*capacity=1000"):
        LimitSet([RateLimit("tokens", 60, 2000)], backend=backend(redis_server), name=name)


def test_a_name_is_required(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="name is required"):
        LimitSet([CallLimit(1, 1)], backend=backend(redis_server))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prefix": ""}, ValueError, "prefix"),
        ({"prefix": "a{b"}, ValueError, "prefix"),
        ({"on_unavailable": "ignore"}, ValueError, "on_unavailable"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": "1"}, TypeError, "timeout"),
        ({"lease_seconds": float("inf")}, ValueError, "lease_seconds"),
    ],
)
def test_bad_arguments_are_named(
    redis_server: RedisServer, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        backend(redis_server, **kwargs)


def test_bad_client_is_named() -> None:
    pytest.importorskip("redis")
    from aiolimits.redis import RedisBackend

    with pytest.raises(TypeError, match="url_or_client"):
        RedisBackend(42)  # type: ignore[arg-type]


def test_an_asyncio_client_names_the_server(redis_server: RedisServer) -> None:
    import redis.asyncio

    from aiolimits.redis import RedisBackend

    client = redis.asyncio.Redis.from_url(redis_server.url)
    name = uuid.uuid4().hex
    a = LimitSet([CallLimit(3600, 1)], backend=RedisBackend(client), name=name)
    b = LimitSet([CallLimit(3600, 1)], backend=backend(redis_server), name=name)
    assert a.try_acquire().successful
    assert not b.try_acquire().successful  # the same state


def test_a_pickled_set_attaches_to_the_same_state(redis_server: RedisServer) -> None:
    name = uuid.uuid4().hex
    limits = LimitSet([CallLimit(3600, 2)], backend=backend(redis_server), name=name)
    assert limits.try_acquire().successful
    copy = pickle.loads(pickle.dumps(limits))
    assert copy.try_acquire().successful
    assert not limits.try_acquire().successful


def test_state_is_in_one_hash_slot_with_the_name_as_its_tag(redis_server: RedisServer) -> None:
    import redis

    name = uuid.uuid4().hex
    LimitSet(
        [CallLimit(1, 1), ResourceLimit("c", 1)],
        backend=backend(redis_server, prefix="p"),
        name=name,
    ).try_acquire()
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.keys(f"*{name}*") == [f"{{p:{name}}}".encode()]
    finally:
        client.close()


# --- waking waiters of other processes ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_release_in_another_process_wakes_a_waiter(redis_server: RedisServer) -> None:
    a, b = pair(redis_server, [ResourceLimit("conns", 1)])
    held = a.try_acquire()
    assert held.successful

    async def wait_in_b() -> None:
        async with b.acquire(timeout=20):
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_in_b)
        await anyio.sleep(0.2)  # b is queued, with no time to wake at: only a release helps
        held.release()  # published by the script; b's subscriber dispatches b's head
    assert b.get_stats()["granted"] == 1


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_refund_in_another_process_wakes_a_waiter(redis_server: RedisServer) -> None:
    # 10 tokens an hour: without the wake-up, b would wait about 6 minutes.
    a, b = pair(redis_server, [RateLimit("tokens", 3600, 10)])
    held = a.try_acquire({"tokens": 10})
    assert held.successful

    async def wait_in_b() -> None:
        async with b.acquire({"tokens": 5}):
            pass

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_in_b)
            await anyio.sleep(0.2)
            held.update({"tokens": 4})  # 6 back
    assert b.get_stats()["granted"] == 1


# --- leases ---------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from aiolimits import LimitSet, ResourceLimit
    from aiolimits.redis import RedisBackend
    url, name = sys.argv[1], sys.argv[2]
    limits = LimitSet([ResourceLimit("conns", 1)],
                      backend=RedisBackend(url, lease_seconds=1.0), name=name)
    acq = limits.acquire_sync(timeout=10)
    print("held", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_a_holder_that_dies_frees_its_slot_within_the_lease(redis_server: RedisServer) -> None:
    name = uuid.uuid4().hex
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_server.url, name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        mine = LimitSet(
            [ResourceLimit("conns", 1)],
            backend=backend(redis_server, lease_seconds=1.0),
            name=name,
        )
        # Alive, it renews its lease: nothing is free after more than one lease.
        with pytest.raises(TimeoutError):
            mine.acquire_sync(timeout=2.5)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        # Dead, its lease runs out and the waiter's timer for that expiry admits it.
        with mine.acquire_sync(timeout=20) as acq:
            assert acq.successful
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_a_lease_renewal_that_finds_the_lease_gone_is_reported(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    name = uuid.uuid4().hex
    limits = LimitSet(
        [ResourceLimit("conns", 1)],
        backend=backend(redis_server, lease_seconds=30.0),
        name=name,
    )
    acq = limits.try_acquire()
    assert acq.successful
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.hdel(f"{{aiolimits:{name}}}", "s:conns")  # as if the lease had run out
    finally:
        client.close()
    sched = limits._scheduler
    sched.renew()  # type: ignore[attr-defined]
    assert sched.leases_lost == 1  # type: ignore[attr-defined]
    assert "expired before it was renewed" in caplog.text
    acq.release()


# --- failure policies -----------------------------------------------------------------------------


def test_raise_when_redis_is_gone_at_attach() -> None:
    from aiolimits.redis import RedisBackend

    require_redis()
    from ._redis_server import free_port

    gone = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    with pytest.raises(BackendUnavailable, match="did not answer"):
        LimitSet([CallLimit(1, 1)], backend=gone, name="x")


@pytest.mark.slow
def test_raise_while_redis_is_paused_and_no_over_admission_after(own_server: RedisServer) -> None:
    limits = LimitSet(
        [CallLimit(3600, 2, "sliding_window")],
        backend=backend(own_server, timeout=0.2),
        name=uuid.uuid4().hex,
    )
    assert limits.try_acquire().successful
    os.kill(own_server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(BackendUnavailable):
            limits.try_acquire()
        with pytest.raises(BackendUnavailable):
            limits.acquire_sync(timeout=5)
    finally:
        os.kill(own_server.pid, signal.SIGCONT)
    wait_reachable(limits._backend)
    # The calls that timed out may still run once the server resumes (Redis had read them):
    # their units then count as used. Either way, never more than the limit in all.
    admitted = sum(limits.try_acquire().successful for _ in range(3))
    assert admitted <= 1
    assert limits.get_stats()["limits"]["call_count"]["available"] == 0


@pytest.mark.slow
def test_allow_admits_while_redis_is_paused(own_server: RedisServer) -> None:
    limits = LimitSet(
        [CallLimit(3600, 1)],
        backend=backend(own_server, timeout=0.2, on_unavailable="allow"),
        name=uuid.uuid4().hex,
    )
    assert limits.try_acquire().successful
    os.kill(own_server.pid, signal.SIGSTOP)
    try:
        with limits.try_acquire() as acq:  # fail open
            assert acq.successful
            acq.update({"call_count": 1})
    finally:
        os.kill(own_server.pid, signal.SIGCONT)
    wait_reachable(limits._backend)
    assert not limits.try_acquire().successful  # the shared limit again


@pytest.mark.slow
def test_local_decides_in_process_while_redis_is_down_and_shares_again_after(
    own_server: RedisServer,
) -> None:
    limits = LimitSet(
        [CallLimit(3600, 2, "sliding_window"), ResourceLimit("conns", 1)],
        backend=backend(own_server, timeout=0.2, on_unavailable="local"),
        name=uuid.uuid4().hex,
    )
    first = limits.try_acquire()
    assert first.successful
    first.release()
    port = own_server.port
    own_server.stop()  # killed: its state is gone with it (no persistence in these tests)
    local = limits.try_acquire()
    assert local.successful  # in-process limits: 2 calls, 1 slot
    assert not limits.try_acquire().successful  # the local slot is held
    local.release()
    assert limits.try_acquire().successful  # call 2 of the local 2
    assert not limits.try_acquire().successful
    restarted = RedisServer.start(port=port)
    try:
        wait_reachable(limits._backend)
        # Redis answers again: decisions are shared again (a fresh state after the restart).
        assert limits.try_acquire().successful
        assert limits.get_stats()["limits"]["call_count"]["available"] == 1
    finally:
        restarted.stop()


def test_a_manual_clock_drives_the_script_time(redis_server: RedisServer) -> None:
    clock = ManualClock(1000.0)
    limits = LimitSet(
        [RateLimit("tokens", 10, 10, "fixed_window")],
        backend=backend(redis_server),
        name=uuid.uuid4().hex,
        clock=clock,
    )
    assert limits.try_acquire({"tokens": 10}).successful
    assert limits.retry_after({"tokens": 1}) == 10.0  # the window [1000, 1010) on that clock
    clock.advance(10)
    assert limits.try_acquire({"tokens": 10}).successful


# --- how the script is loaded: a function library, or an EVAL script -----------------------------


def commandstats(server: RedisServer) -> dict[str, int]:
    """How many times each command was called on the server (INFO commandstats)."""
    import redis

    client = redis.Redis.from_url(server.url)
    try:
        stats: Any = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items()}


@pytest.mark.anyio
async def test_the_library_is_loaded_once_and_again_after_a_function_flush(
    own_server: RedisServer,
) -> None:
    import redis

    from aiolimits.redis._script import FUNCTION

    limits = LimitSet(
        [CallLimit(3600, 5, "sliding_window")], backend=backend(own_server), name=uuid.uuid4().hex
    )
    client = redis.Redis.from_url(own_server.url)
    try:
        assert limits.try_acquire().successful  # from the thread: Function not found, loaded
        async with limits.acquire(timeout=5):  # the task's direct call
            pass
        assert client.function_list(FUNCTION)[0][1] == FUNCTION.encode()
        assert commandstats(own_server)["function|load"] == 1
        client.function_flush()  # a restart without persistence, say: both doors load it again
        assert limits.try_acquire().successful
        client.function_flush()
        async with limits.acquire(timeout=5):
            pass
        assert limits.try_acquire().successful
        stats = commandstats(own_server)
        assert stats["function|load"] == 3
        assert "evalsha" not in stats
        # Five were taken, each once (a call refused for want of the library was not run).
        assert not limits.try_acquire().successful
    finally:
        client.close()


@pytest.mark.anyio
async def test_a_server_without_functions_is_sent_the_script_by_evalsha() -> None:
    import redis

    require_redis()
    # FCALL and FUNCTION unknown, as on Redis < 7.
    server = RedisServer.start("--rename-command", "FCALL", "", "--rename-command", "FUNCTION", "")
    try:
        limits = LimitSet(
            [CallLimit(3600, 4, "sliding_window")], backend=backend(server), name=uuid.uuid4().hex
        )
        assert limits.try_acquire().successful  # unknown command: EVALSHA from now on
        async with limits.acquire(timeout=5):
            pass
        client = redis.Redis.from_url(server.url)
        try:
            client.script_flush()  # NOSCRIPT: loaded again, by both doors
            assert limits.try_acquire().successful
            client.script_flush()
            async with limits.acquire(timeout=5):
                pass
        finally:
            client.close()
        assert not limits.try_acquire().successful  # four taken, each once
        stats = commandstats(server)
        assert "fcall" not in stats  # renamed away: never run
        assert stats["script|load"] == 3
        assert limits._scheduler.calls.script.functions is False  # type: ignore[attr-defined]
    finally:
        server.stop()


def test_a_user_refused_functions_by_an_acl_is_sent_the_script_by_evalsha(
    own_server: RedisServer,
) -> None:
    import redis

    admin = redis.Redis.from_url(own_server.url)
    try:
        admin.acl_setuser(
            "scripts-only",
            enabled=True,
            passwords=["+pw"],
            keys=["~*"],
            channels=["&*"],
            commands=["+@all", "-fcall", "-function"],
        )
    finally:
        admin.close()
    from aiolimits.redis import RedisBackend

    url = f"redis://scripts-only:pw@127.0.0.1:{own_server.port}/0"
    limits = LimitSet(
        [CallLimit(3600, 2, "sliding_window")], backend=RedisBackend(url), name=uuid.uuid4().hex
    )
    assert limits.try_acquire().successful  # NOPERM for FCALL: not run, EVALSHA from now on
    assert limits.try_acquire().successful
    assert not limits.try_acquire().successful
    assert limits._scheduler.calls.script.functions is False  # type: ignore[attr-defined]


# --- the async door on the real clock: the dispatcher thread asks for the queue ------------------


class CountingScript:
    """Wraps a scheduler's script to count the calls per operation (not the direct calls of
    the async door's first step, which tests that use this turn off)."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.script, name)

    def __call__(self, client: Any, key: str, args: Any) -> Any:
        self.calls[args[0]] = self.calls.get(args[0], 0) + 1
        return self.script(client, key, args)

    def command(self, key: str, args: Any, *, functions: bool) -> Any:
        # The words of a call a thread sends on its own connection (or of a pipelined batch).
        self.calls[args[0]] = self.calls.get(args[0], 0) + 1
        return self.script.command(key, args, functions=functions)


@pytest.mark.anyio
async def test_queued_tasks_are_granted_in_arrival_order(redis_server: RedisServer) -> None:
    # One slot: grants are one at a time, so the order the tasks run in is the grant order
    # (tasks woken together may run in any order, as trio's scheduler shows).
    limits = LimitSet(
        [ResourceLimit("conns", 1), RateLimit("tokens", 0.1, 5, "sliding_window")],
        backend=backend(redis_server),
        name=uuid.uuid4().hex,
    )
    order: list[int] = []

    async def one(i: int) -> None:
        async with limits.acquire({"tokens": 1}, timeout=30):
            order.append(i)
            await anyio.sleep(0.001)

    def arrived(i: int) -> bool:
        waiting: int = limits.get_stats()["waiting"]
        return len(order) + waiting > i

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(one, i)
                # Each one granted or queued before the next starts (trio runs in any order).
                await eventually(partial(arrived, i))
    assert order == list(range(30))


@pytest.mark.anyio
async def test_tasks_granted_together_run_in_grant_order(redis_server: RedisServer) -> None:
    # A release from a thread grants the four queued tasks in one batch. Woken together, trio
    # runs them in any order (it reverses a batch of runnable tasks half the time): the
    # scheduler wakes each once the one granted before it has run.
    limits = LimitSet(
        [ResourceLimit("conns", 4)], backend=backend(redis_server), name=uuid.uuid4().hex
    )
    order: list[int] = []

    async def one(i: int) -> None:
        async with limits.acquire({"conns": 1}, timeout=30):
            order.append(i)

    for _ in range(6):
        holder = limits.try_acquire({"conns": 4})
        assert holder.successful
        order.clear()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(one, i)
                    await eventually(partial(lambda n: limits.get_stats()["waiting"] > n, i))
                await anyio.to_thread.run_sync(holder.release)
        assert order == [0, 1, 2, 3]


@pytest.mark.anyio
@pytest.mark.parametrize("clock", [None, ManualClock], ids=["real_clock", "manual_clock"])
async def test_concurrent_acquisitions_coalesce_into_few_script_calls(
    redis_server: RedisServer, clock: type[ManualClock] | None
) -> None:
    # Time injected, not a second code path: on a ManualClock too, the async door never asks
    # under the lock (the tasks queue, and the dispatcher thread grants runs of them at once).
    limits = LimitSet(
        [CallLimit(1, 10**9)],
        backend=backend(redis_server),
        name=uuid.uuid4().hex,
        clock=time.monotonic if clock is None else clock(),
    )
    counting = CountingScript(limits._scheduler.calls.script)  # type: ignore[attr-defined]
    limits._scheduler.calls.script = counting  # type: ignore[attr-defined]
    limits._scheduler.calls.link = None  # type: ignore[attr-defined]  # every call is counted
    done = 0

    async def one() -> None:
        nonlocal done
        async with limits.acquire(timeout=30):
            done += 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)
    assert done == 50
    assert "acquire" not in counting.calls  # the async door never asks under the lock
    # Runs of waiters decided together, off the loop (a manual clock's time moves only when the
    # test moves it, so its runs may be shorter).
    assert counting.calls["batch"] < (25 if clock is None else 50)


def test_the_packed_calls_a_set_keeps_stay_within_their_bytes(redis_server: RedisServer) -> None:
    # A client key comes from outside and may be long: the calls a set keeps packed are bounded
    # in bytes, not only in number.
    import redis

    from aiolimits.redis._calls import _PACK_BYTES

    limits = LimitSet([CallLimit(1, 10**9)], backend=backend(redis_server), name=uuid.uuid4().hex)
    calls = limits._scheduler.calls  # type: ignore[attr-defined]
    conn = redis.Connection()  # type: ignore[no-untyped-call]  # packs; never connects
    for i in range(200):
        words = ["acquire", "d", f"{i}:" + "k" * 20_000]
        expected = conn.pack_command(*words)  # type: ignore[no-untyped-call]
        assert b"".join(calls._packed(conn, words)) == b"".join(expected)
    kept = sum(sum(map(len, packed)) for packed in calls._packs.values())
    assert 0 < kept <= _PACK_BYTES
    huge = ["acquire", "d", "k" * _PACK_BYTES]
    calls._packed(conn, huge)
    assert tuple(huge) not in calls._packs


@pytest.mark.anyio
async def test_a_cancelled_queued_task_leaves_and_the_next_gets_the_slot(
    redis_server: RedisServer,
) -> None:
    limits = LimitSet(
        [ResourceLimit("conns", 1)], backend=backend(redis_server), name=uuid.uuid4().hex
    )
    held = limits.try_acquire()
    granted: list[str] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def wait(name: str) -> None:
        with anyio.CancelScope() as scopes[name]:
            async with limits.acquire(timeout=30):
                granted.append(name)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "first")
            await eventually(lambda: limits.get_stats()["waiting"] == 1)
            tg.start_soon(wait, "second")
            await eventually(lambda: limits.get_stats()["waiting"] == 2)
            scopes["first"].cancel()
            await eventually(lambda: limits.get_stats()["waiting"] == 1)
            held.release()
    assert granted == ["second"]
    assert limits.get_stats()["waiting"] == 0


@pytest.mark.slow
@pytest.mark.anyio
async def test_queued_tasks_get_backend_unavailable_while_redis_is_paused(
    own_server: RedisServer,
) -> None:
    limits = LimitSet(
        [CallLimit(3600, 5)], backend=backend(own_server, timeout=0.2), name=uuid.uuid4().hex
    )
    os.kill(own_server.pid, signal.SIGSTOP)
    try:
        with anyio.fail_after(30), pytest.raises(BackendUnavailable):
            async with limits.acquire():
                pytest.fail("admitted while Redis was paused")
    finally:
        os.kill(own_server.pid, signal.SIGCONT)


@pytest.mark.slow
@pytest.mark.anyio
async def test_queued_tasks_are_decided_in_process_while_redis_is_gone_with_local(
    own_server: RedisServer,
) -> None:
    limits = LimitSet(
        [CallLimit(3600, 1, "sliding_window")],
        backend=backend(own_server, timeout=0.2, on_unavailable="local"),
        name=uuid.uuid4().hex,
    )
    own_server.stop()
    with anyio.fail_after(30):
        async with limits.acquire() as acq:
            assert acq.successful  # the in-process limit: 1 call
        with pytest.raises(TimeoutError):
            async with limits.acquire(timeout=0.5):
                pytest.fail("the in-process limit admitted a second call")


class GrantLog:
    """Wraps a scheduler's script to log the Redis server time of every grant it makes (the
    direct calls of the async door's first step are turned off where this is used)."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.times: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.script, name)

    def __call__(self, client: Any, key: str, args: Any) -> Any:
        from aiolimits.redis._script import acquire_reply

        reply = self.script(client, key, args)
        if args[0] == "batch":
            self.times += [float(reply[0])] * len(reply[2])
        elif args[0] == "acquire" and acquire_reply(reply)[0] == 1:
            self.times.append(float(acquire_reply(reply)[1]))
        return reply


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["pause", "restart"])
@pytest.mark.parametrize("policy", ["raise", "allow", "local"])
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the policies, not the loops, vary here
@pytest.mark.anyio
async def test_a_fault_mid_load_honours_the_policy_and_never_over_admits_in_redis(
    own_server: RedisServer, policy: str, fault: str, request: pytest.FixtureRequest
) -> None:
    limits = LimitSet(
        [CallLimit(0.5, 10, "sliding_window")],  # 10 per 500 ms
        backend=backend(own_server, timeout=0.2, on_unavailable=policy),
        name=uuid.uuid4().hex,
    )
    grants = GrantLog(limits._scheduler.calls.script)  # type: ignore[attr-defined]
    limits._scheduler.calls.script = grants  # type: ignore[attr-defined]
    limits._scheduler.calls.link = None  # type: ignore[attr-defined]  # every grant is logged
    outcomes: dict[str, int] = {"granted": 0, "unavailable": 0}
    resumed = anyio.Event()

    async def attempt() -> None:
        try:
            async with limits.acquire(timeout=20):
                outcomes["granted"] += 1
        except BackendUnavailable:
            outcomes["unavailable"] += 1
            await resumed.wait()

    async def worker() -> None:
        for _ in range(6):
            await attempt()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(worker)
            await anyio.sleep(0.3)  # mid-load
            restarted_at = math.inf
            if fault == "pause":
                os.kill(own_server.pid, signal.SIGSTOP)
                await anyio.sleep(0.6)
                os.kill(own_server.pid, signal.SIGCONT)
            else:  # killed, and a new empty server on the same port (no persistence here)
                port = own_server.port
                os.kill(own_server.pid, signal.SIGKILL)
                own_server.process.wait()
                own_server.stop()
                await anyio.sleep(0.3)
                restarted_at = time.time()  # Redis TIME is this machine's clock
                request.addfinalizer(RedisServer.start(port=port).stop)
            resumed.set()
    assert outcomes["granted"] + outcomes["unavailable"] == 30
    if policy == "raise":
        assert outcomes["unavailable"] > 0
    else:
        assert outcomes["unavailable"] == 0  # admitted (allow) or decided in-process (local)
    # What Redis granted never exceeds 10 in any 500 ms: before and after a pause, and on each
    # server (a restarted server without persistence starts afresh).
    for segment in (
        sorted(t for t in grants.times if t < restarted_at),
        sorted(t for t in grants.times if t >= restarted_at),
    ):
        for i, t in enumerate(segment):
            assert sum(1 for u in segment[i:] if u < t + 0.5) <= 10


def test_a_thread_uses_its_refusal_to_wait_or_time_out_at_once(redis_server: RedisServer) -> None:
    limits = LimitSet(
        [RateLimit("tokens", 3600, 1, "gcra")], backend=backend(redis_server), name=uuid.uuid4().hex
    )
    counting = CountingScript(limits._scheduler.calls.script)  # type: ignore[attr-defined]
    limits._scheduler.calls.script = counting  # type: ignore[attr-defined]
    assert limits.try_acquire({"tokens": 1}).successful
    with pytest.raises(TimeoutError):
        limits.acquire_sync({"tokens": 1}, timeout=5)  # due in an hour: at once
    assert counting.calls == {"acquire": 2}  # the refusal was enough; nobody asked again
    assert limits.get_stats()["timed_out"] == 1


@pytest.mark.anyio
async def test_an_uncontended_task_asks_redis_itself_without_the_dispatcher(
    redis_server: RedisServer,
) -> None:
    limits = LimitSet(
        [CallLimit(3600, 5, "sliding_window")], backend=backend(redis_server), name=uuid.uuid4().hex
    )
    for _ in range(5):
        async with limits.acquire(timeout=5) as acq:
            assert acq.successful
    assert limits._scheduler._hub.dispatcher is None  # type: ignore[attr-defined]  # no thread hop
    with pytest.raises(TimeoutError):
        async with limits.acquire(timeout=5):  # due in an hour: refused by that one call
            pytest.fail("admitted beyond the limit")
    assert limits._scheduler._hub.dispatcher is None  # type: ignore[attr-defined]
    assert limits.get_stats()["timed_out"] == 1


@pytest.mark.slow
@pytest.mark.anyio
async def test_two_processes_taking_turns_on_one_slot_all_get_it(redis_server: RedisServer) -> None:
    # Every hand-over between the two sets goes through a publication; a lost one hangs here.
    a, b = pair(redis_server, [ResourceLimit("conns", 1)])
    inside = 0
    done = 0

    async def use(limits: LimitSet) -> None:
        nonlocal inside, done
        async with limits.acquire(timeout=30):
            inside += 1
            assert inside == 1  # one slot: never two holders, whichever set they came from
            await anyio.sleep(0.002)
            inside -= 1
            done += 1

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(15):
                tg.start_soon(use, a)
                tg.start_soon(use, b)
    assert done == 30
