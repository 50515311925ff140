"""§3 algorithm decisions, seen through a LimitSet; §4 what a request takes."""

from __future__ import annotations

import pytest

from aiolimits import CallLimit, RateLimit, RateLimitAlgorithm, ResourceLimit
from aiolimits.testing import ManualClock

from ._support import ALGORITHMS, FIXED, GCRA, LEAKY, SLIDING, TB, MakeLimitSet, stats_of

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
