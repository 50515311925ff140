"""Queue-aware timeouts (semantics §4) against a brute-force model, on the scheduler itself.

A request with a deadline that arrives behind others fails at once when the rate limits cannot
admit it before the deadline even if every request ahead is granted at its own earliest time,
in order (ignoring future releases, refunds and cancellations). The scheduler answers that from
an incremental :class:`~aiolimits._scheduler.Forecast`; the model answers it from scratch, by
running the queue in order on a copy of the state. Hypothesis drives random histories (arrivals
with and without deadlines, time, releases, refunds, charges, cancellations, pauses) on a
hand-moved clock, stepping through every wake time and deadline so that nothing is granted late.

Properties:
* soundness: a request refused at once is one the model refuses (its time is after the deadline);
* exactness: with rate limits only and every grant on time, the forecast equals the model;
* nothing admissible in time is lost: the same history with the forecast switched off grants
  exactly the same requests at the same times, and times out every request refused at once
  (histories without the events the rule ignores: releases, refunds, cancellations, pauses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiolimits import LimitSet, ProcessBackend, RateLimit, RateLimitAlgorithm, ResourceLimit
from aiolimits._algorithms import RateState, SemaphoreState, new_state
from aiolimits._scheduler import Forecast, Items, Scheduler
from aiolimits._waiters import GRANTED, LEFT, Waiter
from aiolimits.testing import ManualClock

from .contract import crowd

INF = math.inf


class SimWaiter(Waiter):
    """A waiter that runs when the simulation says so: a notification only sets a flag."""

    __slots__ = ()

    def notify(self) -> bool:
        self.notified = True
        return True


class UnboundedForecastScheduler(Scheduler):
    """A forecast at every arrival, however often it is rebuilt (to check it against the model
    everywhere; the budget's fallback is checked by the soundness test)."""

    __slots__ = ()
    forecast_budget = 10**9


class NoForecastScheduler(Scheduler):
    """Today's behaviour before queue-aware timeouts: only the request's own amounts count."""

    __slots__ = ()
    forecasts_queue = False


def model_rate_at(sched: Scheduler, items: Items, now: float) -> float:
    """The brute-force answer: copy the rate states, grant every queued request in order at its
    own earliest time, then ask for ``items``."""
    copies = {id(s): deepcopy(s) for s in sched.states if not isinstance(s, SemaphoreState)}

    def earliest(its: Items, at: float) -> float:
        answers = [copies[id(s)].earliest(a, at) for s, a in its if id(s) in copies]
        return max([at, *answers])

    t = max(now, sched.paused_until)
    for waiter in sched.queue:
        t = earliest(waiter.items, t)
        for s, a in waiter.items:
            if id(s) in copies:
                copies[id(s)].take(a, t)
    return earliest(items, t)


@attrs.define
class Outcome:
    kind: str  # "taken", "refused", "granted", "timed out", "cancelled", "waiting"
    at: float


@attrs.define(eq=False)
class Sim:
    sched: Scheduler
    clock: list[float]
    checks: bool
    exact: bool
    waiters: list[tuple[int, SimWaiter]] = attrs.Factory(list)
    held: list[tuple[Items, list[Any]]] = attrs.Factory(list)
    outcomes: dict[int, Outcome] = attrs.Factory(dict)

    @property
    def now(self) -> float:
        return self.clock[0]

    def run_due(self) -> None:
        """Run every waiter that has something to do now, until none has."""
        sched, now = self.sched, self.now
        while True:
            sched.catch_up(now)
            busy = False
            for i, w in list(self.waiters):
                if w.state in {GRANTED, LEFT}:
                    self.finish(i, w)
                    busy = True
                elif w.notified or w.deadline <= now or (sched.head() is w and w.wake_at <= now):
                    sched.after_wake(w, now)
                    if w.state not in {GRANTED, LEFT} and not w.notified:
                        continue
                    busy = True
            if not busy:
                return

    def finish(self, i: int, w: SimWaiter) -> None:
        self.waiters.remove((i, w))
        if w.state == GRANTED:
            assert w.receipts is not None
            self.outcomes[i] = Outcome("granted", w.granted_at)
            self.held.append((w.items, w.receipts))
        elif i not in self.outcomes:
            self.outcomes[i] = Outcome("timed out", self.now)

    def advance(self, dt: float) -> None:
        target = self.now + dt
        while True:
            head = self.sched.head()
            times = [w.deadline for _i, w in self.waiters]
            if head is not None:
                times.append(head.wake_at)
            nxt = min(times, default=INF)
            if nxt > target:
                break
            self.clock[0] = max(self.now, nxt)
            self.run_due()
        self.clock[0] = target
        self.run_due()

    def arrive(self, i: int, items: Items, timeout: float | None) -> None:
        sched, now = self.sched, self.now
        receipts = sched.try_take(items, now)
        if receipts is not None:
            self.outcomes[i] = Outcome("taken", now)
            self.held.append((items, receipts))
            return
        deadline = INF if timeout is None else now + timeout
        waiter = SimWaiter(items, deadline)
        model = model_rate_at(sched, items, now)
        queued = bool(sched.queue)
        if self.checks and queued:
            forecast = sched.queued_rate_at(items, now)
            assert forecast <= model  # a lower bound, always
            if self.exact:
                assert forecast == model
        if not sched.enqueue(waiter, now):
            self.outcomes[i] = Outcome("refused", now)
            if self.checks:
                assert now >= deadline or model > deadline  # sound: never refused in vain
            return
        if self.checks and queued and self.exact and deadline < INF:
            assert model <= deadline  # strong: everything the model refuses is refused at once
        self.waiters.append((i, waiter))
        self.run_due()

    def release(self, pick: int) -> None:
        if self.held:
            items, receipts = self.held.pop(pick % len(self.held))
            self.sched.release(items, receipts)
            self.run_due()

    def refund(self, pick: int) -> None:
        if not self.held:
            return
        items, receipts = self.held[pick % len(self.held)]
        now = self.now
        for k, (state, amount) in enumerate(items):
            if not isinstance(state, SemaphoreState) and amount > 1:
                receipts[k], _left = self.sched.settle(state, receipts[k], amount, 1, now)
                self.sched.after_refund(now)
                break
        self.run_due()

    def charge(self, pick: int) -> None:
        # Usage above the amount taken (§3 overage): the forecast is kept, still a lower bound.
        if not self.held:
            return
        items, receipts = self.held[pick % len(self.held)]
        for k, (state, amount) in enumerate(items):
            if not isinstance(state, SemaphoreState):
                receipts[k], _held = self.sched.settle(
                    state, receipts[k], amount, amount + 3, now=self.now
                )
                break
        self.run_due()

    def cancel(self, pick: int) -> None:
        if self.waiters:
            i, w = self.waiters[pick % len(self.waiters)]
            self.sched.abandon(w, self.now)
            self.outcomes[i] = Outcome("cancelled", self.now)
            self.waiters.remove((i, w))
            self.run_due()

    def pause(self, seconds: float) -> None:
        self.sched.pause(self.now + seconds, self.now)
        self.run_due()


Op = tuple[Any, ...]

amounts = st.fixed_dictionaries({"a": st.integers(0, 10), "b": st.integers(0, 4)})
arrival = st.tuples(
    st.just("arrive"), amounts, st.one_of(st.none(), st.integers(0, 40).map(lambda x: x / 2))
)
advance = st.tuples(st.just("advance"), st.integers(0, 12).map(lambda x: x / 4))
releases = st.tuples(st.just("release"), st.integers(0, 50))
refunds = st.tuples(st.just("refund"), st.integers(0, 50))
cancels = st.tuples(st.just("cancel"), st.integers(0, 50))
charges = st.tuples(st.just("charge"), st.integers(0, 50))
pauses = st.tuples(st.just("pause"), st.integers(1, 8).map(float))
algorithms = st.sampled_from(list(RateLimitAlgorithm))


def build(
    algorithm: RateLimitAlgorithm, resource: bool, make: Callable[..., Scheduler]
) -> tuple[Scheduler, list[float], tuple[RateState, ...]]:
    clock = [0.0]
    limits: list[Any] = [
        RateLimit("a", 10, 10, algorithm=algorithm),
        RateLimit("b", 4, 8, algorithm=RateLimitAlgorithm.TokenBucket),
    ]
    if resource:
        limits.append(ResourceLimit("conn", 2))
    states = tuple(new_state(limit, 0.0) for limit in limits)
    return make(states, lambda: clock[0]), clock, states


def items_of(states: tuple[RateState, ...], amounts: dict[str, int]) -> Items:
    items = [(s, float(amounts[s.key])) for s in states if amounts.get(s.key)]
    items += [(s, 1.0) for s in states if isinstance(s, SemaphoreState)]
    return tuple(items)


def play(sim: Sim, states: tuple[RateState, ...], ops: list[Op]) -> None:
    for n, op in enumerate(ops):
        if op[0] == "arrive":
            sim.arrive(n, items_of(states, op[1]), op[2])
        else:
            getattr(sim, op[0])(op[1])
    sim.advance(1000.0)


@given(
    algorithm=algorithms,
    resource=st.booleans(),
    ops=st.lists(st.one_of(arrival, arrival, advance, releases, refunds, charges, cancels, pauses)),
)
def test_a_request_refused_at_once_is_one_the_model_refuses(
    algorithm: RateLimitAlgorithm, resource: bool, ops: list[Op]
) -> None:
    sched, clock, states = build(algorithm, resource, Scheduler)
    play(Sim(sched, clock, checks=True, exact=False), states, ops)


@given(algorithm=algorithms, ops=st.lists(st.one_of(arrival, arrival, advance, pauses)))
def test_with_rate_limits_only_the_forecast_is_the_model(
    algorithm: RateLimitAlgorithm, ops: list[Op]
) -> None:
    sched, clock, states = build(algorithm, False, UnboundedForecastScheduler)
    play(Sim(sched, clock, checks=True, exact=True), states, ops)


@given(algorithm=algorithms, ops=st.lists(st.one_of(arrival, arrival, advance)))
def test_failing_at_once_never_loses_a_request_that_would_have_been_admitted_in_time(
    algorithm: RateLimitAlgorithm, ops: list[Op]
) -> None:
    # The same history with and without the forecast: the same grants at the same times, and a
    # refusal at once is a timeout there. Without the events semantics §4 lets a refusal ignore
    # (releases, refunds, cancellations, and a pause, which can make a request ahead time out
    # and so leave room behind it), the rule loses nothing.
    on_sched, on_clock, on_states = build(algorithm, False, UnboundedForecastScheduler)
    off_sched, off_clock, off_states = build(algorithm, False, NoForecastScheduler)
    on = Sim(on_sched, on_clock, checks=False, exact=False)
    off = Sim(off_sched, off_clock, checks=False, exact=False)
    play(on, on_states, ops)
    play(off, off_states, ops)
    assert on.outcomes.keys() == off.outcomes.keys()
    for i, got in on.outcomes.items():
        before = off.outcomes[i]
        if got.kind == "refused" and before.kind == "timed out":
            continue
        assert got == before, (i, ops[i])


def test_the_forecast_is_rebuilt_after_a_cancellation_ahead() -> None:
    sched, clock, states = build(RateLimitAlgorithm.TokenBucket, False, Scheduler)
    sim = Sim(sched, clock, checks=True, exact=True)
    sim.arrive(0, items_of(states, {"a": 10}), None)  # taken: the bucket is empty
    sim.arrive(1, items_of(states, {"a": 10}), None)  # due at 10
    sim.arrive(2, items_of(states, {"a": 5}), 15)  # due at 15: the forecast counts it
    sim.cancel(0)  # waiter 1 leaves
    # Without waiter 1 ahead it is due at 5 (behind waiter 2), within 6 s.
    sim.arrive(3, items_of(states, {"a": 5}), 10)
    assert sim.outcomes[1] == Outcome("cancelled", 0.0)
    assert 3 not in sim.outcomes
    sim.advance(100)
    assert (sim.outcomes[2], sim.outcomes[3]) == (Outcome("granted", 5.0), Outcome("granted", 10.0))


def test_the_forecast_is_rebuilt_after_a_refund() -> None:
    sched, clock, states = build(RateLimitAlgorithm.TokenBucket, False, Scheduler)
    sim = Sim(sched, clock, checks=True, exact=True)
    sim.arrive(0, items_of(states, {"a": 10}), None)  # taken: the bucket is empty
    sim.arrive(1, items_of(states, {"a": 10}), None)  # due at 10
    sim.arrive(2, items_of(states, {"a": 1}), 100)  # due at 11: the forecast counts it
    sim.refund(0)  # the first used 1 of its 10: waiter 1 is due at 1, waiter 2 at 2
    sim.arrive(3, items_of(states, {"a": 5}), 7.5)  # due at 7
    assert 3 not in sim.outcomes
    sim.advance(100)
    assert sim.outcomes[3] == Outcome("granted", 7.0)


def test_the_forecast_is_rebuilt_after_a_pause() -> None:
    sched, clock, states = build(RateLimitAlgorithm.TokenBucket, False, Scheduler)
    sim = Sim(sched, clock, checks=True, exact=True)
    sim.arrive(0, items_of(states, {"a": 10}), None)  # taken: the bucket is empty
    sim.arrive(1, items_of(states, {"a": 5}), None)  # due at 5
    sim.arrive(2, items_of(states, {"a": 1}), 100)  # due at 6: the forecast counts it
    sim.pause(20)  # nobody before 20: waiter 1 at 20, waiter 2 at 20
    sim.arrive(3, items_of(states, {"a": 5}), 15)  # cannot be before 20
    assert sim.outcomes[3] == Outcome("refused", 0.0)


def test_the_forecast_holds_no_more_waiters_than_twice_the_queue() -> None:
    # A queue that never empties, with arrivals that have no deadline: the forecast does not
    # keep every waiter that ever passed through.
    sched, clock, states = build(RateLimitAlgorithm.TokenBucket, False, Scheduler)
    sim = Sim(sched, clock, checks=False, exact=False)  # checking would run the forecast
    sim.arrive(0, items_of(states, {"a": 10}), None)  # taken: the bucket is empty
    sim.arrive(1, items_of(states, {"a": 1}), None)  # due at 1
    sim.arrive(2, items_of(states, {"a": 1}), 100)  # due at 2: the forecast is made
    for n in range(3, 200):
        sim.arrive(n, items_of(states, {"a": 1}), None)
        sim.advance(1)
        assert sched.queue  # never empty, so never reset by an arrival at an empty queue
        forecast = sched._forecast
        # At most twice the queue when the last one arrived (one granted since).
        assert forecast is None or len(forecast.pending) <= 2 * (len(sched.queue) + 1)


class CountingScheduler(Scheduler):
    __slots__ = ()
    runs = 0  # waiters run on copies by the forecasts built (a class-level tally: one test)

    def _new_forecast(self, now: float) -> Forecast | None:
        forecast = super()._new_forecast(now)
        if forecast is not None:
            CountingScheduler.runs += len(forecast.pending)
        return forecast


def test_rebuilding_the_forecast_costs_at_most_its_budget_per_arrival() -> None:
    # Something drops the forecast before every arrival (a refund, a waiter leaving): the
    # rebuilds stop once they have used the credit the arrivals earned, and the arrivals are
    # then checked on their own amounts (they wait, as before queue-aware timeouts).
    sched, clock, states = build(RateLimitAlgorithm.TokenBucket, False, CountingScheduler)
    sim = Sim(sched, clock, checks=False, exact=False)
    sim.arrive(0, items_of(states, {"a": 10}), None)  # taken: the bucket is empty
    arrivals = 0
    for n in range(1, 101):
        sim.arrive(n, items_of(states, {"a": 1}), None)
        arrivals += 1
    assert sched.queued_rate_at(items_of(states, {"a": 1}), 0.0) == 101  # 100 ahead, 1/s
    for n in range(101, 301):
        sched.forget_forecast()
        sim.arrive(n, items_of(states, {"a": 1}), 1000)
        arrivals += 1
    assert CountingScheduler.runs <= sched.forecast_budget * arrivals
    assert sched._credit >= 0
    # Arrivals behind a queue that cannot clear in time are still refused at once: on their
    # own amounts when the budget is spent, from a forecast once it is earned again.
    sim.arrive(301, items_of(states, {"a": 1}), 0.5)
    assert sim.outcomes[301] == Outcome("refused", 0.0)


def test_an_empty_queue_keeps_no_forecast() -> None:
    sched, clock, states = build(RateLimitAlgorithm.TokenBucket, False, Scheduler)
    sim = Sim(sched, clock, checks=True, exact=True)
    sim.arrive(0, items_of(states, {"a": 10}), None)  # taken: the bucket is empty
    sim.arrive(1, items_of(states, {"a": 1}), None)
    sim.arrive(2, items_of(states, {"a": 1}), 100)  # the forecast is made
    assert sched._forecast is not None
    sim.advance(2)
    assert not sched.queue
    assert sched._forecast is None  # its copies and the granted waiters are not kept alive


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_process_backend_forecast_sees_a_refund_made_by_another_attachment(
    tmp_path: Path, anyio_backend: str
) -> None:
    # Two attachments of one shared set stand for two processes. The first queues waiters (its
    # forecast is made); the second refunds into the shared state: the first's next arrival is
    # decided on the state with the refund, not on its stale forecast.
    clock = ManualClock()
    backend = ProcessBackend(str(tmp_path))
    first, second = (
        LimitSet([RateLimit("tokens", 10, 10)], backend=backend, name="shared", clock=clock)
        for _ in range(2)
    )
    holder = second.try_acquire({"tokens": 10})
    assert holder.successful
    async with crowd(first, clock) as c:
        await c.arrive("head", {"tokens": 10})  # due at 10
        await c.arrive("middle", {"tokens": 1}, timeout=100)  # due at 11: the forecast is made
        holder.update({"tokens": 1})  # in the other "process": 9 back, the head is due at 1
        late = await c.arrive("late", {"tokens": 5}, timeout=7.5)  # due at 7
        assert late.state == "waiting"
