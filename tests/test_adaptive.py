"""Following the provider (aiolimits._adaptive through the httpx transports and the aiohttp client
middleware): what remains is held back, a lower announced limit is adopted and logged once, never
above what was declared; AIMD on 429s without headers; a pool adapts only the refused set.

The provider here is ``httpx.MockTransport`` answering what each test says, and the limits run on
a ManualClock: every decision is the test's. The outcome tests against a provider that enforces its
own limits are in ``test_adaptive_outcomes.py``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiolimits import (
    Acquisition,
    BackendUnavailable,
    CallLimit,
    KeyedLimitSet,
    LimitPool,
    LimitSet,
    ProcessBackend,
    RateLimit,
)
from aiolimits._adaptive import (
    Adaptation,
    Follower,
    available,
    follow_answer_sync,
    follower_for,
    settle_with,
)
from aiolimits.integrations.httpx import LimitedSyncTransport, LimitedTransport
from aiolimits.testing import ManualClock

from ._redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the session fixture

pytestmark = pytest.mark.anyio

URL = "http://llm.test/v1/chat/completions"
Answer = Callable[[httpx.Request], httpx.Response]


def tokens_of(request: httpx.Request) -> dict[str, int]:
    return {"tokens": int(json.loads(request.content)["max_tokens"])}


def total_tokens(request: httpx.Request, response: httpx.Response) -> dict[str, int] | None:
    if response.status_code != 200:
        return None
    return {"tokens": int(response.json()["usage"]["total_tokens"])}


def ok(total: int, **headers: str) -> httpx.Response:
    named = {name.replace("_", "-"): value for name, value in headers.items()}
    return httpx.Response(200, headers=named, json={"usage": {"total_tokens": total}})


def declared(clock: ManualClock, config: dict[str, str] | None = None) -> LimitSet:
    return LimitSet(
        [CallLimit(60, 100), RateLimit("tokens", window_seconds=60, capacity=10_000)],
        clock=clock,
        config=config,
    )


def stats(limits: LimitSet, key: str) -> tuple[float, float]:
    """``(capacity, available)`` of ``key`` now."""
    limit = limits.statistics().limits[key]
    return float(limit.capacity), float(limit.available)


async def post(limits: LimitSet | LimitPool, answer: Answer, max_tokens: int = 100) -> int:
    transport = LimitedTransport(
        limits,
        transport=httpx.MockTransport(answer),
        cost=tokens_of,
        usage=total_tokens,
        retries=0,
        adapt=True,
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post(URL, json={"max_tokens": max_tokens})
    return response.status_code


async def test_what_remains_is_held_back_by_charging_the_answer() -> None:
    clock = ManualClock()
    limits = declared(clock)
    answer = ok(80, x_ratelimit_remaining_tokens="2000", x_ratelimit_reset_tokens="48s")
    await post(limits, lambda request: answer)
    # 10,000 less the 80 used would be admissible; the provider says 2,000 remain.
    assert stats(limits, "tokens") == (10_000, 2000)
    # A bucket earns it back at its rate, as the provider's does: 1,000 tokens in 6 s.
    clock.advance(6)
    assert stats(limits, "tokens") == (10_000, 3000)


async def test_what_remains_counts_the_requests_still_in_transit() -> None:
    clock = ManualClock()
    limits = declared(clock)
    follower = follower_for(limits, Adaptation())
    earlier = limits.try_acquire({"tokens": 700})  # sent a round trip before: counted
    follower.sent(earlier)
    later = []

    def answer(request: httpx.Request) -> httpx.Response:
        clock.advance(1)  # the round trip: the shortest seen so far
        later.append(limits.try_acquire({"tokens": 500}))  # sent within it
        follower.sent(later[0])
        return ok(100, x_ratelimit_remaining_tokens="3000")

    await post(limits, answer)
    # The provider may not have counted the later 500 yet: at most 2,500 more may go.
    assert stats(limits, "tokens")[1] == 2500
    earlier.release()
    later[0].release()


async def test_an_answer_saying_more_remains_than_the_set_has_gives_nothing_back() -> None:
    clock = ManualClock()
    limits = declared(clock)
    await post(limits, lambda request: ok(100, x_ratelimit_remaining_tokens="9999999"))
    assert stats(limits, "tokens") == (10_000, 9900)


async def test_right_after_a_lower_limit_the_set_is_brought_to_what_remains_both_ways() -> None:
    clock = ManualClock()
    limits = declared(clock)
    # Halving keeps the 100 in use in use (4,900 admissible); the provider says 4,990 remain.
    answer = ok(10, x_ratelimit_limit_tokens="5000", x_ratelimit_remaining_tokens="4990")
    await post(limits, lambda request: answer)
    assert stats(limits, "tokens") == (5000, 4990)


async def test_a_lower_announced_limit_is_adopted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    limits = declared(clock)
    caplog.set_level(logging.INFO, logger="aiolimits")
    for _ in range(3):
        await post(
            limits,
            lambda request: ok(
                10, x_ratelimit_limit_tokens="4000", x_ratelimit_limit_requests="50"
            ),
        )
    assert stats(limits, "tokens")[0] == 4000
    assert stats(limits, "call_count")[0] == 50
    announced = [r for r in caplog.records if "announces" in r.getMessage()]
    assert len(announced) == 2  # once per key, not once per answer


async def test_a_limit_above_the_declared_one_is_never_adopted() -> None:
    clock = ManualClock()
    limits = declared(clock)
    await post(limits, lambda request: ok(10, x_ratelimit_limit_tokens="4000"))
    await post(limits, lambda request: ok(10, x_ratelimit_limit_tokens="90000"))
    # Back up to what was declared, and no further.
    assert stats(limits, "tokens")[0] == 10_000


async def test_published_limits_scale_a_set_that_leaves_a_margin() -> None:
    clock = ManualClock()
    limits = declared(clock)
    follower_for(limits, Adaptation(published={"tokens": 20_000}))
    transport = LimitedTransport(
        limits,
        transport=httpx.MockTransport(lambda request: ok(10, x_ratelimit_limit_tokens="10000")),
        cost=tokens_of,
        adapt=Adaptation(published={"tokens": 20_000}),
    )
    async with httpx.AsyncClient(transport=transport) as client:
        await client.post(URL, json={"max_tokens": 10})
    assert stats(limits, "tokens")[0] == 5000  # half the provider's: half of the client's


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-remaining-tokens": "-5"},
        {"x-ratelimit-remaining-tokens": "nan"},
        {"x-ratelimit-limit-tokens": "0"},
        {"x-ratelimit-limit-tokens": "1e400"},
        {"anthropic-ratelimit-tokens-reset": "yesterday"},
        {"ratelimit-policy": '"x";q=oops'},
    ],
)
async def test_malformed_headers_are_ignored(headers: dict[str, str]) -> None:
    clock = ManualClock()
    limits = declared(clock)
    response = httpx.Response(200, headers=headers, json={"usage": {"total_tokens": 100}})
    assert await post(limits, lambda request: response) == 200
    assert stats(limits, "tokens") == (10_000, 9900)


@pytest.mark.parametrize(
    ("limit", "remaining", "reset"),
    [("100", "100", "0s"), ("100", "100", "1s"), ("0", "0", "1s"), ("100", "0", "0s")],
)
async def test_edge_figures_for_requests_neither_raise_nor_pause_for_long(
    limit: str, remaining: str, reset: str
) -> None:
    clock = ManualClock()
    limits = declared(clock)
    answer = ok(
        10,
        x_ratelimit_limit_requests=limit,
        x_ratelimit_remaining_requests=remaining,
        x_ratelimit_reset_requests=reset,
    )
    assert await post(limits, lambda request: answer) == 200
    assert limits.statistics().paused_for <= 1


async def test_no_request_remaining_pauses_the_set_until_one_comes_back() -> None:
    clock = ManualClock()
    limits = declared(clock)
    answer = ok(
        10,
        x_ratelimit_limit_requests="100",
        x_ratelimit_remaining_requests="0",
        x_ratelimit_reset_requests="60s",
    )
    await post(limits, lambda request: answer)
    # The provider's bucket is empty and refills 100 in 60 s: one request in 0.6 s.
    assert limits.statistics().paused_for == pytest.approx(0.6)


async def test_a_429_without_headers_lowers_the_rate_multiplicatively_once_per_burst() -> None:
    clock = ManualClock()
    limits = declared(clock)
    adaptation = Adaptation(decrease=0.5, increase=0.1)
    follower = follower_for(limits, adaptation)
    burst = [limits.try_acquire({"tokens": 10}) for _ in range(3)]
    for acq in burst:
        follower.sent(acq)
    for acq in burst:  # three 429s for requests sent together: one signal
        follower.answered(acq, 429, {}, 0.0)
        acq.release()
    assert stats(limits, "tokens")[0] == 5000
    assert stats(limits, "call_count")[0] == 50
    late = limits.try_acquire({"tokens": 10})
    follower.sent(late)  # sent at the lowered rate, and refused again: a new signal
    follower.answered(late, 429, {}, 0.0)
    late.release()
    assert stats(limits, "tokens")[0] == 2500


async def test_answers_without_429_recover_additively_one_step_per_interval() -> None:
    clock = ManualClock()
    limits = declared(clock)
    follower = follower_for(limits, Adaptation(decrease=0.5, increase=0.1, interval=10))

    def answer(status: int) -> None:
        acq = limits.try_acquire({"tokens": 1})
        follower.sent(acq)
        follower.answered(acq, status, {}, 0.0)
        acq.release()

    answer(429)
    assert stats(limits, "tokens")[0] == 5000
    answer(200)
    assert stats(limits, "tokens")[0] == 5000  # not an interval yet
    clock.advance(10)
    answer(200)
    answer(200)
    assert stats(limits, "tokens")[0] == 6000
    for _ in range(10):
        clock.advance(10)
        answer(200)
    assert stats(limits, "tokens")[0] == 10_000  # never above what was declared


async def test_a_pool_adapts_only_the_set_that_was_refused() -> None:
    clock = ManualClock()
    sets = [declared(clock, {"api_key": "a"}), declared(clock, {"api_key": "b"})]
    pool = LimitPool(sets, load_balancing="round_robin")

    def answer(request: httpx.Request) -> httpx.Response:
        if request.extensions["aiolimits"]["api_key"] == "b":
            return httpx.Response(429)
        return ok(10)

    await post(pool, answer)
    await post(pool, answer)
    assert stats(sets[0], "tokens")[0] == 10_000
    assert stats(sets[1], "tokens")[0] == 7000  # the default decrease, 0.7


def test_the_sync_transport_follows_the_provider_too() -> None:
    clock = ManualClock()
    limits = declared(clock)
    transport = LimitedSyncTransport(
        limits,
        transport=httpx.MockTransport(
            lambda request: ok(
                50, x_ratelimit_remaining_tokens="1000", x_ratelimit_limit_tokens="5000"
            )
        ),
        cost=tokens_of,
        usage=total_tokens,
        adapt=True,
    )
    with httpx.Client(transport=transport) as client:
        client.post(URL, json={"max_tokens": 100})
    assert stats(limits, "tokens") == (5000, 1000)


def test_bad_adaptation_arguments_are_named() -> None:
    for kwargs, word in [
        ({"decrease": 1.0}, "decrease"),
        ({"decrease": 0}, "decrease"),
        ({"increase": float("nan")}, "increase"),
        ({"floor": 2}, "floor"),
        ({"interval": -1}, "interval"),
        ({"published": {"tokens": float("inf")}}, "published"),
        ({"dimensions": {"tokens": 3}}, "dimensions"),
    ]:
        with pytest.raises((ValueError, TypeError), match=word):
            Adaptation(**kwargs)  # type: ignore[arg-type]
    clock = ManualClock()
    with pytest.raises(ValueError, match="published"):
        follower_for(declared(clock), Adaptation(published={"nope": 1}))
    with pytest.raises(TypeError, match="adapt"):
        LimitedTransport(declared(clock), adapt="yes")  # type: ignore[arg-type]
    keyed = KeyedLimitSet([CallLimit(1, 1)])
    with pytest.raises(ValueError, match="adapt"):
        LimitedTransport(keyed, key=lambda request: "k", adapt=True)


def test_every_caller_of_one_set_shares_one_follower_with_equal_parameters() -> None:
    clock = ManualClock()
    limits = declared(clock)
    assert follower_for(limits, Adaptation()) is follower_for(limits, Adaptation())
    with pytest.raises(ValueError, match="other parameters"):
        follower_for(limits, Adaptation(decrease=0.5))


_FIGURE = st.one_of(
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                f"x-ratelimit-{field}-{dimension}"
                for field in ("limit", "remaining", "reset")
                for dimension in ("requests", "tokens")
            ]
            + ["retry-after", "retry-after-ms", "ratelimit", "ratelimit-policy"]
        ),
        _FIGURE,
    ),
    st.sampled_from([200, 429, 500]),
)
def test_no_header_value_raises_or_loosens_the_declared_limits(
    headers: dict[str, str], status: int
) -> None:
    clock = ManualClock()
    limits = declared(clock)
    follower = follower_for(limits, Adaptation())
    acq = limits.try_acquire({"tokens": 100})
    follower.sent(acq)
    reading = follower.answered(acq, status, headers, 1.7e9)
    if reading is not None:
        settle_with(acq, None, follower.in_line(acq, reading, available(limits)))
    acq.release()
    for key in ("call_count", "tokens"):
        capacity, _ = stats(limits, key)
        assert 1 <= capacity <= {"call_count": 100, "tokens": 10_000}[key]
    assert limits.statistics().paused_for <= 1e6


async def test_a_store_that_cannot_take_the_change_costs_no_answer_and_is_asked_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    limits = declared(clock)
    change = LimitSet.change_limit

    def unreachable(self: LimitSet, key: str, **numbers: float) -> None:
        raise BackendUnavailable("the store is gone")

    monkeypatch.setattr(LimitSet, "change_limit", unreachable)
    answer = ok(10, x_ratelimit_limit_tokens="5000")
    assert await post(limits, lambda request: answer) == 200
    assert stats(limits, "tokens")[0] == 10_000
    assert "could not follow" in caplog.text
    monkeypatch.setattr(LimitSet, "change_limit", change)
    await post(limits, lambda request: answer)
    assert stats(limits, "tokens")[0] == 5000


# -- several processes sharing one set: each has its own follower ------------------------------


def two_followers(
    clock: ManualClock, tmp_path: Path, adaptation: Adaptation
) -> tuple[LimitSet, LimitSet, list[Follower]]:
    """Two sets on one process backend, as two processes would build them: one follower each."""
    backend = ProcessBackend(tmp_path)
    first, second = (
        LimitSet(
            [CallLimit(60, 100), RateLimit("tokens", window_seconds=60, capacity=10_000)],
            clock=clock,
            backend=backend,
            name="shared",
        )
        for _ in range(2)
    )
    return first, second, [follower_for(first, adaptation), follower_for(second, adaptation)]


def sent(limits: LimitSet, follower: Follower) -> Acquisition:
    acq = limits.try_acquire({"tokens": 1})
    assert acq.successful
    follower.sent(acq)
    return acq


def answered(follower: Follower, acq: Acquisition, status: int) -> None:
    follower.answered(acq, status, {}, 0.0)
    acq.release()


def test_processes_refused_in_one_episode_lower_the_shared_limit_once(tmp_path: Path) -> None:
    clock = ManualClock()
    first, second, (a, b) = two_followers(clock, tmp_path, Adaptation(decrease=0.5))
    burst = [sent(first, a), sent(second, b)]  # both sent at 10,000
    answered(a, burst[0], 429)
    assert stats(second, "tokens")[0] == 5000
    answered(b, burst[1], 429)  # the same episode, seen by the other process: no second step
    assert stats(first, "tokens")[0] == 5000
    late = sent(second, b)  # sent at the lowered rate and refused: a new signal
    answered(b, late, 429)
    assert stats(first, "tokens")[0] == 2500


def test_a_late_refusal_of_an_early_request_never_raises_the_shared_limit(
    tmp_path: Path,
) -> None:
    clock = ManualClock()
    first, second, (a, b) = two_followers(clock, tmp_path, Adaptation(decrease=0.5))
    early = sent(second, b)  # at 10,000
    answered(a, sent(first, a), 429)  # 5,000
    answered(a, sent(first, a), 429)  # sent at 5,000: 2,500
    answered(b, early, 429)  # half of what it was sent at is more than what is in force
    assert stats(first, "tokens")[0] == 2500
    assert stats(second, "call_count")[0] == 25


def test_processes_recovering_together_add_one_increase_per_interval(tmp_path: Path) -> None:
    clock = ManualClock()
    adaptation = Adaptation(decrease=0.5, increase=0.1, interval=10)
    first, second, (a, b) = two_followers(clock, tmp_path, adaptation)
    burst = [sent(first, a), sent(second, b)]
    answered(a, burst[0], 429)
    answered(b, burst[1], 429)
    assert stats(first, "tokens")[0] == 5000
    for step in range(1, 4):
        clock.advance(10)
        answered(a, sent(first, a), 200)
        clock.advance(1)
        answered(b, sent(second, b), 200)  # within the same interval: adds nothing more
        assert stats(first, "tokens")[0] == 5000 + 1000 * step


def test_on_redis_a_late_refusal_reads_the_limits_first_and_never_raises_them(
    redis_server: RedisServer,
) -> None:
    from aiolimits.redis import RedisBackend

    name = uuid.uuid4().hex
    sets = [
        LimitSet(
            [CallLimit(60, 100), RateLimit("tokens", window_seconds=60, capacity=10_000)],
            backend=RedisBackend(redis_server.url),
            name=name,
        )
        for _ in range(2)
    ]
    adaptation = Adaptation(decrease=0.5)
    a, b = (follower_for(limits, adaptation) for limits in sets)
    early = sent(sets[1], b)  # at 10,000
    for _ in range(2):  # 5,000, then (sent at 5,000) 2,500
        acq = sent(sets[0], a)
        follow_answer_sync(a, acq, 429, {})
        acq.release()
    # The second set has not called Redis since: it reads the limits before it steps.
    follow_answer_sync(b, early, 429, {})
    early.release()
    assert stats(sets[0], "tokens")[0] == 2500
    assert stats(sets[1], "tokens")[0] == 2500


def test_what_an_answer_held_back_for_a_request_already_counted_comes_back() -> None:
    clock = ManualClock()
    limits = LimitSet([RateLimit("tokens", window_seconds=3600, capacity=10_000)], clock=clock)
    follower = follower_for(limits, Adaptation())

    def answer(acq: Acquisition, remaining: int) -> None:
        reading = follower.answered(acq, 200, {"x-ratelimit-remaining-tokens": str(remaining)}, 0)
        assert reading is not None
        settle_with(acq, None, follower.in_line(acq, reading, available(limits)))
        acq.release()

    first = limits.try_acquire({"tokens": 100})
    follower.sent(first)
    clock.advance(0.5)
    second = limits.try_acquire({"tokens": 100})
    follower.sent(second)
    clock.advance(0.5)
    # The provider had counted both: 5,000 remain. The follower cannot know the second was
    # counted (sent within the shortest round trip), so it holds back 100 more.
    answer(first, 5000)
    assert stats(limits, "tokens")[1] == pytest.approx(4900, abs=1)
    # The second's answer says the same 5,000 remain, with nothing in transit: the 100 held
    # back for it comes back (without this the set would stay 100 below for as long as it is
    # busy).
    answer(second, 5000)
    assert stats(limits, "tokens")[1] == pytest.approx(5000, abs=1)
    # Nothing more than was held back: an answer saying more remains gives nothing.
    third = limits.try_acquire({"tokens": 100})
    follower.sent(third)
    answer(third, 9000)
    assert stats(limits, "tokens")[1] == pytest.approx(4900, abs=1)
