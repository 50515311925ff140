"""Reading a provider's rate-limit headers (aiolimits.integrations.headers): each family's
tables, and hostile values that are ignored, never raised."""

from __future__ import annotations

import logging
import math
import re
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiolimits.integrations.headers import (
    MAX_COUNT,
    MAX_SECONDS,
    ProviderLimits,
    Quota,
    read_anthropic,
    read_limits,
)

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def test_openai_headers_give_limit_remaining_and_reset_per_dimension() -> None:
    said = read_limits(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "X-RateLimit-Limit-Tokens": "90000",  # any case
            "x-ratelimit-remaining-tokens": "89000.5",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        now=NOW,
    )
    assert said.quotas == {
        "requests": Quota(500, 499, 0.12),
        "tokens": Quota(90_000, 89_000.5, 360.0),
    }
    assert said.retry_after is None
    assert said.families == ("openai",)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("250us", 250e-6),
        ("17", 17.0),  # plain seconds, as some gateways send
        ("2.5", 2.5),
    ],
)
def test_openai_reset_durations(text: str, seconds: float) -> None:
    said = read_limits({"x-ratelimit-reset-tokens": text}, now=NOW)
    reset = said.quotas["tokens"].reset_after
    assert reset is not None
    assert math.isclose(reset, seconds, rel_tol=1e-12, abs_tol=1e-15)


def test_anthropic_headers_with_rfc3339_resets() -> None:
    said = read_limits(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:01Z",
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "39000",
            "anthropic-ratelimit-input-tokens-reset": "2026-01-01T01:00:30+01:00",  # 30 s
            "anthropic-ratelimit-output-tokens-reset": "2025-12-31T23:59:00Z",  # past: 0
            "retry-after": "7",
        },
        now=NOW,
    )
    assert said.quotas == {
        "requests": Quota(50, 49, 1.0),
        "input_tokens": Quota(40_000, 39_000, 30.0),
        "output_tokens": Quota(None, None, 0.0),
    }
    assert said.retry_after == 7.0
    assert said.families == ("anthropic", "retry-after")


def test_ietf_structured_fields_pair_policy_and_state_by_name() -> None:
    said = read_limits(
        {
            "RateLimit-Policy": '"burst";q=100;w=1, "daily";q=10000;w=86400',
            "RateLimit": '"burst";r=42;t=1, "daily";r=9000;t=3600',
        },
        now=NOW,
    )
    assert said.quotas == {
        "burst": Quota(100, 42, 1.0, 1.0),
        "daily": Quota(10_000, 9_000, 3600.0, 86_400.0),
    }


def test_ietf_earlier_drafts_separate_fields() -> None:
    said = read_limits(
        {"RateLimit-Limit": "100", "RateLimit-Remaining": "0", "RateLimit-Reset": "30"}, now=NOW
    )
    assert said.quotas == {"default": Quota(100, 0, 30.0)}


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # the finer one wins
        ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),
        (
            {
                "retry-after": format_datetime(
                    datetime.fromtimestamp(NOW + 20, timezone.utc), usegmt=True
                )
            },
            20.0,
        ),
        ({"retry-after": "Wed, 31 Dec 2025 00:00:00 GMT"}, 0.0),  # a date in the past
    ],
)
def test_retry_after_forms(headers: dict[str, str], seconds: float) -> None:
    assert read_limits(headers, now=NOW).retry_after == seconds


def test_openai_and_retry_after_together_and_pairs_of_headers() -> None:
    pairs = [("Retry-After", "2"), ("x-ratelimit-remaining-requests", "0"), ("retry-after", "99")]
    said = read_limits(pairs, now=NOW)
    assert said.retry_after == 2.0  # the first of repeated names
    assert said.quotas == {"requests": Quota(remaining=0)}
    assert said.families == ("openai", "retry-after")


def test_no_rate_limit_headers_is_falsy() -> None:
    said = read_limits({"content-type": "application/json"}, now=NOW)
    assert not said
    assert said == ProviderLimits()


@pytest.mark.parametrize(
    "value",
    [
        "-1",
        "nan",
        "inf",
        "-inf",
        "1e400",
        str(MAX_COUNT * 10),
        "12abc",
        "",
        "\uff10x10",
        "1" * 5000,
    ],
)
def test_a_hostile_count_is_ignored_and_logged(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="aiolimits"):
        said = read_limits(
            {"x-ratelimit-remaining-tokens": value, "x-ratelimit-limit-tokens": "100"}, now=NOW
        )
    assert said.quotas == {"tokens": Quota(limit=100)}
    assert "x-ratelimit-remaining-tokens" in caplog.text


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-reset-tokens": "5y"},
        {"x-ratelimit-reset-tokens": "1s" * 100},
        {"x-ratelimit-reset-tokens": f"{MAX_SECONDS * 2:.0f}s"},
        {"anthropic-ratelimit-tokens-reset": "tomorrow"},
        {"anthropic-ratelimit-tokens-reset": "2026-01-01T00:00:30"},  # no offset
        {"anthropic-ratelimit-tokens-reset": "9999-12-31T23:59:59Z"},  # beyond MAX_SECONDS
        {"retry-after": "-5"},
        {"retry-after": "nan"},
        {"retry-after": "Someday, 99 Foo 20xx"},
        {"retry-after-ms": "1e300"},
        {"RateLimit-Policy": '"x";q=-1;w=nan', "RateLimit": "garbage"},
        {"RateLimit": '"x";r=1e999;t=-2'},
    ],
)
def test_hostile_times_are_ignored_never_raised(headers: dict[str, str]) -> None:
    said = read_limits(headers, now=NOW)
    assert said.retry_after is None
    assert said.quotas == {}  # a quota with nothing valid in it is not reported


def test_read_limits_refuses_a_non_finite_now() -> None:
    with pytest.raises(ValueError, match="now must be a finite"):
        read_limits({}, now=math.nan)


def test_a_custom_parser_list_reads_only_its_families() -> None:
    headers = {"x-ratelimit-remaining-tokens": "5", "anthropic-ratelimit-tokens-remaining": "6"}
    assert read_limits(headers, now=NOW, parsers=[read_anthropic]).quotas == {
        "tokens": Quota(remaining=6)
    }
    # the default order prefers OpenAI's value for a field both state
    assert read_limits(headers, now=NOW).quotas == {"tokens": Quota(remaining=5)}


_NAMES = st.sampled_from(
    [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-requests-remaining",
        "ratelimit",
        "ratelimit-policy",
        "ratelimit-reset",
        "retry-after",
        "retry-after-ms",
    ]
)


@given(
    headers=st.dictionaries(_NAMES, st.text(max_size=80) | st.floats().map(repr), max_size=10),
    now=st.floats(min_value=0, max_value=4e9),
)
def test_any_header_values_give_numbers_in_range_and_never_raise(
    headers: dict[str, str], now: float
) -> None:
    said = read_limits(headers, now=now)
    if said.retry_after is not None:
        assert 0 <= said.retry_after <= MAX_SECONDS
    for quota in said.quotas.values():
        for count in (quota.limit, quota.remaining):
            assert count is None or 0 <= count <= MAX_COUNT
        for seconds in (quota.reset_after, quota.window):
            assert seconds is None or 0 <= seconds <= MAX_SECONDS


def test_the_httpx_guide_example_reads_openai_headers() -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "httpx.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    (block,) = [b for b in blocks if "read_limits" in b]
    namespace: dict[str, object] = {}
    exec(compile(block, str(page), "exec"), namespace)  # its own assert checks the values
    assert isinstance(namespace["said"], ProviderLimits)
