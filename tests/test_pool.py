"""LimitPool: picking a set (RoundRobin, Random, LeastWait), validation, the verbs, pickling."""

from __future__ import annotations

import collections
import math
import pickle
import threading
from collections.abc import Callable, Sequence

import anyio
import anyio.to_thread
import pytest

from aiolimits import (
    Acquisition,
    CallLimit,
    LimitPool,
    LimitSet,
    LoadBalancingAlgorithm,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)
from aiolimits.testing import ManualClock
from tests.contract._support import eventually, settle

pytestmark = pytest.mark.anyio

Backend = tuple[str, dict[str, object]]


def fixed_clock() -> float:
    """A module-level clock: it pickles by reference."""
    return 100.0


def token_sets(
    n: int, clock: Callable[[], float], capacity: float = 10
) -> list[LimitSet]:  # 10 tokens per 10 s: one token per second
    return [
        LimitSet([RateLimit("tokens", 10, capacity)], config={"set": i}, clock=clock)
        for i in range(n)
    ]


def slot_sets(n: int) -> list[LimitSet]:
    return [LimitSet([ResourceLimit("slot", 1)], config={"set": i}) for i in range(n)]


def picked(acqs: Sequence[Acquisition]) -> list[int]:
    return [acq.config["set"] for acq in acqs]


# -- construction ------------------------------------------------------------------------------


def test_pool_accepts_the_enum_or_its_string_value() -> None:
    sets = slot_sets(2)
    assert LimitPool(sets).load_balancing is LoadBalancingAlgorithm.RoundRobin
    for algorithm in LoadBalancingAlgorithm:
        assert LimitPool(sets, load_balancing=algorithm.value).load_balancing is algorithm
        assert LimitPool(sets, load_balancing=algorithm).load_balancing is algorithm
    assert str(LoadBalancingAlgorithm.LeastWait) == "least_wait"


def test_pool_rejects_sets_with_different_keys_naming_the_index_and_the_keys() -> None:
    good = [LimitSet([CallLimit(60, 10), RateLimit("tokens", 60, 100)]) for _ in range(2)]
    odd = LimitSet([CallLimit(60, 10), RateLimit("bytes", 60, 100)])
    with pytest.raises(ValueError, match=r"limit_sets\[2\] lacks \['tokens'\] and has \['bytes'\]"):
        LimitPool([*good, odd])
    fewer = LimitSet([CallLimit(60, 10)])
    with pytest.raises(ValueError, match=r"limit_sets\[1\] lacks \['tokens'\] and has \[\]"):
        LimitPool([good[0], fewer])


def test_pool_rejects_sets_with_a_different_kind_of_limit_for_a_key() -> None:
    rate = LimitSet([RateLimit("x", 60, 100), ResourceLimit("conn", 2)])
    resource = LimitSet([ResourceLimit("x", 100), ResourceLimit("conn", 2)])
    with pytest.raises(
        ValueError, match=r"in limit_sets\[1\] 'x' is a ResourceLimit, not a RateLimit"
    ):
        LimitPool([rate, resource])


def test_pool_allows_different_capacities_and_algorithms_for_the_same_kinds() -> None:
    a = LimitSet([RateLimit("tokens", 60, 100)])
    b = LimitSet([RateLimit("tokens", 1, 5, algorithm=RateLimitAlgorithm.GCRA)])
    assert len(LimitPool([a, b]).limit_sets) == 2


@pytest.mark.parametrize(
    ("limit_sets", "error", "message"),
    [
        ([], ValueError, "at least one LimitSet"),
        (LimitSet(), TypeError, "got a single LimitSet"),
        ("ab", TypeError, "sequence of LimitSets"),
        (None, TypeError, "sequence of LimitSets"),
        ([LimitSet(), "x"], TypeError, r"limit_sets\[1\] must be a LimitSet, got str 'x'"),
    ],
)
def test_pool_rejects_bad_limit_sets(
    limit_sets: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        LimitPool(limit_sets)  # type: ignore[arg-type]


def test_pool_rejects_the_same_set_twice() -> None:
    limits = LimitSet()
    with pytest.raises(
        ValueError, match=r"limit_sets\[2\] is the same LimitSet as limit_sets\[0\]"
    ):
        LimitPool([limits, LimitSet(), limits])


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"worker_index": -1}, ValueError, "worker_index must be >= 0, got -1"),
        ({"worker_index": "1"}, TypeError, "worker_index must be an int, got str '1'"),
        ({"worker_index": True}, TypeError, "worker_index must be an int, got bool True"),
        ({"worker_index": 1.0}, TypeError, "worker_index must be an int"),
        ({"load_balancing": "fastest"}, ValueError, "load_balancing must be .* got 'fastest'"),
        ({"load_balancing": 1}, TypeError, "load_balancing must be .* got int 1"),
    ],
)
def test_pool_rejects_bad_options_naming_them(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        LimitPool(slot_sets(2), **options)  # type: ignore[arg-type]


# -- RoundRobin and Random ---------------------------------------------------------------------


def test_round_robin_picks_each_set_in_turn() -> None:
    pool = LimitPool([LimitSet(config={"set": i}) for i in range(3)])
    assert picked([pool.try_acquire() for _ in range(7)]) == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize(("worker_index", "first"), [(0, 0), (1, 1), (2, 2), (4, 1)])
def test_round_robin_starts_at_worker_index_modulo_the_number_of_sets(
    worker_index: int, first: int
) -> None:
    pool = LimitPool([LimitSet(config={"set": i}) for i in range(3)], worker_index=worker_index)
    got = picked([pool.try_acquire() for _ in range(3)])
    assert got == [first, (first + 1) % 3, (first + 2) % 3]


def test_round_robin_counter_is_shared_safely_by_threads() -> None:
    pool = LimitPool([LimitSet(config={"set": i}) for i in range(4)])
    counts: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    def work() -> None:
        for _ in range(500):
            got = pool.try_acquire().config["set"]
            with lock:
                counts[got] += 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every pick advanced the counter exactly once: 4000 picks, exactly 1000 per set.
    assert counts == {0: 1000, 1: 1000, 2: 1000, 3: 1000}


def test_round_robin_try_acquire_tries_only_the_picked_set() -> None:
    sets = slot_sets(2)
    held = sets[0].try_acquire()
    pool = LimitPool(sets)
    first = pool.try_acquire()
    assert not first.successful
    assert first.config["set"] == 0  # set 1 was free, but not tried
    second = pool.try_acquire()
    assert second.successful
    assert second.config["set"] == 1
    held.release()


def test_random_spreads_over_every_set() -> None:
    pool = LimitPool([LimitSet(config={"set": i}) for i in range(4)], load_balancing="random")
    pool._random.seed(1234)
    counts = collections.Counter(picked([pool.try_acquire() for _ in range(4000)]))
    assert set(counts) == {0, 1, 2, 3}
    assert all(800 <= n <= 1200 for n in counts.values()), counts


def test_random_is_repeatable_for_a_seed() -> None:
    def run() -> list[int]:
        pool = LimitPool([LimitSet(config={"set": i}) for i in range(3)], load_balancing="random")
        pool._random.seed(99)
        return picked([pool.try_acquire() for _ in range(50)])

    assert run() == run()


async def test_round_robin_acquire_picks_on_entering(anyio_backend: Backend) -> None:
    pool = LimitPool([LimitSet(config={"set": i}) for i in range(2)], worker_index=1)
    got = []
    for _ in range(3):
        async with pool.acquire() as acq:
            got.append(acq.config["set"])
    assert got == [1, 0, 1]


# -- LeastWait ---------------------------------------------------------------------------------


async def test_least_wait_takes_a_free_set_at_once_when_the_next_in_turn_is_full(
    anyio_backend: Backend,
) -> None:
    sets = slot_sets(3)
    held = [sets[0].try_acquire(), sets[1].try_acquire()]  # sets 0 and 1 full, set 2 free
    pool = LimitPool(sets, load_balancing=LoadBalancingAlgorithm.LeastWait)
    with anyio.fail_after(5):  # granted without waiting: no release will ever come
        async with pool.acquire() as acq:
            assert acq.config["set"] == 2
            assert acq.waited == 0.0
            assert [s.get_stats()["waiting"] for s in sets] == [0, 0, 0]
    for h in held:
        h.release()


async def test_least_wait_queues_on_the_set_with_the_smallest_retry_after(
    anyio_backend: Backend,
) -> None:
    clock = ManualClock()
    sets = token_sets(3, clock)
    assert sets[0].try_acquire({"tokens": 10}).successful  # 5 tokens in 5 s
    assert sets[1].try_acquire({"tokens": 7}).successful  # 3 left: 5 tokens in 2 s
    assert sets[2].try_acquire({"tokens": 9}).successful  # 1 left: 5 tokens in 4 s
    pool = LimitPool(sets, load_balancing="least_wait")
    assert pool.retry_after({"tokens": 5}) == pytest.approx(2.0)
    got: list[Acquisition] = []

    async def caller() -> None:
        async with pool.acquire({"tokens": 5}) as acq:
            got.append(acq)

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await settle()
        assert [s.get_stats()["waiting"] for s in sets] == [0, 1, 0]
        clock.advance(1.999)
        await settle()
        assert not got
        clock.advance(0.001)
        await settle()
        assert picked(got) == [1]
    assert got[0].waited == pytest.approx(2.0)


async def test_least_wait_breaks_ties_in_round_robin_order_and_stays_in_its_queue(
    anyio_backend: Backend,
) -> None:
    sets = slot_sets(2)
    held = [s.try_acquire() for s in sets]  # both full: retry_after is inf for each
    pool = LimitPool(sets, load_balancing="least_wait", worker_index=1)
    got: list[Acquisition] = []

    async def caller() -> None:
        async with pool.acquire() as acq:
            got.append(acq)

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await settle()
        assert [s.get_stats()["waiting"] for s in sets] == [0, 1]  # the counter's set: 1
        held[0].release()  # set 0 frees up, but the caller is queued on set 1 and stays there
        await settle()
        assert not got
        assert [s.get_stats()["waiting"] for s in sets] == [0, 1]
        held[1].release()
        await settle()
        assert picked(got) == [1]


async def test_least_wait_rotates_over_sets_that_are_all_free(anyio_backend: Backend) -> None:
    pool = LimitPool([LimitSet(config={"set": i}) for i in range(3)], load_balancing="least_wait")
    got = []
    for _ in range(4):
        async with pool.acquire() as acq:
            got.append(acq.config["set"])
    assert got == [0, 1, 2, 0]


def test_least_wait_try_acquire_tries_every_set() -> None:
    sets = slot_sets(3)
    held = [sets[0].try_acquire(), sets[2].try_acquire()]
    pool = LimitPool(sets, load_balancing="least_wait")
    acq = pool.try_acquire()
    assert acq.successful
    assert acq.config["set"] == 1
    failed = pool.try_acquire()  # all full now; the counter moved on to set 1
    assert not failed.successful
    assert failed.config["set"] == 1
    for h in [*held, acq]:
        h.release()


async def test_least_wait_timeout_fails_at_once_when_every_set_is_too_far(
    anyio_backend: Backend,
) -> None:
    clock = ManualClock()
    sets = token_sets(2, clock)
    for s in sets:
        assert s.try_acquire({"tokens": 10}).successful
    pool = LimitPool(sets, load_balancing="least_wait")
    with pytest.raises(TimeoutError):
        async with pool.acquire({"tokens": 5}, timeout=4.0):
            pass
    assert [s.get_stats()["waiting"] for s in sets] == [0, 0]


async def test_least_wait_cancelled_waiter_leaves_the_queue(anyio_backend: Backend) -> None:
    sets = slot_sets(2)
    held = [s.try_acquire() for s in sets]
    pool = LimitPool(sets, load_balancing="least_wait")
    with anyio.move_on_after(0.05):
        async with pool.acquire():
            pytest.fail("granted while every slot is held")
    assert [s.get_stats()["waiting"] for s in sets] == [0, 0]
    assert sum(s.get_stats()["cancelled"] for s in sets) == 1
    for h in held:
        h.release()


# -- acquire: the context manager -------------------------------------------------------------


async def test_pool_acquire_is_single_use_and_async_only(anyio_backend: Backend) -> None:
    pool = LimitPool(slot_sets(2))
    manager = pool.acquire()
    with pytest.raises(RuntimeError, match="async with"), manager:
        pass
    async with manager as acq:
        assert manager.acquisition is acq
    assert acq.released
    with pytest.raises(RuntimeError, match="already entered"):
        async with manager:
            pass


async def test_pool_acquire_validates_against_every_set_when_called(
    anyio_backend: Backend,
) -> None:
    big = LimitSet([RateLimit("tokens", 60, 1000)])
    small = LimitSet([RateLimit("tokens", 60, 100)])
    pool = LimitPool([big, small])
    with pytest.raises(ValueError, match="tokens"):
        pool.acquire({"tokens": 500})  # fits `big`, never `small`: rejected whichever is picked
    with pytest.raises(ValueError, match="nope"):
        pool.acquire({"nope": 1})
    with pytest.raises(ValueError, match="timeout"):
        pool.acquire({"tokens": 1}, timeout=-1)
    assert pool.get_stats()["granted"] == 0


async def test_pool_releases_the_chosen_set_on_exception(anyio_backend: Backend) -> None:
    sets = slot_sets(2)
    pool = LimitPool(sets)
    with pytest.raises(KeyError):
        async with pool.acquire():
            raise KeyError("boom")
    assert [s.get_stats()["limits"]["slot"]["in_use"] for s in sets] == [0, 0]


# -- acquire_sync ------------------------------------------------------------------------------


async def test_acquire_sync_from_a_worker_thread(anyio_backend: Backend) -> None:
    pool = LimitPool(slot_sets(2), worker_index=1)

    def work() -> tuple[int, bool]:
        with pool.acquire_sync(timeout=5) as acq:
            return acq.config["set"], acq.successful

    assert await anyio.to_thread.run_sync(work) == (1, True)
    assert await anyio.to_thread.run_sync(work) == (0, True)
    with pytest.raises(RuntimeError, match="event loop"):
        pool.acquire_sync()


async def test_least_wait_acquire_sync_waits_in_the_soonest_set(anyio_backend: Backend) -> None:
    clock = ManualClock()
    sets = token_sets(2, clock)
    assert sets[0].try_acquire({"tokens": 8}).successful  # 5 tokens in 3 s
    assert sets[1].try_acquire({"tokens": 10}).successful  # 5 tokens in 5 s
    pool = LimitPool(sets, load_balancing="least_wait", worker_index=1)

    def work() -> tuple[int, float]:
        with pool.acquire_sync({"tokens": 5}, timeout=60) as acq:
            return acq.config["set"], acq.waited

    async with anyio.create_task_group() as tg:
        result: list[tuple[int, float]] = []

        async def run() -> None:
            result.append(await anyio.to_thread.run_sync(work))

        tg.start_soon(run)
        await eventually(lambda: sets[0].get_stats()["waiting"] == 1)
        assert sets[1].get_stats()["waiting"] == 0
        clock.advance(3.0)
    ((chosen, waited),) = result
    assert chosen == 0
    assert waited == pytest.approx(3.0)


def test_acquire_sync_takes_a_free_set_at_once_with_least_wait() -> None:
    sets = slot_sets(2)
    held = sets[0].try_acquire()
    pool = LimitPool(sets, load_balancing="least_wait")
    with pool.acquire_sync(timeout=0) as acq:
        assert acq.config["set"] == 1
    held.release()


# -- questions, pause, stats -------------------------------------------------------------------


def test_retry_after_is_the_minimum_over_the_sets() -> None:
    clock = ManualClock()
    sets = token_sets(2, clock)
    assert sets[0].try_acquire({"tokens": 10}).successful
    pool = LimitPool(sets)
    assert pool.retry_after({"tokens": 5}) == 0.0
    assert sets[1].try_acquire({"tokens": 8}).successful
    assert pool.retry_after({"tokens": 5}) == pytest.approx(3.0)
    slots = LimitPool(slot_sets(2))
    held = [s.try_acquire() for s in slots.limit_sets]
    assert slots.retry_after() == math.inf
    held[1].release()
    assert slots.retry_after() == 0.0


async def test_pause_on_the_pool_pauses_every_set(anyio_backend: Backend) -> None:
    clock = ManualClock()
    sets = token_sets(3, clock)
    pool = LimitPool(sets, load_balancing="least_wait")
    pool.pause(5.0)
    assert [s.get_stats()["paused_for"] for s in sets] == [5.0, 5.0, 5.0]
    assert pool.retry_after({"tokens": 1}) == 5.0
    assert not pool.try_acquire({"tokens": 1}).successful
    got: list[Acquisition] = []

    async def caller() -> None:
        async with pool.acquire({"tokens": 1}) as acq:
            got.append(acq)

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await settle()
        clock.advance(4.999)
        await settle()
        assert not got
        clock.advance(0.001)
        await settle()
        assert len(got) == 1


def test_pausing_one_set_leaves_the_others_admitting() -> None:
    clock = ManualClock()
    sets = token_sets(2, clock)
    pool = LimitPool(sets, load_balancing="least_wait")
    pool.limit_sets[0].pause(30)
    assert pool.retry_after({"tokens": 1}) == 0.0
    acq = pool.try_acquire({"tokens": 1})
    assert acq.successful
    assert acq.config["set"] == 1


def test_pause_with_bad_seconds_pauses_nothing() -> None:
    sets = slot_sets(2)
    pool = LimitPool(sets)
    with pytest.raises(ValueError, match="seconds"):
        pool.pause(-1)
    with pytest.raises(TypeError, match="seconds"):
        pool.pause("5")  # type: ignore[arg-type]
    assert [s.get_stats()["paused_for"] for s in sets] == [0.0, 0.0]


def test_get_stats_has_each_set_with_its_config_and_totals() -> None:
    sets = [
        LimitSet([ResourceLimit("slot", 2)], config={"api_key": k}, name=f"key-{k}")
        for k in ("a", "b")
    ]
    pool = LimitPool(sets, load_balancing="round_robin")
    held = [pool.try_acquire() for _ in range(3)]  # a, b, a
    stats = pool.get_stats()
    assert stats["load_balancing"] == "round_robin"
    assert [(e["config"], e["name"]) for e in stats["sets"]] == [
        ({"api_key": "a"}, "key-a"),
        ({"api_key": "b"}, "key-b"),
    ]
    assert [e["stats"]["limits"]["slot"]["in_use"] for e in stats["sets"]] == [2, 1]
    assert stats["sets"][0]["stats"] == sets[0].get_stats()
    assert {k: stats[k] for k in ("waiting", "granted", "timed_out", "cancelled", "refunded")} == {
        "waiting": 0,
        "granted": 3,
        "timed_out": 0,
        "cancelled": 0,
        "refunded": 0,
    }
    for h in held:
        h.release()


def test_repr_shows_algorithm_sets_and_counts() -> None:
    pool = LimitPool(slot_sets(2), load_balancing="random")
    pool.try_acquire().release()
    assert repr(pool) == "<LimitPool load_balancing=random sets=2 waiting=0 granted=1>"


# -- pickling ----------------------------------------------------------------------------------


def test_limitset_pickles_its_limits_and_options_with_fresh_state() -> None:
    limits: list[CallLimit | RateLimit] = [
        CallLimit(60, 5),
        RateLimit("tokens", 60, 100, algorithm="gcra"),
    ]
    original = LimitSet(limits, config={"api_key": "k1"}, name="llm", clock=fixed_clock)
    assert original.try_acquire({"tokens": 100}).successful
    restored = pickle.loads(pickle.dumps(original))
    assert restored is not original
    assert restored.limits == tuple(limits)
    assert restored.config == {"api_key": "k1"}
    assert restored.name == "llm"
    assert restored._clock is fixed_clock
    # Memory state is per process: the copy starts full.
    assert restored.get_stats()["limits"]["tokens"]["available"] == 100
    assert original.get_stats()["limits"]["tokens"]["available"] == 0


def test_limitset_with_an_unpicklable_clock_raises_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match=r"clock ManualClock\(0\.0\) is not picklable"):
        pickle.dumps(LimitSet(clock=ManualClock()))
    with pytest.raises(TypeError, match=r"time\.monotonic"):
        pickle.dumps(LimitSet(clock=lambda: 0.0))


def test_pool_pickles_its_sets_and_options() -> None:
    sets = [
        LimitSet([RateLimit("tokens", 60, 100)], config={"set": i}, name=f"s{i}", clock=fixed_clock)
        for i in range(3)
    ]
    pool = LimitPool(sets, load_balancing="least_wait", worker_index=2)
    pool.try_acquire({"tokens": 1})  # moves the counter: the copy starts over at worker_index
    restored = pickle.loads(pickle.dumps(pool))
    assert restored.load_balancing is LoadBalancingAlgorithm.LeastWait
    assert restored.worker_index == 2
    assert [s.config for s in restored.limit_sets] == [{"set": 0}, {"set": 1}, {"set": 2}]
    assert [s.name for s in restored.limit_sets] == ["s0", "s1", "s2"]
    assert all(s.limits == sets[0].limits for s in restored.limit_sets)
    assert restored.try_acquire({"tokens": 1}).config["set"] == 2


def test_pool_pickles_with_the_real_clock() -> None:
    pool = LimitPool(slot_sets(2), load_balancing="random")
    restored = pickle.loads(pickle.dumps(pool))
    assert restored.load_balancing is LoadBalancingAlgorithm.Random
    assert restored.try_acquire().successful
