"""The buckets are exact at the windows people write (issue #13, item 6).

Users write 0.1 s, 0.3 s and 60 s windows and capacities like 3 or 90,000; those floats are not
binary fractions, so ``W/C`` and the products of the state are rounded. The promises of
``docs/algorithms.md`` must hold for them anyway, checked here against the exact rational model
(``tests.models.BucketModel``) of the very floats the limit holds:

* a full TokenBucket or GCRA admits its whole capacity at one instant, in any split;
* the steady refill admits each unit at the first float at or after its exact refill time:
  never a float earlier, and (with whole amounts) not a float later.

The table cases follow Go's ``x/time/rate`` tests (rate r, burst b; a Go limiter of r per second
and burst b is a bucket of capacity b with window b / r), translated to this library's verbs.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiolimits._algorithms import GCRAState, RateState, TokenBucketState
from tests.models import BucketModel

BUCKETS = [TokenBucketState, GCRAState]


def bucket(cls: type[RateState], window: float, capacity: float, now: float) -> RateState:
    return cls("k", capacity, window, now)


# --- tables, after Go's x/time/rate -----------------------------------------------------------


@pytest.mark.parametrize("cls", BUCKETS, ids=lambda c: c.__name__)
def test_a_burst_split_two_then_one_at_one_instant(cls: type[RateState]) -> None:
    # Go: r = 10/s, b = 3. Kept in unit-seconds, 3·0.3 - 2·0.3 rounded below 0.3: refused.
    t0 = 100.0
    b = bucket(cls, 0.3, 3, t0)
    assert b.earliest(2, t0) == t0
    b.take(2, t0)
    assert b.earliest(1, t0) == t0
    b.take(1, t0)
    assert b.earliest(1, t0) > t0


@pytest.mark.parametrize("cls", BUCKETS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("window", "capacity"),
    [(1.0, 3), (0.1, 3), (0.3, 3), (60.0, 7), (3600.0, 90_000), (0.1, 90_000), (1.0, 1000)],
)
def test_a_full_bucket_admits_its_capacity_one_unit_at_a_time(
    cls: type[RateState], window: float, capacity: int
) -> None:
    # The sweep: GCRA admitted a burst of 2 of capacity 3 in a 1 s window.
    for t0 in (0.0, 1e7 + 0.1, 1.7e9 + 0.123):
        b = bucket(cls, window, capacity, t0)
        for i in range(capacity):
            assert b.earliest(1, t0) == t0, (i, t0)
            b.take(1, t0)
        assert b.earliest(1, t0) > t0


@pytest.mark.parametrize("cls", BUCKETS, ids=lambda c: c.__name__)
def test_go_style_table_rate_10_burst_1(cls: type[RateState]) -> None:
    # Go's table (r = 10, b = 1): t, t+1ms refused, t+100ms admitted, ... Go counts integer
    # nanoseconds; here the clock reads float seconds, and the float 0.3 lies 2.8e-17 s *before*
    # the float 0.2 plus the float 0.1: refused there (never early), admitted a float later.
    b = bucket(cls, 0.1, 1, 0.0)
    steps = [
        (0.0, True),
        (0.001, False),
        (0.1, True),
        (0.199, False),
        (0.2, True),
        (0.3, False),
        (math.nextafter(0.3, 1), True),
    ]
    for t, admitted in steps:
        assert (b.earliest(1, t) == t) == admitted, t
        if admitted:
            b.take(1, t)


@pytest.mark.parametrize("cls", BUCKETS, ids=lambda c: c.__name__)
def test_go_style_table_rate_3_burst_3_waits_a_third(cls: type[RateState]) -> None:
    # Go's reservation table: r = 3/s, b = 3 at t = 0; three at once, then one per 1/3 s.
    b = bucket(cls, 1.0, 3, 0.0)
    for _ in range(3):
        b.take(1, 0.0)
    t = 0.0
    for k in range(1, 7):
        e = b.earliest(1, t)
        exact = Fraction(k, 3)  # W = 1 and C = 3 are exact floats
        assert Fraction(e) >= exact
        assert Fraction(math.nextafter(e, -math.inf)) < exact
        b.take(1, e)
        t = e


# --- against the exact model, over decimal values ---------------------------------------------


def decimal(lo: int, hi: int, places: int) -> st.SearchStrategy[float]:
    """Decimal numbers ``m / 10**k`` (k up to ``places``), as the float a user's literal is."""
    return st.builds(
        lambda m, k: float(Fraction(m, 10**k)), st.integers(lo, hi), st.integers(0, places)
    )


@st.composite
def decimal_buckets(draw: st.DrawFn) -> tuple[float, int, float]:
    window = draw(decimal(1, 10**6, 4).filter(lambda w: 1e-3 <= w <= 1e9))
    capacity = draw(st.integers(1, 10**5))
    start = draw(st.sampled_from([0.0, 12.5, 1e7 + 0.1, 1.7e9 + 0.123456]))
    start += draw(decimal(0, 10**4, 3))
    return window, capacity, start


@pytest.mark.parametrize("cls", BUCKETS, ids=lambda c: c.__name__)
@settings(max_examples=500, deadline=None)
@given(params=decimal_buckets(), split=st.lists(st.integers(1, 10**5), min_size=1, max_size=12))
@example(params=(0.3, 3, 100.0), split=[2, 1])
@example(params=(1.0, 3, 0.0), split=[1, 1, 1])
def test_a_full_bucket_admits_its_capacity_at_one_instant_in_any_split(
    cls: type[RateState], params: tuple[float, int, float], split: list[int]
) -> None:
    window, capacity, t0 = params
    # A split of the capacity into whole parts: the drawn numbers, cut to fit, and the rest.
    parts, left = [], capacity
    for x in split:
        if left == 0:
            break
        parts.append(min(x, left))
        left -= parts[-1]
    if left:
        parts.append(left)
    b = bucket(cls, window, capacity, t0)
    for n in parts:
        assert b.earliest(n, t0) == t0, (parts, n)
        b.take(n, t0)
    assert b.earliest(1, t0) > t0


@pytest.mark.parametrize("cls", BUCKETS, ids=lambda c: c.__name__)
@settings(max_examples=500, deadline=None)
@given(
    params=decimal_buckets(),
    amounts=st.lists(st.integers(1, 10**5), min_size=1, max_size=30),
    burst=st.booleans(),
)
@example(params=(0.3, 3, 0.0), amounts=[1] * 10, burst=True)
@example(params=(0.1, 1, 1e7 + 0.1), amounts=[1] * 30, burst=True)
def test_the_steady_refill_admits_at_each_exact_refill_time_never_a_float_early(
    cls: type[RateState], params: tuple[float, int, float], amounts: list[int], burst: bool
) -> None:
    window, capacity, t0 = params
    b = bucket(cls, window, capacity, t0)
    model = BucketModel(Fraction(capacity), Fraction(window), Fraction(t0))
    t = t0
    if burst:
        b.take(capacity, t)
        model.take(Fraction(capacity), Fraction(t))
    for raw in amounts:
        n = raw % capacity + 1
        e = b.earliest(n, t)
        boundary = model.earliest(Fraction(n), Fraction(t))
        # Never early: the exact refill time is not after the admission...
        assert Fraction(e) >= boundary, (n, e, boundary)
        # ... and the float before it is (or is before the question was asked): not late.
        before = math.nextafter(e, -math.inf)
        assert e == t or Fraction(before) < boundary, (n, e, boundary)
        b.take(n, e)
        model.take(Fraction(n), Fraction(e))
        t = e
    later = t + 2 * window
    assert b.is_fresh(later)
    assert model.is_fresh(Fraction(later))


@pytest.mark.parametrize("cls", BUCKETS, ids=lambda c: c.__name__)
@settings(max_examples=300, deadline=None)
@given(
    params=decimal_buckets(),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["take", "wait", "refund", "charge"]),
            decimal(0, 10**4, 3),  # the clock moves by a decimal number of seconds
            st.integers(1, 10**5),
            st.integers(0, 10),
        ),
        max_size=25,
    ),
)
def test_decimal_histories_never_admit_before_the_exact_model(
    cls: type[RateState], params: tuple[float, int, float], ops: list[tuple[str, float, int, int]]
) -> None:
    # With refunds and charges (debts) and fractional amounts too: every admission is at or after
    # the exact model's time. Refunds are honest up to the rounding of the level they are
    # computed from (the level is kept exactly, but the peaks and rooms of PeakLog are floats):
    # a refund may give back a float step more than the exact history allows. That excess is
    # tracked, must stay within a rounding, and is the only slack the admissions get.
    window, capacity, t = params
    b = bucket(cls, window, capacity, t)
    model = BucketModel(Fraction(capacity), Fraction(window), Fraction(t))
    held: list[list[Any]] = []
    excess = Fraction(0)  # units given back beyond the exact history's, in all
    for kind, dt, raw, which in ops:
        t += dt
        n = float(Fraction(raw % (4 * capacity) + 1, 4)) if raw % 2 else raw % capacity + 1
        n = min(n, capacity)
        if kind in ("take", "wait"):
            e = b.earliest(n, t)
            if kind == "wait":
                t = e
            if e == t:
                if Fraction(n) > excess:
                    assert model.earliest(Fraction(n) - excess, Fraction(t)) == Fraction(t), (n, t)
                held.append([b.take(n, t), model.take(Fraction(n), Fraction(t))])
        elif held:
            r, m = held[which % len(held)]
            if kind == "charge":
                b.charge(r, n, t)
                model.charge(m, Fraction(n), Fraction(t))
            else:
                could = model.level_had_it_taken_less(m, Fraction(n), Fraction(t)) - model.level(
                    Fraction(t)
                )
                given = Fraction(b.refund(r, n, t))
                assert given <= could + Fraction(capacity) * 2**-48, (given, could)
                excess += max(Fraction(0), given - could)
                model._lower(m, min(given, could))
        # available() is the level rounded to nearest, for statistics: within rounding of it.
        slack = excess + Fraction(capacity, 10**12) + Fraction(abs(b.available(t))) / 10**12
        assert Fraction(b.available(t)) <= model.level(Fraction(t)) + slack, t
