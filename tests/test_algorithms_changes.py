"""Table tests of limits that change at run time (semantics §4), with ``now`` passed in.

The steps of ``test_algorithms_tables`` plus :class:`Change`: at ``t`` the limit gets a new
capacity and window. Each table states, per algorithm, what the change keeps in use and when the
next admissions come; times and amounts are binary fractions, so every value is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiolimits._algorithms import (
    FixedWindowState,
    GCRAState,
    LeakyBucketState,
    RateState,
    SemaphoreState,
    SlidingWindowState,
    TokenBucketState,
)

from .test_algorithms_tables import Ask, Charge, Refund


class Change(NamedTuple):
    """At ``t``, the limit becomes ``capacity`` per ``window`` seconds."""

    t: float
    capacity: float
    window: float


Step = Ask | Refund | Charge | Change


def run(state: RateState, steps: Sequence[Step]) -> None:
    receipts: list[Any] = []
    for i, step in enumerate(steps):
        where = f"step {i}: {step} on {state!r}"
        if isinstance(step, Change):
            state.change(step.capacity, step.window, step.t)
            assert (state.capacity, state.window) == (step.capacity, step.window), where
        elif isinstance(step, Ask):
            assert step.admitted == (step.earliest == step.t), f"table typo at {where}"
            assert state.earliest(step.n, step.t) == step.earliest, where
            if step.admitted:
                receipts.append(state.take(step.n, step.t))
        elif isinstance(step, Refund):
            assert state.refund(receipts[step.of], step.n, step.t) == step.given, where
        else:
            receipts[step.of] = state.charge(receipts[step.of], step.n, step.t)


# --- TokenBucket and GCRA: 4 tokens per 2 s (2 tokens/s); the deficit is kept

BUCKET_CASES: dict[str, list[Step]] = {
    "growing adds the difference at once": [
        Ask(0, 4, True, 0),
        Change(0, 8, 2),  # 4 tokens in use of 8: 4 left, 4 tokens/s
        Ask(0, 4, True, 0),
        Ask(0, 2, False, 0.5),
    ],
    "shrinking keeps the units in use in use, into debt": [
        Ask(0, 3, True, 0),
        Change(0, 2, 2),  # 3 in use of 2: -1, 1 token/s
        Ask(0, 1, False, 2),
        Ask(2, 1, True, 2),
        Ask(2, 1, False, 3),
    ],
    "the deficit is taken at the change, the new rate runs from it": [
        Ask(0, 4, True, 0),
        Change(1, 4, 8),  # 2 refilled by t=1; from then 0.5 token/s
        Ask(1, 3, False, 3),
        Ask(3, 3, True, 3),
    ],
    "a full bucket stays full": [
        Change(5, 2, 1),
        Ask(5, 2, True, 5),
        Ask(5, 1, False, 5.5),
    ],
    "a refund after growing gives back what it would have": [
        Ask(0, 4, True, 0),
        Change(0, 8, 2),
        Refund(0, 4, of=0, given=4),
        Ask(0, 8, True, 0),
    ],
    "a refund after shrinking gives back what it would have": [
        Ask(0, 4, True, 0),
        Change(0, 2, 2),  # -2
        Refund(0, 4, of=0, given=4),  # back to 2: full
        Ask(0, 2, True, 0),
        Ask(0, 1, False, 1),
    ],
    "what the cap absorbed before the change stays absorbed": [
        Ask(0, 2, True, 0),  # 2 left
        Ask(1, 1, True, 1),  # full again at 1 (2 + 2): the first take is forgotten; 3 left
        Change(1, 8, 2),  # 7 left
        Refund(1, 2, of=0, given=0),
        Refund(1, 1, of=1, given=1),  # 8: full
        Ask(1, 8, True, 1),
    ],
}


@pytest.mark.parametrize("cls", [TokenBucketState, GCRAState], ids=lambda c: c.__name__)
@pytest.mark.parametrize("steps", BUCKET_CASES.values(), ids=BUCKET_CASES.keys())
def test_bucket_change_table(cls: type[RateState], steps: list[Step]) -> None:
    run(cls("tokens", 4, 2, 0.0), steps)


# --- LeakyBucket: 4 per 2 s (one unit every 0.5 s); the units not drained are kept

LEAKY_CASES: dict[str, list[Step]] = {
    "slower: the units not drained drain at the new interval": [
        Ask(0, 2, True, 0),  # [0, 1)
        Change(0.5, 4, 4),  # one unit left, now 1 s: [0, 1.5)
        Ask(0.5, 1, False, 1.5),
        Ask(1.5, 1, True, 1.5),
        Ask(1.5, 1, False, 2.5),
    ],
    "faster: the schedule comes forward": [
        Ask(0, 4, True, 0),  # [0, 2)
        Change(1, 8, 2),  # two units left, 0.25 s each: [0, 1.5)
        Ask(1, 1, False, 1.5),
        Ask(1.5, 2, True, 1.5),
        Ask(1.5, 1, False, 2),
    ],
    "a refund gives back the tail at the new interval": [
        Ask(0, 4, True, 0),  # [0, 2)
        Change(0, 4, 4),  # [0, 4)
        Refund(1, 4, of=0, given=3),  # three units still ahead: [0, 1)
        Ask(1, 1, True, 1),
    ],
    "a change after the schedule ended changes only what comes next": [
        Ask(0, 1, True, 0),
        Change(3, 2, 2),
        Ask(3, 2, True, 3),
        Ask(3, 1, False, 5),
    ],
}


@pytest.mark.parametrize("steps", LEAKY_CASES.values(), ids=LEAKY_CASES.keys())
def test_leaky_bucket_change_table(steps: list[Step]) -> None:
    run(LeakyBucketState("tokens", 4, 2, 0.0), steps)


# --- SlidingWindow: 4 per 2 s; every entry is kept, counting for the new window

SLIDING_CASES: dict[str, list[Step]] = {
    "shrinking: the units in the window count against the new capacity": [
        Ask(0, 3, True, 0),
        Change(1, 2, 2),
        Ask(1, 1, False, 2),
        Ask(2, 2, True, 2),
        Ask(2, 1, False, 4),
    ],
    "a longer window keeps each admission longer": [
        Ask(0, 4, True, 0),
        Change(1, 4, 4),  # counts until 4
        Ask(3, 1, False, 4),
        Ask(4, 4, True, 4),
    ],
    "a shorter window forgets sooner": [
        Ask(0, 4, True, 0),
        Change(0.5, 4, 1),  # counts until 1
        Ask(0.5, 1, False, 1),
        Ask(1, 4, True, 1),
    ],
    "a window that shrinks past an entry forgets it at once": [
        Ask(0, 4, True, 0),
        Change(1.5, 4, 1),
        Ask(1.5, 4, True, 1.5),
    ],
    "a refund follows the moved entry": [
        Ask(0, 4, True, 0),
        Change(1, 4, 4),
        Refund(3, 2, of=0, given=2),  # still counted (until 4)
        Ask(3, 2, True, 3),
        Ask(3, 1, False, 4),
    ],
}


@pytest.mark.parametrize("steps", SLIDING_CASES.values(), ids=SLIDING_CASES.keys())
def test_sliding_window_change_table(steps: list[Step]) -> None:
    run(SlidingWindowState("tokens", 4, 2, 0.0), steps)


# --- FixedWindow: 3 per 10 s; the current window's count is kept

FIXED_CASES: dict[str, list[Step]] = {
    "shrinking: the count of the window counts against the new capacity": [
        Ask(0, 3, True, 0),
        Change(5, 2, 10),
        Ask(5, 1, False, 10),
        Ask(10, 2, True, 10),
        Ask(10, 1, False, 20),
    ],
    "growing: room in the current window at once": [
        Ask(0, 3, True, 0),
        Change(5, 5, 10),
        Ask(5, 2, True, 5),
        Ask(5, 1, False, 10),
    ],
    "a shorter window: the current one lasts to the first new boundary after its end": [
        Ask(0, 3, True, 0),  # [0, 10)
        Change(5, 3, 4),  # [0, 12), then [12, 16), ...
        Ask(5, 1, False, 12),
        Ask(10, 1, False, 12),
        Ask(12, 3, True, 12),
        Ask(12, 1, False, 16),
    ],
    "a longer window: the current one lasts to its first boundary": [
        Ask(0, 3, True, 0),
        Change(5, 3, 25),  # [0, 25), then [25, 50)
        Ask(5, 1, False, 25),
        Ask(25, 3, True, 25),
        Ask(25, 1, False, 50),
    ],
    "a refund in the stretched window lowers its count": [
        Ask(0, 3, True, 0),
        Change(5, 3, 4),
        Refund(11, 2, of=0, given=2),
        Ask(11, 2, True, 11),
    ],
    "a window index is never used twice": [
        Ask(30, 1, True, 30),  # window 3 of 10 s
        Ask(50, 3, True, 50),  # window 5
        Change(55, 3, 20),  # [50, 60), then [60, 80): on the new grid that is window 3
        Ask(60, 3, True, 60),
        Refund(65, 1, of=0, given=0),  # the first acquisition's window is long over
        Ask(65, 1, False, 80),
    ],
}


@pytest.mark.parametrize("steps", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_fixed_window_change_table(steps: list[Step]) -> None:
    run(FixedWindowState("requests", 3, 10, steps[0].t), steps)


def test_semaphore_change_keeps_the_slots_held() -> None:
    state = SemaphoreState("conn", 2, 0.0, 0.0)
    state.take(2, 0.0)
    state.change(1, 0.0, 0.0)
    assert state.earliest(1, 0.0) == float("inf")
    state.release(1)
    assert state.earliest(1, 0.0) == float("inf")  # one held of one
    state.release(1)
    assert state.earliest(1, 0.0) == 0.0
    state.change(3, 0.0, 0.0)
    state.take(3, 0.0)
    assert state.available(0.0) == 0


# --- properties: a tightening change never admits what the old limit would refuse -----------------

TIGHTENING: dict[str, type[RateState]] = {
    "token_bucket": TokenBucketState,
    "gcra": GCRAState,
    "leaky_bucket": LeakyBucketState,
    "sliding_window": SlidingWindowState,
    "fixed_window": FixedWindowState,  # the capacity only: fixed grids of two windows disagree
}


def capped(n: int) -> int:
    """The profile's example count, at most ``n`` (each example runs up to 30 steps)."""
    profile = settings.default
    return n if profile is None else min(profile.max_examples, n)


@st.composite
def tightening(draw: st.DrawFn) -> tuple[str, float, float, float, list[tuple[float, int]]]:
    name = draw(st.sampled_from(sorted(TIGHTENING)))
    capacity = draw(st.integers(2, 12))
    new_capacity = draw(st.integers(1, capacity))
    if name == "fixed_window":
        new_window = 4.0
    else:
        # No faster: the window grows at least as the capacity shrinks (rate C'/W' <= C/W).
        new_window = 4.0 * draw(st.sampled_from([1, 1.25, 1.5, 2, 3]))
    asks = draw(
        st.lists(
            st.tuples(st.sampled_from([0, 0.125, 0.25, 0.5, 1, 1.5]), st.integers(1, new_capacity)),
            min_size=1,
            max_size=30,
        )
    )
    return name, capacity, new_capacity, new_window, asks


@settings(deadline=None, max_examples=capped(300))
@given(tightening(), st.integers(0, 29))
def test_a_tightening_change_admits_nothing_the_old_limit_would_refuse(
    case: tuple[str, float, float, float, list[tuple[float, int]]], change_at: int
) -> None:
    name, capacity, new_capacity, new_window, asks = case
    cls = TIGHTENING[name]
    changed = cls("k", capacity, 4.0, 0.0)
    old = cls("k", capacity, 4.0, 0.0)  # the same admissions, never changed
    t = 0.0
    for i, (step, amount) in enumerate(asks):
        t += step
        if i == change_at:
            changed.change(new_capacity, new_window, t)
        if amount <= changed.capacity and changed.earliest(amount, t) <= t:
            assert old.earliest(amount, t) <= t, (i, t, amount, changed, old)
            changed.take(amount, t)
            old.take(amount, t)


@settings(deadline=None, max_examples=capped(300))
@given(tightening(), st.integers(0, 29))
def test_a_sliding_window_after_a_change_holds_the_new_capacity_in_every_new_window(
    case: tuple[str, float, float, float, list[tuple[float, int]]], change_at: int
) -> None:
    _name, capacity, new_capacity, new_window, asks = case
    state = SlidingWindowState("k", capacity, 4.0, 0.0)
    admitted: list[tuple[float, int, bool]] = []  # time, amount, after the change
    t, changed_at = 0.0, 0.0
    for i, (step, amount) in enumerate(asks):
        t += step
        if i == change_at:
            state.change(new_capacity, new_window, t)
            changed_at = t
        if amount <= state.capacity and state.earliest(amount, t) <= t:
            state.take(amount, t)
            admitted.append((t, amount, i >= change_at))
    # Every interval of length W' ending at an admission made after the change holds <= C',
    # counting what still counted at the change (admitted within W = 4 before it).
    for end, _, after in admitted:
        if after:
            held = sum(
                n
                for at, n, post in admitted
                if end - new_window < at <= end and (post or at > changed_at - 4.0)
            )
            assert held <= new_capacity, (end, admitted)
