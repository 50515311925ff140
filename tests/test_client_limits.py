"""client_limits: the provider's limits less the in-transit margin keep the provider free of 429s.

The property test plays a provider that is a LimitSet of its own limits (exact, on the same
manual clock) against a client that declares ``client_limits(...)``: requests admitted by the
client arrive after random delays, the answer is read later still, and the provider must admit
every one of them, for every algorithm, any sizes and any delays.
"""

from __future__ import annotations

import heapq
import itertools
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiolimits import Acquisition, CallLimit, LimitSet, RateLimit, ResourceLimit, client_limits
from aiolimits.testing import ManualClock

ALGORITHMS = ["token_bucket", "gcra", "sliding_window", "fixed_window"]


def test_the_margin_comes_out_of_the_burst_at_the_same_rate() -> None:
    calls, tokens, in_flight = client_limits(
        [CallLimit(60, 500), RateLimit("tokens", 60, 200_000)],
        in_flight=32,
        largest={"tokens": 2_300},
    )
    assert isinstance(calls, CallLimit)
    assert calls.capacity == 500 - 33
    assert calls.capacity / calls.window_seconds == pytest.approx(500 / 60)
    assert isinstance(tokens, RateLimit)
    assert tokens.capacity == 200_000 - 32 * 2_300 - 1
    assert tokens.capacity / tokens.window_seconds == pytest.approx(200_000 / 60)
    assert in_flight == ResourceLimit("in_flight", 32)


def test_window_algorithms_keep_the_window_and_count_whole_units() -> None:
    (tokens, _) = client_limits(
        [RateLimit("tokens", 60, 1000.5, "sliding_window")], in_flight=3, largest={"tokens": 7.5}
    )
    assert tokens == RateLimit("tokens", 60, 977, "sliding_window")  # floor(1000.5 - 23.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"in_flight": 0}, ValueError, "in_flight must be >= 1, got 0"),
        ({"in_flight": 2.0}, TypeError, "in_flight must be an int"),
        ({"in_flight": True}, TypeError, "in_flight must be an int"),
        ({"in_flight": 4, "largest": {}}, ValueError, r"missing \['tokens'\]"),
        (
            {"in_flight": 4, "largest": {"tokens": 1, "bytes": 2}},
            ValueError,
            r"not a plain RateLimit: \['bytes'\]",
        ),
        (
            {"in_flight": 4, "largest": {"tokens": 0}},
            ValueError,
            r"largest\['tokens'\] must be > 0",
        ),
        (
            {"in_flight": 4, "largest": {"tokens": 101}},
            ValueError,
            r"largest\['tokens'\] must be > 0 and at most",
        ),
        ({"in_flight": 4, "largest": {"tokens": "9"}}, TypeError, r"largest\['tokens'\] must be a"),
        ({"in_flight": 49, "largest": {"tokens": 2}}, ValueError, "leaves no room"),
        ({"in_flight": 4, "largest": {"tokens": 1}, "in_flight_key": "tokens"}, ValueError, "key"),
    ],
)
def test_bad_arguments_are_named(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        client_limits([RateLimit("tokens", 1, 100)], **kwargs)  # type: ignore[arg-type]


def test_a_leaky_bucket_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="leaky_bucket, which has no burst"):
        client_limits([CallLimit(1, 100, "leaky_bucket")], in_flight=2)


def test_a_non_limit_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="provider must hold RateLimit or CallLimit"):
        client_limits([ResourceLimit("x", 3)], in_flight=2)  # type: ignore[list-item]


_REQUESTS = st.lists(
    st.tuples(
        st.integers(1, 200) | st.just(200),  # tokens asked, often the largest
        st.floats(0, 1),  # share of them really used
        st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.5, 1.5]),  # transit delay, in windows
        st.sampled_from([0.0, 0.0, 0.0, 0.001, 0.3, 1.2, 1.4]),  # think time, in windows
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=300)
# One that fails without the margin: a request held in transit while the client, full again,
# sends a whole burst that arrives first.
@example(
    algorithm="token_bucket",
    window=1.0,
    quotas=(60, 1500),
    in_flight=6,
    requests=[(200, 1.0, 1.5, 1.2)] + [(200, 1.0, 0.0, 0.0)] * 12,
)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    window=st.sampled_from([0.3, 1.0, 2.5, 60.0]),
    quotas=st.tuples(st.integers(12, 60), st.integers(1_500, 6_000)),
    in_flight=st.integers(1, 30),
    requests=_REQUESTS,
)
def test_the_provider_never_refuses_what_the_client_admits(
    algorithm: str,
    window: float,
    quotas: tuple[int, int],
    in_flight: int,
    requests: list[tuple[int, float, float, float]],
) -> None:
    clock = ManualClock()
    calls, tokens = quotas
    published: list[RateLimit | CallLimit] = [
        CallLimit(window, calls, algorithm),
        RateLimit("tokens", window, tokens, algorithm),
    ]
    provider = LimitSet(published, clock=clock)
    try:
        own = client_limits(published, in_flight=in_flight, largest={"tokens": 200})
    except ValueError:
        return  # the margin leaves nothing: refused, as the table tests check
    client = LimitSet(own, clock=clock)
    # (time, sequence, the client's acquisition, tokens asked, tokens used, arrived yet)
    Event = tuple[float, int, Acquisition, int, int, bool]
    events: list[Event] = []
    sequence = itertools.count()

    def handle(event: Event) -> None:
        when, _, acq, asked, used, arrived = event
        clock.set(max(clock(), when))
        if not arrived:  # the provider counts it, settles the real usage, then answers
            counted = provider.try_acquire({"tokens": asked})
            assert counted.successful, f"429 at {clock()}: {provider.get_stats()}"
            counted.update({"tokens": used})
            heapq.heappush(events, (clock(), next(sequence), acq, asked, used, True))
        else:  # the client reads the answer: settles, then frees its in-flight slot
            acq.update({"tokens": used})
            acq.release()

    not_before = 0.0
    for asked, share, delay, think in requests:
        want = {"tokens": asked}
        for _ in range(10_000):  # each turn handles an event or moves the clock forward
            start = max(clock(), not_before)
            if start == clock():
                wait = client.retry_after(want)
                if wait == 0:
                    break
                start += wait  # inf while every in-flight slot is taken
            if events and events[0][0] <= start:
                handle(heapq.heappop(events))
            else:
                assert start != math.inf, "nothing in flight, yet the client can never admit"
                clock.set(start)
        else:
            raise AssertionError(f"no admission for {want} at {clock()}")
        acq = client.try_acquire(want)
        assert acq.successful, f"retry_after said now, try_acquire refused at {clock()}"
        used = max(1, math.ceil(asked * share))
        heapq.heappush(events, (clock() + delay * window, next(sequence), acq, asked, used, False))
        not_before = clock() + think * window
    while events:  # the last ones arrive and are read
        handle(heapq.heappop(events))
    assert client.get_stats()["limits"]["in_flight"]["in_use"] == 0
