"""The LimitSet contract (``tests/contract/``) run against RedisBackend on a real redis-server.

Every LimitSet gets its own ``name``, so tests share one server. Under a
:class:`~aiolimits.testing.ManualClock` the script takes its time from that clock (the backend's
test hook); the real-clock tests run on Redis server time. They run twice: with the script as
a function (FCALL), and as an EVAL script, as on a server without functions.
"""

from __future__ import annotations

import uuid

import pytest

from ._redis_server import RedisServer, redis_server
from .contract import LimitSetContract, MakeLimitSet, limitset_factory

__all__ = ["redis_server"]  # the session fixture

#: SPEC §4 queue-aware timeouts: not yet on Redis (see QueueTimeoutContract).
_NO_QUEUE_FORECAST = (
    "the Lua script decides on the state in Redis and does not forecast the queue ahead "
    "(RedisScheduler.forecasts_queue = False): a request behind others fails at its deadline"
)


@pytest.fixture
def make_limitset(redis_server: RedisServer) -> MakeLimitSet:
    from aiolimits.redis import RedisBackend

    backend = RedisBackend(redis_server.url, prefix="contract")
    return limitset_factory(backend, lambda: uuid.uuid4().hex)


class TestRedisBackend(LimitSetContract):
    """Every contract test, on RedisBackend."""

    queue_forecast_missing = _NO_QUEUE_FORECAST


class TestRedisBackendWithoutFunctions(LimitSetContract):
    """Every contract test, with the script sent as EVALSHA (a server without functions)."""

    queue_forecast_missing = _NO_QUEUE_FORECAST

    @pytest.fixture
    def make_limitset(self, redis_server: RedisServer) -> MakeLimitSet:
        from aiolimits.redis import RedisBackend

        backend = RedisBackend(redis_server.url, prefix="contract-eval")
        backend._lua.functions = False  # what a server without FCALL leads to
        return limitset_factory(backend, lambda: uuid.uuid4().hex)
