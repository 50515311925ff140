"""Table tests of the algorithm maths (semantics §3), with ``now`` passed in.

Each case is a list of steps fed through one loop, :func:`run`. An :class:`Ask` states what the
algorithm must answer at that time (admitted or not, and the earliest time it would be) and takes
the amount when it is admitted; :class:`Refund` and :class:`Charge` update an earlier acquisition,
numbered from 0 in the order of admission. Times and amounts are binary fractions, so every value in
the tables is exact and compared with ``==``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import pytest

from aiolimits._algorithms import (
    FixedWindowState,
    GCRAState,
    LeakyBucketState,
    RateState,
    SemaphoreState,
    SlidingWindowState,
    TokenBucketState,
    new_state,
)
from aiolimits._limits import CallLimit, RateLimit, RateLimitAlgorithm, ResourceLimit


class Ask(NamedTuple):
    """At ``t``, ``n`` is ``admitted`` (and taken) or not; ``earliest`` is when it would be."""

    t: float
    n: float
    admitted: bool
    earliest: float


class Refund(NamedTuple):
    """At ``t``, acquisition ``of`` gives back up to ``n``; ``given`` units come back."""

    t: float
    n: float
    of: int
    given: float


class Charge(NamedTuple):
    """At ``t``, acquisition ``of`` used ``n`` more than it took."""

    t: float
    n: float
    of: int


Step = Ask | Refund | Charge


def run(state: RateState, steps: Sequence[Step]) -> None:
    receipts: list[Any] = []
    for i, step in enumerate(steps):
        where = f"step {i}: {step} on {state!r}"
        if isinstance(step, Ask):
            assert step.admitted == (step.earliest == step.t), f"table typo at {where}"
            earliest = state.earliest(step.n, step.t)
            assert earliest == step.earliest, where
            if step.admitted:
                receipts.append(state.take(step.n, step.t))
        elif isinstance(step, Refund):
            assert state.refund(receipts[step.of], step.n, step.t) == step.given, where
        else:
            receipts[step.of] = state.charge(receipts[step.of], step.n, step.t)


def assert_exact(state: RateState, n: float, earliest: float) -> None:
    """``earliest`` admits ``n`` when asked again, and the float just before it does not."""
    # Asking at a later time prunes windows and logs, so each question goes to a copy.
    assert copy.deepcopy(state).earliest(n, earliest) == earliest
    before = math.nextafter(earliest, -math.inf)
    assert copy.deepcopy(state).earliest(n, before) > before


# --- TokenBucket and GCRA: the same tables, since they must admit the same sequences -------------

# C = 4 per W = 2 s: a burst of 4, then 2 units per second.
BUCKET_CASES: dict[str, list[Step]] = {
    "burst of capacity then one unit per W/C": [
        Ask(0, 4, True, 0),
        Ask(0, 1, False, 0.5),
        Ask(0.25, 1, False, 0.5),
        Ask(0.5, 1, True, 0.5),
        Ask(0.5, 2, False, 1.5),
        Ask(1.5, 2, True, 1.5),
    ],
    "idle refill stops at capacity": [
        Ask(0, 1, True, 0),
        Ask(100, 4, True, 100),
        Ask(100, 0.5, False, 100.25),
    ],
    "fractional amounts": [
        Ask(0, 3.5, True, 0),
        Ask(0, 0.75, False, 0.125),
        Ask(0.125, 0.75, True, 0.125),
    ],
    "amount of exactly the capacity waits for a full bucket": [
        Ask(0, 0.5, True, 0),
        Ask(0, 4, False, 0.25),
        Ask(0.25, 4, True, 0.25),
    ],
    "refund is capped at capacity": [
        Ask(0, 3, True, 0),
        Refund(0.25, 3, of=0, given=2.5),  # 1.5 tokens by then; 4.5 would overflow
        Ask(0.25, 4, True, 0.25),
        Ask(0.25, 0.5, False, 0.5),
    ],
    "refund after the bucket refilled gives nothing back": [
        Ask(0, 1, True, 0),
        Refund(10, 1, of=0, given=0),
        Ask(10, 4, True, 10),
        Ask(10, 0.5, False, 10.25),
    ],
    "overage is a debt the refill pays before anything is admitted": [
        Ask(0, 4, True, 0),
        Charge(0, 2, of=0),
        Ask(0, 1, False, 1.5),
        Ask(0.5, 0, False, 1),
        Ask(1.5, 1, True, 1.5),
    ],
    "refund of an overage pays the debt back": [
        Ask(0, 4, True, 0),
        Charge(0, 2, of=0),
        Refund(0, 3, of=0, given=3),
        Ask(0, 1, True, 0),
        Ask(0, 0.5, False, 0.25),
    ],
    # Honest refunds: only what the cap has not absorbed since the take comes back, so after a
    # refund the bucket is the one in which the acquisition had taken less from the start.
    "refund right after a take gives everything back": [
        Ask(0, 3, True, 0),
        Refund(0, 3, of=0, given=3),
        Ask(0, 4, True, 0),
        Ask(0, 0.5, False, 0.25),
    ],
    "refund after the bucket refilled to full gives nothing, even once it is low again": [
        Ask(0, 2, True, 0),
        Ask(1, 4, True, 1),  # full at 1: the cap absorbed the whole take
        Refund(1, 2, of=0, given=0),
        Ask(1, 0.5, False, 1.25),
    ],
    "refund after a partial climb gives exactly C - peak": [
        Ask(0, 3, True, 0),
        Ask(1, 3, True, 1),  # the level climbed to 3 before this: 1 short of full
        Refund(1, 3, of=0, given=1),
        Ask(1, 1, True, 1),  # as if it had taken 0: 4 at 1, minus 3
        Ask(1, 0.5, False, 1.25),
    ],
    "a second refund on the same receipt after a further climb": [
        Ask(0, 4, True, 0),
        Ask(0.5, 1, True, 0.5),  # the level climbed to 1
        Refund(0.5, 2, of=0, given=2),  # room 3: all of it; as if it had taken 2
        Ask(1, 3, True, 1),  # the level climbed to 3
        Refund(1, 2, of=0, given=1),  # room 1: had it taken 0, the bucket would be at 1 now
        Ask(1, 1, True, 1),
        Ask(1, 0.5, False, 1.25),
    ],
    "a refund undoes a charge before the take": [
        Ask(0, 2, True, 0),
        Charge(0.5, 2, of=0),  # the level climbed to 3; 1 after the charge
        Refund(1, 3, of=0, given=2),  # the whole charge, none of the take: the cap absorbed it
        Ask(1, 4, True, 1),
        Ask(1, 0.5, False, 1.25),
    ],
    "two refunds cannot both claim the room the cap absorbed": [
        Ask(0, 2, True, 0),  # A
        Ask(0, 2, True, 0),  # B: empty
        Ask(1, 2, True, 1),  # X, at a level of 2
        Refund(1, 2, of=1, given=2),  # B: all of it, as if it had taken 0 (A held the level down)
        Refund(1, 2, of=0, given=0),  # A: had both taken 0, the cap would have absorbed A's 2
        Ask(1, 2, True, 1),
        Ask(1, 0.5, False, 1.25),
    ],
}


@pytest.mark.parametrize("cls", [TokenBucketState, GCRAState], ids=lambda c: c.__name__)
@pytest.mark.parametrize("steps", BUCKET_CASES.values(), ids=BUCKET_CASES.keys())
def test_bucket_table(cls: type[RateState], steps: list[Step]) -> None:
    run(cls("tokens", 4, 2, 0.0), steps)


@pytest.mark.parametrize("cls", [TokenBucketState, GCRAState], ids=lambda c: c.__name__)
def test_bucket_refund_gives_back_only_what_the_cap_has_not_absorbed(cls: type[RateState]) -> None:
    # The example of docs/algorithms.md: C = 100 per 100 s, one token per second.
    run(
        cls("tokens", 100, 100, 0.0),
        [
            Ask(0, 60, True, 0),  # 40 left
            Ask(55, 90, True, 55),  # the level climbed to 95: 5 left
            Refund(55, 60, of=0, given=5),  # had it taken 0: capped at 100, then 10 now
            Ask(55, 10, True, 55),
            Ask(55, 1, False, 56),
        ],
    )


# --- LeakyBucket ---------------------------------------------------------------------------------

# C = 4 per W = 2 s: one unit every 0.5 s, no burst.
LEAKY_CASES: dict[str, list[Step]] = {
    "no burst: an amount n occupies n * W/C": [
        Ask(0, 1, True, 0),
        Ask(0, 1, False, 0.5),
        Ask(0.5, 2, True, 0.5),
        Ask(0.5, 1, False, 1.5),
        Ask(1.5, 0.5, True, 1.5),
        Ask(1.5, 1, False, 1.75),
    ],
    "idle time builds no burst": [
        Ask(0, 1, True, 0),
        Ask(100, 1, True, 100),
        Ask(100, 1, False, 100.5),
    ],
    "capacity occupies a whole window": [
        Ask(0, 4, True, 0),
        Ask(0, 0.5, False, 2),
    ],
    "refund gives back the unused future tail": [
        Ask(0, 2, True, 0),
        Refund(0.25, 2, of=0, given=1.5),
        Ask(0.25, 1, True, 0.25),
    ],
    "partial refund shortens the slot from its end": [
        Ask(0, 4, True, 0),
        Refund(0.5, 1, of=0, given=1),
        Ask(0.5, 1, False, 1.5),
    ],
    "refund after the slot passed gives nothing": [
        Ask(0, 2, True, 0),
        Refund(1, 2, of=0, given=0),
        Ask(1, 1, True, 1),
    ],
    "overage occupies the schedule after the slot": [
        Ask(0, 1, True, 0),
        Charge(0.25, 2, of=0),  # [0.5, 1.5)
        Ask(0.25, 1, False, 1.5),
        Refund(0.75, 2, of=0, given=1.5),  # [0.5, 0.75) of the overage has passed
        Ask(0.75, 1, True, 0.75),
    ],
    "refund moves up the slots scheduled after it": [
        Ask(0, 1, True, 0),  # X: [0, 0.5)
        Ask(0.5, 1, True, 0.5),  # Y: [0.5, 1)
        Ask(1, 4, True, 1),  # A: [1, 3)
        Charge(1.5, 2, of=0),  # X: [3, 4)
        Charge(1.5, 2, of=1),  # Y: [4, 5)
        Refund(2, 4, of=2, given=2),  # A: [1, 2); X: [2, 3); Y: [3, 4)
        Ask(2, 1, False, 4),
        Refund(2.5, 2, of=0, given=1),  # X: [2, 2.5); Y: [2.5, 3.5)
        Ask(2.5, 1, False, 3.5),
        Refund(3, 2, of=1, given=1),  # Y: [2.5, 3)
        Ask(3, 1, True, 3),
    ],
}


@pytest.mark.parametrize("steps", LEAKY_CASES.values(), ids=LEAKY_CASES.keys())
def test_leaky_bucket_table(steps: list[Step]) -> None:
    run(LeakyBucketState("tokens", 4, 2, 0.0), steps)


# --- SlidingWindow -------------------------------------------------------------------------------

JUST_BEFORE_10 = math.nextafter(10.0, 0.0)

# C = 3 per W = 10 s.
SLIDING_CASES: dict[str, list[Step]] = {
    "an entry counts until exactly W after it": [
        Ask(0, 2, True, 0),
        Ask(4, 1, True, 4),
        Ask(5, 1, False, 10),
        Ask(JUST_BEFORE_10, 1, False, 10),
        Ask(10, 1, True, 10),
        Ask(10, 2, False, 14),
        Ask(14, 2, True, 14),
    ],
    "an amount waits for enough entries to leave": [
        Ask(0, 1, True, 0),
        Ask(1, 1, True, 1),
        Ask(2, 1, True, 2),
        Ask(2.5, 2, False, 11),
        Ask(11, 2, True, 11),
    ],
    "refund lowers the acquisition's own entry": [
        Ask(0, 2, True, 0),
        Ask(1, 1, True, 1),
        Ask(2, 1, False, 10),
        Refund(2, 2, of=1, given=1),  # only its own unit, not the other's
        Ask(2, 1, True, 2),
        Refund(3, 1, of=0, given=1),
        Ask(3, 1, True, 3),
        Ask(3, 1, False, 10),
    ],
    "refund of an entry that left the window gives nothing": [
        Ask(0, 3, True, 0),
        Refund(10, 3, of=0, given=0),
        Ask(10, 3, True, 10),
        Ask(10, 1, False, 20),
    ],
    "overage is counted in the window from when it is reported": [
        Ask(0, 3, True, 0),
        Charge(5, 2, of=0),
        Ask(6, 1, False, 10),
        Ask(10, 2, False, 15),
        Ask(10, 1, True, 10),
    ],
    "refund takes back the overage first": [
        Ask(0, 2, True, 0),
        Charge(1, 1, of=0),
        Refund(2, 1, of=0, given=1),
        Ask(2, 1, True, 2),
        Ask(2, 1, False, 10),
    ],
}


@pytest.mark.parametrize("steps", SLIDING_CASES.values(), ids=SLIDING_CASES.keys())
def test_sliding_window_table(steps: list[Step]) -> None:
    run(SlidingWindowState("requests", 3, 10, 0.0), steps)


def test_sliding_window_memory_is_one_entry_per_acquisition_in_the_window() -> None:
    state = SlidingWindowState("requests", 1000, 10, 0.0)
    for t in range(10):
        state.take(100, float(t))
    assert len(state) == 10
    state.take(1, 15.0)  # entries of t = 0..5 have left
    assert len(state) == 5


# --- FixedWindow ---------------------------------------------------------------------------------

# C = 3 per W = 10 s; windows are [0, 10), [10, 20), ... whenever the limiter was created.
FIXED_CASES: dict[str, list[Step]] = {
    "windows are aligned on the clock, with a burst of 2C at the edge": [
        Ask(7, 3, True, 7),
        Ask(9.5, 1, False, 10),
        Ask(10, 3, True, 10),
        Ask(19.5, 1, False, 20),
    ],
    "the boundary belongs to the window that starts there": [
        Ask(0, 3, True, 0),
        Ask(JUST_BEFORE_10, 1, False, 10),
        Ask(10, 1, True, 10),
    ],
    "negative times": [
        Ask(-5, 3, True, -5),
        Ask(-0.5, 1, False, 0),
        Ask(0, 3, True, 0),
    ],
    "refund in the same window gives back": [
        Ask(1, 3, True, 1),
        Refund(5, 2, of=0, given=2),
        Ask(5, 2, True, 5),
        Ask(5, 1, False, 10),
    ],
    "refund after the window ended gives nothing": [
        Ask(1, 3, True, 1),
        Refund(12, 3, of=0, given=0),
        Ask(12, 3, True, 12),
        Ask(12, 1, False, 20),
    ],
    "overage counts in the window it is reported in, and no later": [
        Ask(1, 3, True, 1),
        Charge(2, 4, of=0),
        Ask(3, 1, False, 10),
        Ask(10, 3, True, 10),
        Charge(15, 1, of=0),  # counted in [10, 20)
        Ask(15, 0, False, 20),
        Refund(16, 5, of=0, given=1),  # only the part counted in this window
        Ask(16, 1, False, 20),
    ],
}


@pytest.mark.parametrize("steps", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_fixed_window_table(steps: list[Step]) -> None:
    run(FixedWindowState("requests", 3, 10, steps[0].t), steps)


# --- every algorithm ------------------------------------------------------------------------------

RATE_STATES = [TokenBucketState, GCRAState, LeakyBucketState, SlidingWindowState, FixedWindowState]


@pytest.mark.parametrize("cls", [*RATE_STATES, SemaphoreState], ids=lambda c: c.__name__)
def test_amount_above_capacity_raises_at_once_and_takes_nothing(cls: type[RateState]) -> None:
    state = cls("tokens", 4, 8, 0.0)
    state.take(1, 0.0)
    before = (state.available(0.0), state.earliest(2, 0.0), repr(state))
    with pytest.raises(ValueError, match=r"requested\['tokens'\] = 5 exceeds the capacity 4"):
        state.earliest(5, 0.0)
    with pytest.raises(ValueError, match=r"limit 'tokens'"):
        state.take(5, 0.0)
    with pytest.raises(ValueError, match=r"requested\['tokens'\] = 4.5 exceeds"):
        state.earliest(4.5, 1.0)
    assert (state.available(0.0), state.earliest(2, 0.0), repr(state)) == before


# (algorithm, what to take at 0, time to look, units available then, fresh then); C = 4 per 2 s
# for the buckets, C = 3 per 10 s for the windows.
AVAILABLE_CASES = [
    (TokenBucketState, 3, 0.5, 2, False),
    (TokenBucketState, 3, 1.5, 4, True),
    (GCRAState, 3, 0.5, 2, False),
    (GCRAState, 3, 1.5, 4, True),
    (LeakyBucketState, 1, 0.25, 0, False),
    (LeakyBucketState, 1, 0.5, 4, True),
    (SlidingWindowState, 2, 5, 1, False),
    (SlidingWindowState, 2, 10, 3, True),
    (FixedWindowState, 2, 9.5, 1, False),
    (FixedWindowState, 2, 10, 3, True),
]


@pytest.mark.parametrize(("cls", "taken", "t", "available", "fresh"), AVAILABLE_CASES)
def test_available_and_fresh(
    cls: type[RateState], taken: float, t: float, available: float, fresh: bool
) -> None:
    capacity, window = (3, 10) if cls in (SlidingWindowState, FixedWindowState) else (4, 2)
    state = cls("k", capacity, window, 0.0)
    assert state.is_fresh(0.0)
    state.take(taken, 0.0)
    assert state.available(t) == available
    assert state.is_fresh(t) is fresh


def test_semaphore_waits_for_a_release_not_for_a_time() -> None:
    state = SemaphoreState("connections", 2, 0.0, 0.0)
    assert state.earliest(2, 0.0) == 0.0
    assert state.admits(2, 0.0)
    state.take(1, 0.0)
    assert state.earliest(2, 5.0) == math.inf
    assert not state.admits(2, 5.0)
    assert state.admits(1, 5.0)
    state.release(1)
    assert state.earliest(2, 5.0) == 5.0
    assert state.admits(2, 5.0)
    with pytest.raises(TypeError, match="'connections' cannot be updated"):
        state.refund(None, 1, 5.0)
    with pytest.raises(TypeError, match="'connections' cannot be updated"):
        state.charge(None, 1, 5.0)


@pytest.mark.parametrize(
    ("limit", "cls"),
    [
        (RateLimit("t", 1, 2), TokenBucketState),
        (RateLimit("t", 1, 2, "gcra"), GCRAState),
        (RateLimit("t", 1, 2, "leaky_bucket"), LeakyBucketState),
        (RateLimit("t", 1, 2, "sliding_window"), SlidingWindowState),
        (CallLimit(1, 2, RateLimitAlgorithm.FixedWindow), FixedWindowState),
        (ResourceLimit("c", 2), SemaphoreState),
    ],
)
def test_new_state_picks_the_algorithm_of_the_limit(limit: Any, cls: type[RateState]) -> None:
    state = new_state(limit, 5.0)
    assert type(state) is cls
    assert state.key == limit.key
    assert state.capacity == limit.capacity
    assert state.is_fresh(5.0)


# --- long uptimes: exact at 1e7 s with 1 ms and 30-day windows, capacities 1 and 1e9 -------------

UPTIME = 1e7 + 1 / 3  # four months of a monotonic clock, and not a round number
DAY = 86_400.0


@pytest.mark.parametrize("cls", RATE_STATES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("window", [1e-3, 30 * DAY], ids=["1ms", "30days"])
@pytest.mark.parametrize("capacity", [1, 10**9], ids=["C=1", "C=1e9"])
def test_long_uptime_is_exact(cls: type[RateState], window: float, capacity: int) -> None:
    now = UPTIME
    state = cls("k", capacity, window, now)
    assert state.earliest(capacity, now) == now
    state.take(capacity, now)

    # Nothing more at the same instant, however small the unit's time is next to a float step.
    e = state.earliest(1, now)
    assert e > now
    assert_exact(state, 1, e)
    # And the answer is where exact arithmetic puts it, within a few float steps of the clock.
    if cls is FixedWindowState:
        exact_e = (math.floor(Fraction(now) / Fraction(window)) + 1) * Fraction(window)
    elif cls in (LeakyBucketState, SlidingWindowState):
        exact_e = Fraction(now) + Fraction(window)
    else:
        exact_e = Fraction(now) + Fraction(window) / capacity
    assert abs(Fraction(e) - exact_e) <= 4 * math.ulp(e)

    state.take(1, e)
    e2 = state.earliest(1, e)
    assert e2 >= e
    if e2 > e:
        assert_exact(state, 1, e2)
    if capacity == 1 or cls is LeakyBucketState:
        assert e2 > e  # one unit per W/C: the next cannot come in the same float step
