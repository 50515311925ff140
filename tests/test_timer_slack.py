"""timer_slack: validation, the rounding of wake times, and how it reaches every kind of set.

The behaviour (grants coalesced, never early, FIFO) is in the contract (``tests/contract/slack.py``)
and, on a real clock, in ``tests/test_concurrency.py``.
"""

from __future__ import annotations

import math
import pickle
import time
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from aiolimits import KeyedLimitSet, LimitPool, LimitSet, RateLimit
from aiolimits._scheduler import Scheduler
from aiolimits.testing import ManualClock
from tests.contract._support import crowd, settle
from tests.contract.slack import CountingClock

BAD_VALUES = [
    pytest.param(-0.001, ValueError, id="negative"),
    pytest.param(1.5, ValueError, id="above-1"),
    pytest.param(math.nan, ValueError, id="nan"),
    pytest.param(math.inf, ValueError, id="inf"),
    pytest.param(10**400, ValueError, id="huge-int"),
    pytest.param("0.1", TypeError, id="str"),
    pytest.param(True, TypeError, id="bool"),
]


def _limitset(slack: Any) -> object:
    return LimitSet([RateLimit("tokens", 1, 10)], timer_slack=slack)


def _keyed(slack: Any) -> object:
    return KeyedLimitSet([RateLimit("tokens", 1, 10)], timer_slack=slack)


def _pool(slack: Any) -> object:
    return LimitPool([LimitSet([RateLimit("tokens", 1, 10)])], timer_slack=slack)


@pytest.mark.parametrize("make", [_limitset, _keyed, _pool])
@pytest.mark.parametrize(("value", "error"), BAD_VALUES)
def test_a_bad_timer_slack_is_refused_naming_it(make: Any, value: object, error: type) -> None:
    with pytest.raises(error, match="timer_slack"):
        make(value)


@pytest.mark.parametrize("make", [_limitset, _keyed])
def test_none_is_no_timer_slack_of_a_set(make: Any) -> None:
    # (A pool's None keeps each set's own: see below.)
    with pytest.raises(TypeError, match="timer_slack"):
        make(None)


@pytest.mark.parametrize("value", [0, 0.0, 5e-324, 0.005, 1, 1.0])
def test_timer_slack_accepts_zero_to_one_second(value: float) -> None:
    assert LimitSet(timer_slack=value).timer_slack == float(value)
    assert KeyedLimitSet(timer_slack=value).timer_slack == float(value)


def test_timer_slack_defaults_to_exact_wake_ups() -> None:
    assert LimitSet().timer_slack == 0.0
    assert KeyedLimitSet().timer_slack == 0.0
    sched = Scheduler((), time.monotonic)
    assert sched.timer_at(0.123456789) == 0.123456789


def _sched(slack: float) -> Scheduler:
    sched = Scheduler((), time.monotonic)
    sched.timer_slack = slack
    return sched


@given(
    at=st.floats(min_value=-1e9, max_value=1e12, allow_nan=False),
    slack=st.floats(min_value=0.0, max_value=1.0, allow_subnormal=True),
)
@example(at=0.125, slack=0.25)
@example(at=0.25, slack=0.25)
@example(at=1e9 + 0.1, slack=0.001)
@example(at=1.0, slack=5e-324)
def test_a_wake_up_with_slack_is_never_early_and_late_by_less_than_the_slack(
    at: float, slack: float
) -> None:
    when = _sched(slack).timer_at(at)
    assert when >= at
    # Less than one slack late, up to the rounding of ``at`` itself.
    assert when - at <= slack + math.ulp(at)
    if slack == 0.0:
        assert when == at


def test_wake_ups_fall_on_multiples_of_the_slack() -> None:
    sched = _sched(0.25)
    assert [sched.timer_at(t) for t in (0.125, 0.25, 0.26, 0.5, 0.74)] == [
        0.25,
        0.25,
        0.5,
        0.5,
        0.75,
    ]


def test_infinite_wake_times_are_kept() -> None:
    sched = _sched(0.5)
    assert sched.timer_at(math.inf) == math.inf
    assert sched.timer_at(-math.inf) == -math.inf


def test_timer_slack_reaches_the_scheduler_of_every_key() -> None:
    keyed = KeyedLimitSet([RateLimit("tokens", 1, 10)], timer_slack=0.01, clock=ManualClock())
    assert keyed.try_acquire("a", {"tokens": 1}).successful
    assert keyed._entries["a"].timer_slack == 0.01


def test_a_pool_sets_its_timer_slack_on_every_set_or_keeps_theirs() -> None:
    sets = [LimitSet([RateLimit("tokens", 1, 10)], timer_slack=0.002) for _ in range(2)]
    LimitPool(sets)
    assert [s.timer_slack for s in sets] == [0.002, 0.002]
    LimitPool(sets, timer_slack=0.005)
    assert [s.timer_slack for s in sets] == [0.005, 0.005]
    assert [s._scheduler.timer_slack for s in sets] == [0.005, 0.005]


def test_a_bad_pool_timer_slack_changes_no_set() -> None:
    sets = [LimitSet([RateLimit("tokens", 1, 10)], timer_slack=0.002)]
    with pytest.raises(ValueError, match="timer_slack"):
        LimitPool(sets, timer_slack=2.0)
    assert sets[0].timer_slack == 0.002


def test_timer_slack_survives_pickling() -> None:
    limits = pickle.loads(pickle.dumps(LimitSet([RateLimit("t", 1, 10)], timer_slack=0.003)))
    assert limits.timer_slack == 0.003
    assert limits._scheduler.timer_slack == 0.003
    keyed = pickle.loads(pickle.dumps(KeyedLimitSet([RateLimit("t", 1, 10)], timer_slack=0.003)))
    assert keyed.timer_slack == 0.003


def test_a_wake_up_with_slack_never_passes_a_deadline_the_exact_time_meets() -> None:
    sched = _sched(0.25)
    assert sched.timer_at(0.125, 0.25) == 0.25
    assert sched.timer_at(0.125, 0.2) == 0.125  # 0.25 would be too late: the exact time
    assert sched.timer_at(0.125, 0.1) == 0.125  # out of reach anyway: the waiter times out


@pytest.mark.anyio
async def test_in_memory_each_wake_up_grants_every_waiter_due_by_then() -> None:
    # The contract (tests/contract/slack.py) allows a grant earlier than the rounded wake-up;
    # in memory nothing but the wake-ups takes the lock here, so the grants are exactly at
    # them: two per wake-up, four wake-ups for eight waiters.
    clock = CountingClock()
    limits = LimitSet([RateLimit("tokens", 1, 8)], clock=clock, timer_slack=0.25)
    assert limits.try_acquire({"tokens": 8}).successful
    async with crowd(limits, clock) as c:
        for i in range(8):
            await c.arrive(f"w{i}", {"tokens": 1})
        for _ in range(16):
            clock.advance(1 / 16)
            await settle()
        assert c.grants == [(f"w{i}", 0.25 * (i // 2 + 1)) for i in range(8)]
        assert sorted(set(clock.armed)) == [0.25, 0.5, 0.75, 1.0]
