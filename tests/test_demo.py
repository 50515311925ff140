"""``aiolimits demo``: with aiolimits in front the provider never answers 429, and the run uses at
least 95 % of what the provider's limits allow; without it, the provider does answer 429.

Small, fast configurations of the real thing: the simulated provider on 127.0.0.1, the httpx
transport, real time. The checks are counts and shares of the provider's own accounting, not
durations.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from aiolimits import CallLimit, RateLimit, ResourceLimit
from aiolimits.__main__ import main
from aiolimits._demo.run import DemoConfig, Summary, client_limits, run

SMALL: dict[str, Any] = {
    "rpm": 6000,
    "tpm": 270_000,
    "window": 2.0,
    "min_prompt": 20,
    "max_prompt": 200,
    "max_tokens": 50,
    "concurrency": 2,
    "latency": (0.002, 0.008),
}


def run_demo(backend: str = "asyncio", **options: Any) -> Summary:
    config = DemoConfig(**{**SMALL, **options})
    return anyio.run(functools.partial(run, config), backend=backend)


def test_small_run_sees_no_429_and_uses_95_percent_of_the_binding_limit() -> None:
    summary = run_demo(calls=200)
    assert summary.rejected == []
    assert summary.retried == 0
    assert len(summary.arrivals) == 200
    # Tokens bind here (200 requests per window would allow far more calls).
    assert summary.used_calls < 0.9
    assert summary.used_tokens >= 0.95
    assert summary.used_tokens <= 1.0
    assert all(a.tokens <= a.declared for a in summary.arrivals)


@pytest.mark.parametrize(
    ("algorithm", "backend"),
    [("gcra", "trio"), ("sliding_window", "asyncio"), ("fixed_window", "trio")],
)
def test_every_algorithm_keeps_the_provider_free_of_429s(algorithm: str, backend: str) -> None:
    summary = run_demo(backend, calls=80, algorithm=algorithm, window=1.0)
    assert summary.rejected == []
    assert len(summary.arrivals) == 80


def test_without_aiolimits_the_provider_answers_429() -> None:
    # 2,000 tokens per 2 s and about 19,000 tokens to send: only a client that took 17 s over
    # it would not be told 429.
    summary = run_demo(calls=120, use_limits=False, concurrency=16, tpm=60_000)
    assert len(summary.rejected) > 0
    assert len(summary.arrivals) + len(summary.rejected) == 120


def test_client_limits_keep_the_rate_and_leave_the_in_transit_margin() -> None:
    config = DemoConfig(**SMALL, calls=1)
    calls, tokens, in_flight = client_limits(config)
    assert isinstance(calls, CallLimit)
    assert isinstance(tokens, RateLimit)
    assert in_flight == ResourceLimit("in_flight", 2)
    # 200 requests and 9,000 tokens per 2 s at the provider; 2 in transit hold at most 2 requests
    # and 2 * (200 + 50) tokens; one more unit for float rounding.
    assert calls.capacity == 200 - 3
    assert tokens.capacity == 9000 - 501
    assert math.isclose(calls.capacity / calls.window_seconds, 100)
    assert math.isclose(tokens.capacity / tokens.window_seconds, 4500)
    windowed = client_limits(DemoConfig(**{**SMALL, "algorithm": "sliding_window"}))
    assert [
        limit.window_seconds for limit in windowed if isinstance(limit, (CallLimit, RateLimit))
    ] == [2.0, 2.0]


def test_a_margin_that_leaves_nothing_is_refused() -> None:
    config = DemoConfig(**{**SMALL, "concurrency": 40})
    with pytest.raises(ValueError, match="leaves no room"):
        client_limits(config)


def test_bad_demo_options_are_named() -> None:
    with pytest.raises(ValueError, match="algorithm must be one of"):
        DemoConfig(algorithm="leaky_bucket")
    with pytest.raises(ValueError, match="calls must be >= 1"):
        DemoConfig(calls=0)


def test_command_line_prints_the_summary_and_writes_the_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "not-yet" / "timeline.png"  # its folder is made
    argv = ["demo", "--calls", "40", "--no-progress", "--png", str(png)]
    argv += ["--rpm", "6000", "--tpm", "270000", "--window", "2", "--min-prompt", "20"]
    argv += ["--max-prompt", "200", "--max-tokens", "50", "--concurrency", "2", "--latency", "2,8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "40 calls in" in out
    assert "provider answered 429: 0 times" in out
    assert f"timeline: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_learns_a_provider_at_half_from_its_headers_and_draws_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "timeline.png"
    argv = ["demo", "--calls", "60", "--no-progress", "--png", str(png)]
    argv += ["--rpm", "6000", "--tpm", "270000", "--window", "2", "--min-prompt", "20"]
    argv += ["--max-prompt", "200", "--max-tokens", "50", "--concurrency", "2", "--latency", "2,8"]
    argv += ["--provider-factor", "0.5", "--provider-headers", "anthropic"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "really allows 0.5 x" in out
    # The client declared 8,499 tokens per bucket; the provider announced half its 9,000.
    assert "learned: tokens 4,250" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_provider_options_are_checked() -> None:
    with pytest.raises(ValueError, match="provider_factor"):
        DemoConfig(provider_factor=0)
    with pytest.raises(ValueError, match="provider_headers must be one of"):
        DemoConfig(provider_headers="google")
    with pytest.raises(ValueError, match="provider_headers needs"):
        DemoConfig(provider_headers="openai", algorithm="fixed_window")


def test_command_line_refuses_a_margin_that_leaves_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--rpm", "60", "--window", "1", "--no-png"]) == 2
    assert "leaves no room" in capsys.readouterr().err


def test_without_matplotlib_the_demo_says_how_to_get_the_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    png = tmp_path / "timeline.png"
    argv = ["demo", "--calls", "10", "--no-progress", "--png", str(png), "--window", "2"]
    argv += ["--rpm", "6000", "--tpm", "270000", "--max-prompt", "200", "--max-tokens", "50"]
    argv += ["--concurrency", "2", "--latency", "1,2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pip install 'aiolimits[demo]'" in out
    assert not png.exists()
