"""What the integrations share: the rate-limit headers, Retry-After parsing, and the import rule."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from aiolimits import CallLimit, LimitSet, RateLimit, ResourceLimit
from aiolimits.integrations._common import parse_retry_after, ratelimit_headers
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


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        (None, None),
        ("-1", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


def test_importing_aiolimits_imports_no_framework() -> None:
    code = (
        "import sys, aiolimits, aiolimits.integrations\n"
        "loaded = {'httpx', 'starlette', 'fastapi', 'aiohttp', 'uvicorn', 'rich', 'matplotlib',"
        " 'h11'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
