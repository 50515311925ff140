"""Following a provider whose real limits are not the declared ones, against a provider on
127.0.0.1 that enforces its own token buckets (``aiolimits/_demo/provider.py``'s ``Bucket``, not
aiolimits' algorithms), on asyncio and trio.

The checks are counts and shares of the provider's own accounting and of the client's attempts,
never durations. The bounds are looser than the figures ``benchmarks/adaptive.py`` prints (see
docs/httpx.md), so a loaded machine does not fail them; each still fails when the client does
not follow (the last test shows the same runs without ``adapt``).
"""

from __future__ import annotations

import functools

import anyio
import pytest

from aiolimits._demo.follow import TOKENS_PER_WINDOW, FollowOutcome, follow

BACKENDS = ["asyncio", "trio"]


def run(backend: str, **options: object) -> FollowOutcome:
    return anyio.run(functools.partial(follow, **options), backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("headers", ["openai", "anthropic"])
def test_a_headers_at_half_the_declared_limits(backend: str, headers: str) -> None:
    outcome = run(backend, factor=0.5, headers=headers, calls=100)
    assert outcome.rejected_share(after=1) <= 0.01
    assert outcome.used(TOKENS_PER_WINDOW * 0.5) >= 0.75
    # The lower limit was learned from the headers.
    assert {c.key: c.capacity for c in outcome.changes}["tokens"] == TOKENS_PER_WINDOW * 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_b_no_headers_only_429_and_retry_after_at_half(backend: str) -> None:
    outcome = run(backend, factor=0.5, headers="none", calls=100)
    assert outcome.rejected_share(after=1) <= 0.08
    assert outcome.used(TOKENS_PER_WINDOW * 0.5) >= 0.55


@pytest.mark.parametrize("backend", BACKENDS)
def test_c_an_unseen_second_client_on_the_same_key(backend: str) -> None:
    outcome = run(backend, factor=1.0, headers="openai", calls=100, unseen=0.4)
    assert outcome.rejected_share(after=1) <= 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_d_a_pool_key_at_a_quarter_stops_being_refused(backend: str) -> None:
    # With headers the quarter is learned from the first answer on the key.
    outcome = run(backend, factor=0.25, headers="openai", calls=160, pool=True)
    assert outcome.last_rejection("b") <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_d_without_headers_the_refused_key_adapts_and_its_traffic_moves(backend: str) -> None:
    outcome = run(backend, factor=0.25, headers="none", calls=160, pool=True)
    # AIMD keeps probing, so a 429 may still come now and then; most of them stop.
    assert outcome.rejected_share(key="b", after=2) <= 0.15
    assert outcome.sent_after("a", 2) >= 1.3 * outcome.sent_after("b", 2)


def test_without_following_the_same_run_is_refused() -> None:
    # What the bounds above are measured against: the declared limits alone are twice the real.
    half = run("asyncio", factor=0.5, headers="openai", calls=100, adapt=False)
    assert half.rejected_share(after=1) > 0.05
