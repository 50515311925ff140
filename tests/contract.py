"""The LimitSet contract: the behaviour every backend must show, written once, run against each.

This module collects no tests by itself (its name does not start with ``test_``). A backend runs
the whole contract by subclassing :class:`LimitSetContract` in a test module and providing a
``make_limitset`` fixture that returns a :class:`MakeLimitSet` factory for that backend (the idea of
trio's ``generic_lock_test``: one behaviour, many implementations)::

    @pytest.fixture
    def make_limitset() -> MakeLimitSet:
        def make(limits=(), *, clock=None, config=None):
            return LimitSet(limits, backend=MyBackend(...), name=unique_name(),
                            clock=clock or time.monotonic, config=config)
        return make

    class TestMyBackend(LimitSetContract):
        pass

``tests/conftest.py`` registers this module for pytest's assert rewriting, so a failed assert here
shows its values in every backend's test module.

Rules the factory must follow: every call returns a LimitSet with fresh state (shared backends
give each call its own ``name``), it honours ``clock`` (a :class:`ManualClock` drives every
decision and every wake-up), and it passes errors from the constructor through unchanged.

Time-dependent behaviour is checked on a :class:`ManualClock`; only the tests in
:class:`RealClockContract` wait for real, briefly, and they never assert an upper bound tighter
than seconds. Async tests run on every anyio backend the ``anyio_backend`` fixture offers.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import attrs
import pytest

from aiolimits import (
    Acquisition,
    CallLimit,
    LimitSet,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)
from aiolimits.testing import ManualClock

__all__ = [
    "AcquisitionContract",
    "AlgorithmContract",
    "AnyLimit",
    "Attempt",
    "Crowd",
    "LimitSetContract",
    "MakeLimitSet",
    "PauseAndRetryAfterContract",
    "RealClockContract",
    "RequestContract",
    "StatsContract",
    "ThreadContract",
    "TimeoutContract",
    "ValidationContract",
    "WaitingContract",
    "WorkerThreads",
    "crowd",
    "settle",
    "worker_threads",
]

AnyLimit = RateLimit | CallLimit | ResourceLimit
Requested = Mapping[str, float] | None

TB = RateLimitAlgorithm.TokenBucket
GCRA = RateLimitAlgorithm.GCRA
LEAKY = RateLimitAlgorithm.LeakyBucket
SLIDING = RateLimitAlgorithm.SlidingWindow
FIXED = RateLimitAlgorithm.FixedWindow
ALGORITHMS = [pytest.param(a, id=a.value) for a in RateLimitAlgorithm]

NAN = float("nan")
INF = math.inf


class MakeLimitSet(Protocol):
    """Builds a LimitSet with fresh state on the backend under test.

    ``clock=None`` means the backend's real monotonic clock.
    """

    def __call__(
        self,
        limits: Iterable[AnyLimit] = (),
        *,
        clock: Callable[[], float] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> LimitSet: ...


# -- helpers for async tests ------------------------------------------------------------------


async def settle() -> None:
    """Let every task that can run do so, until all of them wait for something.

    A few plain checkpoints first: anyio's asyncio ``wait_all_tasks_blocked`` sleeps 0.1 s of
    real time whenever it finds a runnable task, and the chains of wake-ups in these tests are
    short.
    """
    for _ in range(4):
        await anyio.lowlevel.checkpoint()
    # Bounded: a task that never blocks (a waiter in a busy loop) fails the test, not hangs it.
    with anyio.fail_after(10):
        await anyio.wait_all_tasks_blocked()


async def eventually(predicate: Callable[[], bool], *, within: float = 10.0) -> None:
    """Wait in real time until ``predicate()`` holds; for threads, which ``settle`` cannot see."""
    with anyio.fail_after(within):
        # ASYNC110: a thread changes what the predicate reads; no event can be awaited for it.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.002)


@attrs.define(eq=False)
class Attempt:
    """One task's ``async with limitset.acquire(...)``, observed from outside.

    ``state`` moves from "waiting" to "held" (inside the block), then "done" (left the block),
    or to "timed out" (``error`` holds the exception) or "cancelled".
    """

    name: str
    state: str = "waiting"
    acquisition: Acquisition | None = None
    granted_at: float | None = None
    error: BaseException | None = None
    leave: anyio.Event = attrs.field(factory=anyio.Event)
    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)


class Crowd:
    """Tasks acquiring from one LimitSet, started one at a time so that arrival order is known."""

    def __init__(
        self, tg: anyio.abc.TaskGroup, limitset: LimitSet, clock: Callable[[], float]
    ) -> None:
        self._tg = tg
        self._limitset = limitset
        self._clock = clock
        self.grants: list[tuple[str, float]] = []  # (name, clock reading) in grant order

    async def arrive(
        self,
        name: str,
        requested: Requested = None,
        *,
        # ASYNC109: this is LimitSet.acquire's own timeout, passed on: the thing under test.
        timeout: float | None = None,  # noqa: ASYNC109
        hold: bool = False,
    ) -> Attempt:
        """Start a task acquiring ``requested`` and let it run until it waits or is done.

        With ``hold`` it stays in the block until ``attempt.leave`` is set.
        """
        attempt = Attempt(name)
        self._tg.start_soon(self._run, attempt, requested, timeout, hold)
        await settle()
        return attempt

    async def _run(
        self,
        attempt: Attempt,
        requested: Requested,
        timeout: float | None,  # noqa: ASYNC109 - LimitSet.acquire's timeout, as in arrive()
        hold: bool,
    ) -> None:
        with attempt.scope:
            try:
                async with self._limitset.acquire(requested, timeout=timeout) as acq:
                    attempt.acquisition = acq
                    attempt.granted_at = self._clock()
                    attempt.state = "held"
                    self.grants.append((attempt.name, attempt.granted_at))
                    if hold:
                        await attempt.leave.wait()
            except TimeoutError as exc:
                attempt.state = "timed out"
                attempt.error = exc
                return
            attempt.state = "done"
            return
        attempt.state = "cancelled"  # reached only when the scope caught a cancellation


@contextlib.asynccontextmanager
async def crowd(
    limitset: LimitSet, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[Crowd]:
    """A task group of acquiring tasks; whatever is still running at the end is cancelled."""
    async with anyio.create_task_group() as tg:
        yield Crowd(tg, limitset, clock)
        tg.cancel_scope.cancel()


class WorkerThreads:
    """Functions run in worker threads (``anyio.to_thread``), their return values collected."""

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        self.results: list[object] = []

    def start(self, fn: Callable[[], object]) -> None:
        self._tg.start_soon(self._run, fn)

    async def _run(self, fn: Callable[[], object]) -> None:
        self.results.append(await anyio.to_thread.run_sync(fn, abandon_on_cancel=True))


@contextlib.asynccontextmanager
async def worker_threads(clock: ManualClock | None = None) -> AsyncIterator[WorkerThreads]:
    """A task group for threads. On the way out, ``clock`` jumps an hour ahead so that a thread
    still waiting on it (the test failed) times out instead of hanging the process: asyncio's
    worker threads are not daemons. Threads given no ManualClock must use a real timeout."""
    try:
        async with anyio.create_task_group() as tg:
            yield WorkerThreads(tg)
    finally:
        if clock is not None:
            clock.advance(3600)


def stats_of(limitset: LimitSet, key: str) -> dict[str, Any]:
    per_key: dict[str, Any] = limitset.get_stats()["limits"][key]
    return per_key


# -- §3 algorithm decisions, seen through a LimitSet ------------------------------------------

# Every limit here is RateLimit("x", window_seconds=10, capacity=10): r = 1 unit per second.
# Rows are (clock time, amount, admitted by try_acquire?). The first number is the clock's start.
BUCKET_TABLE = (
    0.0,
    [
        (0, 10, True),  # full at creation: the whole burst at once
        (0, 1, False),
        (0.5, 1, False),  # half a token
        (1, 1, True),  # exactly one token refilled
        (4, 4, False),  # three tokens
        (4, 3, True),
        (100, 10, True),  # refilled, ...
        (100, 1, False),  # ... but never above the capacity
        (100.5, 0.5, True),  # fractional amounts are fine for buckets
    ],
)
DECISION_TABLES: dict[RateLimitAlgorithm, tuple[float, list[tuple[float, float, bool]]]] = {
    TB: BUCKET_TABLE,
    GCRA: BUCKET_TABLE,  # admits exactly the sequences TokenBucket admits
    LEAKY: (
        0.0,
        [
            (0, 3, True),  # occupies [0, 3)
            (0, 1, False),  # no burst, although 7 of 10 units are unused
            (2.5, 1, False),
            (3, 5, True),  # occupies [3, 8)
            (7.5, 1, False),
            (8, 1, True),  # [8, 9)
            (9, 10, True),  # [9, 19)
            (9, 1, False),
            (18.75, 0.25, False),
            (19, 0.25, True),
        ],
    ),
    SLIDING: (
        0.0,
        [
            (0, 4, True),
            (5, 6, True),  # 10 in [0, 10)
            (9.5, 1, False),
            (10, 4, True),  # the 4 admitted at 0 left the window [0.., 10]
            (12, 1, False),  # a fixed window would have reset at 10
            (14.75, 1, False),
            (15, 6, True),  # the 6 admitted at 5 left
            (15, 1, False),
            (20, 4, True),
            (20, 1, False),
        ],
    ),
    FIXED: (
        7.0,  # windows are [k*W, (k+1)*W) on the clock, not counted from the creation time
        [
            (7, 10, True),
            (7, 1, False),
            (9.5, 1, False),
            (10, 10, True),  # a new window at 10, only 3 s after the first burst
            (19.5, 1, False),
            (20, 1, True),
            (29.5, 9, True),
            (29.5, 1, False),
            (30, 10, True),
        ],
    ),
}

# retry_after for the request (amount) after the acquisitions in the prefix, (time, amount) each.
# The clock starts at the first acquisition's time.
RETRY_AFTER_TABLE = [
    pytest.param(TB, [(0, 10)], 5, 5.0, id="token_bucket"),
    pytest.param(TB, [(0, 10)], 0.5, 0.5, id="token_bucket-fraction"),
    pytest.param(GCRA, [(0, 10)], 5, 5.0, id="gcra"),
    pytest.param(GCRA, [(0, 10)], 10, 10.0, id="gcra-full"),
    pytest.param(LEAKY, [(0, 3)], 1, 3.0, id="leaky_bucket"),
    pytest.param(LEAKY, [(0, 3), (3, 4)], 10, 4.0, id="leaky_bucket-chained"),
    pytest.param(SLIDING, [(0, 4), (5, 6)], 4, 5.0, id="sliding_window-oldest"),
    pytest.param(SLIDING, [(0, 4), (5, 6)], 5, 10.0, id="sliding_window-both"),
    pytest.param(FIXED, [(7, 10)], 1, 3.0, id="fixed_window"),  # the window [0, 10) ends
]

# After try_acquire({"x": 6}) at t=0 and update({"x": 2}): retry_after for 8 and for 9 units.
REFUND_TABLE = [
    pytest.param(TB, 0.0, 1.0, id="token_bucket"),  # 8 tokens back in the bucket
    pytest.param(GCRA, 0.0, 1.0, id="gcra"),
    pytest.param(SLIDING, 0.0, 10.0, id="sliding_window"),  # its own entry shrank to 2
    pytest.param(FIXED, 0.0, 10.0, id="fixed_window"),  # the window counts 2
    pytest.param(LEAKY, 2.0, 2.0, id="leaky_bucket"),  # the slot [0, 6) shrank to [0, 2)
]

# After try_acquire({"x": 6}) at t=0, then at time t update({"x": 2}): the units refunded, and
# retry_after for the whole capacity. Time gone by limits what can honestly be given back.
LATE_REFUND_TABLE = [
    pytest.param(TB, 2, 4, 0.0, id="token_bucket-not-yet-full"),
    pytest.param(TB, 10, 0, 0.0, id="token_bucket-full-again"),  # the cap absorbed it
    pytest.param(GCRA, 2, 4, 0.0, id="gcra-not-yet-full"),
    pytest.param(GCRA, 10, 0, 0.0, id="gcra-full-again"),
    pytest.param(SLIDING, 5, 4, 5.0, id="sliding_window-entry-counts"),  # 2 count until 10
    pytest.param(SLIDING, 10, 0, 0.0, id="sliding_window-entry-expired"),
    pytest.param(FIXED, 5, 4, 5.0, id="fixed_window-same-window"),  # 2 count until 10
    pytest.param(FIXED, 10, 0, 0.0, id="fixed_window-window-over"),
    pytest.param(LEAKY, 3, 3, 0.0, id="leaky_bucket-future-tail"),  # [3, 6) was still ahead
    pytest.param(LEAKY, 6, 0, 0.0, id="leaky_bucket-slot-passed"),
]

# After try_acquire({"x": 5}) at t=0 and update({"x": 12}): retry_after for 1 unit.
OVERAGE_TABLE = [
    pytest.param(TB, 3.0, id="token_bucket"),  # 2 tokens of debt, then 1
    pytest.param(GCRA, 3.0, id="gcra"),
    pytest.param(SLIDING, 10.0, id="sliding_window"),  # 12 counted in the window until 10
    pytest.param(FIXED, 10.0, id="fixed_window"),
    pytest.param(LEAKY, 12.0, id="leaky_bucket"),  # the schedule is booked until 12
]


class AlgorithmContract:
    """§3: the five algorithms decide exactly as specified, through try_acquire and retry_after."""

    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    def test_try_acquire_decisions_follow_the_algorithm_table(
        self, make_limitset: MakeLimitSet, algorithm: RateLimitAlgorithm
    ) -> None:
        start, rows = DECISION_TABLES[algorithm]
        clock = ManualClock(start)
        limits = make_limitset([RateLimit("x", 10, 10, algorithm)], clock=clock)
        got = []
        for t, amount, _ in rows:
            clock.set(t)
            got.append((t, amount, limits.try_acquire({"x": amount}).successful))
        assert got == rows

    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    def test_call_limit_decides_with_its_algorithm_one_call_per_acquisition(
        self, make_limitset: MakeLimitSet, algorithm: RateLimitAlgorithm
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([CallLimit(10, 2, algorithm)], clock=clock)
        got = [limits.try_acquire().successful for _ in range(3)]
        # Two calls fit the capacity; LeakyBucket spaces them 5 s apart instead.
        assert got == ([True, False, False] if algorithm == LEAKY else [True, True, False])
        clock.set(10)
        assert limits.try_acquire().successful

    @pytest.mark.parametrize(("algorithm", "prefix", "amount", "expected"), RETRY_AFTER_TABLE)
    def test_retry_after_is_the_exact_time_the_algorithm_admits(
        self,
        make_limitset: MakeLimitSet,
        algorithm: RateLimitAlgorithm,
        prefix: list[tuple[float, float]],
        amount: float,
        expected: float,
    ) -> None:
        clock = ManualClock(prefix[0][0])
        limits = make_limitset([RateLimit("x", 10, 10, algorithm)], clock=clock)
        for t, n in prefix:
            clock.set(t)
            assert limits.try_acquire({"x": n}).successful
        now = clock()
        assert limits.retry_after({"x": amount}) == expected
        # It agrees with the decisions: not admitted a quarter second earlier, admitted then.
        clock.set(now + expected - 0.25)
        assert not limits.try_acquire({"x": amount}).successful
        clock.set(now + expected)
        assert limits.try_acquire({"x": amount}).successful

    @pytest.mark.parametrize(("algorithm", "for_8", "for_9"), REFUND_TABLE)
    def test_update_below_requested_refunds_what_the_algorithm_allows(
        self,
        make_limitset: MakeLimitSet,
        algorithm: RateLimitAlgorithm,
        for_8: float,
        for_9: float,
    ) -> None:
        limits = make_limitset([RateLimit("x", 10, 10, algorithm)], clock=ManualClock())
        acq = limits.try_acquire({"x": 6})
        acq.update({"x": 2})
        assert (limits.retry_after({"x": 8}), limits.retry_after({"x": 9})) == (for_8, for_9)
        assert limits.get_stats()["refunded"] == 4

    @pytest.mark.parametrize(("algorithm", "t", "refunded", "for_all"), LATE_REFUND_TABLE)
    def test_late_refund_gives_back_only_what_time_has_not_used(
        self,
        make_limitset: MakeLimitSet,
        algorithm: RateLimitAlgorithm,
        t: float,
        refunded: float,
        for_all: float,
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("x", 10, 10, algorithm)], clock=clock)
        acq = limits.try_acquire({"x": 6})
        clock.set(t)
        acq.update({"x": 2})
        assert limits.get_stats()["refunded"] == refunded
        assert limits.retry_after({"x": 10}) == for_all

    @pytest.mark.parametrize(("algorithm", "expected"), OVERAGE_TABLE)
    def test_update_above_requested_charges_the_excess(
        self, make_limitset: MakeLimitSet, algorithm: RateLimitAlgorithm, expected: float
    ) -> None:
        limits = make_limitset([RateLimit("x", 10, 10, algorithm)], clock=ManualClock())
        acq = limits.try_acquire({"x": 5})
        acq.update({"x": 12})
        assert limits.retry_after({"x": 1}) == expected
        assert limits.get_stats()["refunded"] == 0

    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    def test_update_last_report_counts(
        self, make_limitset: MakeLimitSet, algorithm: RateLimitAlgorithm
    ) -> None:
        limits = make_limitset([RateLimit("x", 10, 10, algorithm)], clock=ManualClock())
        acq = limits.try_acquire({"x": 5})
        acq.update({"x": 8})
        acq.update({"x": 3})
        # Exactly as if 3 had been taken in the first place.
        reference = make_limitset([RateLimit("x", 10, 10, algorithm)], clock=ManualClock())
        assert reference.try_acquire({"x": 3}).successful
        amounts = range(1, 11)
        assert [limits.retry_after({"x": n}) for n in amounts] == [
            reference.retry_after({"x": n}) for n in amounts
        ]


# -- §4 what a request takes -------------------------------------------------------------------


class RequestContract:
    """§4: defaults, skipping, the empty set, and all-or-nothing across limits."""

    def test_call_limit_is_taken_by_every_acquisition(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [CallLimit(10, 2), RateLimit("tokens", 10, 100)], clock=ManualClock()
        )
        first = limits.try_acquire({"tokens": 1})
        assert first.successful
        assert dict(first.requested) == {"call_count": 1, "tokens": 1}
        assert limits.try_acquire({"tokens": 1}).successful
        # Plenty of tokens, but the two calls are used up.
        assert not limits.try_acquire({"tokens": 1}).successful
        assert stats_of(limits, "call_count")["available"] == 0

    def test_resource_limit_takes_one_slot_by_default(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([ResourceLimit("conn", 2)], clock=ManualClock())
        a, b = limits.try_acquire(), limits.try_acquire()
        assert a.successful
        assert b.successful
        assert dict(a.requested) == {"conn": 1}
        assert not limits.try_acquire().successful
        a.release()
        assert limits.try_acquire().successful

    def test_resource_limit_may_take_several_slots(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([ResourceLimit("conn", 3)], clock=ManualClock())
        two = limits.try_acquire({"conn": 2})
        assert two.successful
        assert not limits.try_acquire({"conn": 2}).successful
        assert stats_of(limits, "conn")["in_use"] == 2
        two.release()
        assert limits.try_acquire({"conn": 3}).successful

    def test_amount_zero_skips_a_limit(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [CallLimit(10, 1), RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)],
            clock=ManualClock(),
        )
        assert limits.try_acquire({"tokens": 10}).successful  # the one call, slot and all tokens
        skip_all = limits.try_acquire({"call_count": 0, "tokens": 0, "conn": 0})
        assert skip_all.successful
        assert dict(skip_all.requested) == {}
        # Without skipping the call, the exhausted CallLimit refuses.
        assert not limits.try_acquire({"tokens": 0, "conn": 0}).successful

    def test_requested_none_with_a_plain_rate_limit_raises_value_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([CallLimit(10, 5), RateLimit("tokens", 10, 10)], clock=ManualClock())
        before = limits.get_stats()
        with pytest.raises(ValueError, match="requested"):
            limits.try_acquire()
        with pytest.raises(ValueError, match="requested"):
            limits.retry_after()
        assert limits.get_stats() == before

    def test_empty_limitset_admits_at_once(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([], clock=ManualClock())
        for _ in range(3):
            acq = limits.try_acquire()
            assert acq.successful
            assert dict(acq.requested) == {}
        assert limits.retry_after() == 0.0
        with limits.acquire_sync() as acq:
            assert acq.successful
            assert acq.waited == 0.0
        assert limits.get_stats()["limits"] == {}

    def test_request_that_fits_one_rate_limit_but_not_another_takes_neither(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset(
            [RateLimit("a", 10, 10), RateLimit("b", 10, 10)], clock=ManualClock()
        )
        assert limits.try_acquire({"b": 8}).successful
        assert not limits.try_acquire({"a": 5, "b": 5}).successful
        assert stats_of(limits, "a")["available"] == 10
        assert stats_of(limits, "b")["available"] == 2
        assert limits.try_acquire({"a": 10}).successful  # all of "a" is still there
        assert limits.try_acquire({"b": 2}).successful

    def test_request_blocked_by_a_full_resource_takes_no_rate_units(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset(
            [RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)], clock=ManualClock()
        )
        holder = limits.try_acquire({"tokens": 1})
        assert holder.successful
        assert not limits.try_acquire({"tokens": 5}).successful
        assert stats_of(limits, "tokens")["available"] == 9
        assert limits.try_acquire({"tokens": 9, "conn": 0}).successful


# -- bad input: exact error type, the argument named, nothing taken ----------------------------


def validation_limits() -> list[AnyLimit]:
    return [
        CallLimit(10, 100),
        RateLimit("tokens", 10, 100),
        RateLimit("sw", 10, 100, SLIDING),
        RateLimit("fw", 10, 100, FIXED),
        ResourceLimit("conn", 3),
    ]


BAD_REQUESTS = [
    pytest.param(None, ValueError, r"requested", id="none-with-plain-rate-limit"),
    pytest.param({"nope": 1}, ValueError, r"requested.*'nope'", id="unknown-key"),
    pytest.param({"tokens": 1, "nope": 1}, ValueError, r"requested.*'nope'", id="valid+unknown"),
    pytest.param({"tokens": -1}, ValueError, r"requested\['tokens'\]", id="negative"),
    pytest.param({"tokens": NAN}, ValueError, r"requested\['tokens'\]", id="nan"),
    pytest.param({"tokens": INF}, ValueError, r"requested\['tokens'\]", id="inf"),
    pytest.param({"tokens": -INF}, ValueError, r"requested\['tokens'\]", id="-inf"),
    pytest.param({"tokens": "5"}, TypeError, r"requested\['tokens'\]", id="str"),
    pytest.param({"tokens": None}, TypeError, r"requested\['tokens'\]", id="none-amount"),
    pytest.param({"tokens": True}, TypeError, r"requested\['tokens'\]", id="bool"),
    pytest.param({"tokens": 5, "conn": -1}, ValueError, r"requested\['conn'\]", id="valid+bad"),
    pytest.param({"sw": 1.5}, ValueError, r"requested\['sw'\]", id="fraction-sliding"),
    pytest.param({"fw": 0.5}, ValueError, r"requested\['fw'\]", id="fraction-fixed"),
    pytest.param({"conn": 1.5}, ValueError, r"requested\['conn'\]", id="fraction-resource"),
    pytest.param({"call_count": 2}, ValueError, r"requested\['call_count'\]", id="calls-2"),
    pytest.param({"call_count": 0.5}, ValueError, r"requested\['call_count'\]", id="calls-half"),
    pytest.param({"tokens": 101}, ValueError, r"requested\['tokens'\]", id="over-capacity"),
    pytest.param({"sw": 101}, ValueError, r"requested\['sw'\]", id="over-capacity-sliding"),
    pytest.param({"conn": 4}, ValueError, r"requested\['conn'\]", id="over-capacity-resource"),
    pytest.param([("tokens", 1)], TypeError, r"requested", id="not-a-mapping"),
]

BAD_TIMEOUTS = [
    pytest.param(-1, ValueError, id="negative"),
    pytest.param(NAN, ValueError, id="nan"),
    pytest.param("1", TypeError, id="str"),
    pytest.param(True, TypeError, id="bool"),
]

BAD_USAGE = [
    pytest.param({"nope": 1}, ValueError, r"usage.*'nope'", id="unknown-key"),
    pytest.param({"tokens": 1, "nope": 1}, ValueError, r"usage.*'nope'", id="valid+unknown"),
    pytest.param({"conn": 1}, ValueError, r"usage\['conn'\]", id="resource"),
    pytest.param({"tokens": -1}, ValueError, r"usage\['tokens'\]", id="negative"),
    pytest.param({"tokens": NAN}, ValueError, r"usage\['tokens'\]", id="nan"),
    pytest.param({"tokens": INF}, ValueError, r"usage\['tokens'\]", id="inf"),
    pytest.param({"tokens": "1"}, TypeError, r"usage\['tokens'\]", id="str"),
    pytest.param({"tokens": True}, TypeError, r"usage\['tokens'\]", id="bool"),
    pytest.param({"call_count": 2}, ValueError, r"usage\['call_count'\]", id="calls-2"),
    pytest.param({"call_count": 0}, ValueError, r"usage\['call_count'\]", id="calls-0"),
    pytest.param({"sw": 2.5}, ValueError, r"usage\['sw'\]", id="fraction-sliding"),
    pytest.param(["tokens"], TypeError, r"usage", id="not-a-mapping"),
]


class ValidationContract:
    """§2/§4/§11: bad input raises the exact error type naming the argument, and takes nothing."""

    @pytest.mark.parametrize(("requested", "error", "match"), BAD_REQUESTS)
    def test_try_acquire_rejects_bad_request_and_takes_nothing(
        self, make_limitset: MakeLimitSet, requested: Any, error: type[Exception], match: str
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        before = limits.get_stats()
        with pytest.raises(error, match=match) as info:
            limits.try_acquire(requested)
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before

    @pytest.mark.parametrize(("requested", "error", "match"), BAD_REQUESTS)
    def test_retry_after_rejects_bad_request(
        self, make_limitset: MakeLimitSet, requested: Any, error: type[Exception], match: str
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        with pytest.raises(error, match=match) as info:
            limits.retry_after(requested)
        assert info.type is error  # exactly, not a subclass

    @pytest.mark.parametrize(("requested", "error", "match"), BAD_REQUESTS)
    def test_acquire_sync_rejects_bad_request_and_takes_nothing(
        self, make_limitset: MakeLimitSet, requested: Any, error: type[Exception], match: str
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        before = limits.get_stats()
        with pytest.raises(error, match=match) as info:
            limits.acquire_sync(requested, timeout=0)
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before

    @pytest.mark.parametrize(("bad_timeout", "error"), BAD_TIMEOUTS)
    def test_acquire_sync_rejects_bad_timeout_and_takes_nothing(
        self, make_limitset: MakeLimitSet, bad_timeout: Any, error: type[Exception]
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        before = limits.get_stats()
        with pytest.raises(error, match="timeout") as info:
            limits.acquire_sync({"tokens": 1}, timeout=bad_timeout)
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before

    @pytest.mark.parametrize(("usage", "error", "match"), BAD_USAGE)
    def test_update_rejects_bad_usage_and_changes_nothing(
        self, make_limitset: MakeLimitSet, usage: Any, error: type[Exception], match: str
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        acq = limits.try_acquire({"tokens": 50, "sw": 50})
        assert acq.successful
        before = limits.get_stats()
        with pytest.raises(error, match=match) as info:
            acq.update(usage)
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before
        acq.update({"tokens": 10})  # still usable afterwards
        assert stats_of(limits, "tokens")["available"] == 90

    @pytest.mark.parametrize(
        "limits",
        [
            pytest.param([RateLimit("x", 1, 1), RateLimit("x", 2, 2)], id="two-rate-limits"),
            pytest.param([RateLimit("x", 1, 1), ResourceLimit("x", 1)], id="rate-and-resource"),
            pytest.param([CallLimit(1, 1), CallLimit(2, 2)], id="two-call-limits"),
            pytest.param([CallLimit(1, 1), RateLimit("call_count", 1, 1)], id="call-and-rate"),
        ],
    )
    def test_duplicate_keys_raise_value_error_naming_the_key(
        self, make_limitset: MakeLimitSet, limits: list[AnyLimit]
    ) -> None:
        with pytest.raises(ValueError, match=repr(limits[1].key)):
            make_limitset(limits, clock=ManualClock())

    @pytest.mark.parametrize(
        ("seconds", "error"),
        [
            pytest.param(-1, ValueError, id="negative"),
            pytest.param(NAN, ValueError, id="nan"),
            pytest.param("1", TypeError, id="str"),
        ],
    )
    def test_pause_rejects_bad_seconds_and_pauses_nothing(
        self, make_limitset: MakeLimitSet, seconds: Any, error: type[Exception]
    ) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=ManualClock())
        with pytest.raises(error, match="seconds") as info:
            limits.pause(seconds)
        assert info.type is error  # exactly, not a subclass
        assert limits.retry_after({"tokens": 1}) == 0.0
        assert limits.try_acquire({"tokens": 1}).successful


# -- §5 the Acquisition object -----------------------------------------------------------------


class AcquisitionContract:
    """§5: update/release misuse, the context-manager protocols, config and waited."""

    def test_update_after_release_raises_runtime_error(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=ManualClock())
        with limits.try_acquire({"tokens": 6}) as acq:
            pass
        with pytest.raises(RuntimeError):
            acq.update({"tokens": 1})
        assert stats_of(limits, "tokens")["available"] == 4  # no refund happened

    def test_update_on_a_pending_acquisition_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=ManualClock())
        pending = limits.acquire({"tokens": 6})  # not entered: holds nothing yet
        with pytest.raises(RuntimeError):
            pending.update({"tokens": 1})
        assert stats_of(limits, "tokens")["available"] == 10

    def test_update_on_a_failed_acquisition_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=ManualClock())
        assert limits.try_acquire({"tokens": 10}).successful
        failed = limits.try_acquire({"tokens": 5})
        assert not failed.successful
        with pytest.raises(RuntimeError):
            failed.update({"tokens": 0})
        assert stats_of(limits, "tokens")["available"] == 0

    def test_release_is_idempotent(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([ResourceLimit("conn", 2)], clock=ManualClock())
        a, b = limits.try_acquire(), limits.try_acquire()
        a.release()
        a.release()
        assert stats_of(limits, "conn")["in_use"] == 1  # b still holds its slot
        assert limits.try_acquire().successful
        assert not limits.try_acquire().successful
        b.release()

    def test_entering_a_released_acquisition_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        with limits.try_acquire() as acq:
            assert acq.successful
        with pytest.raises(RuntimeError), acq:
            pytest.fail("entered a released acquisition")
        assert stats_of(limits, "conn")["in_use"] == 0
        assert limits.get_stats()["granted"] == 1

    def test_failed_try_acquire_as_context_manager_releases_nothing(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        holder = limits.try_acquire()
        with limits.try_acquire() as failed:
            assert not failed.successful
        failed.release()
        assert stats_of(limits, "conn")["in_use"] == 1
        assert not limits.try_acquire().successful
        holder.release()
        assert limits.try_acquire().successful

    def test_sync_with_on_a_pending_async_acquisition_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        pending = limits.acquire()
        with pytest.raises(RuntimeError), pending:
            pytest.fail("entered a pending async acquisition with `with`")
        assert stats_of(limits, "conn")["in_use"] == 0
        assert limits.get_stats()["granted"] == 0

    def test_acquisition_exposes_the_limitset_config_read_only(
        self, make_limitset: MakeLimitSet
    ) -> None:
        config = {"account": "team-a", "region": "eu"}
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock(), config=config)
        config["region"] = "us"  # the set keeps what it was given
        held = limits.try_acquire()
        failed = limits.try_acquire()
        assert dict(held.config) == {"account": "team-a", "region": "eu"}
        assert dict(failed.config) == dict(held.config)
        writable: Any = held.config
        with pytest.raises(TypeError):
            writable["region"] = "ap"
        assert held.config["region"] == "eu"

    def test_immediate_acquisition_waited_zero(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock(5.0)
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 1}).waited == 0.0
        with limits.acquire_sync({"tokens": 1}) as acq:
            assert acq.waited == 0.0
            assert dict(acq.requested) == {"tokens": 1}


# -- §4/§9 questions: retry_after, pause -----------------------------------------------------


class PauseAndRetryAfterContract:
    """retry_after answers 0.0, exact seconds or inf; pause holds everybody back until its end."""

    def test_retry_after_is_zero_when_admissible_now(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [CallLimit(10, 5), RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)],
            clock=ManualClock(),
        )
        assert limits.retry_after({"tokens": 10}) == 0.0
        assert limits.retry_after({"tokens": 10}) == 0.0  # asking takes nothing
        assert limits.try_acquire({"tokens": 10}).successful

    def test_retry_after_takes_the_slowest_limit(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [CallLimit(10, 1), RateLimit("tokens", 100, 10)], clock=ManualClock()
        )
        assert limits.try_acquire({"tokens": 10}).successful
        assert limits.retry_after({"tokens": 1}) == 10.0  # both: tokens refill 1 per 10 s
        assert limits.retry_after({"tokens": 2}) == 20.0
        assert limits.retry_after({"tokens": 0}) == 10.0  # the call alone
        assert limits.retry_after({"tokens": 0, "call_count": 0}) == 0.0

    def test_retry_after_is_inf_while_a_resource_is_full(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)], clock=ManualClock()
        )
        holder = limits.try_acquire({"tokens": 10})
        assert limits.retry_after({"tokens": 1}) == math.inf
        assert limits.retry_after({"tokens": 1, "conn": 0}) == 1.0
        holder.release()
        assert limits.retry_after({"tokens": 1}) == 1.0

    def test_retry_after_includes_a_pause(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        limits.pause(7)
        assert limits.retry_after({"tokens": 1}) == 7.0
        clock.set(2)
        assert limits.retry_after({"tokens": 1}) == 5.0
        assert limits.get_stats()["paused_for"] == 5.0
        clock.set(7)
        assert limits.try_acquire({"tokens": 10}).successful
        limits.pause(3)  # the bucket needs 5 s for 5 tokens, longer than the pause
        assert limits.retry_after({"tokens": 5}) == 5.0
        assert limits.retry_after({"tokens": 2}) == 3.0

    def test_pause_admits_nobody_before_its_end(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10), ResourceLimit("conn", 5)], clock=clock)
        limits.pause(5)
        assert not limits.try_acquire({"tokens": 1}).successful
        assert not limits.try_acquire({"conn": 1}).successful
        clock.set(4.75)
        assert not limits.try_acquire({"tokens": 1}).successful
        clock.set(5)
        assert limits.try_acquire({"tokens": 1}).successful
        assert limits.get_stats()["paused_for"] == 0.0

    def test_overlapping_pauses_keep_the_later_end(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        limits.pause(10)
        limits.pause(3)  # ends earlier: ignored
        assert limits.retry_after({"tokens": 1}) == 10.0
        clock.set(4)
        limits.pause(8)  # ends at 12: later, so it wins
        assert limits.retry_after({"tokens": 1}) == 8.0
        clock.set(11.75)
        assert not limits.try_acquire({"tokens": 1}).successful
        clock.set(12)
        assert limits.try_acquire({"tokens": 1}).successful


# -- statistics --------------------------------------------------------------------------------


class StatsContract:
    """get_stats(): per key and totals, without waiters (the async part is in WaitingContract)."""

    def test_get_stats_describes_each_limit(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [CallLimit(60, 500), RateLimit("tokens", 60, 90_000, GCRA), ResourceLimit("conn", 4)],
            clock=ManualClock(),
        )
        acq = limits.try_acquire({"tokens": 1000, "conn": 2})
        stats = limits.get_stats()
        calls, tokens, conn = (stats["limits"][k] for k in ("call_count", "tokens", "conn"))
        assert (calls["kind"], calls["algorithm"], calls["capacity"]) == (
            "call",
            "token_bucket",
            500,
        )
        assert (calls["window_seconds"], calls["available"], calls["waiting"]) == (60, 499, 0)
        assert (tokens["kind"], tokens["algorithm"], tokens["capacity"]) == ("rate", "gcra", 90_000)
        assert (tokens["available"], tokens["refunded"]) == (89_000, 0)
        assert (conn["kind"], conn["capacity"], conn["in_use"], conn["available"]) == (
            "resource",
            4,
            2,
            2,
        )
        assert (stats["granted"], stats["waiting"], stats["timed_out"], stats["cancelled"]) == (
            1,
            0,
            0,
            0,
        )
        acq.update({"tokens": 400})
        acq.release()
        stats = limits.get_stats()
        assert stats["limits"]["tokens"]["refunded"] == 600
        assert stats["refunded"] == 600
        assert stats["limits"]["tokens"]["available"] == 89_600
        assert stats["limits"]["conn"]["in_use"] == 0

    def test_get_stats_shows_debt_as_negative_available(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=ManualClock())
        limits.try_acquire({"tokens": 10}).update({"tokens": 13})
        assert stats_of(limits, "tokens")["available"] == -3


# -- waiting: FIFO, no barging, refunds, pause, cancellation, stats with waiters -------------


class WaitingContract:
    """Async waiters on a ManualClock: exact grant times and order, on every anyio backend."""

    pytestmark = pytest.mark.anyio

    async def test_acquire_admits_at_once_when_every_limit_has_room(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset(
            [CallLimit(10, 5), RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)],
            clock=clock,
        )
        async with limits.acquire({"tokens": 4}) as acq:
            assert acq.successful
            assert acq.waited == 0.0
            assert dict(acq.requested) == {"call_count": 1, "tokens": 4, "conn": 1}
            assert stats_of(limits, "conn")["in_use"] == 1
        assert stats_of(limits, "conn")["in_use"] == 0
        assert stats_of(limits, "tokens")["available"] == 6
        assert limits.get_stats()["granted"] == 1

    async def test_empty_limitset_acquire_admits_at_once(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset([], clock=ManualClock())
        async with limits.acquire() as acq:
            assert acq.successful
            assert acq.waited == 0.0

    async def test_fifo_large_request_is_granted_in_turn_behind_a_stream_of_small_ones(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 100, 100)], clock=clock)  # 1 token/s
        assert limits.try_acquire({"tokens": 100}).successful
        async with crowd(limits, clock) as c:
            await c.arrive("s1", {"tokens": 1})
            await c.arrive("s2", {"tokens": 1})
            big = await c.arrive("big", {"tokens": 50})
            # One more small request arrives every second while the big one waits.
            for second in range(1, 58):
                clock.advance(1)
                await settle()
                await c.arrive(f"s{second + 2}", {"tokens": 1})
            assert c.grants == [
                ("s1", 1),
                ("s2", 2),
                ("big", 52),  # 50 tokens after s2's, although 1 token was there each second
                ("s3", 53),  # the small ones behind it did not overtake it
                ("s4", 54),
                ("s5", 55),
                ("s6", 56),
                ("s7", 57),
            ]
            assert big.acquisition is not None
            assert big.acquisition.waited == 52.0
            assert limits.get_stats()["waiting"] == 57 - 5

    async def test_only_the_head_sleeps_on_a_timer(self, make_limitset: MakeLimitSet) -> None:
        # Scheduled, not polled: the head sleeps until its time, the others until they lead.
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            for i in range(20):
                await c.arrive(f"w{i}", {"tokens": 1})
            assert clock.pending_timers() == 1
            clock.advance(1)
            await settle()
            assert c.grants == [("w0", 1)]
            assert clock.pending_timers() == 1  # now w1's

    async def test_fifo_order_with_mixed_sizes_on_a_resource(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([ResourceLimit("conn", 3)], clock=clock)
        holders = [limits.try_acquire() for _ in range(3)]
        async with crowd(limits, clock) as c:
            one = await c.arrive("one", {"conn": 1}, hold=True)
            three = await c.arrive("three", {"conn": 3}, hold=True)
            small = await c.arrive("small", {"conn": 1}, hold=True)
            holders[0].release()
            await settle()
            assert [name for name, _ in c.grants] == ["one"]
            holders[1].release()
            holders[2].release()
            await settle()
            # Two slots are free and "small" would fit, but "three" is ahead of it.
            assert [name for name, _ in c.grants] == ["one"]
            assert stats_of(limits, "conn")["in_use"] == 1
            one.leave.set()
            await settle()
            assert [name for name, _ in c.grants] == ["one", "three"]
            three.leave.set()
            await settle()
            assert [name for name, _ in c.grants] == ["one", "three", "small"]
            small.leave.set()
        assert stats_of(limits, "conn")["in_use"] == 0

    async def test_try_acquire_does_not_barge_past_a_queued_rate_waiter(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            waiter = await c.arrive("waiter", {"tokens": 5})
            clock.advance(1)
            await settle()
            assert stats_of(limits, "tokens")["available"] == 1  # room for 1 ...
            assert not limits.try_acquire({"tokens": 1}).successful  # ... but it waits in line
            assert limits.retry_after({"tokens": 1}) > 0
            clock.advance(4)
            await settle()
            assert waiter.state == "done"
            assert waiter.granted_at == 5
        clock.advance(1)
        assert limits.try_acquire({"tokens": 1}).successful  # nobody queued any more

    async def test_try_acquire_does_not_barge_past_a_queued_resource_waiter(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 2)], clock=ManualClock())
        holder = limits.try_acquire()
        async with crowd(limits) as c:
            both = await c.arrive("both", {"conn": 2}, hold=True)
            assert stats_of(limits, "conn")["in_use"] == 1
            assert not limits.try_acquire().successful  # one slot free, but "both" is first
            assert limits.retry_after() > 0
            holder.release()
            await settle()
            assert both.state == "held"
            assert stats_of(limits, "conn")["in_use"] == 2

    async def test_refund_wakes_a_queued_waiter_it_makes_admissible(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        holder = limits.try_acquire({"tokens": 10})
        async with crowd(limits, clock) as c:
            first = await c.arrive("first", {"tokens": 5})  # due at 5
            holder.update({"tokens": 8})  # 2 back: now due at 3
            await settle()
            assert first.state == "waiting"
            clock.advance(2.75)
            await settle()
            assert first.state == "waiting"
            clock.advance(0.25)
            await settle()
            assert first.state == "done"
            assert first.acquisition is not None
            assert first.acquisition.waited == 3.0
            second = await c.arrive("second", {"tokens": 5})  # due at 8
            holder.update({"tokens": 3})  # 5 more back: admissible now
            await settle()
            assert second.state == "done"
            assert second.granted_at == 3
            assert second.acquisition is not None
            assert second.acquisition.waited == 0.0
        assert limits.get_stats()["refunded"] == 7

    async def test_all_or_nothing_waiter_holds_nothing_while_it_waits(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset(
            [RateLimit("a", 10, 10), RateLimit("b", 10, 10), ResourceLimit("conn", 1)],
            clock=clock,
        )
        assert limits.try_acquire({"b": 10, "conn": 0}).successful
        async with crowd(limits, clock) as c:
            both = await c.arrive("both", {"a": 5, "b": 5}, hold=True)  # b is due at 5
            clock.advance(4.5)
            await settle()
            assert both.state == "waiting"
            assert stats_of(limits, "a")["available"] == 10
            assert stats_of(limits, "conn")["in_use"] == 0
            clock.advance(0.5)
            await settle()
            assert both.state == "held"
            assert stats_of(limits, "a")["available"] == 5
            assert stats_of(limits, "b")["available"] == 0
            assert stats_of(limits, "conn")["in_use"] == 1

    async def test_pause_holds_waiters_until_its_end_in_their_order(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        limits.pause(5)
        async with crowd(limits, clock) as c:
            for name, amount in (("a", 3), ("b", 8), ("c", 2)):
                await c.arrive(name, {"tokens": amount})
            clock.advance(4.75)
            await settle()
            assert c.grants == []
            # Each row: move the clock to t, then these have been granted (with their times).
            for t, granted in [
                (5, {"a": 5}),  # b needs 8 of the 7 tokens left; c (2) would fit, but is behind b
                (5.75, {"a": 5}),
                (6, {"a": 5, "b": 6}),
                (7.75, {"a": 5, "b": 6}),
            ]:
                clock.set(t)
                await settle()
                assert dict(c.grants) == granted
            clock.set(8)
            await settle()
            # Tasks granted at the same instant may run in any order (trio shuffles them), so
            # the order shows in the grant times: b at 6, and c (2 would fit at 5) after b.
            assert dict(c.grants) == {"a": 5, "b": 6, "c": 8}

    async def test_pause_postpones_a_waiter_already_due_earlier(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            waiter = await c.arrive("waiter", {"tokens": 2})  # due at 2
            limits.pause(6)
            clock.advance(2)
            await settle()
            assert waiter.state == "waiting"
            limits.pause(1)  # ends at 3, before the first pause: ignored
            clock.advance(3.75)
            await settle()
            assert waiter.state == "waiting"
            clock.advance(0.25)
            await settle()
            assert waiter.state == "done"
            assert waiter.granted_at == 6

    async def test_pause_extended_while_waiting_wakes_at_the_later_end(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        limits.pause(3)
        async with crowd(limits, clock) as c:
            waiter = await c.arrive("waiter", {"tokens": 1})
            limits.pause(8)
            clock.advance(3)
            await settle()
            assert waiter.state == "waiting"
            clock.advance(5)
            await settle()
            assert waiter.granted_at == 8

    async def test_cancelled_head_leaves_and_the_next_waiter_gets_its_own_time(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            big = await c.arrive("big", {"tokens": 8})  # due at 8
            small = await c.arrive("small", {"tokens": 2})  # behind it
            big.scope.cancel()
            await settle()
            assert big.state == "cancelled"
            clock.advance(2)
            await settle()
            assert small.state == "done"
            assert small.granted_at == 2
        stats = limits.get_stats()
        assert (stats["cancelled"], stats["granted"], stats["waiting"]) == (1, 2, 0)

    async def test_cancelled_waiter_in_the_middle_keeps_the_others_in_order(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        holder = limits.try_acquire()
        async with crowd(limits) as c:
            a = await c.arrive("a", hold=True)
            b = await c.arrive("b", hold=True)
            await c.arrive("c", hold=True)
            b.scope.cancel()
            await settle()
            assert b.state == "cancelled"
            assert limits.get_stats()["waiting"] == 2
            holder.release()
            await settle()
            a.leave.set()
            await settle()
            assert [name for name, _ in c.grants] == ["a", "c"]
            assert stats_of(limits, "conn")["in_use"] == 1

    async def test_waiter_cancelled_as_it_is_granted_passes_the_slot_on(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        holder = limits.try_acquire()
        async with crowd(limits) as c:
            first = await c.arrive("first", hold=True)
            second = await c.arrive("second", hold=True)
            holder.release()  # grants "first" ...
            first.scope.cancel()  # ... which is cancelled before it runs
            await settle()
            assert first.state == "cancelled"
            assert second.state == "held"
            assert stats_of(limits, "conn")["in_use"] == 1
            second.leave.set()
            await settle()
        assert stats_of(limits, "conn")["in_use"] == 0
        assert limits.try_acquire().successful

    async def test_get_stats_counts_waiters_and_outcomes(self, make_limitset: MakeLimitSet) -> None:
        clock = ManualClock()
        limits = make_limitset(
            [CallLimit(10, 100), RateLimit("tokens", 10, 10), ResourceLimit("conn", 2)],
            clock=clock,
        )
        holder = limits.try_acquire({"tokens": 10})
        async with crowd(limits, clock) as c:
            a = await c.arrive("a", {"tokens": 5}, hold=True)
            b = await c.arrive("b", {"conn": 0}, hold=True)  # needs only a call
            await c.arrive("c", {"tokens": 1}, timeout=2)
            d = await c.arrive("d", {"tokens": 1})

            def waiting() -> tuple[int, int, int, int]:
                s = limits.get_stats()
                per = s["limits"]
                return (
                    s["waiting"],
                    per["call_count"]["waiting"],
                    per["tokens"]["waiting"],
                    per["conn"]["waiting"],
                )

            def totals() -> tuple[int, int, int, float]:
                s = limits.get_stats()
                return (s["granted"], s["timed_out"], s["cancelled"], s["refunded"])

            assert waiting() == (4, 4, 3, 3)
            assert totals() == (1, 0, 0, 0)
            assert stats_of(limits, "conn")["in_use"] == 1
            clock.advance(2)  # c's deadline
            await settle()
            assert waiting() == (3, 3, 2, 2)
            assert totals() == (1, 1, 0, 0)
            d.scope.cancel()
            await settle()
            assert waiting() == (2, 2, 1, 1)
            assert totals() == (1, 1, 1, 0)
            holder.update({"tokens": 4})  # 2 refilled + 6 refunded = 8: a and b go
            await settle()
            assert (a.state, b.state) == ("held", "held")
            assert waiting() == (0, 0, 0, 0)
            assert totals() == (3, 1, 1, 6)
            assert stats_of(limits, "tokens")["available"] == 3
            assert stats_of(limits, "tokens")["refunded"] == 6
            assert stats_of(limits, "conn")["in_use"] == 2  # holder and a
            a.leave.set()
            b.leave.set()
            await settle()
            assert stats_of(limits, "conn")["in_use"] == 1
        holder.release()
        assert stats_of(limits, "conn")["in_use"] == 0

    async def test_entering_a_released_async_acquisition_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        acq = limits.acquire()
        async with acq:
            pass
        with pytest.raises(RuntimeError):
            async with acq:
                pytest.fail("entered a released acquisition")
        assert stats_of(limits, "conn")["in_use"] == 0
        assert limits.get_stats()["granted"] == 1

    async def test_failed_try_acquire_as_async_context_manager_releases_nothing(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        holder = limits.try_acquire()
        async with limits.try_acquire() as failed:
            assert not failed.successful
        assert stats_of(limits, "conn")["in_use"] == 1
        holder.release()
        assert stats_of(limits, "conn")["in_use"] == 0

    @pytest.mark.parametrize(("requested", "error", "match"), BAD_REQUESTS)
    async def test_acquire_rejects_bad_request_at_once_and_takes_nothing(
        self, make_limitset: MakeLimitSet, requested: Any, error: type[Exception], match: str
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        before = limits.get_stats()
        with anyio.fail_after(5), pytest.raises(error, match=match) as info:
            async with limits.acquire(requested):
                pytest.fail("admitted a bad request")
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before

    @pytest.mark.parametrize(("bad_timeout", "error"), BAD_TIMEOUTS)
    async def test_acquire_rejects_bad_timeout_and_takes_nothing(
        self, make_limitset: MakeLimitSet, bad_timeout: Any, error: type[Exception]
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        before = limits.get_stats()
        with pytest.raises(error, match="timeout") as info:
            async with limits.acquire({"tokens": 1}, timeout=bad_timeout):
                pytest.fail("admitted with a bad timeout")
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before


class TimeoutContract:
    """Timeouts on a ManualClock: the builtin TimeoutError, holding nothing, failing early."""

    pytestmark = pytest.mark.anyio

    async def test_timeout_fails_at_once_when_the_rate_limits_admit_after_the_deadline(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            late = await c.arrive("late", {"tokens": 5}, timeout=4.75)  # due at 5
            # No clock advance: it knew at once.
            assert late.state == "timed out"
            assert type(late.error) is TimeoutError
            assert clock() == 0
            stats = limits.get_stats()
            assert (stats["timed_out"], stats["waiting"]) == (1, 0)
            # Due exactly at the deadline is not after it: that one waits and is admitted.
            just = await c.arrive("just", {"tokens": 5}, timeout=5)
            assert just.state == "waiting"
            clock.advance(5)
            await settle()
            assert just.state == "done"
            assert just.granted_at == 5

    async def test_timeout_fails_at_once_when_a_pause_outlasts_the_deadline(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        limits.pause(10)
        async with crowd(limits, clock) as c:
            attempt = await c.arrive("attempt", {"tokens": 1}, timeout=3)
            assert attempt.state == "timed out"
            assert type(attempt.error) is TimeoutError

    async def test_timeout_zero_admits_when_possible_and_fails_at_once_otherwise(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([ResourceLimit("conn", 1)], clock=clock)
        async with crowd(limits, clock) as c:
            first = await c.arrive("first", timeout=0, hold=True)
            assert first.state == "held"
            second = await c.arrive("second", timeout=0)
            assert second.state == "timed out"
            assert type(second.error) is TimeoutError
            assert limits.get_stats()["waiting"] == 0

    async def test_full_resource_waits_until_the_deadline_then_times_out_holding_nothing(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset(
            [RateLimit("tokens", 100, 10), ResourceLimit("conn", 1)],
            clock=clock,  # 0.1/s
        )
        holder = limits.try_acquire({"tokens": 1})
        async with crowd(limits, clock) as c:
            attempt = await c.arrive("attempt", {"tokens": 5}, timeout=3)
            clock.advance(2.5)
            await settle()
            assert attempt.state == "waiting"  # a release might still come in time
            clock.advance(0.5)
            await settle()
            assert attempt.state == "timed out"
            assert type(attempt.error) is TimeoutError
        stats = limits.get_stats()
        assert (stats["timed_out"], stats["waiting"], stats["granted"]) == (1, 0, 1)
        assert stats["limits"]["conn"]["in_use"] == 1  # the holder's slot only
        assert stats["limits"]["tokens"]["available"] == pytest.approx(9.3)  # 9 + 0.1 * 3
        holder.release()
        assert limits.try_acquire({"tokens": 9}).successful

    async def test_full_resource_with_timeout_gets_a_slot_released_in_time(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([ResourceLimit("conn", 1)], clock=clock)
        holder = limits.try_acquire()
        async with crowd(limits, clock) as c:
            attempt = await c.arrive("attempt", timeout=3, hold=True)
            clock.advance(2.5)
            holder.release()
            await settle()
            assert attempt.state == "held"
            assert attempt.acquisition is not None
            assert attempt.acquisition.waited == 2.5
            clock.advance(1)  # past the deadline: being held, it does not time out
            await settle()
            assert attempt.state == "held"
            attempt.leave.set()
            await settle()
            assert attempt.state == "done"
        assert limits.get_stats()["timed_out"] == 0

    async def test_waiter_behind_the_head_times_out_at_its_deadline(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=clock)
        assert limits.try_acquire({"tokens": 10}).successful
        async with crowd(limits, clock) as c:
            head = await c.arrive("head", {"tokens": 8})  # due at 8
            behind = await c.arrive("behind", {"tokens": 1}, timeout=4)
            clock.advance(3.75)
            await settle()
            assert behind.state == "waiting"
            clock.advance(0.25)
            await settle()
            assert behind.state == "timed out"
            assert head.state == "waiting"
            clock.advance(4)
            await settle()
            assert head.granted_at == 8
        assert stats_of(limits, "tokens")["available"] == 0


class ThreadContract:
    """acquire_sync: threads join the same FIFO queue; never on an event loop thread."""

    pytestmark = pytest.mark.anyio

    async def test_acquire_sync_from_a_worker_thread(self, make_limitset: MakeLimitSet) -> None:
        limits = make_limitset(
            [RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)], clock=ManualClock()
        )

        def work() -> tuple[bool, dict[str, float], float, int]:
            with limits.acquire_sync({"tokens": 3}) as acq:
                in_use = stats_of(limits, "conn")["in_use"]
                return acq.successful, dict(acq.requested), acq.waited, in_use

        assert await anyio.to_thread.run_sync(work) == (True, {"tokens": 3, "conn": 1}, 0.0, 1)
        assert stats_of(limits, "conn")["in_use"] == 0
        assert stats_of(limits, "tokens")["available"] == 7

    async def test_acquire_sync_on_the_event_loop_thread_raises_runtime_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)], clock=ManualClock())
        with pytest.raises(RuntimeError):
            limits.acquire_sync()
        assert limits.get_stats()["granted"] == 0
        assert limits.try_acquire().successful

    async def test_thread_waiter_is_granted_by_a_release_and_waited_is_the_clock_advance(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([ResourceLimit("conn", 1)], clock=clock)
        holder = limits.try_acquire()

        def work() -> float:
            with limits.acquire_sync(timeout=5) as acq:
                return acq.waited

        async with worker_threads(clock) as threads:
            threads.start(work)
            await eventually(lambda: limits.get_stats()["waiting"] == 1)
            clock.advance(2.5)
            holder.release()
            await eventually(lambda: bool(threads.results))
        assert threads.results == [2.5]
        assert stats_of(limits, "conn")["in_use"] == 0

    async def test_thread_waiter_times_out_on_the_manual_clock(
        self, make_limitset: MakeLimitSet
    ) -> None:
        clock = ManualClock()
        limits = make_limitset([RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)], clock=clock)
        assert limits.try_acquire({"tokens": 1}).successful

        def work() -> str:
            try:
                with limits.acquire_sync({"tokens": 5}, timeout=2):
                    return "granted"
            except TimeoutError as exc:
                return type(exc).__name__

        async with worker_threads(clock) as threads:
            threads.start(work)
            await eventually(lambda: limits.get_stats()["waiting"] == 1)
            clock.advance(1.75)
            await anyio.sleep(0.01)
            assert threads.results == []
            clock.advance(0.25)
            await eventually(lambda: bool(threads.results))
        assert threads.results == ["TimeoutError"]
        stats = limits.get_stats()
        assert (stats["timed_out"], stats["waiting"]) == (1, 0)
        assert stats["limits"]["tokens"]["available"] == 10  # 9 + 2 refilled, capped; none taken

    async def test_threads_and_tasks_share_one_fifo_queue(
        self, make_limitset: MakeLimitSet
    ) -> None:
        # The real clock: a resource wait does not depend on time, and the thread's (long)
        # timeout keeps it from blocking forever if this test fails.
        limits = make_limitset([ResourceLimit("conn", 1)])
        holder = limits.try_acquire()
        order: list[str] = []
        lock = threading.Lock()

        def work() -> None:
            with limits.acquire_sync(timeout=20), lock:
                order.append("thread")

        async with crowd(limits) as c, worker_threads() as threads:
            first = await c.arrive("task-1", hold=True)
            threads.start(work)
            await eventually(lambda: limits.get_stats()["waiting"] == 2)
            last = await c.arrive("task-2", hold=True)
            holder.release()
            await settle()
            assert first.state == "held"
            with lock:
                order.append("task-1")
            first.leave.set()  # the thread is next, then task-2
            await eventually(lambda: last.state == "held")
            with lock:
                order.append("task-2")
            last.leave.set()
        assert order == ["task-1", "thread", "task-2"]


class RealClockContract:
    """The thin waiting layer on the real clock: short waits, only lower bounds asserted."""

    pytestmark = pytest.mark.anyio

    async def test_rate_wait_on_the_real_clock_is_granted_no_earlier_than_due(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([RateLimit("tokens", 0.05, 1)])  # one every 50 ms
        start = time.monotonic()
        with anyio.fail_after(10):
            async with limits.acquire({"tokens": 1}):
                pass
            async with limits.acquire({"tokens": 1}) as acq:
                assert acq.waited > 0
        assert time.monotonic() - start >= 0.05
        assert limits.get_stats()["granted"] == 2

    async def test_timeout_on_the_real_clock_raises_builtin_timeout_error(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([ResourceLimit("conn", 1)])
        holder = limits.try_acquire()
        start = time.monotonic()
        with anyio.fail_after(10), pytest.raises(TimeoutError) as info:
            async with limits.acquire(timeout=0.05):
                pytest.fail("admitted while the resource is full")
        assert info.type is TimeoutError
        assert time.monotonic() - start >= 0.05
        assert (limits.get_stats()["timed_out"], limits.get_stats()["waiting"]) == (1, 0)
        holder.release()
        assert limits.try_acquire().successful

    async def test_cancel_scope_cancels_a_waiter_holding_nothing(
        self, make_limitset: MakeLimitSet
    ) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10), ResourceLimit("conn", 1)])
        holder = limits.try_acquire({"tokens": 1})
        with anyio.move_on_after(0.05) as scope:
            async with limits.acquire({"tokens": 5}):
                pytest.fail("admitted while the resource is full")
        assert scope.cancelled_caught
        stats = limits.get_stats()
        assert (stats["cancelled"], stats["waiting"], stats["granted"]) == (1, 0, 1)
        assert stats["limits"]["conn"]["in_use"] == 1
        holder.release()
        assert limits.try_acquire({"tokens": 9}).successful


class LimitSetContract(
    AlgorithmContract,
    RequestContract,
    ValidationContract,
    AcquisitionContract,
    PauseAndRetryAfterContract,
    StatsContract,
    WaitingContract,
    TimeoutContract,
    ThreadContract,
    RealClockContract,
):
    """The whole contract. Subclass it as ``Test<Backend>`` next to a ``make_limitset`` fixture.

    The anyio mark of the async parts reaches the synchronous tests too; anyio ignores it there.
    """
