"""KeyedLimitSet: one set of limits per client key (semantics §8); pause per key or for all (§9).

The central property: dropping a fresh key never changes a decision. It is checked against a model
that never drops anything (one plain LimitSet per key, made up front, on the same ManualClock),
with random sequences of acquisitions, refunds, overage charges, releases, pauses and clock moves.
Everything time-dependent runs on a ManualClock; threads use real time only as a generous bound.
"""

from __future__ import annotations

import math
import pickle
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import anyio
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from aiolimits import (
    Acquisition,
    Backend,
    CallLimit,
    KeyedLimitSet,
    LimitSet,
    MemoryBackend,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)
from aiolimits._limits import Limit
from aiolimits._scheduler import Scheduler
from aiolimits.testing import ManualClock
from tests.contract._support import eventually, settle, worker_threads

pytestmark = pytest.mark.anyio

AnyioBackend = tuple[str, dict[str, object]]
Requested = Mapping[str, float] | None

TB = RateLimitAlgorithm.TokenBucket


def fixed_clock() -> float:
    """A module-level clock: it pickles by reference."""
    return 100.0


def tokens(capacity: float = 10, window: float = 10, algorithm: Any = TB) -> RateLimit:
    """``capacity`` tokens per ``window`` seconds (by default one token per second)."""
    return RateLimit("tokens", window, capacity, algorithm=algorithm)


class Grants:
    """Tasks acquiring from a KeyedLimitSet; records ``(name, clock reading)`` in grant order."""

    def __init__(self, keyed: KeyedLimitSet, clock: ManualClock) -> None:
        self.keyed = keyed
        self.clock = clock
        self.order: list[tuple[str, float]] = []

    async def run(
        self,
        name: str,
        key: str,
        requested: Requested = None,
        scope: anyio.CancelScope | None = None,
    ) -> None:
        with scope or anyio.CancelScope():
            async with self.keyed.acquire(key, requested):
                self.order.append((name, self.clock()))


def use(keyed: KeyedLimitSet, key: str, requested: Requested = None) -> bool:
    """``try_acquire`` and release at once: the key is left idle."""
    with keyed.try_acquire(key, requested) as acq:
        return acq.successful


def clock_order(keyed: KeyedLimitSet) -> list[str]:
    """The keys held, oldest first in the CLOCK order (each key once, the same as the dict's)."""
    order = [sched.key for sched in keyed._order]
    assert sorted(order) == sorted(keyed._entries)
    assert all(keyed._entries[sched.key] is sched for sched in keyed._order)
    return order


# -- 1. keyed isolation ------------------------------------------------------------------------


async def test_one_exhausted_key_with_waiters_never_delays_another(
    anyio_backend: AnyioBackend,
) -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens(capacity=2, window=20)], clock=clock)  # a token per 10 s
    assert keyed.try_acquire("a", {"tokens": 2}).successful
    grants = Grants(keyed, clock)
    async with anyio.create_task_group() as tg:
        for name in ("a1", "a2", "a3"):
            tg.start_soon(grants.run, name, "a", {"tokens": 1})
            await settle()
        assert keyed.get_stats("a")["waiting"] == 3
        assert not keyed.try_acquire("a", {"tokens": 1}).successful  # no barging past them

        # Key b, new while a's queue stands: admitted at once, on every door.
        assert keyed.retry_after("b", {"tokens": 1}) == 0.0
        assert keyed.try_acquire("b", {"tokens": 1}).successful
        with anyio.fail_after(5):
            async with keyed.acquire("b", {"tokens": 1}) as acq:
                assert acq.successful
                assert acq.waited == 0.0
        assert keyed.get_stats("b")["waiting"] == 0
        assert keyed.get_stats("b")["granted"] == 2
        assert keyed.get_stats("a")["waiting"] == 3
        assert grants.order == []

        for _ in range(3):
            clock.advance(10.0)
            await settle()
        assert grants.order == [("a1", 10.0), ("a2", 20.0), ("a3", 30.0)]


async def test_a_full_resource_of_one_key_leaves_other_keys_free(
    anyio_backend: AnyioBackend,
) -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([ResourceLimit("slot", 1)], clock=clock)
    holder = keyed.try_acquire("a")
    grants = Grants(keyed, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(grants.run, "a-waiter", "a")
        await settle()
        assert keyed.retry_after("a") == math.inf
        assert keyed.retry_after("b") == 0.0
        with anyio.fail_after(5):
            async with keyed.acquire("b") as acq:
                assert keyed.get_stats("b")["limits"]["slot"]["in_use"] == 1
                assert keyed.get_stats("a")["limits"]["slot"]["in_use"] == 1
        assert acq.released
        assert grants.order == []
        holder.release()
        await settle()
        assert grants.order == [("a-waiter", 0.0)]


# -- 2. dropping fresh keys never changes a decision -------------------------------------------

KEYS = ("a", "b", "c", "d", "e", "f", "g", "h")
# Exact regime: whole capacities, windows and times that are binary fractions (or whole), amounts
# in quarters. Every float operation of the buckets is then exact, so the property is not
# blurred by rounding (the rounding case is test_token_bucket_dropped_by_rounding...).
WINDOWS = (0.25, 0.5, 1.0, 2.0, 3.0, 10.0, 60.0)
STEPS = (0.0, 1 / 64, 1 / 8, 0.25, 0.5, 1.0, 2.0, 5.0, 100.0, 1000.0, 1000.0, 1000.0)
PAUSES = (0.0, 0.25, 1.0, 3.0, 50.0)
KINDS = ("try", "try", "try", "update", "release", "release", "advance", "advance", "pause", "ask")

_LIMIT_SPECS = st.tuples(
    st.lists(  # rate limits: algorithm, window, capacity
        st.tuples(
            st.sampled_from(list(RateLimitAlgorithm)), st.sampled_from(WINDOWS), st.integers(1, 8)
        ),
        max_size=2,
    ),
    st.none()
    | st.tuples(
        st.sampled_from(list(RateLimitAlgorithm)), st.sampled_from(WINDOWS), st.integers(1, 4)
    ),
    st.none() | st.integers(1, 3),  # resource capacity
)
# One drawn number per operation (drawing its four fields separately made data generation most of
# the run time): see Op.decode.
_OPS = st.lists(
    st.integers(0, len(KINDS) * (len(KEYS) + 1) * 1001 * 64**4 - 1), min_size=16, max_size=40
)


class Op(NamedTuple):
    """One operation of the scenario: ``kind`` on ``KEYS[key]`` (``len(KEYS)``: every key, for a
    pause), with four raw amounts packed in ``raw`` (see :func:`amounts`) and ``n`` choosing the
    clock step, the pause or the held acquisition."""

    kind: str
    key: int
    raw: int
    n: int

    @classmethod
    def decode(cls, x: int) -> Op:
        x, kind = divmod(x, len(KINDS))
        x, key = divmod(x, len(KEYS) + 1)
        raw, n = divmod(x, 1001)
        return cls(KINDS[kind], key, raw, n)

    def encode(self) -> int:
        x = self.raw * 1001 + self.n
        x = x * (len(KEYS) + 1) + self.key
        return x * len(KINDS) + KINDS.index(self.kind)


def pack(amounts: list[int]) -> int:
    """Four raw amounts (0 to 63) as the one number an operation draws."""
    return sum(x << (6 * i) for i, x in enumerate(amounts))


def amounts(raw: int) -> list[int]:
    """The four raw amounts (0 to 63) packed into ``raw``: one draw instead of four."""
    return [(raw >> (6 * i)) & 63 for i in range(4)]


def build_limits(
    spec: tuple[
        list[tuple[RateLimitAlgorithm, float, int]],
        tuple[RateLimitAlgorithm, float, int] | None,
        int | None,
    ],
) -> list[Limit]:
    rates, call, resource = spec
    limits: list[Limit] = [
        RateLimit(f"r{i}", window, capacity, algorithm=algorithm)
        for i, (algorithm, window, capacity) in enumerate(rates)
    ]
    if call is not None:
        limits.append(CallLimit(call[1], call[2], algorithm=call[0]))
    if resource is not None:
        limits.append(ResourceLimit("slot", resource))
    return limits


def request_of(limits: list[Limit], raw: int) -> dict[str, float]:
    """A valid ``requested``: amounts within capacity, whole where the algorithm needs it."""
    requested: dict[str, float] = {}
    for limit, x in zip(limits, amounts(raw), strict=False):
        if isinstance(limit, ResourceLimit):
            requested[limit.key] = x % (limit.capacity + 1)
        elif isinstance(limit, CallLimit):
            if x % 3:  # else left out: taken with 1
                requested[limit.key] = x % 3 - 1
        elif limit.algorithm.integral:
            requested[limit.key] = x % (int(limit.capacity) + 1)
        else:
            requested[limit.key] = (x % (4 * int(limit.capacity) + 1)) / 4
    return requested


def usage_of(limits: list[Limit], raw: int) -> dict[str, float]:
    """A valid ``usage``: from nothing to twice the capacity (refunds and overage charges)."""
    usage: dict[str, float] = {}
    for limit, x in zip(limits, amounts(raw), strict=False):
        if isinstance(limit, CallLimit):
            if x % 2:
                usage[limit.key] = 1
        elif isinstance(limit, RateLimit):
            if limit.algorithm.integral:
                usage[limit.key] = x % (2 * int(limit.capacity) + 1)
            else:
                usage[limit.key] = (x % (8 * int(limit.capacity) + 1)) / 4
    return usage


def full_request(limits: list[Limit]) -> dict[str, float]:
    """Every limit's whole capacity: admissible only by a key that is fresh (or nearly)."""
    return {limit.key: 1 if isinstance(limit, CallLimit) else limit.capacity for limit in limits}


def observe(
    keyed: KeyedLimitSet,
    model: LimitSet,
    key: str,
    probes: list[dict[str, float]],
    *,
    stats: bool = False,
) -> None:
    """The keyed set and the model agree on what ``key`` would decide now (and, with ``stats``,
    on what each limit has available)."""
    for probe in probes:
        assert keyed.retry_after(key, probe) == model.retry_after(probe), (key, probe)
    if not stats:
        return
    mine, theirs = keyed.get_stats(key), model.get_stats()
    assert mine["paused_for"] == theirs["paused_for"], key
    assert {k: v["available"] for k, v in mine["limits"].items()} == {
        k: v["available"] for k, v in theirs["limits"].items()
    }, key


Spec = tuple[
    list[tuple[RateLimitAlgorithm, float, int]],
    tuple[RateLimitAlgorithm, float, int] | None,
    int | None,
]
Scenario = tuple[Spec, list[int], float]


MakeKeyed = Callable[[list[Limit], ManualClock], KeyedLimitSet]


def replay(
    spec: Spec, ops: list[int], start: float, make_keyed: MakeKeyed | None = None
) -> dict[str, Any]:
    """Run ``ops`` on a KeyedLimitSet (in memory, or made by ``make_keyed``) and on the model,
    asserting that they agree at every step; returns the keyed set's ``get_keys_stats()``."""
    limits = build_limits(spec)
    clock = ManualClock(start)
    # max_keys is never reached (there are only len(KEYS) keys), so only fresh keys are dropped.
    if make_keyed is None:
        keyed = KeyedLimitSet(limits, max_keys=len(KEYS), clock=clock)
    else:
        keyed = make_keyed(limits, clock)
    model = {key: LimitSet(limits, clock=clock) for key in KEYS}  # never drops anything
    probes = [request_of(limits, pack([1, 1, 1, 1])), full_request(limits)]
    held: list[tuple[str, Acquisition, Acquisition]] = []
    for kind, k, raw, n in map(Op.decode, ops):
        key = KEYS[k % len(KEYS)]
        if kind == "try":
            requested = request_of(limits, raw)
            mine, theirs = keyed.try_acquire(key, requested), model[key].try_acquire(requested)
            assert mine.successful == theirs.successful, (key, requested)
            if mine.successful:
                held.append((key, mine, theirs))
        elif kind == "ask":
            requested = request_of(limits, raw)
            assert keyed.retry_after(key, requested) == model[key].retry_after(requested)
        elif kind in ("update", "release") and held:
            key, mine, theirs = held[n % len(held)]
            if kind == "update":
                usage = usage_of(limits, raw)
                mine.update(usage)
                theirs.update(usage)
            else:
                mine.release()
                theirs.release()
                held.remove((key, mine, theirs))
        elif kind == "advance":
            clock.advance(STEPS[n % len(STEPS)])
        elif kind == "pause":
            seconds = PAUSES[n % len(PAUSES)]
            if k == len(KEYS):
                keyed.pause(seconds)
                for limitset in model.values():
                    limitset.pause(seconds)
            else:
                keyed.pause(seconds, key=key)
                model[key].pause(seconds)
        observe(keyed, model[key], key, probes)
    for key in KEYS:
        observe(keyed, model[key], key, probes, stats=True)
    counts = keyed.get_keys_stats()
    assert counts["forgotten"] == 0
    assert counts["keys"] == len(keyed) <= len(KEYS)
    return counts


# Every kind of limit, a refund, an overage charge, a pause of one key and of all, a held key
# kept, and four fresh keys dropped.
FIRST: Scenario = (
    (
        [(RateLimitAlgorithm.GCRA, 2.0, 4), (RateLimitAlgorithm.SlidingWindow, 1.0, 3)],
        (RateLimitAlgorithm.LeakyBucket, 1.0, 2),
        2,
    ),
    [
        Op("try", 0, pack([4, 3, 1, 1]), 0).encode(),
        Op("update", 0, pack([2, 5, 1, 0]), 0).encode(),  # r0 down to 0.5, r1 up to 5 > 3
        Op("pause", 1, 0, 2).encode(),  # b (a new key) paused for 1 s
        Op("release", 0, 0, 0).encode(),
        Op("advance", 0, 0, 8).encode(),  # 100 s: a and b fresh
        Op("try", 2, pack([1, 1, 1, 1]), 0).encode(),  # c is new: a and b dropped; c held
        Op("pause", len(KEYS), 0, 3).encode(),  # every key, for 3 s
        Op("try", 0, pack([1, 1, 1, 1]), 0).encode(),  # a is back, during the pause: refused
        Op("advance", 0, 0, 6).encode(),  # 2 s: still paused
        Op("try", 3, pack([8, 8, 2, 1]), 0).encode(),  # d is new: a (fresh) dropped; refused
        Op("advance", 0, 0, 5).encode(),  # 1 s: the pause is over
        Op("try", 0, pack([8, 8, 2, 1]), 0).encode(),  # a is new again: d (fresh) dropped
    ],
    0.0,
)


# A window and a bucket in debt after an overage; the key is dropped once both recovered.
SECOND: Scenario = (
    ([(RateLimitAlgorithm.FixedWindow, 3.0, 2), (TB, 0.25, 5)], None, None),
    [
        Op("try", 0, pack([2, 20, 0, 0]), 0).encode(),
        # Overage: 4 in the window, the bucket 5 tokens in debt.
        Op("update", 0, pack([4, 40, 0, 0]), 0).encode(),
        Op("release", 0, 0, 0).encode(),
        Op("advance", 0, 0, 7).encode(),  # 5 s: bucket full, window over
        Op("try", 1, 0, 0).encode(),
        Op("ask", 0, pack([1, 20, 0, 0]), 0).encode(),
    ],
    5.5,
)


@given(spec=_LIMIT_SPECS, ops=_OPS, start=st.sampled_from([0.0, 5.5, 2.0**20 + 0.75]))
@example(spec=FIRST[0], ops=FIRST[1], start=FIRST[2])
@example(spec=SECOND[0], ops=SECOND[1], start=SECOND[2])
def test_dropping_fresh_keys_never_changes_a_decision(
    spec: Spec, ops: list[int], start: float
) -> None:
    counts = replay(spec, ops, start)
    event(f"fresh keys dropped: {'some' if counts['dropped'] else 'none'}")


@pytest.mark.parametrize(("scenario", "dropped"), [(FIRST, 4), (SECOND, 1)])
def test_the_replay_drops_fresh_keys_so_the_property_is_not_vacuous(
    scenario: Scenario, dropped: int
) -> None:
    assert replay(*scenario)["dropped"] == dropped


@pytest.mark.parametrize(
    ("limit", "requested", "recovery", "b_kept"),
    [
        # 4 units per 2 s, 3 taken at t = 0.5: the buckets refill 3 at 2 per second; the leaky
        # bucket's slot ends at 2.0; the sliding window's entry expires at 2.5; the fixed window
        # [0, 2) ends at 2.0 (and with it b's use, in the same window). A call is one token of 4
        # per 2 s: 0.5 s.
        pytest.param(tokens(4, 2, algorithm=TB), {"tokens": 3}, 1.5, True, id="token_bucket"),
        pytest.param(tokens(4, 2, algorithm="gcra"), {"tokens": 3}, 1.5, True, id="gcra"),
        pytest.param(tokens(4, 2, algorithm="leaky_bucket"), {"tokens": 3}, 1.5, True, id="leaky"),
        pytest.param(
            tokens(4, 2, algorithm="sliding_window"), {"tokens": 3}, 2.0, True, id="sliding"
        ),
        pytest.param(tokens(4, 2, algorithm="fixed_window"), {"tokens": 3}, 1.5, False, id="fixed"),
        pytest.param(CallLimit(2, 4), None, 0.5, True, id="call_limit"),
    ],
)
def test_a_key_is_dropped_exactly_when_it_is_fresh_again(
    limit: Limit, requested: Requested, recovery: float, b_kept: bool
) -> None:
    clock = ManualClock(0.5)
    keyed = KeyedLimitSet([limit], clock=clock)
    assert use(keyed, "a", requested)
    clock.advance(recovery - 1 / 64)
    assert use(keyed, "b", requested)  # a new key sweeps: a still recovers
    assert "a" in keyed
    assert keyed.get_keys_stats()["dropped"] == 0
    clock.advance(1 / 64)
    assert use(keyed, "c", requested)  # a is fresh now
    assert "a" not in keyed
    assert ("b" in keyed) == b_kept
    assert keyed.get_keys_stats()["dropped"] == (1 if b_kept else 2)
    assert keyed.get_keys_stats()["forgotten"] == 0


def test_a_resource_key_is_dropped_once_its_slots_are_released() -> None:
    keyed = KeyedLimitSet([ResourceLimit("slot", 2)])
    held = keyed.try_acquire("a")
    keyed.try_acquire("b").release()
    assert "a" in keyed  # creating b swept a: held, so kept
    keyed.try_acquire("c").release()  # sweeps a (held: kept, moved to the end) and b (fresh)
    assert "a" in keyed
    assert "b" not in keyed
    held.release()
    keyed.try_acquire("d").release()  # sweeps c (fresh), then a (fresh now)
    assert sorted(clock_order(keyed)) == ["d"]
    assert keyed.get_keys_stats()["dropped"] == 3


def test_a_new_key_drops_at_most_three_fresh_keys() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    for key in "abcde":
        use(keyed, key, {"tokens": 1})
    clock.advance(1.0)  # every key is full again
    use(keyed, "z", {"tokens": 1})
    assert sorted(clock_order(keyed)) == ["d", "e", "z"]
    assert keyed.get_keys_stats()["dropped"] == 3


def test_the_sweep_stops_at_a_least_recently_used_key_that_is_still_recovering() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    use(keyed, "slow", {"tokens": 5})  # 5 s to recover
    use(keyed, "quick", {"tokens": 1})  # 1 s
    clock.advance(1.0)
    use(keyed, "new", {"tokens": 1})
    assert clock_order(keyed) == ["slow", "quick", "new"]
    assert keyed.get_keys_stats()["dropped"] == 0


def test_token_bucket_dropped_by_rounding_still_refuses_its_capacity_like_the_model() -> None:
    """With a window that is not a binary fraction (the property above keeps to binary ones, where
    every bucket operation is exact): a bucket of 7 tokens per 0.1 s, 0.5 taken at 0, is "fresh"
    at t = 1/140 for ``is_fresh`` (the refilled level, rounded, reaches full) while ``earliest(7)``
    (an exact comparison) says "a few 1e-18 s later". The keyed set drops the key and admits 7
    at once; a set that keeps the key refuses. Fixed: ``is_fresh`` asks the decision's own
    question, ``self._has(self._full, now)``."""
    limits = [RateLimit("tokens", 0.1, 7)]
    clock = ManualClock(0.0)
    keyed = KeyedLimitSet(limits, clock=clock)
    model = LimitSet(limits, clock=clock)
    assert use(keyed, "a", {"tokens": 0.5})
    assert model.try_acquire({"tokens": 0.5}).successful
    clock.set(0.007142857142857143)  # the float nearest to 0.5 / 70
    use(keyed, "b", {"tokens": 1})  # a new key sweeps a (the bug: finds it fresh, drops it)
    assert 0.0 < model.retry_after({"tokens": 7}) < 1e-15  # a hair short of full
    assert keyed.retry_after("a", {"tokens": 7}) == model.retry_after({"tokens": 7})
    assert (
        keyed.try_acquire("a", {"tokens": 7}).successful
        == model.try_acquire({"tokens": 7}).successful
    )


# -- 3. acquisitions outstanding on a dropped key ---------------------------------------------


def test_overage_of_an_acquisition_whose_key_was_dropped_lands_on_the_live_state() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    model = LimitSet([tokens()], clock=clock)
    acq, theirs = keyed.try_acquire("a", {"tokens": 5}), model.try_acquire({"tokens": 5})
    assert acq.successful
    assert theirs.successful
    clock.advance(100.0)  # a's bucket is full again: the key is fresh
    use(keyed, "b", {"tokens": 1})  # a new key sweeps "a" away
    assert "a" not in keyed
    assert keyed.get_keys_stats()["dropped"] == 1
    acq.update(usage={"tokens": 15})  # 10 more than taken, charged now, on a live state
    theirs.update(usage={"tokens": 15})
    assert "a" in keyed
    assert keyed.get_stats("a")["limits"]["tokens"]["available"] == 0
    assert keyed.retry_after("a", {"tokens": 1}) == model.retry_after({"tokens": 1}) == 1.0
    acq.update(usage={"tokens": 10})  # the overage comes back, as it does on a kept key
    theirs.update(usage={"tokens": 10})
    assert keyed.retry_after("a", {"tokens": 5}) == model.retry_after({"tokens": 5}) == 0.0
    # The rest of the overage comes back; the 5 taken at first were absorbed before the key was
    # dropped (the bucket was full), so they do not come back on top: the bucket ends full.
    acq.update(usage={"tokens": 0})
    theirs.update(usage={"tokens": 0})
    assert keyed.get_stats("a")["limits"]["tokens"]["available"] == 10
    assert model.get_stats()["limits"]["tokens"]["available"] == 10
    assert keyed.get_stats("a")["refunded"] == model.get_stats()["refunded"] == 10
    acq.release()
    theirs.release()


def test_an_acquisition_never_released_pins_nothing() -> None:
    """With rate limits only, an acquisition that is never released (``if
    keyed.try_acquire(...).successful:``) does not keep its key: it goes once fresh."""
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], max_keys=2, clock=clock)
    for key in "abcd":
        assert keyed.try_acquire(key, {"tokens": 1}).successful  # never released
    assert len(keyed) <= 3
    clock.advance(1000.0)
    assert use(keyed, "e", {"tokens": 1})
    assert sorted(clock_order(keyed)) == ["e"]


def test_a_key_holding_resource_slots_is_never_dropped() -> None:
    keyed = KeyedLimitSet([ResourceLimit("slot", 1), tokens()], max_keys=1)
    held = keyed.try_acquire("a", {"tokens": 1})
    assert held.successful
    for key in "bcd":
        use(keyed, key, {"tokens": 1})
        assert "a" in keyed
    held.release()


def test_a_refund_lands_on_its_own_key_only() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    acq = keyed.try_acquire("a", {"tokens": 8})
    for i in range(5):
        use(keyed, f"k{i}", {"tokens": 1})
    acq.update(usage={"tokens": 2})
    assert keyed.get_stats("a")["limits"]["tokens"]["available"] == 8
    assert keyed.get_stats("a")["refunded"] == 6
    assert keyed.get_stats("k0")["limits"]["tokens"]["available"] == 9


# -- 4. max_keys -------------------------------------------------------------------------------


def test_at_max_keys_a_new_key_forgets_the_least_recently_used_idle_key() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens(capacity=1, window=60)], max_keys=3, clock=clock)
    for key in "abc":
        assert use(keyed, key, {"tokens": 1})
    assert not use(keyed, "a", {"tokens": 1})  # a is used again: b is the least recently used
    use(keyed, "d", {"tokens": 1})
    assert clock_order(keyed) == ["c", "a", "d"]
    stats = keyed.get_keys_stats()
    assert (stats["keys"], stats["dropped"], stats["forgotten"]) == (3, 0, 1)
    # b's usage is forgotten: it starts again from full limits (the policy errs on admitting).
    assert keyed.retry_after("b", {"tokens": 1}) == 0.0
    assert use(keyed, "b", {"tokens": 1})
    assert clock_order(keyed) == ["a", "d", "b"]
    assert keyed.get_keys_stats()["forgotten"] == 2
    # a still remembers its usage.
    assert keyed.retry_after("a", {"tokens": 1}) == 60.0


def test_questions_do_not_count_as_use_for_the_lru_order() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens(capacity=1, window=60)], max_keys=2, clock=clock)
    use(keyed, "a", {"tokens": 1})
    use(keyed, "b", {"tokens": 1})
    keyed.retry_after("a", {"tokens": 1})
    keyed.get_stats("a")
    use(keyed, "c", {"tokens": 1})
    assert clock_order(keyed) == ["b", "c"]


async def test_keys_with_waiters_or_slots_held_are_never_forgotten(
    anyio_backend: AnyioBackend,
) -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet(
        [tokens(capacity=1, window=60), ResourceLimit("slot", 1)], max_keys=2, clock=clock
    )
    keyed.try_acquire("w", {"tokens": 1}).release()
    holder = keyed.try_acquire("h", {"tokens": 1})
    grants = Grants(keyed, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(grants.run, "waiter", "w", {"tokens": 1})
        await settle()
        assert keyed.get_stats("w")["waiting"] == 1
        for i in range(3):
            keyed.try_acquire(f"n{i}", {"tokens": 1}).release()
            assert "w" in keyed
            assert "h" in keyed
        # Over the bound by the two pinned keys; each new idle key forgot the one before it.
        assert sorted(clock_order(keyed)) == ["h", "n2", "w"]
        assert keyed.get_keys_stats() == {
            "keys": 3,
            "max_keys": 2,
            "dropped": 0,
            "forgotten": 2,
            "paused_for": 0.0,
        }
        clock.advance(60.0)
        await settle()
        assert grants.order == [("waiter", 60.0)]
    holder.release()


def test_when_every_key_is_pinned_the_count_exceeds_max_keys() -> None:
    keyed = KeyedLimitSet([ResourceLimit("slot", 1)], max_keys=2)
    held = [keyed.try_acquire(key) for key in "abcd"]
    assert all(acq.successful for acq in held)
    assert len(keyed) == 4
    assert keyed.get_keys_stats()["forgotten"] == 0
    for acq in held:
        acq.release()
    keyed.try_acquire("e").release()  # once released, fresh keys go again (three per new key)
    assert sorted(clock_order(keyed)) == ["d", "e"]
    assert keyed.get_keys_stats()["dropped"] == 3


# -- 5. pause ----------------------------------------------------------------------------------


def test_pausing_one_key_leaves_the_others_admitting() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    keyed.pause(5.0, key="a")
    assert "a" in keyed
    assert keyed.retry_after("a", {"tokens": 1}) == 5.0
    assert keyed.get_stats("a")["paused_for"] == 5.0
    assert not keyed.try_acquire("a", {"tokens": 1}).successful
    assert keyed.retry_after("b", {"tokens": 1}) == 0.0
    assert keyed.try_acquire("b", {"tokens": 1}).successful
    assert keyed.get_keys_stats()["paused_for"] == 0.0
    clock.advance(5.0)
    assert keyed.try_acquire("a", {"tokens": 1}).successful


def test_pausing_every_key_covers_keys_first_seen_during_the_pause() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    use(keyed, "old", {"tokens": 1})
    keyed.pause(5.0)
    assert keyed.get_keys_stats()["paused_for"] == 5.0
    clock.advance(2.0)
    for key in ("old", "new"):
        assert keyed.retry_after(key, {"tokens": 1}) == 3.0
        assert keyed.get_stats(key)["paused_for"] == 3.0
        assert not keyed.try_acquire(key, {"tokens": 1}).successful
    clock.advance(3.0)
    for key in ("old", "new", "newer"):
        assert keyed.try_acquire(key, {"tokens": 1}).successful
    assert keyed.get_keys_stats()["paused_for"] == 0.0


def test_a_key_paused_beyond_the_global_pause_is_not_fresh() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    keyed.pause(10.0, key="a")
    keyed.pause(2.0)
    use(keyed, "b", {"tokens": 1})  # sweeps a: full, but paused longer than everyone
    assert "a" in keyed
    assert keyed.retry_after("a", {"tokens": 1}) == 10.0
    assert keyed.retry_after("b", {"tokens": 1}) == 2.0
    clock.advance(10.0)
    use(keyed, "c", {"tokens": 1})
    assert "a" not in keyed


def test_overlapping_pauses_keep_the_later_end() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    keyed.pause(10.0)
    keyed.pause(3.0)
    keyed.pause(3.0, key="a")
    assert keyed.retry_after("a", {"tokens": 1}) == 10.0
    assert keyed.get_keys_stats()["paused_for"] == 10.0
    keyed.pause(20.0, key="a")
    keyed.pause(12.0)
    assert keyed.retry_after("a", {"tokens": 1}) == 20.0
    assert keyed.retry_after("b", {"tokens": 1}) == 12.0
    assert keyed.get_stats("b")["paused_for"] == 12.0


async def test_waiters_keep_their_order_through_a_pause_and_wake_when_it_ends(
    anyio_backend: AnyioBackend,
) -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens(capacity=2, window=2)], clock=clock)  # 1 token per second
    assert keyed.try_acquire("a", {"tokens": 2}).successful
    grants = Grants(keyed, clock)
    async with anyio.create_task_group() as tg:
        for name in ("w1", "w2", "w3"):
            tg.start_soon(grants.run, name, "a", {"tokens": 1})
            await settle()
        tg.start_soon(grants.run, "other", "b", {"tokens": 1})
        await settle()
        assert grants.order == [("other", 0.0)]
        keyed.pause(5.0)  # w1 was due at 1.0
        await settle()
        clock.advance(4.999)
        await settle()
        assert grants.order == [("other", 0.0)]
        assert keyed.get_stats("a")["waiting"] == 3
        clock.advance(0.001)  # at 5.0 the bucket is full (2): w1 and w2; w3 a second later
        await settle()
        assert grants.order == [("other", 0.0), ("w1", 5.0), ("w2", 5.0)]
        clock.advance(1.0)
        await settle()
        assert grants.order == [("other", 0.0), ("w1", 5.0), ("w2", 5.0), ("w3", 6.0)]


async def test_a_waiter_of_a_key_first_seen_during_a_global_pause_waits_for_its_end(
    anyio_backend: AnyioBackend,
) -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    keyed.pause(4.0)
    grants = Grants(keyed, clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(grants.run, "new", "fresh-key", {"tokens": 1})
        await settle()
        assert keyed.get_stats("fresh-key")["waiting"] == 1
        clock.advance(3.5)
        await settle()
        assert grants.order == []
        clock.advance(0.5)
        await settle()
    assert grants.order == [("new", 4.0)]


# -- 6. validation -----------------------------------------------------------------------------

BAD_KEYS = [
    pytest.param(1, "int 1", id="int"),
    pytest.param(None, "NoneType None", id="None"),
    pytest.param(b"a", "bytes b'a'", id="bytes"),
    pytest.param(("a",), r"tuple \('a',\)", id="tuple"),
]


@pytest.mark.parametrize(("key", "shown"), BAD_KEYS)
def test_a_key_that_is_not_a_str_is_a_type_error_on_every_verb(key: Any, shown: str) -> None:
    keyed = KeyedLimitSet([tokens(), ResourceLimit("slot", 1)])
    message = rf"^key must be a str \(a client IP, API key, user id\), got {shown}$"
    calls: list[Callable[[], object]] = [
        lambda: keyed.try_acquire(key, {"tokens": 1}),
        lambda: keyed.acquire(key, {"tokens": 1}),
        lambda: keyed.acquire_sync(key, {"tokens": 1}),
        lambda: keyed.retry_after(key, {"tokens": 1}),
        lambda: keyed.get_stats(key),
    ]
    if key is not None:  # pause(key=None) pauses every key
        calls.append(lambda: keyed.pause(1.0, key=key))
    for call in calls:
        with pytest.raises(TypeError, match=message):
            call()
    assert len(keyed) == 0
    assert key not in keyed


@pytest.mark.parametrize(
    ("requested", "error", "message"),
    [
        ({"nope": 1}, ValueError, r"requested names 'nope', which is not a limit of this set"),
        ({"tokens": 11}, ValueError, r"requested\['tokens'\] = 11 exceeds the capacity 10"),
        ({"tokens": -1}, ValueError, r"requested\['tokens'\] must be 0 or a number between"),
        ({"tokens": math.nan}, ValueError, r"requested\['tokens'\] must be 0 or a number between"),
        ({"tokens": "1"}, TypeError, r"requested\['tokens'\] must be an int or float, got str"),
        ({"slot": 1.5}, ValueError, r"requested\['slot'\] must be a whole number, got 1.5"),
        (None, ValueError, r"requested=None, but the RateLimit\(s\) 'tokens'"),
        (["tokens"], TypeError, r"requested must be a mapping of key to amount or None"),
    ],
)
def test_a_bad_request_creates_no_key_and_takes_nothing(
    requested: Any, error: type[Exception], message: str
) -> None:
    keyed = KeyedLimitSet([tokens(), ResourceLimit("slot", 1)])
    assert use(keyed, "known", {"tokens": 1})
    calls: list[Callable[[], object]] = [
        lambda: keyed.try_acquire("a", requested),
        lambda: keyed.acquire("a", requested),
        lambda: keyed.acquire_sync("a", requested),
        lambda: keyed.retry_after("a", requested),
        lambda: keyed.try_acquire("known", requested),
    ]
    for call in calls:
        with pytest.raises(error, match=message):
            call()
    assert len(keyed) == 1
    assert "a" not in keyed
    stats = keyed.get_stats("known")
    assert stats["granted"] == 1
    assert stats["limits"]["slot"]["in_use"] == 0


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda k: k.acquire("a", {"tokens": 1}, timeout=-1),
            ValueError,
            "timeout must be None or",
        ),
        (lambda k: k.acquire_sync("a", {"tokens": 1}, timeout="1"), TypeError, "timeout must"),
        (lambda k: k.pause(-1.0, key="a"), ValueError, "seconds must be a number of seconds"),
        (lambda k: k.pause(math.inf, key="a"), ValueError, "seconds must be a number of seconds"),
        (lambda k: k.pause("5", key="a"), TypeError, "seconds must be an int or float, got str"),
        (lambda k: k.pause(-1.0), ValueError, "seconds must be a number of seconds"),
    ],
)
def test_a_bad_timeout_or_pause_creates_no_key_and_pauses_nothing(
    call: Any, error: type[Exception], message: str
) -> None:
    keyed = KeyedLimitSet([tokens()])
    with pytest.raises(error, match=message):
        call(keyed)
    assert len(keyed) == 0
    assert keyed.get_keys_stats()["paused_for"] == 0.0


@pytest.mark.parametrize(
    ("max_keys", "error", "message"),
    [
        (0, ValueError, r"^max_keys must be >= 1, got 0$"),
        (-1, ValueError, r"^max_keys must be >= 1, got -1$"),
        (True, TypeError, r"^max_keys must be an int, got bool True$"),
        (1.5, TypeError, r"^max_keys must be an int, got float 1.5$"),
        (10.0, TypeError, r"^max_keys must be an int, got float 10.0$"),
        ("10", TypeError, r"^max_keys must be an int, got str '10'$"),
        (None, TypeError, r"^max_keys must be an int, got NoneType None$"),
    ],
)
def test_bad_max_keys_is_rejected_naming_it(
    max_keys: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        KeyedLimitSet([tokens()], max_keys=max_keys)


class _ElsewhereBackend(Backend):
    """A backend that is not in this process's memory."""

    def attach(self, limits: Any, states: Any, clock: Any, name: str | None) -> Scheduler:
        raise AssertionError("never attached")

    def __repr__(self) -> str:
        return "_ElsewhereBackend()"


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        (_ElsewhereBackend(), r"^backend _ElsewhereBackend\(\) cannot hold a KeyedLimitSet"),
        ("redis://localhost", r"^backend must be a backend such as MemoryBackend\(\), got 're"),
        (object(), r"^backend must be a backend such as MemoryBackend\(\), got <object"),
    ],
)
def test_a_backend_that_cannot_hold_keys_is_refused(backend: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        KeyedLimitSet([tokens()], backend=backend)
    keyed = KeyedLimitSet([tokens()], backend=MemoryBackend())
    assert keyed.try_acquire("a", {"tokens": 1}).successful


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"config": ["a"]}, TypeError, "config must be a mapping or None, got list"),
        ({"clock": 1.0}, TypeError, "clock must be a callable returning seconds, got float"),
        ({"name": 3}, TypeError, "name must be a str or None, got int 3"),
    ],
)
def test_bad_options_are_rejected_naming_them(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        KeyedLimitSet([tokens()], **options)


def test_bad_limits_are_rejected_like_a_limitsets() -> None:
    with pytest.raises(ValueError, match="limits has the key 'tokens' more than once"):
        KeyedLimitSet([tokens(), tokens(5)])
    with pytest.raises(TypeError, match="limits must be an iterable of limits, got a single"):
        KeyedLimitSet(tokens())  # type: ignore[arg-type]


# -- 7. questions create no key; stats per key -------------------------------------------------


def test_retry_after_and_get_stats_on_an_unknown_key_create_nothing() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens(), ResourceLimit("slot", 2)], clock=clock)
    assert keyed.retry_after("ghost", {"tokens": 10}) == 0.0
    stats = keyed.get_stats("ghost")
    assert stats["limits"]["tokens"]["available"] == 10
    assert stats["limits"]["slot"]["in_use"] == 0
    assert (stats["granted"], stats["waiting"], stats["paused_for"]) == (0, 0, 0.0)
    assert len(keyed) == 0
    assert "ghost" not in keyed
    assert keyed.get_keys_stats()["keys"] == 0
    keyed.pause(3.0)
    assert keyed.retry_after("ghost", {"tokens": 1}) == 3.0
    assert keyed.get_stats("ghost")["paused_for"] == 3.0
    assert len(keyed) == 0


def test_get_stats_shows_each_keys_own_usage() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens(), ResourceLimit("slot", 2)], clock=clock)
    held = keyed.try_acquire("a", {"tokens": 3})
    keyed.try_acquire("a", {"tokens": 2, "slot": 0})
    keyed.try_acquire("b", {"tokens": 1}).release()
    a, b = keyed.get_stats("a"), keyed.get_stats("b")
    assert a["limits"]["tokens"]["available"] == 5
    assert a["limits"]["slot"]["in_use"] == 1
    assert a["granted"] == 2
    assert b["limits"]["tokens"]["available"] == 9
    assert b["limits"]["slot"]["in_use"] == 0
    assert b["granted"] == 1
    clock.advance(2.0)
    assert keyed.get_stats("a")["limits"]["tokens"]["available"] == 7
    held.release()
    assert keyed.get_stats("a")["limits"]["slot"]["in_use"] == 0


def test_len_contains_and_repr() -> None:
    keyed = KeyedLimitSet([tokens()], max_keys=7, name="clients")
    keyed.try_acquire("a", {"tokens": 1})
    assert len(keyed) == 1
    assert "a" in keyed
    assert "b" not in keyed
    assert 1 not in keyed
    assert keyed.max_keys == 7
    assert keyed.name == "clients"
    assert repr(keyed) == (
        "<KeyedLimitSet name='clients' limits=[RateLimit('tokens', window_seconds=10, "
        "capacity=10, algorithm='token_bucket')] keys=1 max_keys=7>"
    )


# -- 8. threads --------------------------------------------------------------------------------


def test_threads_never_hold_more_slots_of_a_key_than_its_capacity() -> None:
    keyed = KeyedLimitSet([ResourceLimit("slot", 2)], max_keys=2)  # 3 keys: forgetting too
    keys = ("k0", "k1", "k2")
    lock = threading.Lock()
    holders = dict.fromkeys(keys, 0)
    most = dict.fromkeys(keys, 0)
    grants = dict.fromkeys(keys, 0)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(40):
                key = keys[(worker + i) % len(keys)]
                with keyed.acquire_sync(key, timeout=30) as acq:
                    assert acq.successful
                    with lock:
                        holders[key] += 1
                        most[key] = max(most[key], holders[key])
                        grants[key] += 1
                    time.sleep(0.0002)
                    with lock:
                        holders[key] -= 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sum(grants.values()) == 8 * 40
    assert all(n <= 2 for n in most.values()), most
    assert holders == dict.fromkeys(keys, 0)
    for key in keys:
        assert keyed.get_stats(key)["limits"]["slot"]["in_use"] == 0


async def test_a_thread_waits_on_its_key_until_the_clock_gets_there(
    anyio_backend: AnyioBackend,
) -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    assert keyed.try_acquire("a", {"tokens": 10}).successful

    def work() -> float:
        with keyed.acquire_sync("a", {"tokens": 2}, timeout=60) as acq:
            return acq.waited

    async with worker_threads(clock) as threads:
        threads.start(work)
        await eventually(lambda: keyed.get_stats("a")["waiting"] == 1)
        assert keyed.try_acquire("b", {"tokens": 10}).successful  # b is not behind it
        clock.advance(1.999)
        assert keyed.get_stats("a")["waiting"] == 1
        clock.advance(0.001)
    assert threads.results == [2.0]


async def test_acquire_sync_refuses_on_an_event_loop_thread(anyio_backend: AnyioBackend) -> None:
    keyed = KeyedLimitSet([tokens()])
    with pytest.raises(RuntimeError, match=r"would block the event loop .* keyed\.acquire"):
        keyed.acquire_sync("a", {"tokens": 1})
    assert len(keyed) == 0


# -- 9. cancellation ---------------------------------------------------------------------------


async def test_a_cancelled_waiter_holds_nothing_and_its_key_is_then_dropped(
    anyio_backend: AnyioBackend,
) -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens(), ResourceLimit("slot", 1)], clock=clock)
    holder = keyed.try_acquire("a", {"tokens": 4})
    grants = Grants(keyed, clock)
    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(grants.run, "slot-waiter", "a", {"tokens": 1}, scope)
        await settle()
        assert keyed.get_stats("a")["waiting"] == 1
        scope.cancel()
        await settle()
    assert grants.order == []
    stats = keyed.get_stats("a")
    assert (stats["waiting"], stats["cancelled"], stats["granted"]) == (0, 1, 1)
    assert stats["limits"]["slot"]["in_use"] == 1  # the holder's, not the waiter's
    holder.release()
    clock.advance(4.0)  # the 4 tokens are back: a is fresh
    assert clock.pending_timers() == 0
    use(keyed, "b", {"tokens": 1})
    assert "a" not in keyed
    assert keyed.get_keys_stats()["dropped"] == 1


async def test_a_waiter_cancelled_while_sleeping_on_the_clock_leaves_no_timer(
    anyio_backend: AnyioBackend,
) -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([tokens()], clock=clock)
    keyed.try_acquire("a", {"tokens": 10}).release()
    with anyio.move_on_after(0.05):
        async with keyed.acquire("a", {"tokens": 5}):
            pytest.fail("granted while the clock stands still")
    assert clock.pending_timers() == 0
    stats = keyed.get_stats("a")
    assert (stats["waiting"], stats["cancelled"]) == (0, 1)
    assert stats["limits"]["tokens"]["available"] == 0  # the waiter took nothing
    clock.advance(10.0)
    use(keyed, "b", {"tokens": 1})
    assert "a" not in keyed


async def test_a_timed_out_waiter_leaves_its_key_droppable(anyio_backend: AnyioBackend) -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([ResourceLimit("slot", 1)], clock=clock)
    holder = keyed.try_acquire("a")
    with pytest.raises(TimeoutError):
        async with keyed.acquire("a", timeout=0):
            pass
    assert keyed.get_stats("a")["timed_out"] == 1
    holder.release()
    keyed.try_acquire("b").release()
    assert "a" not in keyed


async def test_a_keyed_acquire_is_single_use(anyio_backend: AnyioBackend) -> None:
    keyed = KeyedLimitSet([tokens()])
    manager = keyed.acquire("a", {"tokens": 1})
    async with manager as acq:
        assert acq.successful
    assert acq.released
    with pytest.raises(RuntimeError, match="already entered"):
        async with manager:
            pass
    assert keyed.get_stats("a")["granted"] == 1


async def test_a_keyed_acquire_releases_on_exception(anyio_backend: AnyioBackend) -> None:
    keyed = KeyedLimitSet([ResourceLimit("slot", 1)])
    with pytest.raises(KeyError):
        async with keyed.acquire("a"):
            raise KeyError("boom")
    assert keyed.get_stats("a")["limits"]["slot"]["in_use"] == 0
    assert keyed.try_acquire("a").successful


# -- 10. pickling ------------------------------------------------------------------------------


def test_pickles_as_its_recipe_with_no_keys() -> None:
    limits: list[Limit] = [
        CallLimit(60, 5),
        tokens(100, 60, algorithm="gcra"),
        ResourceLimit("slot", 2),
    ]
    original = KeyedLimitSet(
        limits, max_keys=42, config={"tier": "free"}, name="clients", clock=fixed_clock
    )
    assert original.try_acquire("a", {"tokens": 100}).successful
    restored = pickle.loads(pickle.dumps(original))
    assert isinstance(restored, KeyedLimitSet)
    assert restored is not original
    assert restored.limits == tuple(limits)
    assert restored.max_keys == 42
    assert restored.config == {"tier": "free"}
    assert restored.name == "clients"
    assert restored._clock is fixed_clock
    assert len(restored) == 0
    assert restored.get_keys_stats()["dropped"] == 0
    assert restored.try_acquire("a", {"tokens": 100}).successful  # fresh, unlike the original
    assert not original.try_acquire("a", {"tokens": 1}).successful


def test_pickles_with_the_default_clock_but_not_a_manual_one() -> None:
    restored = pickle.loads(pickle.dumps(KeyedLimitSet([tokens()])))
    assert restored._clock is time.monotonic
    assert restored.max_keys == 100_000
    with pytest.raises(TypeError, match=r"clock ManualClock\(0\.0\) is not picklable"):
        pickle.dumps(KeyedLimitSet([tokens()], clock=ManualClock()))
