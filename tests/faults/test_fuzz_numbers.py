"""A stateful fuzz of hostile numbers through every backend (issue #13, item 7).

A hypothesis state machine drives random sequences of the sync verbs (``try_acquire``,
``acquire_sync`` with no wait, ``retry_after``, ``update``, ``release``, ``pause``, ``get_stats``)
with numbers from the edges of the range, just outside it, huge, tiny, subnormal, NaN and
infinite, through the memory backend and a shared one in lockstep, each on its own manual clock
moved by the same steps. It checks that:

* nothing raises but the documented errors (``ValueError``/``TypeError`` for bad input, and
  ``TimeoutError`` for an acquisition that cannot be admitted at once), and the same call fails
  the same way on both; a rejected ``update`` changes nothing;
* the shared backend makes the memory backend's decisions, with the same waits and the same
  statistics (the memory backend is the model: the contract and property suites check it);
* every number in the statistics stays finite, nothing hangs (the per-test timeout), and
  Redis answers a second client's ``PING`` within 1 s throughout (a stalled script holds it for
  seconds).

Each backend sees at least 2,000 steps (``max_examples`` times ``stateful_step_count`` below,
set here so that no hypothesis profile lowers it; the test counts them).
"""

from __future__ import annotations

import math
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from aiolimits import (
    LimitSet,
    MemoryBackend,
    ProcessBackend,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)
from aiolimits._numbers import (
    MAX_AMOUNT,
    MAX_CAPACITY,
    MAX_SECONDS,
    MAX_WINDOW,
    MIN_AMOUNT,
    MIN_CAPACITY,
    MIN_WINDOW,
)
from aiolimits.testing import ManualClock
from tests._redis_server import RedisServer, own_server

from .test_numbers import Pinger

__all__ = ["own_server"]

# At least 2,000 steps per backend, whatever HYPOTHESIS_PROFILE says (the test counts them).
FUZZ = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

WINDOWS = [MIN_WINDOW, 0.1, 0.3, 1.0, 60.0, 3600.0, MAX_WINDOW]
CAPACITIES = [MIN_CAPACITY, 0.5, 1, 3, 7, 90_000, MAX_CAPACITY]
# Amounts and usages: valid, at both edges, just outside them, and hostile.
NUMBERS = st.sampled_from(
    [
        0,
        MIN_AMOUNT,
        math.nextafter(MIN_AMOUNT, 0),
        5e-324,
        1e-300,
        -0.0,
        0.25,
        1,
        2,
        3,
        7.5,
        1000,
        90_000,
        MAX_AMOUNT,
        math.nextafter(MAX_AMOUNT, math.inf),
        1e308,
        10**400,
        math.nan,
        math.inf,
        -math.inf,
        -1,
        True,
        "1",
    ]
)
SECONDS = st.sampled_from(
    [
        0,
        1e-9,
        0.001,
        1,
        60,
        MAX_SECONDS,
        math.nextafter(MAX_SECONDS, math.inf),
        1e300,
        10**400,
        math.nan,
        math.inf,
        -1,
        -5e-324,
    ]
)
STEPS = st.sampled_from([0.0, 1e-9, 1e-3, 0.1, 0.3, 1.0, 60.0, 1e4])
TIMEOUTS = st.sampled_from([0, 0.0, -1, math.nan, math.nextafter(MAX_SECONDS, math.inf), 10**400])

EXPECTED = (ValueError, TypeError, TimeoutError)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or (error type name, None) for a documented error; anything else raises."""
    try:
        return ("ok", call())
    except EXPECTED as e:
        return (type(e).__name__, None)


def same_number(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9)


class NumberFuzz(RuleBasedStateMachine):
    """The memory backend and a shared one (``make_shared``, set by the test) in lockstep."""

    make_shared: Callable[[], Any]
    # Redis leases run out on the manual clock, which jumps far faster than their renewal
    # thread runs: a resource limit is fuzzed where slots are not leases.
    with_resource = True
    steps = 0  # steps run, counted by the invariant (which runs after every step)

    def __init__(self) -> None:
        super().__init__()
        self.sets: list[LimitSet] = []
        self.clocks: list[ManualClock] = []
        self.held: list[list[Any]] = []  # per acquisition: one Acquisition per backend
        self.keys: list[str] = []

    @initialize(
        algorithms=st.lists(st.sampled_from(list(RateLimitAlgorithm)), min_size=2, max_size=2),
        windows=st.lists(st.sampled_from(WINDOWS), min_size=2, max_size=2),
        capacities=st.lists(st.sampled_from(CAPACITIES), min_size=2, max_size=2),
        start=st.sampled_from([0.0, 1e6 + 0.1, 1.7e9 + 0.123]),
    )
    def build(
        self,
        algorithms: list[RateLimitAlgorithm],
        windows: list[float],
        capacities: list[float],
        start: float,
    ) -> None:
        limits: list[Any] = []
        for key, algorithm, window, capacity in zip(
            "ab", algorithms, windows, capacities, strict=True
        ):
            whole = max(1, math.floor(capacity)) if algorithm.integral else capacity
            limits.append(RateLimit(key, window, whole, algorithm))
        self.keys = ["a", "b"]
        if self.with_resource:
            limits.append(ResourceLimit("r", 3))
            self.keys.append("r")
        name = uuid.uuid4().hex
        for backend in (MemoryBackend(), type(self).make_shared()):
            clock = ManualClock(start)
            self.clocks.append(clock)
            self.sets.append(LimitSet(limits, backend=backend, name=name, clock=clock))

    def each(self, call: Callable[[LimitSet], Any]) -> list[tuple[str, Any]]:
        """``call`` on every backend: the same outcome kind on each, or the test fails."""
        results = [outcome(lambda s=s: call(s)) for s in self.sets]  # type: ignore[misc]
        assert len({kind for kind, _ in results}) == 1, results
        return results

    def requested(self, a: Any, b: Any, r: Any = 0) -> dict[str, Any]:
        return {"a": a, "b": b, "r": r} if self.with_resource else {"a": a, "b": b}

    @rule(dt=STEPS)
    def advance(self, dt: float) -> None:
        for clock in self.clocks:
            clock.advance(dt)

    @rule(a=NUMBERS, b=NUMBERS, r=st.sampled_from([0, 1, 2, 4, -1, 1.5]))
    def try_acquire(self, a: Any, b: Any, r: Any) -> None:
        results = self.each(lambda s: s.try_acquire(self.requested(a, b, r)))
        if results[0][0] == "ok":
            acqs = [value for _, value in results]
            assert len({acq.successful for acq in acqs}) == 1, acqs
            if acqs[0].successful:
                self.held.append(acqs)

    @rule(a=NUMBERS, b=NUMBERS, timeout=TIMEOUTS)
    def acquire_sync_without_waiting(self, a: Any, b: Any, timeout: Any) -> None:
        results = self.each(lambda s: s.acquire_sync(self.requested(a, b), timeout=timeout))
        if results[0][0] == "ok":
            self.held.append([value for _, value in results])

    @rule(a=NUMBERS, b=NUMBERS)
    def retry_after(self, a: Any, b: Any) -> None:
        results = self.each(lambda s: s.retry_after(self.requested(a, b)))
        if results[0][0] == "ok":
            waits = [value for _, value in results]
            assert all(w >= 0 for w in waits), waits
            assert same_number(waits[0], waits[1]), waits

    @rule(which=st.integers(0, 100), a=NUMBERS, b=NUMBERS, keys=st.sampled_from(["a", "b", "ab"]))
    def update(self, which: int, a: Any, b: Any, keys: str) -> None:
        if not self.held:
            return
        acqs = self.held[which % len(self.held)]
        usage = {key: value for key, value in (("a", a), ("b", b)) if key in keys}
        before = self.stats()
        results = [outcome(lambda acq=acq: acq.update(usage)) for acq in acqs]  # type: ignore[misc]
        assert len({kind for kind, _ in results}) == 1, results
        if results[0][0] != "ok":
            assert self.stats() == before  # a rejected update changes nothing

    @rule(which=st.integers(0, 100))
    def release(self, which: int) -> None:
        if not self.held:
            return
        for acq in self.held.pop(which % len(self.held)):
            acq.release()  # never raises

    @rule(seconds=SECONDS)
    def pause(self, seconds: Any) -> None:
        self.each(lambda s: s.pause(seconds))

    def stats(self) -> list[Any]:
        out = []
        for s in self.sets:
            stats = s.get_stats()
            out.append(
                (
                    stats["paused_for"],
                    stats["granted"],
                    {k: v["available"] for k, v in stats["limits"].items()},
                )
            )
        return out

    @invariant()
    def same_finite_state(self) -> None:
        if not self.sets:
            return
        type(self).steps += 1
        (p0, g0, a0), (p1, g1, a1) = self.stats()
        assert same_number(p0, p1), (p0, p1)
        assert g0 == g1
        for key in self.keys:
            assert math.isfinite(a0[key]), a0
            assert same_number(a0[key], a1[key]), (key, a0, a1)

    def teardown(self) -> None:
        for acqs in self.held:
            for acq in acqs:
                acq.release()


def run_fuzz(make_shared: Callable[[], Any], *, with_resource: bool = True) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    class Machine(NumberFuzz):
        pass

    Machine.make_shared = staticmethod(make_shared)
    Machine.with_resource = with_resource
    run_state_machine_as_test(Machine, settings=FUZZ)
    # A failure stops the run early (and says why); a passing run must have done its share.
    assert Machine.steps >= 2000, Machine.steps


def test_fuzz_memory_and_process_backends() -> None:
    with tempfile.TemporaryDirectory() as directory:
        backend = ProcessBackend(Path(directory))
        run_fuzz(lambda: backend)


def test_fuzz_memory_and_redis_backends(own_server: RedisServer) -> None:
    from aiolimits.redis import RedisBackend

    pinger = Pinger(own_server.url)
    try:
        backend = RedisBackend(own_server.url, prefix="fuzz")
        run_fuzz(lambda: backend, with_resource=False)
    finally:
        pinger.stop()
    assert not pinger.errors, pinger.errors[:3]
    # A stalled script holds Redis for seconds (BUSY until lua-time-limit, 5 s): 1 s tells that
    # apart from a loaded 2-core machine, where a healthy PING has taken 0.24 s.
    assert pinger.worst < 1.0, f"Redis took {pinger.worst:.3f} s to answer PING"
