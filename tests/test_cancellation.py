"""Cancellation and release: a waiter that leaves, by any means, leaves no trace (semantics §4-5).

Whatever makes a queued waiter leave (an anyio or trio cancel scope, a deadline, ``Task.cancel``,
``asyncio.timeout``, the ``timeout=`` of ``acquire`` or ``acquire_sync``), afterwards it is out of
the queue, holds nothing, and the next waiter gets exactly what it would have got. A waiter that
was granted but cancelled before it resumed hands its grant on. Releases are synchronous, so they
happen on exceptions and in cancelled scopes.

The tests run on a :class:`ManualClock` (all but one, which checks a real-time timeout): the
LimitSet's time moves only when a test advances it, so expected amounts and wait times are exact.
Real time is used only as a generous bound on how long a test may wait for another task or thread
to get somewhere.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import anyio
import pytest
from anyio.abc import TaskGroup

from aiolimits import Acquisition, CallLimit, LimitSet, RateLimit, ResourceLimit
from aiolimits._algorithms.fixed_window import window_index
from aiolimits.testing import ManualClock

pytestmark = pytest.mark.anyio

Backend = tuple[str, dict[str, object]]

BACKENDS: dict[str, Backend] = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}
if sys.platform == "win32":  # uvloop does not exist there
    del BACKENDS["uvloop"]
ASYNCIO_ONLY = [pytest.param(BACKENDS[b], id=b) for b in ("asyncio", "uvloop") if b in BACKENDS]


PATIENCE = 10.0  # real seconds; generous for a loaded machine, normally milliseconds


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Yield until ``predicate()`` holds; fail after PATIENCE real seconds."""
    with anyio.move_on_after(PATIENCE):
        # Polling: threads change what is watched, and they cannot set an anyio.Event.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.001)
        return
    pytest.fail(f"timed out after {PATIENCE}s waiting for {what}")


async def queued(limits: LimitSet, n: int) -> None:
    """Wait until exactly ``n`` waiters are queued."""
    await wait_for(lambda: limits.get_stats()["waiting"] == n, f"{n} waiter(s) to be queued")


# -- one waiter leaves, by every mechanism --------------------------------------------------------


class Departure:
    """A waiter that queues and then leaves by one mechanism when :meth:`fire` is called.

    ``outcome`` becomes "left" when it left as it should (cancelled or timed out) and "granted"
    if it was admitted instead (a failure)."""

    #: which ``get_stats()`` total the departure counts in
    counter: ClassVar[str] = "cancelled"
    #: the backends it exists on
    backends: ClassVar[tuple[str, ...]] = ("asyncio", "uvloop", "trio")
    #: a library timeout cannot make a waiter that the rate limits alone hold back leave: such a
    #: waiter is refused at once, never queued (semantics §4).
    rate_blocked_ok: ClassVar[bool] = True

    def __init__(self) -> None:
        self.outcome: str | None = None

    async def start(self, tg: TaskGroup, limits: LimitSet, requested: Mapping[str, int]) -> None:
        tg.start_soon(self.run, limits, requested)

    async def run(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
        raise NotImplementedError

    def fire(self, clock: ManualClock) -> float:
        """Make it leave; returns how far the manual clock was moved to do so."""
        raise NotImplementedError


class AnyioCancelScope(Departure):
    async def run(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
        with anyio.CancelScope() as self.scope:
            async with limits.acquire(requested):
                self.outcome = "granted"
                return
        assert self.scope.cancelled_caught
        self.outcome = "left"

    def fire(self, clock: ManualClock) -> float:
        self.scope.cancel()
        return 0.0


class AnyioFailAfter(Departure):
    """``anyio.fail_after``: the deadline is moved to now when fired, so the order of events is
    exact rather than a race with a short real-time timeout."""

    async def run(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
        try:
            with anyio.fail_after(3600) as self.scope:
                async with limits.acquire(requested):
                    self.outcome = "granted"
                    return
        except TimeoutError:
            self.outcome = "left"

    def fire(self, clock: ManualClock) -> float:
        self.scope.deadline = anyio.current_time()
        return 0.0


class AcquireTimeout(Departure):
    """The ``timeout=`` of ``acquire``, on the LimitSet's (manual) clock."""

    counter = "timed_out"
    rate_blocked_ok = False

    async def run(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
        try:
            async with limits.acquire(requested, timeout=3):
                self.outcome = "granted"
        except TimeoutError:
            self.outcome = "left"

    def fire(self, clock: ManualClock) -> float:
        clock.advance(3)
        return 3.0


class AcquireSyncTimeout(Departure):
    """The ``timeout=`` of ``acquire_sync`` in a worker thread; the manual clock's timer wakes
    the thread when the test advances it."""

    counter = "timed_out"
    rate_blocked_ok = False

    async def run(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
        await anyio.to_thread.run_sync(self.run_sync, limits, requested)

    def run_sync(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
        try:
            with limits.acquire_sync(requested, timeout=3):
                self.outcome = "granted"
        except TimeoutError:
            self.outcome = "left"

    def fire(self, clock: ManualClock) -> float:
        clock.advance(3)
        return 3.0


class AsyncioTaskCancel(Departure):
    """A plain ``asyncio.Task.cancel()``, on a task outside any anyio cancel scope."""

    backends = ("asyncio", "uvloop")

    async def start(self, tg: TaskGroup, limits: LimitSet, requested: Mapping[str, int]) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(limits, requested))

    async def run(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
        try:
            async with limits.acquire(requested):
                self.outcome = "granted"
        except asyncio.CancelledError:
            self.outcome = "left"
            raise

    def fire(self, clock: ManualClock) -> float:
        self.task.cancel()
        return 0.0


DEPARTURES: list[type[Departure]] = [
    AnyioCancelScope,
    AnyioFailAfter,
    AcquireTimeout,
    AcquireSyncTimeout,
    AsyncioTaskCancel,
]

if sys.version_info >= (3, 11):

    class AsyncioTimeout(Departure):
        """``asyncio.timeout`` (Python 3.11+), rescheduled to now when fired."""

        backends = ("asyncio", "uvloop")

        async def run(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
            try:
                async with asyncio.timeout(None) as self.timeout:
                    async with limits.acquire(requested):
                        self.outcome = "granted"
            except TimeoutError:
                self.outcome = "left"

        def fire(self, clock: ManualClock) -> float:
            self.timeout.reschedule(asyncio.get_running_loop().time())
            return 0.0

    DEPARTURES.append(AsyncioTimeout)


class TrioCancelScope(Departure):
    backends = ("trio",)

    async def run(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
        import trio

        with trio.CancelScope() as self.scope:
            async with limits.acquire(requested):
                self.outcome = "granted"
                return
        assert self.scope.cancelled_caught
        self.outcome = "left"

    def fire(self, clock: ManualClock) -> float:
        self.scope.cancel()
        return 0.0


class TrioDeadline(Departure):
    """``trio.move_on_at``: the deadline is moved to now when fired."""

    backends = ("trio",)

    async def run(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
        import trio

        with trio.move_on_at(math.inf) as self.scope:
            async with limits.acquire(requested):
                self.outcome = "granted"
                return
        assert self.scope.cancelled_caught
        self.outcome = "left"

    def fire(self, clock: ManualClock) -> float:
        import trio

        self.scope.deadline = trio.current_time()
        return 0.0


class TrioNurseryCancel(Departure):
    """The waiter is a child of a nursery whose scope is cancelled."""

    backends = ("trio",)

    async def run(self, limits: LimitSet, requested: Mapping[str, int]) -> None:
        import trio

        async def child() -> None:
            async with limits.acquire(requested):
                self.outcome = "granted"

        async with trio.open_nursery() as self.nursery:
            self.nursery.start_soon(child)
        if self.nursery.cancel_scope.cancelled_caught and self.outcome is None:
            self.outcome = "left"

    def fire(self, clock: ManualClock) -> float:
        self.nursery.cancel_scope.cancel()
        return 0.0


DEPARTURES += [TrioCancelScope, TrioDeadline, TrioNurseryCancel]

DEPARTURE_CASES = [
    pytest.param(BACKENDS[b], departure, blocked_by, id=f"{b}-{departure.__name__}-{blocked_by}")
    for departure in DEPARTURES
    for b in departure.backends
    if b in BACKENDS
    for blocked_by in ("resource", "rate")
    if blocked_by == "resource" or departure.rate_blocked_ok
]


@pytest.mark.parametrize(("anyio_backend", "departure_cls", "blocked_by"), DEPARTURE_CASES)
async def test_departed_waiter_leaves_the_queue_holding_nothing(
    anyio_backend: Backend, departure_cls: type[Departure], blocked_by: str
) -> None:
    # conn: 1 slot; tokens: a bucket of 10 refilled at 1 per second. The departing waiter and the
    # one queued behind it both ask for 6 tokens and the slot.
    clock = ManualClock(1000.0)
    limits = LimitSet([ResourceLimit("conn", 1), RateLimit("tokens", 10, 10)], clock=clock)
    if blocked_by == "resource":
        holder = limits.try_acquire({"tokens": 4})  # the slot is taken; 6 tokens are left
        tokens_left = 6.0
    else:
        holder = limits.try_acquire({"tokens": 10, "conn": 0})  # empty bucket: 6 tokens in 6 s
        tokens_left = 0.0
    assert holder.successful
    requested = {"tokens": 6}
    departing = departure_cls()
    granted: list[Acquisition] = []
    finish = anyio.Event()

    async def behind() -> None:
        async with limits.acquire(requested) as acq:
            granted.append(acq)
            await finish.wait()

    async with anyio.create_task_group() as tg:
        await departing.start(tg, limits, requested)
        await queued(limits, 1)
        tg.start_soon(behind)
        await queued(limits, 2)

        elapsed = departing.fire(clock)
        await wait_for(lambda: departing.outcome is not None, "the waiter to leave")
        assert departing.outcome == "left"
        stats = limits.get_stats()
        assert stats["waiting"] == 1
        assert stats[departing.counter] == 1
        assert stats["cancelled"] + stats["timed_out"] == 1
        assert stats["granted"] == 1  # the holder only
        # Holding nothing: the bucket is where the holder alone left it (plus the refill).
        assert stats["limits"]["tokens"]["available"] == min(10.0, tokens_left + elapsed)
        assert stats["limits"]["conn"]["in_use"] == (1 if blocked_by == "resource" else 0)
        assert not granted

        # The waiter behind gets what the departed one would have got, when it would have.
        if blocked_by == "resource":
            holder.release()
            passed = elapsed
        else:
            clock.advance(6.0 - elapsed)
            passed = 6.0
        await wait_for(lambda: bool(granted), "the second waiter to be granted")
        assert granted[0].waited == passed
        stats = limits.get_stats()
        assert stats["waiting"] == 0
        assert stats["granted"] == 2
        assert stats["limits"]["conn"]["in_use"] == 1
        assert stats["limits"]["tokens"]["available"] == min(10.0, tokens_left + passed) - 6.0
        finish.set()

    holder.release()
    if isinstance(departing, AsyncioTaskCancel):
        assert departing.task.cancelled()
    stats = limits.get_stats()
    assert stats["limits"]["conn"]["in_use"] == 0
    assert stats["waiting"] == 0
    assert clock.pending_timers() == 0  # the departed waiter left no timer behind


def test_acquire_sync_timeout_on_the_real_clock_leaves_the_queue() -> None:
    limits = LimitSet([ResourceLimit("conn", 1)])
    holder = limits.try_acquire()
    with pytest.raises(TimeoutError):
        limits.acquire_sync(timeout=0.05)
    stats = limits.get_stats()
    assert stats["waiting"] == 0
    assert stats["timed_out"] == 1
    assert stats["limits"]["conn"]["in_use"] == 1
    holder.release()
    with limits.acquire_sync(timeout=0) as acq:
        assert acq.successful
    assert limits.get_stats()["limits"]["conn"]["in_use"] == 0


# -- woken, then cancelled before it resumed ----------------------------------------------------


@pytest.mark.parametrize("order", ["cancel_then_release", "release_then_cancel"])
async def test_granted_then_cancelled_waiter_hands_the_slot_on(
    anyio_backend: Backend, order: str
) -> None:
    clock = ManualClock()
    limits = LimitSet([ResourceLimit("conn", 1)], clock=clock)
    holder = limits.try_acquire()
    entered: list[str] = []
    finish = anyio.Event()

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            async with limits.acquire():
                entered.append(name)
                await finish.wait()

    first, second = anyio.CancelScope(), anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "first", first)
        await queued(limits, 1)
        tg.start_soon(waiter, "second", second)
        await queued(limits, 2)

        # One synchronous step: neither waiter runs in between.
        if order == "cancel_then_release":
            first.cancel()
            holder.release()
        else:
            holder.release()  # grants the first waiter
            first.cancel()
        await wait_for(lambda: "second" in entered, "the second waiter to get the slot")
        stats = limits.get_stats()
        assert stats["limits"]["conn"]["in_use"] == 1
        assert stats["waiting"] == 0
        # Either the first waiter never resumed and handed its grant back (it counts as
        # cancelled), or it resumed, entered its block and released the slot on cancellation
        # there. Both are correct; neither loses or duplicates the slot.
        if "first" in entered:
            assert order == "release_then_cancel"
            assert (stats["granted"], stats["cancelled"]) == (3, 0)
        else:
            assert (stats["granted"], stats["cancelled"]) == (2, 1)
        assert entered[-1] == "second"
        finish.set()
    assert first.cancelled_caught
    assert not second.cancel_called
    assert limits.get_stats()["limits"]["conn"]["in_use"] == 0


@pytest.mark.parametrize("anyio_backend", ASYNCIO_ONLY)
async def test_task_cancelled_after_its_grant_hands_the_grant_back(anyio_backend: Backend) -> None:
    # A release grants the first task (its wake-up is set), and the task is cancelled in the same
    # synchronous step: asyncio throws CancelledError into it before it resumes, so it never
    # enters its block and must give the slot to the next waiter (anyio #952).
    clock = ManualClock()
    limits = LimitSet([ResourceLimit("conn", 1)], clock=clock)
    holder = limits.try_acquire()
    entered: list[str] = []

    async def waiter(name: str) -> None:
        async with limits.acquire():
            entered.append(name)

    loop = asyncio.get_running_loop()
    first = loop.create_task(waiter("first"))
    await queued(limits, 1)
    second = loop.create_task(waiter("second"))
    await queued(limits, 2)

    holder.release()
    assert limits.get_stats()["granted"] == 2  # the holder, and now the first waiter
    first.cancel()
    await asyncio.wait({first, second})
    assert first.cancelled()
    assert second.result() is None
    assert entered == ["second"]
    stats = limits.get_stats()
    assert (stats["granted"], stats["cancelled"], stats["waiting"]) == (2, 1, 0)
    assert stats["limits"]["conn"]["in_use"] == 0
    # The slot is really free: nothing lost, nothing double-counted.
    acq = limits.try_acquire()
    assert acq.successful
    assert not limits.try_acquire().successful
    acq.release()


@pytest.mark.parametrize("order", ["cancel_then_refund", "refund_then_cancel"])
async def test_waiter_woken_by_a_refund_and_cancelled_hands_the_tokens_on(
    anyio_backend: Backend, order: str
) -> None:
    clock = ManualClock()
    limits = LimitSet([RateLimit("tokens", 10, 10)], clock=clock)  # refills 1 token per second
    holder = limits.try_acquire({"tokens": 10})
    entered: list[str] = []
    finish = anyio.Event()

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            async with limits.acquire({"tokens": 6}):
                entered.append(name)
                await finish.wait()

    first, second = anyio.CancelScope(), anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "first", first)
        await queued(limits, 1)
        tg.start_soon(waiter, "second", second)
        await queued(limits, 2)

        if order == "cancel_then_refund":
            first.cancel()
            holder.update({"tokens": 4})  # 6 tokens back: enough for one waiter
        else:
            holder.update({"tokens": 4})  # grants the first waiter
            first.cancel()
        await wait_for(
            lambda: "second" in entered or first.cancelled_caught, "the first waiter to finish"
        )
        stats = limits.get_stats()
        assert stats["refunded"] == 6
        # No time has passed: the 6 refunded tokens went to exactly one waiter.
        if "first" in entered:
            # It resumed with its grant and was cancelled in its block. It used the tokens, so
            # the second waiter is now the head of the queue, due when 6 more have refilled.
            assert order == "refund_then_cancel"
            assert entered == ["first"]
            assert (stats["granted"], stats["cancelled"], stats["waiting"]) == (2, 0, 1)
            clock.advance(6)
            await wait_for(lambda: "second" in entered, "the second waiter to get the tokens")
            stats = limits.get_stats()
            assert (stats["granted"], stats["cancelled"]) == (3, 0)
        else:
            # It handed the tokens back before resuming; the second waiter got them at once.
            assert (stats["granted"], stats["cancelled"]) == (2, 1)
        assert stats["waiting"] == 0
        assert stats["limits"]["tokens"]["available"] == 0.0
        finish.set()
    holder.release()
    clock.advance(6)
    assert limits.get_stats()["limits"]["tokens"]["available"] == 6.0


# -- a storm of cancellations ---------------------------------------------------------------------


async def settle(anyio_backend: Backend) -> None:
    """Let every other task run until all of them are blocked.

    anyio's ``wait_all_tasks_blocked`` sleeps 0.1 s per retry on asyncio, far too slow for
    hundreds of steps, so asyncio gets the same check without the sleep (two consecutive quiet
    observations, so a callback queued behind a task's step is seen too)."""
    if anyio_backend[0] == "trio":
        import trio.testing

        await trio.testing.wait_all_tasks_blocked()
        return
    me = asyncio.current_task()
    quiet = 0
    while quiet < 2:
        await asyncio.sleep(0)
        blocked = True
        for task in asyncio.all_tasks():
            if task is me:
                continue
            waiter = task._fut_waiter  # type: ignore[attr-defined]  # what anyio inspects too
            if waiter is None or waiter.done():
                blocked = False
                break
        quiet = quiet + 1 if blocked else 0


class StormBook:
    """The reference: what the limits must show, rebuilt from the grants the tasks saw.

    ``tokens`` is a fixed window (a grant counts in the window of its grant time; a lower usage
    reported in that same window gives the difference back), ``call_count`` a token bucket (one
    call per grant, refilled continuously, never above capacity)."""

    def __init__(self, window: float, per_window: int, calls_capacity: int, calls_rate: float):
        self.window = window
        self.per_window = per_window
        self.counts: dict[int, float] = {}
        self.refunded = 0.0
        self.calls_capacity = float(calls_capacity)
        self.calls_rate = calls_rate
        self.level = self.calls_capacity
        self.last = 0.0

    def grant(self, t: float, amount: int) -> None:
        assert t >= self.last, "grants are replayed in time order"
        k = window_index(t, self.window)
        self.counts[k] = self.counts.get(k, 0) + amount
        assert self.counts[k] <= self.per_window, f"window {k} admitted {self.counts[k]} tokens"
        self.level = self.calls_available(t) - 1
        self.last = t
        assert self.level >= 0, f"a call was admitted at t={t} from an empty bucket"

    def update(self, granted_at: float, amount: int, now: float, usage: int) -> None:
        k = window_index(granted_at, self.window)
        if window_index(now, self.window) == k:
            self.counts[k] -= amount - usage
            self.refunded += amount - usage

    def tokens_available(self, now: float) -> float:
        return self.per_window - self.counts.get(window_index(now, self.window), 0)

    def calls_available(self, now: float) -> float:
        return min(self.calls_capacity, self.level + self.calls_rate * (now - self.last))


@pytest.mark.timeout(60)
async def test_cancellation_storm_loses_and_duplicates_nothing(anyio_backend: Backend) -> None:
    """2,000 waiters on a resource limit, a fixed window and a token bucket; half of them are
    cancelled at random moments: while queued (head or not), right after a release or a refund
    granted them (before they resume), or while holding. After every step the limits must show
    exactly what the grants that really happened account for."""
    n = 2000
    slots, window, per_window = 8, 1.0, 60
    calls_capacity, calls_window = 25, 1.0
    rng = random.Random(20240611)
    clock = ManualClock(0.0)
    limits = LimitSet(
        [
            ResourceLimit("conn", slots),
            RateLimit("tokens", window, per_window, "fixed_window"),
            CallLimit(calls_window, calls_capacity),  # a token bucket of calls
        ],
        clock=clock,
    )
    book = StormBook(window, per_window, calls_capacity, calls_capacity / calls_window)
    amounts = [rng.randint(1, 5) for _ in range(n)]
    # Half the waiters are doomed. Half of those are cancelled at a random step while still
    # somewhere in the queue (about 3 waiters leave it per step), the others at a random step
    # once among the first 4 in the queue, where a release or refund may grant them first.
    cancel_steps: dict[int, list[int]] = {}
    cancel_near_head: set[int] = set()
    for i in rng.sample(range(n), n // 2):
        if rng.random() < 0.5:
            cancel_steps.setdefault(rng.randint(1, max(1, i // 4)), []).append(i)
        else:
            cancel_near_head.add(i)
    scopes = [anyio.CancelScope() for _ in range(n)]
    releases = [anyio.Event() for _ in range(n)]

    arrivals: list[int] = []
    entered = [0] * n
    outcome: dict[int, str] = {}
    granted_at: dict[int, float] = {}
    new_grants: list[int] = []
    holding: dict[int, Acquisition] = {}
    updated: set[int] = set()

    async def task(i: int) -> None:
        try:
            with scopes[i]:
                arrived = clock()
                arrivals.append(i)  # no checkpoint between this and joining the queue
                async with limits.acquire({"tokens": amounts[i]}) as acq:
                    entered[i] += 1
                    # The grant time, exact: the manual clock moves in binary fractions only.
                    granted_at[i] = arrived + acq.waited
                    new_grants.append(i)
                    holding[i] = acq
                    assert len(holding) <= slots
                    try:
                        await releases[i].wait()
                    finally:
                        holding.pop(i, None)
        finally:
            outcome[i] = "cancelled" if scopes[i].cancelled_caught else "done"

    steps = 0
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(task, i)
        await settle(anyio_backend)
        while len(outcome) < n:
            steps += 1
            assert steps < 20_000, f"no progress: {limits.get_stats()}"
            for i in sorted(new_grants, key=granted_at.__getitem__):
                book.grant(granted_at[i], amounts[i])
            new_grants.clear()
            now = clock()
            stats = limits.get_stats()
            assert stats["limits"]["conn"]["in_use"] == len(holding)
            assert stats["waiting"] == sum(
                1 for i in arrivals if not entered[i] and i not in outcome
            )
            assert stats["limits"]["tokens"]["available"] == book.tokens_available(now)
            assert stats["refunded"] == book.refunded
            assert stats["limits"]["call_count"]["available"] == pytest.approx(
                book.calls_available(now), abs=1e-9
            )

            # One synchronous step, in random order: usage reports (refunds), releases and
            # cancellations, and the grants they cause. A waiter cancelled before a release
            # grants it, or granted just before it is cancelled, has not resumed yet.
            actions: list[tuple[str, int]] = [("cancel", i) for i in cancel_steps.pop(steps, ())]
            front = [i for i in arrivals if not entered[i] and i not in outcome][:4]
            for i in front:
                if i in cancel_near_head and rng.random() < 0.5:
                    cancel_near_head.discard(i)
                    actions.append(("cancel", i))
            for i in holding:
                r = rng.random()
                if r < 0.15 and i not in updated:
                    actions.append(("update", i))
                elif r < 0.55:
                    actions.append(("release", i))
            rng.shuffle(actions)
            for action, i in actions:
                if action == "cancel":
                    scopes[i].cancel()
                elif action == "update" and i in holding:
                    usage = rng.randint(0, amounts[i])
                    holding[i].update({"tokens": usage})
                    book.update(granted_at[i], amounts[i], now, usage)
                    updated.add(i)
                elif action == "release" and i in holding:
                    holding.pop(i).release()
                    releases[i].set()
            # Everyone reacts before time moves on: a waiter granted and cancelled in this step
            # hands its grant back at the time it was granted (handing it back after the clock
            # moved is the subject of test_grant_handed_back_after_the_clock_moved_...).
            await settle(anyio_backend)
            clock.advance(rng.choice((0.0, 0.0625, 0.125, 0.25)))
            await settle(anyio_backend)

    for i in sorted(new_grants, key=granted_at.__getitem__):
        book.grant(granted_at[i], amounts[i])
    now = clock()
    stats = limits.get_stats()
    assert stats["waiting"] == 0
    assert stats["limits"]["conn"]["in_use"] == 0
    assert clock.pending_timers() == 0
    assert stats["limits"]["tokens"]["available"] == book.tokens_available(now)
    assert stats["limits"]["call_count"]["available"] == pytest.approx(
        book.calls_available(now), abs=1e-9
    )
    assert stats["refunded"] == book.refunded
    assert sorted(arrivals) == list(range(n))
    # Every waiter that was not cancelled was granted exactly once; none more than once.
    assert max(entered) == 1
    assert all(entered[i] for i in range(n) if outcome[i] == "done")
    cancelled = [i for i in range(n) if outcome[i] == "cancelled"]
    assert len(cancelled) > n // 4  # the storm really cancelled waiters (about 700 of 2000)
    assert stats["granted"] == sum(entered)
    assert stats["cancelled"] == sum(1 for i in cancelled if not entered[i])
    assert stats["timed_out"] == 0
    # FIFO: in arrival order, grant times never go back.
    times = [granted_at[i] for i in arrivals if entered[i]]
    assert times == sorted(times)

    # And the limits admit exactly what is left: every slot and exactly the remaining tokens.
    tokens = stats["limits"]["tokens"]["available"]
    if tokens < per_window:
        assert not limits.try_acquire({"tokens": tokens + 1, "call_count": 0, "conn": 0}).successful
    everything = limits.try_acquire({"tokens": tokens, "call_count": 0, "conn": slots})
    assert everything.successful
    everything.release()


@pytest.mark.parametrize("algorithm", ["token_bucket", "gcra"])
async def test_grant_handed_back_after_the_clock_moved_admits_nothing_extra(
    anyio_backend: Backend, algorithm: str
) -> None:
    clock = ManualClock()
    limits = LimitSet([ResourceLimit("conn", 1), CallLimit(1, 2, algorithm)], clock=clock)
    holder = limits.try_acquire()  # t=0: the slot, and 1 of the 2 calls
    scope = anyio.CancelScope()

    async def waiter() -> None:
        with scope:
            async with limits.acquire():
                pytest.fail("a cancelled waiter entered its block")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await queued(limits, 1)
        # One synchronous step: the waiter is cancelled, then granted before it runs again.
        scope.cancel()
        holder.release()  # grants it the slot and 1 call at t=0: no call is left
        clock.advance(1)  # t=1: the bucket is full again, 2 calls
        others = [limits.try_acquire({"conn": 0}) for _ in range(2)]
        assert all(acq.successful for acq in others)  # 2 calls at t=1: the whole capacity
    # The waiter has run and handed its unused grant back, at t=1.
    assert scope.cancelled_caught
    stats = limits.get_stats()
    assert (stats["waiting"], stats["cancelled"], stats["limits"]["conn"]["in_use"]) == (0, 1, 0)
    # A bucket of capacity 2 admits at most 2 calls at one instant (semantics §3).
    assert stats["limits"]["call_count"]["available"] == 0
    assert not limits.try_acquire({"conn": 0}).successful


# -- release on exceptions and in cancelled scopes ------------------------------------------------


def mixed_set(clock: ManualClock) -> LimitSet:
    return LimitSet(
        [ResourceLimit("conn", 2), CallLimit(1, 5), RateLimit("tokens", 1, 10)], clock=clock
    )


class Boom(Exception):
    pass


async def test_exception_in_the_body_releases_everything(anyio_backend: Backend) -> None:
    clock = ManualClock()
    limits = mixed_set(clock)
    acq = limits.acquire({"tokens": 3, "conn": 2})

    async def body() -> None:
        async with acq:
            assert limits.get_stats()["limits"]["conn"]["in_use"] == 2
            raise Boom

    with pytest.raises(Boom):
        await body()
    assert acq.released
    stats = limits.get_stats()
    assert stats["limits"]["conn"]["in_use"] == 0
    # Rate limits count what was requested (no usage was reported).
    assert stats["limits"]["tokens"]["available"] == 7
    assert stats["limits"]["call_count"]["available"] == 4
    with pytest.raises(RuntimeError):
        acq.update({"tokens": 1})


async def test_exception_in_the_body_of_a_granted_waiter_wakes_the_next(
    anyio_backend: Backend,
) -> None:
    clock = ManualClock()
    limits = LimitSet([ResourceLimit("conn", 1)], clock=clock)
    holder = limits.try_acquire()
    got: list[str] = []

    async def body() -> None:
        async with limits.acquire():
            got.append("failing")
            raise Boom

    async def failing() -> None:
        with pytest.raises(Boom):
            await body()

    async def next_one() -> None:
        async with limits.acquire():
            got.append("next")

    async with anyio.create_task_group() as tg:
        tg.start_soon(failing)
        await queued(limits, 1)
        tg.start_soon(next_one)
        await queued(limits, 2)
        holder.release()
    assert got == ["failing", "next"]
    assert limits.get_stats()["limits"]["conn"]["in_use"] == 0


def test_exception_in_a_sync_body_releases_everything() -> None:
    clock = ManualClock()
    limits = mixed_set(clock)
    acq = limits.acquire_sync({"tokens": 3})
    tried = limits.try_acquire({"tokens": 3})
    assert tried.successful

    def body(held: Acquisition) -> None:
        with held:
            raise Boom

    with pytest.raises(Boom):
        body(acq)
    with pytest.raises(Boom):
        body(tried)
    assert acq.released
    assert tried.released
    stats = limits.get_stats()
    assert stats["limits"]["conn"]["in_use"] == 0
    assert stats["limits"]["tokens"]["available"] == 4
    assert stats["granted"] == 2


async def test_cancellation_in_the_body_releases_and_wakes_the_next(
    anyio_backend: Backend,
) -> None:
    clock = ManualClock()
    limits = mixed_set(clock)
    got: list[str] = []
    in_body = anyio.Event()

    async def holder(scope: anyio.CancelScope) -> None:
        with scope:
            async with limits.acquire({"conn": 2, "tokens": 1}):
                in_body.set()
                await anyio.sleep_forever()

    async def next_one() -> None:
        async with limits.acquire({"tokens": 1}):
            got.append("next")

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder, scope)
        await in_body.wait()
        tg.start_soon(next_one)
        await queued(limits, 1)
        scope.cancel()
    assert scope.cancelled_caught
    assert got == ["next"]
    stats = limits.get_stats()
    assert stats["limits"]["conn"]["in_use"] == 0
    assert stats["waiting"] == 0


async def test_release_in_a_cancelled_scope_happens_without_a_checkpoint(
    anyio_backend: Backend,
) -> None:
    clock = ManualClock()
    limits = mixed_set(clock)
    first = limits.acquire({"conn": 2})
    second = limits.acquire({"conn": 2})
    await first.__aenter__()
    with anyio.CancelScope() as scope:
        scope.cancel()
        # __aexit__ never awaits: in a cancelled scope it still completes, and no checkpoint
        # inside it delivers the cancellation.
        await first.__aexit__(None, None, None)
        assert first.released
        assert limits.get_stats()["limits"]["conn"]["in_use"] == 0
        # An explicit release, and a second one, are synchronous and idempotent.
        first.release()
        await anyio.lowlevel.checkpoint()  # the cancellation is delivered here
        pytest.fail("a cancelled scope let a checkpoint through")
    assert scope.cancelled_caught
    async with second:
        assert limits.get_stats()["limits"]["conn"]["in_use"] == 2
    assert limits.get_stats()["limits"]["conn"]["in_use"] == 0


# -- under trio, acquiring is a checkpoint (semantics §4), as trio.Semaphore.acquire is -------

ACQUIRE_FORMS = ["LimitSet", "LimitPool", "LimitPool LeastWait", "KeyedLimitSet"]


def _uncontended_acquirer(clock: ManualClock, form: str) -> Callable[[], Any]:
    """An async acquire form on limits with room: nothing waits."""
    from aiolimits import KeyedLimitSet, LimitPool, LoadBalancingAlgorithm

    if form == "LimitSet":
        limits = mixed_set(clock)
        return lambda: limits.acquire({"tokens": 1})
    if form == "LimitPool":
        pool = LimitPool([mixed_set(clock), mixed_set(clock)])
        return lambda: pool.acquire({"tokens": 1})
    if form == "LimitPool LeastWait":
        least_wait = LimitPool(
            [mixed_set(clock), mixed_set(clock)], load_balancing=LoadBalancingAlgorithm.LeastWait
        )
        return lambda: least_wait.acquire({"tokens": 1})
    keyed = KeyedLimitSet([ResourceLimit("conn", 2), CallLimit(1, 5)], clock=clock)
    return lambda: keyed.acquire("client")


@pytest.mark.parametrize("anyio_backend", [BACKENDS["trio"]], ids=["trio"])
@pytest.mark.parametrize("form", ACQUIRE_FORMS)
async def test_under_trio_an_uncontended_acquire_in_a_cancelled_scope_takes_nothing(
    anyio_backend: Backend, form: str
) -> None:
    import trio

    acquire = _uncontended_acquirer(ManualClock(), form)
    entered = False
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            async with acquire():
                entered = True
    assert not entered
    # Nothing was taken: the next one is the first grant of its set.
    async with acquire() as acq:
        assert acq._sched.granted == 1


@pytest.mark.parametrize("anyio_backend", [BACKENDS["trio"]], ids=["trio"])
@pytest.mark.parametrize("form", ACQUIRE_FORMS)
async def test_under_trio_an_uncontended_acquire_is_a_checkpoint(
    anyio_backend: Backend, form: str
) -> None:
    import trio.testing

    acquire = _uncontended_acquirer(ManualClock(), form)
    # Both halves of a checkpoint: a cancellation point and a schedule point (a yield to other
    # tasks), with nothing waiting.
    with trio.testing.assert_checkpoints():
        async with acquire() as acq:
            assert acq.waited == 0


@pytest.mark.parametrize("anyio_backend", [BACKENDS["trio"]], ids=["trio"])
async def test_under_trio_an_acquire_refused_at_once_is_a_checkpoint(
    anyio_backend: Backend,
) -> None:
    import trio.testing

    limits = LimitSet([RateLimit("tokens", 10, 10)], clock=ManualClock())
    assert limits.try_acquire({"tokens": 10}).successful
    with trio.testing.assert_checkpoints(), pytest.raises(TimeoutError):
        async with limits.acquire({"tokens": 5}, timeout=1):  # due at 5
            pass  # pragma: no cover


@pytest.mark.parametrize("anyio_backend", ASYNCIO_ONLY)
async def test_under_asyncio_an_uncontended_acquire_does_not_yield(
    anyio_backend: Backend,
) -> None:
    # asyncio.Semaphore's behaviour, kept (docs/limitset.md): no task switch when nothing waits.
    limits = mixed_set(ManualClock())
    ran: list[str] = []

    async def note() -> None:
        ran.append("other")

    async with anyio.create_task_group() as tg:
        tg.start_soon(note)
        async with limits.acquire({"tokens": 1}):
            assert ran == []
