"""KeyedLimitSet on RedisBackend: one expiring hash per client key, shared by every process.

Two KeyedLimitSets with the same ``name`` stand for two processes (each has its own proxies,
queues, threads and subscription). Expiry is checked two ways: under ``ManualClock`` the hash's
PTTL is the simulated time until the key is fresh (rounded up, plus the margin); under the real
clock a short window's hash really leaves Redis (seen through a keyspace notification).
"""

from __future__ import annotations

import gc
import itertools
import math
import pickle
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from hypothesis import given, settings

from aiolimits import (
    Acquisition,
    BackendUnavailable,
    CallLimit,
    KeyedLimitSet,
    LimitSet,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)
from aiolimits._limits import Limit
from aiolimits._scheduler import Scheduler
from aiolimits.testing import ManualClock

from ._redis_server import (
    RedisClusterNodes,
    RedisFailoverCluster,
    RedisServer,
    own_server,
    redis_cluster,
    redis_failover_cluster,
    redis_server,
)
from .contract._support import eventually
from .test_keyed import _LIMIT_SPECS, _OPS, FIRST, SECOND, Spec, replay
from .test_redis_failover import fail_over

if TYPE_CHECKING:
    import redis

    from aiolimits.redis import RedisBackend

__all__ = [
    "own_server",
    "redis_cluster",
    "redis_failover_cluster",
    "redis_server",
]  # the fixtures

pytestmark = pytest.mark.filterwarnings("error")

MARGIN_MS = 1000  # lua/base.lua FRESH_MARGIN_MS


def backend(
    server: RedisServer | RedisClusterNodes | RedisFailoverCluster, **kwargs: Any
) -> RedisBackend:
    from aiolimits.redis import RedisBackend

    return RedisBackend(server.url, **kwargs)


def pair(
    server: RedisServer | RedisClusterNodes | RedisFailoverCluster,
    limits: list[Limit],
    **kwargs: Any,
) -> tuple[KeyedLimitSet, KeyedLimitSet]:
    """Two keyed sets on one name: two processes, as far as the limits can tell."""
    name = uuid.uuid4().hex + kwargs.pop("suffix", "")
    clock = kwargs.pop("clock", None)
    extra = {} if clock is None else {"clock": clock}
    a = KeyedLimitSet(limits, backend=backend(server, **kwargs), name=name, **extra)
    b = KeyedLimitSet(limits, backend=backend(server, **kwargs), name=name, **extra)
    return a, b


def client(server: RedisServer) -> redis.Redis:
    import redis

    return redis.Redis.from_url(server.url)


def hash_of(keyed: KeyedLimitSet, key: str) -> str:
    assert keyed.name is not None
    return keyed.backend.key_hash_key(keyed.name, key)  # type: ignore[attr-defined,no-any-return]


# --- shared state, per key ------------------------------------------------------------------------


def test_keys_are_independent_and_two_sets_on_one_name_share_each_key(
    redis_server: RedisServer,
) -> None:
    a, b = pair(redis_server, [CallLimit(3600, 2, "sliding_window"), ResourceLimit("conns", 1)])
    held = a.try_acquire("alice")
    assert held.successful
    assert not b.try_acquire("alice").successful  # alice's slot is held by a
    assert b.try_acquire("bob").successful  # bob has limits of his own
    held.release()
    assert b.try_acquire("alice").successful  # alice's second call, and her slot
    assert not a.try_acquire("alice").successful  # both calls used, in either process
    assert a.get_stats("alice")["limits"]["call_count"]["available"] == 0
    assert a.get_stats("bob")["limits"]["call_count"]["available"] == 1
    assert a.get_stats("carol")["limits"]["conns"]["in_use"] == 0
    assert "carol" not in a  # asking made no key, here or in Redis
    assert a.retry_after("dave", {"conns": 1}) == 0.0
    assert not client(redis_server).exists(hash_of(a, "carol"), hash_of(a, "dave"))
    assert b.retry_after("alice", {"conns": 0}) > 3000  # a call comes back within the hour


def test_keys_and_names_never_share_a_hash(redis_server: RedisServer) -> None:
    from aiolimits.redis import RedisBackend

    store = RedisBackend(redis_server.url, prefix="p")
    pairs = [("a", "b:c"), ("a:b", "c"), ("a", "b}c"), ("", "x"), ("x", "")]
    keys = {store.key_hash_key(name, key) for name, key in pairs}
    assert len(keys) == len(pairs)
    assert not any(key.startswith("{") for key in keys)  # no plain set's hash
    limits = [CallLimit(3600, 1)]
    for name, key in pairs[:3]:
        keyed = KeyedLimitSet(limits, backend=store, name=f"{uuid.uuid4().hex}{name}")
        assert keyed.try_acquire(key).successful


def test_a_keyed_and_a_plain_set_cannot_share_a_name(redis_server: RedisServer) -> None:
    limits = [CallLimit(60, 5)]
    name = uuid.uuid4().hex
    KeyedLimitSet(limits, backend=backend(redis_server), name=name)
    with pytest.raises(ValueError, match=r"belongs to a KeyedLimitSet .*not to a LimitSet"):
        LimitSet(limits, backend=backend(redis_server), name=name)
    other = uuid.uuid4().hex
    LimitSet(limits, backend=backend(redis_server), name=other)
    with pytest.raises(ValueError, match=r"belongs to a LimitSet, not to a KeyedLimitSet"):
        KeyedLimitSet(limits, backend=backend(redis_server), name=other)


def test_other_limits_under_one_keyed_name_say_what_differs(redis_server: RedisServer) -> None:
    name = uuid.uuid4().hex
    KeyedLimitSet([RateLimit("tokens", 60, 1000)], backend=backend(redis_server), name=name)
    with pytest.raises(ValueError, match=r"capacity=2000.* where it has .*capacity=1000"):
        KeyedLimitSet([RateLimit("tokens", 60, 2000)], backend=backend(redis_server), name=name)


def test_a_name_is_required(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="name is required"):
        KeyedLimitSet([CallLimit(1, 1)], backend=backend(redis_server))


def test_dropped_proxies_forget_nothing(redis_server: RedisServer) -> None:
    keyed = KeyedLimitSet(
        [CallLimit(3600, 1, "fixed_window"), RateLimit("tokens", 3600, 10, "sliding_window")],
        backend=backend(redis_server),
        name=uuid.uuid4().hex,
        max_keys=3,
    )
    first = keyed.try_acquire("k0", {"tokens": 10})
    assert first.successful
    for i in range(1, 12):
        assert keyed.try_acquire(f"k{i}", {"tokens": 1}).successful
    assert len(keyed) <= 3
    assert "k0" not in keyed  # its proxy was dropped ...
    assert not keyed.try_acquire("k0", {"tokens": 1}).successful  # ... its state was not
    first.update({"tokens": 4})  # an acquisition on a dropped proxy still settles in Redis
    assert keyed.get_stats("k0")["limits"]["tokens"]["available"] == 6
    assert keyed.get_keys_stats()["forgotten"] == 0


def test_the_async_door_of_a_redis_scheduler_never_asks_on_the_loop_under_the_lock(
    redis_server: RedisServer,
) -> None:
    """Redis schedulers are ``remote`` as the scheduler's own (compiled) code reads it, through
    its slot: else an async acquire asks Redis under the lock, blocking the event loop."""
    keyed = KeyedLimitSet(
        [RateLimit("tokens", 3600, 1000)], backend=backend(redis_server), name=uuid.uuid4().hex
    )
    plain = LimitSet([RateLimit("tokens", 3600, 1000)], backend=backend(redis_server), name="r")
    keyed.try_acquire("k", {"tokens": 1})
    slot = Scheduler.__dict__["remote"]
    for sched in (keyed._proxies["k"].sched, plain._scheduler):
        assert slot.__get__(sched, Scheduler) is True


def test_proxies_of_keys_in_recent_use_are_kept(redis_server: RedisServer) -> None:
    """A proxy is a cache of a key Redis holds: below max_keys an idle one is kept, not made
    again at its key's next call (every call would otherwise make one)."""
    keyed = KeyedLimitSet(
        [RateLimit("tokens", 3600, 1000)], backend=backend(redis_server), name=uuid.uuid4().hex
    )
    for _ in range(2):
        for i in range(50):
            with keyed.try_acquire(f"k{i}", {"tokens": 1}):
                pass
    assert len(keyed) == 50
    assert keyed.get_keys_stats()["dropped"] == 0


def test_pickles_with_a_url_backend_and_shares_each_key(redis_server: RedisServer) -> None:
    keyed = KeyedLimitSet(
        [CallLimit(3600, 1)], backend=backend(redis_server), name=uuid.uuid4().hex, max_keys=7
    )
    again = pickle.loads(pickle.dumps(keyed))
    assert (again.name, again.max_keys, again.limits) == (keyed.name, 7, keyed.limits)
    assert keyed.try_acquire("k").successful
    assert not again.try_acquire("k").successful
    assert again.try_acquire("other").successful


# --- expiry -------------------------------------------------------------------------------------


def ttl_ms(seconds: float) -> int:
    """The TTL the script sets for a key fresh in ``seconds`` (simulated)."""
    return math.ceil(seconds * 1000) + MARGIN_MS


def server_ms(store: redis.Redis) -> float:
    seconds, micros = store.time()
    return seconds * 1000 + micros / 1000


def ttl_given(store: redis.Redis, key: str, call: Callable[[], object]) -> tuple[float, float]:
    """Bounds of the TTL in ms that ``call`` gave ``key``: its absolute expiry less the server's
    clock just after and just before the call (no assumption on how long anything takes)."""
    before = math.floor(server_ms(store))
    call()
    after = math.ceil(server_ms(store))
    at: int = store.pexpiretime(key)
    return at - after, at - before


@pytest.mark.parametrize(
    ("limit", "requested", "fresh_in"),
    [
        (RateLimit("r", 100, 10, "token_bucket"), {"r": 4}, 40.0),
        (RateLimit("r", 100, 10, "gcra"), {"r": 4}, 40.0),
        (RateLimit("r", 100, 10, "leaky_bucket"), {"r": 4}, 40.0),
        (RateLimit("r", 100, 10, "sliding_window"), {"r": 4}, 100.0),
        (RateLimit("r", 100, 10, "fixed_window"), {"r": 4}, 70.0),  # the window ends at 100
        (ResourceLimit("c", 2), {"c": 1}, 50.0),  # the lease
    ],
    ids=["token_bucket", "gcra", "leaky_bucket", "sliding_window", "fixed_window", "resource"],
)
def test_a_keys_hash_lives_until_it_is_fresh_rounded_up_plus_the_margin(
    redis_server: RedisServer, limit: Limit, requested: dict[str, float], fresh_in: float
) -> None:
    clock = ManualClock(30.0)
    keyed = KeyedLimitSet(
        [limit], backend=backend(redis_server, lease_seconds=50), name=uuid.uuid4().hex, clock=clock
    )
    low, high = ttl_given(
        client(redis_server),
        hash_of(keyed, "k"),
        lambda: keyed.try_acquire("k", requested).successful or pytest.fail("refused"),
    )
    assert low <= ttl_ms(fresh_in) <= high


def test_a_pause_keeps_the_hash_until_it_ends_and_the_ttl_is_never_shortened(
    redis_server: RedisServer,
) -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet(
        [RateLimit("r", 10, 10)], backend=backend(redis_server), name=uuid.uuid4().hex, clock=clock
    )
    store = client(redis_server)
    low, high = ttl_given(store, hash_of(keyed, "k"), lambda: keyed.pause(200, key="k"))
    assert low <= ttl_ms(200) <= high
    held: list[Acquisition] = []
    low, high = ttl_given(
        store, hash_of(keyed, "k2"), lambda: held.append(keyed.try_acquire("k2", {"r": 10}))
    )
    assert held[0].successful
    assert low <= ttl_ms(10) <= high  # the bucket is full again in 10 s
    at = store.pexpiretime(hash_of(keyed, "k2"))
    held[0].update({"r": 0})  # all given back: fresh now, yet the expiry stays
    assert keyed.get_stats("k2")["limits"]["r"]["available"] == 10
    assert store.pexpiretime(hash_of(keyed, "k2")) == at
    low, high = ttl_given(store, hash_of(keyed, "k3"), lambda: keyed.try_acquire("k3", {"r": 0}))
    assert low <= MARGIN_MS <= high  # taking nothing: fresh at once


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # Redis's expiry is the point, not loops
@pytest.mark.anyio
async def test_a_short_window_really_leaves_redis(own_server: RedisServer) -> None:
    store = client(own_server)
    store.config_set("notify-keyspace-events", "Ex")
    keyed = KeyedLimitSet([CallLimit(0.05, 1)], backend=backend(own_server), name="short")
    pubsub = store.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe("__keyevent@0__:expired")
    try:
        assert keyed.try_acquire("k").successful
        key = hash_of(keyed, "k")
        assert store.exists(key)
        expired = None
        with anyio.fail_after(20):
            while expired != key:
                message = await anyio.to_thread.run_sync(pubsub.get_message, False, 20.0)
                if message is not None:
                    expired = message["data"].decode()
        assert not store.exists(key)
        assert store.exists("{aiolimits:short}")  # the declaration stays
        assert keyed.try_acquire("k").successful  # a fresh key again
    finally:
        pubsub.close()


# Receipts held across an expiry are worth nothing: a refund gives back nothing, an overage charge
# lands on the new state; exactly as the memory KeyedLimitSet, which drops the fresh key.
@pytest.mark.parametrize("algorithm", list(RateLimitAlgorithm))
@pytest.mark.parametrize("usage", [0, 9])
def test_a_receipt_held_across_an_expiry_is_worth_nothing_like_in_memory(
    redis_server: RedisServer, algorithm: RateLimitAlgorithm, usage: int
) -> None:
    limits: list[Limit] = [RateLimit("r", 10, 10, algorithm)]
    clock = ManualClock(1000.0)
    shared = KeyedLimitSet(
        limits, backend=backend(redis_server), name=uuid.uuid4().hex, clock=clock
    )
    memory = KeyedLimitSet(limits, clock=clock, max_keys=1)
    store = client(redis_server)
    old = [keyed.try_acquire("k", {"r": 5}) for keyed in (shared, memory)]
    assert all(acq.successful for acq in old)
    clock.advance(200)  # fresh again
    store.delete(hash_of(shared, "k"))  # what the expiry does
    assert memory.try_acquire("other", {"r": 1}).successful  # memory drops its fresh key
    assert "k" not in memory
    step = 1.0 if algorithm is RateLimitAlgorithm.LeakyBucket else 0.001
    for _ in range(3):  # a new state, with ids of its own
        assert all(keyed.try_acquire("k", {"r": 1}).successful for keyed in (shared, memory))
        clock.advance(step)
    for acq in old:
        acq.update({"r": usage})
    available = [keyed.get_stats("k")["limits"]["r"]["available"] for keyed in (shared, memory)]
    assert available[0] == available[1]
    assert [keyed.retry_after("k", {"r": 7}) for keyed in (shared, memory)] == [
        memory.retry_after("k", {"r": 7})
    ] * 2


# --- the model property, against Redis ----------------------------------------------------------


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_the_model_replays_agree_on_redis(redis_server: RedisServer, functions: bool) -> None:
    for spec, ops, start in (FIRST, SECOND):
        replay(spec, ops, start, make_keyed=redis_keyed(redis_server, functions=functions))


def redis_keyed(server: RedisServer, *, functions: bool = True) -> Any:
    def make(limits: list[Limit], clock: ManualClock) -> KeyedLimitSet:
        # Leases as long as the simulated run: a slot is held until released, as in memory.
        store = backend(server, lease_seconds=1e6)
        store._lua.functions = functions  # False: the script as EVALSHA (no FCALL on the server)
        return KeyedLimitSet(limits, max_keys=3, backend=store, name=uuid.uuid4().hex, clock=clock)

    return make


@settings(max_examples=15)
@given(spec=_LIMIT_SPECS, ops=_OPS)
def test_each_key_on_redis_decides_as_its_own_limitset(
    redis_server: RedisServer, spec: Spec, ops: list[int]
) -> None:
    replay(spec, ops, 5.5, make_keyed=redis_keyed(redis_server))


# --- threads and wake-ups -----------------------------------------------------------------------


def threads_named(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def waiting(keyed: KeyedLimitSet, keys: list[str]) -> int:
    return sum(keyed.get_stats(key)["waiting"] for key in keys)


def pubsub_connections(server: RedisServer) -> tuple[int, int]:
    """(channel subscriptions, pattern subscriptions) over every connection of ``server``."""
    subs = psubs = 0
    for entry in client(server).client_list():
        subs += int(entry.get("sub", 0))
        psubs += int(entry.get("psub", 0))
    return subs, psubs


@pytest.mark.anyio
async def test_waiters_on_200_keys_share_one_dispatcher_one_subscription_and_one_renewer(
    own_server: RedisServer,
) -> None:
    # Long leases: only a wake-up (no lease expiry) can admit the waiters in time.
    holder, waiter = pair(own_server, [ResourceLimit("c", 1)], lease_seconds=120)
    keys = [f"client-{i}" for i in range(200)]
    held = [holder.try_acquire(key) for key in keys]
    assert all(acq.successful for acq in held)
    label = f"{{aiolimits:{waiter.name}}} keys"
    granted: list[str] = []

    async def wait(key: str) -> None:
        async with waiter.acquire(key, timeout=30):
            granted.append(key)

    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(wait, key)
        await eventually(lambda: waiting(waiter, keys) == len(keys), within=20)
        assert len(threads_named(f"aiolimits-dispatch {label}")) <= 2  # one per set
        # One per set: each hears its keys' wake-ups and the changes of its limits.
        assert len(threads_named(f"aiolimits-wake {label}")) == 2
        assert len(threads_named(f"aiolimits-renew {label}")) == 1  # the holding set's
        assert pubsub_connections(own_server) == (0, 2)  # one pattern subscription per set
        for acq in held:
            acq.release()
    assert sorted(granted) == sorted(keys)


@pytest.mark.anyio
async def test_the_due_queues_of_many_keys_are_asked_for_in_one_round_trip(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 20 keys each have a waiter behind a held slot. The dispatcher is held up by a job of ours
    # while the 20 releases wake their keys, so that its next round finds all 20 due: their
    # calls go out in one pipeline, and every waiter is granted exactly its one slot.
    import redis.client

    from aiolimits.redis._keys import RedisKeys

    holder, waiter = pair(own_server, [ResourceLimit("c", 1)], lease_seconds=120)
    keys = [f"client-{i}" for i in range(20)]
    held = [holder.try_acquire(key) for key in keys]
    assert all(acq.successful for acq in held)
    sizes: list[int] = []
    execute = redis.client.Pipeline.execute

    def counting(self: Any, raise_on_error: bool = True) -> Any:
        sizes.append(len(self.command_stack))
        return execute(self, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting)
    granted: list[str] = []

    async def wait(key: str) -> None:
        async with waiter.acquire(key, timeout=30):
            granted.append(key)
            await anyio.sleep(0.05)

    assert isinstance(waiter._shared, RedisKeys)
    hub = waiter._shared.hub
    gate = threading.Event()
    # A key with nothing due, to hold the dispatcher up by (checked out: never dropped).
    gate_key = waiter._checkout("gate").sched
    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(wait, key)
        await eventually(lambda: waiting(waiter, keys) == len(keys), within=20)
        dispatcher = hub.dispatcher
        assert dispatcher is not None

        def asked() -> bool:
            # Every key's waiter has had its first answer (a full slot: no wake time), and the
            # dispatcher has nothing left to do: the round our job opens holds only its key.
            heads = [next(iter(waiter._proxies[key].sched.queue)) for key in keys]
            return all(head.wake_at == math.inf for head in heads) and not dispatcher._pending

        await eventually(asked, within=20)
        holding = threading.Event()

        def hold() -> None:
            holding.set()
            gate.wait()

        hub.signal(gate_key, hold)  # type: ignore[arg-type]
        await eventually(holding.is_set)  # the dispatcher is in our job: what wakes now waits

        # From a thread, each release is sent before it returns (on the event loop it would be
        # handed to the dispatcher, which our job holds up, and mix with the wake-ups).
        def release_all() -> None:
            for acq in held:
                acq.release()

        await anyio.to_thread.run_sync(release_all)
        # The 20 woken keys, waiting for the dispatcher's next round (it took the gate's key
        # with the gate job).
        await eventually(lambda: len(dispatcher._pending) == len(keys), within=20)
        gate.set()
    assert sorted(granted) == sorted(keys)
    assert max(sizes) == len(keys)
    for key in keys:
        assert waiter.get_stats(key)["limits"]["c"]["in_use"] == 0


@pytest.mark.anyio
async def test_the_threads_of_a_keyed_set_end_when_it_is_garbage(
    redis_server: RedisServer,
) -> None:
    holder, waiter = pair(redis_server, [ResourceLimit("c", 1)], lease_seconds=120)
    label = f"{{aiolimits:{waiter.name}}} keys"
    held = holder.try_acquire("k")
    with pytest.raises(TimeoutError):
        async with waiter.acquire("k", timeout=0.2):  # queues: dispatcher and subscriber
            pytest.fail("admitted beyond the limit")
    held.release()  # on the event loop: handed to the holder's dispatcher thread
    holder.get_stats("k")  # sends it first: the dispatcher holds nothing of the set any more
    threads = [t for t in threading.enumerate() if label in t.name]
    assert {t.name.split(" ")[0] for t in threads} == {
        "aiolimits-dispatch",
        "aiolimits-wake",
        "aiolimits-renew",
    }
    del holder, waiter, held
    # A background thread may still be finishing a round that holds the sets (a cycle, which
    # only the collector frees): collect again until the threads ended, within a bound.
    for _ in range(100):
        gc.collect()
        if not any(thread.is_alive() for thread in threads):
            break
        threads[0].join(0.1)
    assert not any(thread.is_alive() for thread in threads)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("suffix", "key"),
    [("", "k"), ("*?[a]\\^{x}", "*}:wake?")],  # glob characters, braces: escaped, still routed
    ids=["plain", "glob-characters"],
)
async def test_a_release_in_another_process_wakes_the_waiter_of_that_key(
    redis_server: RedisServer, suffix: str, key: str
) -> None:
    holder, waiter = pair(redis_server, [ResourceLimit("c", 1)], lease_seconds=120, suffix=suffix)
    held = holder.try_acquire(key)
    assert held.successful
    assert waiter.try_acquire("other").successful  # another key is not blocked
    done = anyio.Event()

    async def wait() -> None:
        async with waiter.acquire(key, timeout=30) as acq:  # far shorter than the lease
            assert acq.successful
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await eventually(lambda: waiter.get_stats(key)["waiting"] >= 1, within=20)
        held.release()
        with anyio.fail_after(25):
            await done.wait()


def test_a_thread_waits_on_a_key_until_another_process_releases_it(
    redis_server: RedisServer,
) -> None:
    holder, waiter = pair(redis_server, [ResourceLimit("c", 1)], lease_seconds=120)
    held = holder.try_acquire("k")
    got: list[bool] = []

    def wait() -> None:
        with waiter.acquire_sync("k", timeout=30) as acq:
            got.append(acq.successful)

    thread = threading.Thread(target=wait)
    thread.start()
    ready = threading.Event()
    while waiter.get_stats("k")["waiting"] < 1:
        ready.wait(0.01)
    held.release()
    thread.join(30)
    assert got == [True]


# --- failure policies ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["raise", "allow", "local"])
def test_the_failure_policy_applies_per_key_when_redis_is_gone(
    own_server: RedisServer, policy: str
) -> None:
    keyed = KeyedLimitSet(
        [CallLimit(3600, 1)],
        backend=backend(own_server, timeout=0.2, on_unavailable=policy),
        name=uuid.uuid4().hex,
    )
    assert keyed.try_acquire("a").successful
    own_server.stop()
    if policy == "raise":
        with pytest.raises(BackendUnavailable):
            keyed.try_acquire("b")
        return
    assert keyed.try_acquire("b").successful  # allowed, or by b's fresh local limits
    second = keyed.try_acquire("b").successful
    assert second is (policy == "allow")  # "local": b's one call in this process is used


# --- Redis Cluster ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_keys_spread_over_the_cluster_and_wake_across_nodes(
    redis_cluster: RedisClusterNodes,
) -> None:
    from redis.cluster import RedisCluster

    holder, waiter = pair(redis_cluster, [CallLimit(3600, 2), ResourceLimit("c", 1)])
    keys = [f"user-{i}" for i in range(12)]
    cluster = RedisCluster.from_url(redis_cluster.url)
    try:
        owners = {
            cluster.get_node_from_key(hash_of(holder, key)).port  # type: ignore[no-untyped-call]
            for key in keys
        }
        root = cluster.get_node_from_key(f"{{aiolimits:{holder.name}}}").port  # type: ignore[no-untyped-call]
        # A key on another node than the one the waiting set subscribes on.
        far = next(
            key
            for key in keys
            if cluster.get_node_from_key(hash_of(holder, key)).port != root  # type: ignore[no-untyped-call]
        )
    finally:
        cluster.close()
    assert len(owners) >= 2
    held = {key: holder.try_acquire(key) for key in keys}
    assert all(acq.successful for acq in held.values())
    assert not any(waiter.try_acquire(key).successful for key in keys)
    done = anyio.Event()

    async def wait() -> None:
        async with waiter.acquire(far, timeout=30):
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await eventually(lambda: waiter.get_stats(far)["waiting"] >= 1, within=20)
        held[far].release()
        with anyio.fail_after(25):
            await done.wait()


# --- integrations -------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn runs on asyncio only
@pytest.mark.anyio
async def test_two_starlette_apps_share_each_clients_limit_through_redis(
    redis_server: RedisServer,
) -> None:
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from aiolimits.integrations.starlette import LimitMiddleware, header

    from ._servers import uvicorn_server

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    def app(keyed: KeyedLimitSet) -> Starlette:
        made = Starlette(routes=[Route("/", hello)])
        made.add_middleware(LimitMiddleware, limits=keyed, key=header("x-api-key"))
        return made

    first, second = pair(redis_server, [CallLimit(window_seconds=3600, capacity=2)])
    async with (
        uvicorn_server(app(first)) as one,
        uvicorn_server(app(second)) as two,
        httpx.AsyncClient() as http,
    ):
        statuses = [
            (await http.get(url, headers={"x-api-key": key})).status_code
            for url, key in [(one, "a"), (two, "a"), (one, "a"), (two, "b")]
        ]
    assert statuses == [200, 200, 429, 200]  # a's two calls, across both apps; b's own


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a Cluster and a failover per loop: one
@pytest.mark.anyio
async def test_the_keyed_subscription_moves_to_the_new_master_after_a_failover(
    redis_failover_cluster: RedisFailoverCluster,
) -> None:
    from redis.cluster import RedisCluster

    cluster = redis_failover_cluster
    # Leases far longer than the test: only the publication of the release can wake the waiter.
    holder, waiter = pair(cluster, [ResourceLimit("c", 1)], lease_seconds=600, timeout=0.5)
    root = f"{{aiolimits:{waiter.name}}}"  # the waiting set subscribes on this key's master
    client = RedisCluster.from_url(cluster.url)
    try:
        subscribed = client.get_node_from_key(root).port  # type: ignore[no-untyped-call]
        key = next(  # a key on another master: its release is not the first call after failover
            f"k{i}"
            for i in itertools.count()
            if client.get_node_from_key(hash_of(holder, f"k{i}")).port != subscribed  # type: ignore[no-untyped-call]
        )
    finally:
        client.close()
    held = holder.try_acquire(key)
    assert held.successful
    admitted = anyio.Event()

    async def wait() -> None:
        async with waiter.acquire(key, timeout=60):
            admitted.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await eventually(lambda: waiter.get_stats(key)["waiting"] == 1, within=20)
        await anyio.to_thread.run_sync(fail_over, cluster, root)
        held.release()
        with anyio.fail_after(30):  # the subscriber reconnects within a second or so
            await admitted.wait()
