"""Statistics as values (semantics §4): ``statistics()`` beside ``get_stats()``, with clean numbers.

Counts are ints on every backend (also after a process backend reclaimed a dead holder's slot);
amounts of units are rounded down to 1e-6 and pauses up to 1e-6 s, so no figure overstates what
is available; ``get_stats()`` is the same snapshot as a dict. The contract suite checks the
agreement of the two forms on every backend (``tests/contract/acquisition.py``).
"""

from __future__ import annotations

import math
import multiprocessing
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from aiolimits import (
    CallLimit,
    KeyedLimitSet,
    KeyedStatistics,
    LimitPool,
    LimitSet,
    LimitSetStatistics,
    LoadBalancingAlgorithm,
    PoolStatistics,
    ProcessBackend,
    RateLimit,
    RateLimitAlgorithm,
    RateLimitStatistics,
    ResourceLimit,
    ResourceLimitStatistics,
)
from aiolimits._statistics import seconds_up, units
from aiolimits.testing import ManualClock

from . import _process_workers as workers

_spawn = multiprocessing.get_context("spawn")


def mixed(clock: ManualClock, **kwargs: Any) -> LimitSet:
    return LimitSet(
        [
            CallLimit(60, 100),
            RateLimit("tokens", 3, 1),  # a third of a unit per second: float noise on refill
            ResourceLimit("conn", 2),
        ],
        clock=clock,
        **kwargs,
    )


def test_statistics_is_a_frozen_typed_snapshot() -> None:
    clock = ManualClock()
    limits = mixed(clock)
    held = limits.try_acquire({"tokens": 1})
    assert held.successful
    clock.advance(0.1)
    stats = limits.statistics()
    assert isinstance(stats, LimitSetStatistics)
    tokens, conn, calls = stats.limits["tokens"], stats.limits["conn"], stats.limits["call_count"]
    assert isinstance(tokens, RateLimitStatistics)
    assert isinstance(conn, ResourceLimitStatistics)
    assert (calls.kind, tokens.kind, conn.kind) == ("call", "rate", "resource")
    assert tokens.algorithm is RateLimitAlgorithm.TokenBucket
    assert list(stats.limits) == ["call_count", "tokens", "conn"]  # declaration order
    # 0.1 s at 1/3 per second is 0.0333...: shown rounded down to a millionth.
    assert tokens.available == 0.033333
    assert (conn.available, conn.in_use) == (1, 1)
    assert (stats.waiting, stats.granted, stats.timed_out, stats.cancelled) == (0, 1, 0, 0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.granted = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.limits["tokens"] = tokens  # type: ignore[index]
    # A snapshot: later changes do not show in it.
    held.release()
    assert conn.in_use == 1
    assert limits.statistics().limits["conn"].in_use == 0  # type: ignore[union-attr]
    assert attrs.evolve(stats) == stats  # a value (it holds a mapping, so it is not hashable)
    with pytest.raises(TypeError):
        hash(stats)
    assert hash(tokens) == hash(attrs.evolve(tokens))


def test_get_stats_is_the_same_snapshot_as_a_dict() -> None:
    clock = ManualClock()
    limits = mixed(clock)
    held = limits.try_acquire({"tokens": 1})
    held.update({"tokens": 0.3})  # 0.7 refunded
    limits.pause(0.1 + 0.2)  # 0.30000000000000004 s
    clock.advance(0.05)
    stats = limits.get_stats()
    assert stats == limits.statistics().as_dict()
    assert stats["limits"]["tokens"]["refunded"] == 0.7
    assert stats["refunded"] == 0.7
    # Rounded up: the pause is not shown shorter than it is.
    assert stats["paused_for"] == 0.250001
    assert stats["paused_for"] >= (0.1 + 0.2) - 0.05
    held.release()


def test_counts_are_ints_whatever_the_amounts() -> None:
    clock = ManualClock()
    limits = mixed(clock)
    with limits.try_acquire({"tokens": 1, "conn": 2}):
        stats = limits.get_stats()
    for value in (stats["waiting"], stats["granted"], stats["timed_out"], stats["cancelled"]):
        assert type(value) is int
    conn = stats["limits"]["conn"]
    assert (type(conn["in_use"]), type(conn["available"]), type(conn["waiting"])) == (int,) * 3
    # Rate amounts are floats, whatever the algorithm keeps.
    assert type(stats["limits"]["tokens"]["available"]) is float


def test_counts_are_ints_after_a_process_backend_reclaims_a_dead_holders_slot(
    tmp_path: Path,
) -> None:
    backend = ProcessBackend(str(tmp_path))
    location, name = str(backend.directory), "stats-reclaim"
    limits = LimitSet([ResourceLimit("conn", capacity=1)], backend=backend, name=name)
    ready = _spawn.Event()
    proc = _spawn.Process(
        target=workers.hold_slot_forever, args=(location, name, ready), daemon=True
    )
    proc.start()
    try:
        assert ready.wait(60)
        assert limits.statistics().limits["conn"].in_use == 1  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.join(10)
    stats = limits.get_stats()
    conn = stats["limits"]["conn"]
    assert (conn["in_use"], conn["available"]) == (0, 1)
    assert (type(conn["in_use"]), type(conn["available"])) == (int, int)
    assert all(type(stats[k]) is int for k in ("waiting", "granted", "timed_out", "cancelled"))


def test_pool_statistics() -> None:
    clock = ManualClock()
    pool = LimitPool([mixed(clock, config={"key": "a"}), mixed(clock, config={"key": "b"})])
    with pool.try_acquire({"tokens": 1}):
        stats = pool.statistics()
    assert isinstance(stats, PoolStatistics)
    assert [dict(s.config) for s in stats.sets] == [{"key": "a"}, {"key": "b"}]
    assert (stats.granted, stats.waiting, stats.refunded) == (1, 0, 0.0)
    assert stats.load_balancing is LoadBalancingAlgorithm.RoundRobin
    assert pool.get_stats() == pool.statistics().as_dict()


def test_keyed_statistics() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([RateLimit("tokens", 3, 1)], max_keys=10, clock=clock)
    with keyed.try_acquire("client", {"tokens": 1}):
        pass
    clock.advance(0.1)
    stats = keyed.statistics("client")
    assert stats.limits["tokens"].available == 0.033333
    assert keyed.get_stats("client") == stats.as_dict()
    keys = keyed.keys_statistics()
    assert isinstance(keys, KeyedStatistics)
    assert (keys.keys, keys.max_keys, keys.paused_for) == (1, 10, 0.0)
    assert keyed.get_keys_stats() == keys.as_dict()
    # Asking about a key creates none.
    assert keyed.statistics("other").limits["tokens"].available == 1.0
    assert keyed.keys_statistics().keys == 1


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
@example(0.22980038000059722)
@example(math.nextafter(0.3, 0.0))
@example(0.1 + 0.2)
@example(-1e-7)
@example(5e-324)
def test_units_round_down_to_a_millionth_and_seconds_up(x: float) -> None:
    down = units(x)
    assert down <= x  # never more than there is
    if math.ulp(x) < 1e-6:
        assert x - down <= 1e-6 + 2 * math.ulp(x)
        assert down == round(down, 6)  # a short decimal
        assert len(repr(abs(down)).split(".")[-1].split("e")[0]) <= 20
    else:
        assert down == x
    up = seconds_up(x)
    assert up >= x
    assert up == -units(-x)
    assert not math.copysign(1.0, down) < 0 or down < 0  # no -0.0


def test_units_of_the_noise_in_the_issue() -> None:
    assert units(0.22980038000059722) == 0.2298
    assert units(0.1 + 0.2) == 0.3
    assert units(math.nextafter(0.3, 0.0)) == 0.299999  # what the decisions see: less than 0.3


def test_a_snapshot_does_not_change_as_the_clock_moves() -> None:
    clock = ManualClock()
    limits = mixed(clock)
    assert limits.try_acquire({"tokens": 1}).successful
    stats = limits.statistics()
    clock.advance(1)
    assert stats.limits["tokens"].available == 0.0
    assert limits.statistics().limits["tokens"].available == 0.333333
