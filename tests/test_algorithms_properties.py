"""Property tests of the algorithm maths against brute-force models, and of semantics §3.

Two regimes, and each property says which one it uses:

* **exact**: whole capacities, and W/C, times and amounts on a binary grid (multiples of 1/64 and
  the like, well inside 53 bits). Every float operation the algorithms do on the state is then
  exact, so they are compared with the exact models of ``models.py`` with ``==``. The one quotient
  that is not always a float (the units a refund gives back, computed as ``.../W``) is compared to
  within rounding.
* **float**: arbitrary floats — windows from 1 ms to 30 days, capacities up to 1e9, clocks up to
  1e7 s. Here the properties are those that must hold whatever the rounding: ``earliest`` is never
  early and never late by a float step, limits are never exceeded beyond a relative 1e-9, and two
  implementations agree except within a guard band (a thousand float steps) around a boundary.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiolimits._algorithms import (
    FixedWindowState,
    GCRAState,
    LeakyBucketState,
    RateState,
    SlidingWindowState,
    TokenBucketState,
)
from aiolimits._algorithms._base import PeakLog
from tests.models import (
    BucketModel,
    FixedWindowModel,
    LeakyBucketModel,
    Model,
    SlidingWindowModel,
)

DAY = 86_400.0
WHOLE_UNITS: tuple[type[RateState], ...] = (SlidingWindowState, FixedWindowState)
RATE_STATES: tuple[type[RateState], ...] = (
    TokenBucketState,
    GCRAState,
    LeakyBucketState,
    SlidingWindowState,
    FixedWindowState,
)
ALL_KINDS = ("ask", "wait", "refund", "charge")


class Op(NamedTuple):
    """One step of a scenario: move the clock by ``dt``, then act.

    ``ask``: admit ``amount`` if it is admissible now; ``wait``: first move the clock to the
    earliest time it is admissible, then admit it; ``refund`` / ``charge``: give back / add
    ``amount`` for one of the last three acquisitions, picked by ``target``.
    """

    kind: str
    dt: Any  # Fraction in the exact regime, float in the float regime
    amount: Any
    target: int


class Scenario(NamedTuple):
    capacity: Any
    window: Any
    start: Any
    ops: list[Op]


# The steps are drawn as raw numbers by strategies built once (building strategies for every
# example was most of the time these tests took), then scaled to the scenario's parameters.
_RAW_OPS = {
    kinds: st.lists(
        st.tuples(
            st.sampled_from(kinds),
            st.sampled_from(["zero", "small", "small", "large"]),
            st.integers(0, 96),  # time step, exact regime (taken modulo the span)
            st.floats(0, 1),  # time step, float regime
            st.integers(0, 48),  # amount, exact regime (taken modulo the capacity + 1)
            st.floats(0, 1),  # amount, float regime
            st.integers(0, 1000),  # target
        ),
        max_size=24,
    )
    for kinds in [ALL_KINDS, ("ask", "wait"), ("ask", "wait", "refund")]
}


@st.composite
def exact_scenarios(
    draw: st.DrawFn, *, whole_units: bool, kinds: tuple[str, ...] = ALL_KINDS
) -> Scenario:
    """Scenarios of the exact regime: everything is a Fraction that floats hold exactly."""
    capacity = draw(st.integers(1, 12))
    per_unit = Fraction(draw(st.integers(1, 40)), 16)  # W / C: dyadic, so rates are exact
    start = Fraction(draw(st.sampled_from([0, 5, -1024, 2**20, 2**30])))
    start += Fraction(draw(st.integers(0, 63)), 64)
    # Times move on a grid of a quarter of a unit's interval: 0, up to 1 unit, or up to 2 windows.
    steps = {"zero": 1, "small": 5, "large": 8 * capacity + 1}
    ops = [
        Op(
            kind,
            (raw_dt % steps[size]) * per_unit / 4,
            Fraction(raw_n % (capacity + 1))
            if whole_units
            else Fraction(raw_n % (4 * capacity + 1), 4),
            target,
        )
        for kind, size, raw_dt, _, raw_n, _, target in draw(_RAW_OPS[kinds])
    ]
    return Scenario(capacity, capacity * per_unit, start, ops)


@st.composite
def float_scenarios(
    draw: st.DrawFn, *, whole_units: bool, kinds: tuple[str, ...] = ALL_KINDS
) -> Scenario:
    """Scenarios of the float regime: any window, capacity and clock a deployment might see."""
    window = draw(st.floats(1e-3, 30 * DAY))
    capacity: float = draw(st.integers(1, 10**9)) if whole_units else draw(st.floats(0.25, 1e9))
    start = draw(st.floats(-1e7, 1e7))
    # A time step is 0, up to a few units' worth, or up to two windows.
    spans = {"zero": 0.0, "small": 4 * window / capacity, "large": 2 * window}
    ops = []
    for kind, size, _, dt, _, n, target in draw(_RAW_OPS[kinds]):
        if whole_units:
            amount = float(math.floor(n * capacity))
        else:
            # Fractional amounts go down to a millionth of a unit; below that the slots they cost
            # could be subnormal floats, whose rounding is no longer relative.
            amount = max(1e-6, n * capacity) if n else 0.0
        ops.append(Op(kind, dt * spans[size], amount, target))
    return Scenario(capacity, window, start, ops)


def recent(target: int, count: int) -> int:
    """The index of one of the last three acquisitions: those whose slots and entries still count
    are the recent ones, so that is where refunds and charges interact."""
    return count - 1 - target % min(3, count)


def exact(x: Fraction) -> float:
    """``x`` as a float, asserting the scenario is still in the exact regime."""
    f = float(x)
    assert Fraction(f) == x, f"{x} is not a float: the scenario left the exact regime"
    return f


def new(cls: type[RateState], sc: Scenario) -> RateState:
    return cls("k", float(sc.capacity), float(sc.window), float(sc.start))


@dataclasses.dataclass
class Held:
    """An acquisition the scenario may still refund or charge."""

    receipt: Any
    other: Any  # the model's receipt, or the second implementation's
    outstanding: Any  # units taken plus charged minus given back


# --- each algorithm makes the decisions of its brute-force model ----------------------------------

MODELS: dict[type[RateState], Callable[[Fraction, Fraction, Fraction], Model]] = {
    TokenBucketState: BucketModel,
    GCRAState: BucketModel,
    LeakyBucketState: LeakyBucketModel,
    SlidingWindowState: SlidingWindowModel,
    FixedWindowState: FixedWindowModel,
}


@pytest.mark.parametrize("cls", RATE_STATES, ids=lambda c: c.__name__)
@settings(max_examples=1000, deadline=None)
@given(sc=exact_scenarios(whole_units=False))
# Found by this test: a refund shortened a LeakyBucket slot with a charge scheduled after it, and a
# later refund of that charge still saw its old end and gave back time that had already passed.
@example(
    sc=Scenario(
        capacity=1,
        window=Fraction(1, 16),
        start=Fraction(0),
        ops=[
            Op("ask", Fraction(0), Fraction(0), 0),  # acquisition 0, nothing
            Op("ask", Fraction(0), Fraction(1, 4), 0),  # acquisition 1: [0, 1/64)
            Op("charge", Fraction(0), Fraction(1, 4), 1),  # acquisition 0: [1/64, 2/64)
            Op("refund", Fraction(0), Fraction(1, 4), 0),  # 1 gives all back: 0 moves up
            Op("refund", Fraction(1, 64), Fraction(1, 4), 1),  # 0's slot has passed: nothing
        ],
    )
)
def test_algorithm_makes_the_decisions_of_its_reference_model(
    cls: type[RateState], sc: Scenario
) -> None:
    # Exact regime: earliest times compared with ==, so a decision at an exact boundary counts.
    state = new(cls, sc)
    model = MODELS[cls](Fraction(sc.capacity), sc.window, sc.start)
    t = sc.start
    held: list[Held] = []
    for op in sc.ops:
        t += op.dt
        # The window algorithms count whole units: the same scenario, amounts rounded down.
        n = Fraction(math.floor(op.amount)) if cls in WHOLE_UNITS else op.amount
        if op.kind in ("ask", "wait"):
            if op.kind == "wait":
                t = model.earliest(n, t)
            expected = model.earliest(n, t)
            got = state.earliest(exact(n), exact(t))
            assert Fraction(got) == expected, (op, t)
            if expected == t:
                held.append(Held(state.take(exact(n), exact(t)), model.take(n, t), n))
        elif held:
            h = held[recent(op.target, len(held))]
            if op.kind == "charge":
                h.receipt = state.charge(h.receipt, exact(n), exact(t))
                h.other = model.charge(h.other, n, t)
                h.outstanding += n
            else:
                x = min(n, h.outstanding)
                given = state.refund(h.receipt, exact(x), exact(t))
                expected_given = model.refund(h.other, x, t)
                assert math.isclose(given, expected_given, rel_tol=1e-12, abs_tol=1e-12), (op, t)
                h.outstanding -= expected_given
        assert state.is_fresh(exact(t)) == model.is_fresh(t), (op, t)


# --- SlidingWindow: never more than C in any half-open window of length W -------------------------


@settings(max_examples=1000, deadline=None)
@given(sc=exact_scenarios(whole_units=True, kinds=("ask", "wait", "refund")))
def test_sliding_window_never_admits_more_than_capacity_in_any_window(sc: Scenario) -> None:
    # Exact regime, so "inside [s, s + W)" below is decided without rounding. No charges: an
    # overage is counted but not admitted, and may exceed C by design.
    state = new(SlidingWindowState, sc)
    admitted: list[list[Fraction]] = []  # [time, units still counted], one per acquisition
    receipts: list[Any] = []
    t = sc.start
    for op in sc.ops:
        t += op.dt
        if op.kind == "refund":
            if receipts:
                i = recent(op.target, len(receipts))
                given = state.refund(receipts[i], exact(op.amount), exact(t))
                admitted[i][1] -= Fraction(given)
            continue
        if op.kind == "wait":
            t = Fraction(state.earliest(exact(op.amount), exact(t)))
        if state.earliest(exact(op.amount), exact(t)) == exact(t):
            receipts.append(state.take(exact(op.amount), exact(t)))
            admitted.append([t, op.amount])
    for s, _ in admitted:
        inside = sum(n for a, n in admitted if s <= a < s + sc.window)
        assert inside <= sc.capacity, (s, admitted)


# --- TokenBucket and GCRA admit the same sequences ------------------------------------------------


def run_bucket_pair(sc: Scenario, *, exact_regime: bool) -> None:
    """Drive a TokenBucket and a GCRA through ``sc`` side by side, with the model as the referee.

    In the exact regime every earliest time must be the model's, exactly. Otherwise an ask within
    the guard band around the model's boundary is skipped (both sides skip it, so they stay in step)
    and earliest times must agree with the model to within the guard.
    """
    tb, gcra = new(TokenBucketState, sc), new(GCRAState, sc)
    c, w = Fraction(sc.capacity), Fraction(sc.window)
    model = BucketModel(c, w, Fraction(sc.start))
    t = float(sc.start)
    held: list[Held] = []
    for op in sc.ops:
        t += float(op.dt)
        n = float(op.amount)
        # A thousand float steps of the clock and of the window: far more than the rounding two
        # dozen steps can accumulate, far less than any time step a scenario takes on purpose.
        guard = Fraction(0) if exact_regime else Fraction(2**10 * (math.ulp(t) + math.ulp(w)))
        if op.kind in ("ask", "wait"):
            if op.kind == "wait":
                t = max(tb.earliest(n, t), gcra.earliest(n, t))
            expected = model.earliest(Fraction(n), Fraction(t))
            boundary = model.boundary(Fraction(n))
            near = guard > 0 and boundary is not None and abs(boundary - Fraction(t)) <= guard
            if near and op.kind == "ask":
                continue  # too close to the boundary for floats to be held to it
            admit = tb.earliest(n, t) == t
            for side in (tb, gcra):
                e = side.earliest(n, t)
                assert abs(Fraction(e) - expected) <= guard, (side, op, t)
                # A wait lands where both sides admit, which may be a hair from the model.
                assert near or (e == t) == (expected <= Fraction(t)) == admit, (side, op, t)
            if admit:
                receipts = [tb.take(n, t), gcra.take(n, t)]
                held.append(Held(receipts, model.take(Fraction(n), Fraction(t)), n))
        elif held:
            h = held[recent(op.target, len(held))]
            if op.kind == "charge":
                h.receipt = [
                    side.charge(r, n, t) for side, r in zip((tb, gcra), h.receipt, strict=True)
                ]
                h.other = model.charge(h.other, Fraction(n), Fraction(t))
                h.outstanding += n
            else:
                x = min(n, h.outstanding)
                given = [
                    side.refund(r, x, t) for side, r in zip((tb, gcra), h.receipt, strict=True)
                ]
                expected_given = model.refund(h.other, Fraction(x), Fraction(t))
                slack = 1e-12 * sc.capacity + float(guard * c / w)
                for g in given:
                    assert abs(g - expected_given) <= slack, (given, expected_given, op, t)
                h.outstanding -= float(expected_given)
        if exact_regime:
            assert tb.is_fresh(t) == gcra.is_fresh(t) == model.is_fresh(Fraction(t))


@settings(max_examples=1000, deadline=None)
@given(sc=exact_scenarios(whole_units=False))
def test_token_bucket_and_gcra_admit_the_same_sequences_when_w_over_c_is_dyadic(
    sc: Scenario,
) -> None:
    run_bucket_pair(sc, exact_regime=True)


@settings(max_examples=1000, deadline=None)
@given(sc=float_scenarios(whole_units=False))
@example(sc=Scenario(3, 1.0, 1e7, [Op("wait", 0.0, 1.0, 0)] * 5))  # T = 1/3 is not a float
def test_token_bucket_and_gcra_agree_outside_a_guard_band_for_any_w_and_c(sc: Scenario) -> None:
    run_bucket_pair(sc, exact_regime=False)


# --- a bucket refund is honest: never more than had the acquisition taken less -------------------


@pytest.mark.parametrize("cls", [TokenBucketState, GCRAState], ids=lambda c: c.__name__)
@settings(max_examples=1000, deadline=None)
@given(
    sc=exact_scenarios(whole_units=False),
    first=st.integers(0, 8),
    delay=st.integers(0, 23),
    kept=st.integers(0, 16),
)
def test_bucket_refund_never_admits_more_than_had_the_acquisition_taken_less(
    cls: type[RateState], sc: Scenario, first: int, delay: int, kept: int
) -> None:
    # Exact regime. Two buckets see the same operations, except one acquisition, A: the actual
    # bucket admits n for it and later refunds it down to u; the counterfactual one admits u from
    # the start. Other acquisitions are admitted when the actual bucket admits them, and their
    # refunds and charges are asked of each bucket with its own receipts. After A's refund the
    # actual bucket is never above the counterfactual one (so it never admits more), and it is
    # the same bucket when its level never came within n - u of full between A's take and refund
    # (A then gets all of n - u back, unless another refund came in between: the counterfactual
    # bucket may have absorbed part of that one, and A's refund then gives up the difference).
    actual, counterfactual = new(cls, sc), new(cls, sc)
    c = Fraction(sc.capacity)
    t = sc.start
    others: list[list[Any]] = []  # [actual receipt, counterfactual receipt, units outstanding]
    mine: Any = None  # A's receipt in the actual bucket, once admitted
    n = u = Fraction(0)
    since = -1  # the index of the op that admitted A; A is the first admission from op `first`
    refunded = False
    highest: Fraction | None = None  # the highest actual level between A's take and its refund
    other_refunds = False  # whether another acquisition got units back in between

    def level(state: RateState) -> Fraction:
        return Fraction(state.available(exact(t)))

    def see_level() -> None:
        nonlocal highest
        if mine is not None and not refunded:
            a = level(actual)
            highest = a if highest is None or a > highest else highest

    def never_came_near_full() -> bool:
        return highest is not None and highest <= c - (n - u)

    def compare() -> None:
        a, cf = level(actual), level(counterfactual)
        assert a <= cf, (t, a, cf)
        if refunded and never_came_near_full():
            assert a == cf, (t, a, cf)

    def refund_mine() -> None:
        nonlocal refunded
        see_level()
        given = actual.refund(mine, exact(n - u), exact(t))
        if never_came_near_full() and not other_refunds:
            assert given == n - u, (t, given, n - u)
        refunded = True

    for i, op in enumerate(sc.ops):
        t += op.dt
        see_level()
        if mine is not None and not refunded and i >= since + 1 + delay:
            refund_mine()
        compare()
        if op.kind in ("ask", "wait"):
            if op.kind == "wait":
                t = Fraction(actual.earliest(exact(op.amount), exact(t)))
                see_level()
                compare()
            if actual.earliest(exact(op.amount), exact(t)) != exact(t):
                continue
            # Never more permissive: what the actual bucket admits, the counterfactual one does.
            if mine is None and i >= first:
                mine, n, since = actual.take(exact(op.amount), exact(t)), op.amount, i
                u = n * kept / 16
                counterfactual.take(exact(u), exact(t))
            else:
                assert counterfactual.earliest(exact(op.amount), exact(t)) == exact(t)
                a = actual.take(exact(op.amount), exact(t))
                cf = counterfactual.take(exact(op.amount), exact(t))
                others.append([a, cf, op.amount])
        elif others:
            other = others[recent(op.target, len(others))]
            if op.kind == "charge":
                other[0] = actual.charge(other[0], exact(op.amount), exact(t))
                other[1] = counterfactual.charge(other[1], exact(op.amount), exact(t))
                other[2] += op.amount
            else:
                x = exact(min(op.amount, other[2]))
                given = actual.refund(other[0], x, exact(t))
                counterfactual.refund(other[1], x, exact(t))
                other[2] -= Fraction(given)
                other_refunds = other_refunds or (mine is not None and not refunded and given > 0)
        see_level()
        compare()
    if mine is not None and not refunded:
        refund_mine()
        compare()
    # And later: a window on, both are full.
    t += sc.window
    compare()


@pytest.mark.parametrize("cls", [TokenBucketState, GCRAState], ids=lambda c: c.__name__)
def test_bucket_refunds_stay_honest_when_its_peak_log_folds(
    cls: type[TokenBucketState] | type[GCRAState],
) -> None:
    # Exact regime. Takes whose levels only go down each keep an entry in the bucket's PeakLog;
    # past PeakLog.LIMIT neighbours merge in pairs (older level, newer number). That keeps it
    # bounded, and may only make refunds smaller than the model's, never larger; far below the
    # cap a merged level is still far enough below it to give everything back (only the first
    # receipts, taken just below the cap, lose theirs).
    c = 4096.0  # one unit per second
    state = cls("k", c, c, 0.0)
    model = BucketModel(Fraction(c), Fraction(c), Fraction(0))
    receipts = []
    for i in range(2000):  # the level drops by 1.5 per step, from 4096 to 1096
        t = exact(Fraction(i, 2))
        receipts.append((state.take(2.0, t), model.take(Fraction(2), Fraction(t))))
    assert isinstance(state._peaks, PeakLog)
    assert len(state._peaks) <= PeakLog.LIMIT
    t = exact(Fraction(1999, 2))
    exact_answers = asked = 0
    for i in range(0, 2000, 37):  # each refund on copies, so each is asked of the same bucket
        trial, receipt = copy.deepcopy((state, receipts[i][0]))
        trial_model, model_receipt = copy.deepcopy((model, receipts[i][1]))
        given = trial.refund(receipt, 2.0, t)
        expected = trial_model.refund(model_receipt, Fraction(2), Fraction(t))
        assert 0 <= given <= expected, (i, given, expected)
        exact_answers += given == expected
        asked += 1
    assert exact_answers >= 0.9 * asked  # merging loses little


# --- the limits hold whatever the rounding --------------------------------------------------------

# Below, "limit" is checked in exact arithmetic against the float parameters themselves, and may be
# exceeded by a relative 1e-9 at most: rounding noise is about 1e-16 per step, while an algorithm
# that loses a unit in the rounding of a large clock (1e7 s) exceeds it by whole units.
RELATIVE_SLACK = Fraction(1, 10**9)


def admit_greedily(state: RateState, sc: Scenario) -> list[tuple[Fraction, Fraction]]:
    """Run the asks and waits of ``sc``; return the admissions as exact (time, amount)."""
    t = float(sc.start)
    admitted: list[tuple[Fraction, Fraction]] = []
    for op in sc.ops:
        t += op.dt
        if op.kind == "wait":
            t = state.earliest(op.amount, t)
        if state.earliest(op.amount, t) == t:
            state.take(op.amount, t)
            admitted.append((Fraction(t), Fraction(op.amount)))
    return admitted


@pytest.mark.parametrize("cls", [TokenBucketState, GCRAState], ids=lambda c: c.__name__)
@settings(max_examples=1000, deadline=None)
@given(data=st.data())
def test_bucket_never_admits_more_than_its_burst_plus_refill(
    cls: type[RateState], data: st.DataObject
) -> None:
    # Float regime. In any span [t_i, t_j] of admissions, at most C + r·(t_j - t_i) units pass.
    sc = data.draw(float_scenarios(whole_units=False, kinds=("ask", "wait")))
    admitted = admit_greedily(new(cls, sc), sc)
    c, rate = Fraction(sc.capacity), Fraction(sc.capacity) / Fraction(sc.window)
    for i, (ti, _) in enumerate(admitted):
        total = Fraction(0)
        for tj, n in admitted[i:]:
            total += n
            assert total <= (c + rate * (tj - ti)) * (1 + RELATIVE_SLACK), (i, admitted)


@settings(max_examples=1000, deadline=None)
@given(sc=float_scenarios(whole_units=False, kinds=("ask", "wait")))
def test_leaky_bucket_never_admits_before_the_previous_slot_ends(sc: Scenario) -> None:
    # Float regime. An amount n admitted at t occupies [t, t + n/r); the next one starts no earlier.
    admitted = admit_greedily(new(LeakyBucketState, sc), sc)
    per_unit = Fraction(sc.window) / Fraction(sc.capacity)
    for (t1, n1), (t2, _) in itertools.pairwise(admitted):
        assert t2 - t1 >= n1 * per_unit * (1 - RELATIVE_SLACK), (t1, n1, t2)


# --- earliest is exact: never early, never late by a float step -----------------------------------


def earliest_on_a_copy(state: RateState, n: float, t: float) -> float:
    # Asking at a later time prunes windows and logs: ask a copy, so the scenario's clock can go on.
    return copy.deepcopy(state).earliest(n, t)


@pytest.mark.parametrize("cls", RATE_STATES, ids=lambda c: c.__name__)
@settings(max_examples=1000, deadline=None)
@given(data=st.data())
def test_earliest_is_admissible_when_asked_again_and_a_float_earlier_is_not(
    cls: type[RateState], data: st.DataObject
) -> None:
    # Float regime, with refunds and charges, so the states carry debts, overages and partial slots.
    sc = data.draw(float_scenarios(whole_units=cls in WHOLE_UNITS))
    state = new(cls, sc)
    t = float(sc.start)
    receipts: list[Any] = []
    for op in sc.ops:
        t += op.dt
        if op.kind in ("refund", "charge"):
            if receipts:
                i = recent(op.target, len(receipts))
                if op.kind == "refund":
                    state.refund(receipts[i], op.amount, t)
                else:
                    receipts[i] = state.charge(receipts[i], op.amount, t)
            continue
        e = state.earliest(op.amount, t)
        assert e >= t
        # The fast path's question (``admits``) has the same answer as ``earliest``.
        assert copy.deepcopy(state).admits(op.amount, t) == (e == t), (op, t, e)
        if e > t:
            assert earliest_on_a_copy(state, op.amount, e) == e, (op, t, e)
            before = math.nextafter(e, -math.inf)
            assert earliest_on_a_copy(state, op.amount, before) > before, (op, t, e)
        if op.kind == "wait":
            t = e
        if state.earliest(op.amount, t) == t:
            receipts.append(state.take(op.amount, t))


# --- FixedWindow: window k is [k·W, (k+1)·W) ------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(t=st.floats(-1e9, 1e9), window=st.floats(1e-6, 1e9))
@example(t=1e7, window=1e-3)
@example(t=math.nextafter(3.0, 0), window=0.1)
def test_fixed_window_index_brackets_the_time(t: float, window: float) -> None:
    # Float regime: the bracket holds for the float products the algorithm itself uses.
    k = FixedWindowState("k", 1, window, 0.0).window_index(t)
    assert k * window <= t < (k + 1) * window


@settings(max_examples=1000, deadline=None)
@given(
    t=st.integers(-(2**40), 2**40).map(lambda q: Fraction(q, 64)),
    window=st.integers(1, 2**20).map(lambda q: Fraction(q, 16)),
)
def test_fixed_window_index_is_floor_of_time_over_window_when_exact(
    t: Fraction, window: Fraction
) -> None:
    # Exact regime: the index is the true floor(t / W), not one computed from a rounded quotient.
    k = FixedWindowState("k", 1, exact(window), 0.0).window_index(exact(t))
    assert k == math.floor(t / window)


@pytest.mark.parametrize("cls", [TokenBucketState, GCRAState], ids=lambda c: c.__name__)
def test_a_bucket_full_at_its_last_take_keeps_a_number_not_a_log_and_refunds_the_same(
    cls: type[TokenBucketState] | type[GCRAState],
) -> None:
    # A keyed set holds a million buckets, most used now and then: while the last take found the
    # bucket full, only that take's number is kept (no older receipt can get anything back).
    # The log comes back with a take below full, and the refunds are the model's throughout.
    c = 8.0  # one unit per second
    state = cls("k", c, c, 0.0)
    model = BucketModel(Fraction(c), Fraction(c), Fraction(0))
    kinds = []
    receipts = []
    for t, amount in ((0, 3), (1, 2), (20, 1), (20, 4), (40, 2)):
        receipts.append(
            (state.take(float(amount), float(t)), model.take(Fraction(amount), Fraction(t)))
        )
        kinds.append(type(state._peaks).__name__)
    assert kinds == ["int", "PeakLog", "int", "PeakLog", "int"]
    for now in (40, 41, 45):
        for i in range(len(receipts)):
            trial, receipt = copy.deepcopy((state, receipts[i][0]))
            trial_model, model_receipt = copy.deepcopy((model, receipts[i][1]))
            given = trial.refund(receipt, 1.0, float(now))
            assert given == trial_model.refund(model_receipt, Fraction(1), Fraction(now)), (i, now)
