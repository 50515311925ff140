"""Limit values (semantics §2): immutable, hashable, picklable, equal by value, validated."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from aiolimits._limits import (
    CALL_COUNT_KEY,
    CallLimit,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)

LIMITS = [
    RateLimit("tokens", window_seconds=60, capacity=90_000),
    RateLimit("tokens", window_seconds=0.5, capacity=2.5, algorithm="gcra"),
    CallLimit(window_seconds=60, capacity=500),
    CallLimit(1, 10, RateLimitAlgorithm.SlidingWindow),
    ResourceLimit("connections", capacity=10),
]


@pytest.mark.parametrize("limit", LIMITS, ids=repr)
def test_limit_is_immutable(limit: Any) -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        limit.capacity = 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        limit.key = "other"


@pytest.mark.parametrize("limit", LIMITS, ids=repr)
def test_limit_survives_pickling_equal_and_with_the_same_hash(limit: Any) -> None:
    copy = pickle.loads(pickle.dumps(limit))
    assert copy == limit
    assert hash(copy) == hash(limit)
    assert copy is not limit


def test_limits_are_equal_by_value_and_usable_as_keys() -> None:
    a = RateLimit("tokens", 60, 1000, "sliding_window")
    b = RateLimit("tokens", 60.0, 1000, RateLimitAlgorithm.SlidingWindow)
    assert a == b
    assert hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert len({a, b, RateLimit("tokens", 60, 1000)}) == 2
    assert RateLimit("tokens", 60, 1000) != RateLimit("tokens", 60, 1001)
    assert RateLimit("tokens", 60, 1000) != RateLimit("other", 60, 1000)
    assert CallLimit(60, 1000) == CallLimit(60, 1000)
    assert ResourceLimit("c", 2) != ResourceLimit("c", 3)


def test_limits_of_different_kinds_are_never_equal() -> None:
    # A CallLimit is a RateLimit on "call_count" in meaning, but it is taken by every acquisition.
    call: object = CallLimit(60, 10)
    assert call != RateLimit(CALL_COUNT_KEY, 60, 10)


@pytest.mark.parametrize(
    ("limit", "text"),
    [
        (
            RateLimit("tokens", window_seconds=60, capacity=90_000),
            "RateLimit('tokens', window_seconds=60, capacity=90000, algorithm='token_bucket')",
        ),
        (
            RateLimit("b", 0.5, 2.5, "leaky_bucket"),
            "RateLimit('b', window_seconds=0.5, capacity=2.5, algorithm='leaky_bucket')",
        ),
        (
            CallLimit(window_seconds=60, capacity=500, algorithm="fixed_window"),
            "CallLimit(window_seconds=60, capacity=500, algorithm='fixed_window')",
        ),
        (ResourceLimit("connections", capacity=10), "ResourceLimit('connections', capacity=10)"),
    ],
)
def test_repr_shows_every_field(limit: Any, text: str) -> None:
    assert repr(limit) == text


@pytest.mark.parametrize("algorithm", list(RateLimitAlgorithm), ids=str)
def test_algorithm_is_accepted_as_its_string_value(algorithm: RateLimitAlgorithm) -> None:
    limit = RateLimit("k", 1, 2, algorithm.value)
    assert limit.algorithm is algorithm
    assert CallLimit(1, 2, algorithm.value).algorithm is algorithm
    assert str(algorithm) == algorithm.value


def test_algorithm_string_values_are_the_documented_ones() -> None:
    assert {a.value for a in RateLimitAlgorithm} == {
        "token_bucket",
        "leaky_bucket",
        "sliding_window",
        "fixed_window",
        "gcra",
    }


def test_only_the_window_algorithms_count_whole_units() -> None:
    assert {a for a in RateLimitAlgorithm if a.integral} == {
        RateLimitAlgorithm.SlidingWindow,
        RateLimitAlgorithm.FixedWindow,
    }


def test_defaults() -> None:
    assert RateLimit("k", 1, 2).algorithm is RateLimitAlgorithm.TokenBucket
    call = CallLimit(60, 500)
    assert call.key == CALL_COUNT_KEY == "call_count"
    assert call.algorithm is RateLimitAlgorithm.TokenBucket
    assert CallLimit(60, 500, key="call_count") == call


def test_rate_is_capacity_per_second() -> None:
    assert RateLimit("k", window_seconds=60, capacity=90).rate == 1.5
    assert CallLimit(window_seconds=0.5, capacity=2).rate == 4


def test_fractional_capacity_is_accepted_for_the_buckets() -> None:
    for algorithm in ("token_bucket", "gcra", "leaky_bucket"):
        assert RateLimit("k", 1, 0.5, algorithm).capacity == 0.5


def wrong(value: object) -> Any:
    """A value of the wrong type, past the type checker: the constructor must catch it."""
    return value


# (constructor call, exception type, fragments the message must contain: the argument and the value)
BAD_ARGUMENTS: list[tuple[str, Callable[[], object], type[Exception], tuple[str, ...]]] = [
    ("zero window", lambda: RateLimit("k", 0, 10), ValueError, ("window_seconds", "got 0")),
    ("negative window", lambda: RateLimit("k", -1.5, 10), ValueError, ("window_seconds", "-1.5")),
    ("nan window", lambda: RateLimit("k", math.nan, 10), ValueError, ("window_seconds", "nan")),
    ("inf window", lambda: RateLimit("k", math.inf, 10), ValueError, ("window_seconds", "inf")),
    ("str window", lambda: RateLimit("k", wrong("60"), 10), TypeError, ("window_seconds", "'60'")),
    ("bool window", lambda: RateLimit("k", True, 10), TypeError, ("window_seconds", "True")),
    ("zero capacity", lambda: RateLimit("k", 1, 0), ValueError, ("capacity", "got 0")),
    ("negative capacity", lambda: RateLimit("k", 1, -3), ValueError, ("capacity", "-3")),
    ("nan capacity", lambda: RateLimit("k", 1, math.nan), ValueError, ("capacity", "nan")),
    ("inf capacity", lambda: RateLimit("k", 1, -math.inf), ValueError, ("capacity", "-inf")),
    ("bool capacity", lambda: RateLimit("k", 1, True), TypeError, ("capacity", "True")),
    ("None capacity", lambda: RateLimit("k", 1, wrong(None)), TypeError, ("capacity", "None")),
    ("empty key", lambda: RateLimit("", 1, 10), ValueError, ("key", "''")),
    ("non-str key", lambda: RateLimit(wrong(5), 1, 10), TypeError, ("key", "5")),
    (
        "unknown algorithm",
        lambda: RateLimit("k", 1, 10, "bucket"),
        ValueError,
        ("algorithm", "'bucket'"),
    ),
    (
        "algorithm of wrong type",
        lambda: RateLimit("k", 1, 10, wrong(3)),
        TypeError,
        ("algorithm", "3"),
    ),
    (
        "sliding window below one unit",
        lambda: RateLimit("k", 1, 0.5, "sliding_window"),
        ValueError,
        ("capacity", "0.5", "sliding_window"),
    ),
    (
        "fixed window below one unit",
        lambda: CallLimit(1, 0.25, RateLimitAlgorithm.FixedWindow),
        ValueError,
        ("capacity", "0.25", "fixed_window"),
    ),
    ("call limit zero window", lambda: CallLimit(0, 10), ValueError, ("window_seconds", "got 0")),
    ("call limit bool capacity", lambda: CallLimit(1, False), TypeError, ("capacity", "False")),
    (
        "call limit given another key",
        lambda: CallLimit(1, 10, key="tokens"),
        ValueError,
        ("key", "'tokens'", "call_count"),
    ),
    ("resource zero capacity", lambda: ResourceLimit("c", 0), ValueError, ("capacity", "got 0")),
    ("resource negative capacity", lambda: ResourceLimit("c", -2), ValueError, ("capacity", "-2")),
    (
        "resource float capacity",
        lambda: ResourceLimit("c", wrong(2.0)),
        TypeError,
        ("capacity", "2.0"),
    ),
    (
        "resource fractional capacity",
        lambda: ResourceLimit("c", wrong(1.5)),
        TypeError,
        ("capacity", "1.5"),
    ),
    ("resource bool capacity", lambda: ResourceLimit("c", True), TypeError, ("capacity", "True")),
    ("resource empty key", lambda: ResourceLimit("", 1), ValueError, ("key", "''")),
    ("resource non-str key", lambda: ResourceLimit(wrong(b"c"), 1), TypeError, ("key", "b'c'")),
]


@pytest.mark.parametrize(
    ("make", "error", "fragments"),
    [case[1:] for case in BAD_ARGUMENTS],
    ids=[case[0] for case in BAD_ARGUMENTS],
)
def test_bad_argument_raises_naming_the_argument_and_the_value(
    make: Callable[[], object], error: type[Exception], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(error) as info:
        make()
    assert type(info.value) is error  # exactly, not a subclass that happens to match
    for fragment in fragments:
        assert fragment in str(info.value)


def test_evolve_validates_like_the_constructor() -> None:
    limit = RateLimit("k", 1, 10, "fixed_window")
    with pytest.raises(ValueError, match="capacity"):
        attrs.evolve(limit, capacity=0.5)
    assert attrs.evolve(limit, capacity=20).capacity == 20
