"""What the integrations share: the rate-limit headers, Retry-After parsing, and the import rule."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import anyio
import pytest

from aiolimits import CallLimit, KeyedLimitSet, LimitSet, RateLimit, ResourceLimit
from aiolimits.integrations._common import Gate, Verdict, policy_name, ratelimit_headers
from aiolimits.testing import ManualClock


def headers_of(limits: LimitSet, retry_after: float | None = None) -> dict[str, str]:
    return ratelimit_headers(limits.limits, limits.get_stats(), retry_after)


def test_one_policy_item_per_rate_limit_and_none_for_resources() -> None:
    limits = LimitSet(
        [
            CallLimit(60, 100),
            RateLimit("tokens", 60, 90_000, algorithm="sliding_window"),
            ResourceLimit("connections", 8),
        ],
        clock=ManualClock(),
    )
    assert headers_of(limits) == {
        "RateLimit-Policy": '"call_count";q=100;w=60, "tokens";q=90000;w=60',
        "RateLimit": '"call_count";r=100;t=0, "tokens";r=90000;t=0',
    }
    limits.try_acquire({"tokens": 30_000})
    # A window algorithm is back to full within one window at most.
    assert headers_of(limits)["RateLimit"] == '"call_count";r=99;t=1, "tokens";r=60000;t=60'


def test_a_bucket_in_debt_shows_zero_remaining_and_the_time_to_refill() -> None:
    limits = LimitSet([RateLimit("tokens", 10, 100)], clock=ManualClock())
    with limits.try_acquire({"tokens": 100}) as acq:
        acq.update({"tokens": 150})  # overage: 50 in debt
    assert headers_of(limits, 5.0) == {
        "RateLimit-Policy": '"tokens";q=100;w=10',
        "RateLimit": '"tokens";r=0;t=15',
        "Retry-After": "5",
    }


def test_retry_after_is_whole_seconds_rounded_up_and_absent_when_only_a_release_helps() -> None:
    limits = LimitSet([ResourceLimit("connections", 1)])
    assert headers_of(limits, 0.01) == {"Retry-After": "1"}
    assert headers_of(limits, math.inf) == {}
    assert headers_of(limits, None) == {}


def test_quoted_key_names_are_escaped() -> None:
    limits = LimitSet([RateLimit('a"b', 1, 1)])
    assert headers_of(limits)["RateLimit-Policy"] == '"a\\"b";q=1;w=1'


def test_importing_aiolimits_imports_no_framework() -> None:
    code = (
        "import sys, aiolimits, aiolimits.integrations\n"
        "loaded = {'httpx', 'starlette', 'fastapi', 'aiohttp', 'uvicorn', 'rich', 'matplotlib',"
        " 'h11'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class FakeRequest:
    def __init__(self, client: str | None, tokens: int = 1) -> None:
        self.client = client
        self.tokens = tokens


@pytest.mark.anyio
async def test_gate_waits_for_a_keyed_client_and_admits_when_the_clock_allows() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([RateLimit("tokens", 10, 10)], max_keys=100, clock=clock)
    gate: Gate[FakeRequest] = Gate(
        keyed,
        key=lambda r: r.client,
        cost=lambda r: {"tokens": r.tokens},
        max_wait=5,
        headers=True,
    )
    first = await gate.enter(FakeRequest("a", 10))
    assert first.admitted
    assert first.headers["RateLimit"] == '"tokens";r=0;t=10'
    verdicts: list[Verdict] = []
    async with anyio.create_task_group() as tg:

        async def enter() -> None:
            verdicts.append(await gate.enter(FakeRequest("a", 3)))  # 3 s away: within 5

        tg.start_soon(enter)
        await anyio.wait_all_tasks_blocked()
        assert keyed.get_stats("a")["waiting"] == 1
        other = await gate.enter(FakeRequest("b", 10))  # another client is not held up
        assert other.admitted
        clock.advance(3)
    (second,) = verdicts
    assert second.admitted
    assert second.acquisition is not None
    assert second.acquisition.waited == 3
    late = await gate.enter(FakeRequest("a", 8))  # 8 s away: beyond 5, rejected at once
    assert not late.admitted
    assert late.retry_after == 8
    assert late.headers["Retry-After"] == "8"
    unlimited = await gate.enter(FakeRequest(None, 10))
    assert unlimited.admitted
    assert unlimited.acquisition is None
    assert unlimited.headers == {}
    for verdict in (first, second, other, late, unlimited):
        await verdict.release()
        await verdict.release()  # idempotent


@pytest.mark.anyio
async def test_gate_holds_resources_until_released_and_refuses_a_bad_key() -> None:
    limits = LimitSet([ResourceLimit("in_progress", 1)])
    gate: Gate[FakeRequest] = Gate(limits, key=None, cost=None, max_wait=0, headers=False)
    held = await gate.enter(FakeRequest(None))
    refused = await gate.enter(FakeRequest(None))
    assert (held.admitted, refused.admitted) == (True, False)
    assert refused.retry_after == math.inf
    assert "Retry-After" not in refused.headers
    await held.release()
    again = await gate.enter(FakeRequest(None))
    assert again.admitted
    assert again.headers == {}  # headers=False
    await again.release()

    def bad_key(request: FakeRequest) -> Any:
        return 42

    keyed: Gate[FakeRequest] = Gate(
        KeyedLimitSet([CallLimit(1, 1)], max_keys=100),
        key=bad_key,
        cost=None,
        max_wait=0,
        headers=True,
    )
    with pytest.raises(TypeError, match="key\\(\\) must return a str or None"):
        await keyed.enter(FakeRequest("a"))


def test_fractional_quotas_are_rounded_down_and_windows_up() -> None:
    limits = LimitSet([RateLimit("gpu_seconds", 0.5, 2.5)], clock=ManualClock())
    assert headers_of(limits)["RateLimit-Policy"] == '"gpu_seconds";q=2;w=1'


@pytest.mark.anyio
async def test_a_refusal_by_the_queue_ahead_names_no_limit() -> None:
    clock = ManualClock()
    limits = LimitSet([RateLimit("tokens", 10, 10)], clock=clock, name="api")
    gate: Gate[FakeRequest] = Gate(
        limits, key=None, cost=lambda r: {"tokens": r.tokens}, max_wait=0, headers=True
    )
    assert (await gate.enter(FakeRequest(None, 10))).admitted
    async with anyio.create_task_group() as tg:

        async def wait_for_ten() -> None:
            async with limits.acquire({"tokens": 10}):
                pass

        tg.start_soon(wait_for_ten)
        await anyio.wait_all_tasks_blocked()
        clock.advance(5)  # 5 tokens back: room for 1, but the waiter ahead is served first
        refused = await gate.enter(FakeRequest(None, 1))
        clock.advance(5)
    assert not refused.admitted
    assert refused.rejection is not None
    assert (refused.rejection.limit, refused.rejection.policy) == (None, None)
    assert refused.rejection.remaining is None
    assert "RateLimit-Refused-By" not in refused.headers
    assert refused.headers["RateLimit"] == '"api.tokens";r=5;t=5'


@pytest.mark.anyio
async def test_the_refusing_limit_is_the_one_short_of_the_most_time() -> None:
    limits = LimitSet(
        [CallLimit(60, 1), RateLimit("tokens", 60, 100), ResourceLimit("slots", 5)],
        clock=ManualClock(),
    )
    gate: Gate[FakeRequest] = Gate(
        limits, key=None, cost=lambda r: {"tokens": r.tokens}, max_wait=0, headers=True
    )
    first = await gate.enter(FakeRequest(None, 90))
    assert first.admitted
    refused = await gate.enter(FakeRequest(None, 50))  # calls: 60 s away; tokens: 24 s away
    assert refused.rejection is not None
    assert refused.rejection.limit == "call_count"
    assert refused.rejection.retry_after == 60
    assert refused.headers["RateLimit-Policy"].startswith('"call_count";q=1;w=60, "tokens"')
    await first.release()


def test_policy_names_are_sf_strings_whatever_the_key() -> None:
    assert policy_name(None, "tokens") == '"tokens"'
    assert policy_name("api", "tokens") == '"api.tokens"'
    assert policy_name(None, "50%\t\x00") == '"50%25%09%00"'
    assert policy_name(None, "\ud800") == '"%ED%A0%80"'  # a lone surrogate is no crash
    assert policy_name('a"', "\\") == '"a\\".\\\\"'
