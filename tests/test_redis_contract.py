"""The LimitSet contract (``tests/contract/``) run against RedisBackend on a real redis-server.

Every LimitSet gets its own ``name``, so tests share one server. Under a
:class:`~aiolimits.testing.ManualClock` the script takes its time from that clock (time
injected; the code path is production's, so ``settle`` also waits for each set's background
work); the real-clock tests run on Redis server time. They run twice: with the script as
a function (FCALL), and as an EVAL script, as on a server without functions.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from aiolimits import LimitSet

from ._redis_server import RedisServer, redis_server
from .contract import LimitSetContract, MakeLimitSet, limitset_factory
from .contract._support import BACKGROUND, background_work

__all__ = ["redis_server"]  # the session fixture

#: semantics §4 queue-aware timeouts: not yet on Redis (see QueueTimeoutContract).
_NO_QUEUE_FORECAST = (
    "the Lua script decides on the state in Redis and does not forecast the queue ahead "
    "(RedisScheduler.forecasts_queue = False): a request behind others fails at its deadline"
)


def watched(make: MakeLimitSet) -> MakeLimitSet:
    """``make``, each set's background work (the dispatcher thread, a task's round trip)
    waited for by ``settle``: the production path, on an injected clock."""

    def made(*args: Any, **kwargs: Any) -> LimitSet:
        limits = make(*args, **kwargs)
        BACKGROUND.append(limits._scheduler.quiet)  # type: ignore[attr-defined]
        return limits

    return made


@pytest.fixture
def make_limitset(redis_server: RedisServer) -> Iterator[MakeLimitSet]:
    from aiolimits.redis import RedisBackend

    backend = RedisBackend(redis_server.url, prefix="contract")
    with background_work():
        yield watched(limitset_factory(backend, lambda: uuid.uuid4().hex))


class RedisContract(LimitSetContract):
    """The contract, with what a task observes of a release on a shared backend: it is handed
    to the backend's dispatcher thread (no round trip on the event loop), so the next waiter is
    granted one round trip later rather than before the releasing task next blocks."""

    release_hands_off = True
    decides_off_the_task = True

    @pytest.fixture(autouse=True)
    def _slack_turn_not_on_the_grid(self, request: pytest.FixtureRequest) -> None:
        # Seen in CI (Cluster, uvloop): the large request granted at 0.625, its exact time, where
        # the test expects the slack's wake-up at 0.75: a round of the dispatcher thread started
        # by another event granted the due head then. Never early, order kept, but off the grid
        # this test checks exactly. Not strict: most runs land on the grid.
        if request.node.name.startswith("test_timer_slack_keeps_a_large_request_in_its_turn"):
            reason = "Redis: the dispatcher may grant a due head before its slack wake-up"
            request.applymarker(pytest.mark.xfail(reason=reason, strict=False))


class TestRedisBackend(RedisContract):
    """Every contract test, on RedisBackend."""

    queue_forecast_missing = _NO_QUEUE_FORECAST


class TestRedisBackendWithoutFunctions(RedisContract):
    """Every contract test, with the script sent as EVALSHA (a server without functions)."""

    queue_forecast_missing = _NO_QUEUE_FORECAST

    @pytest.fixture
    def make_limitset(self, redis_server: RedisServer) -> Iterator[MakeLimitSet]:
        from aiolimits.redis import RedisBackend

        backend = RedisBackend(redis_server.url, prefix="contract-eval")
        backend._lua.functions = False  # what a server without FCALL leads to
        with background_work():
            yield watched(limitset_factory(backend, lambda: uuid.uuid4().hex))
