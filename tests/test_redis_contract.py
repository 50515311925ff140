"""The LimitSet contract (``tests/contract/``) run against RedisBackend on a real redis-server.

Every LimitSet gets its own ``name``, so tests share one server. Under a
:class:`~aiolimits.testing.ManualClock` the script takes its time from that clock (the backend's
test hook); the real-clock tests run on Redis server time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from aiolimits import LimitSet

from ._redis_server import RedisServer, redis_server
from .contract import AnyLimit, LimitSetContract, MakeLimitSet

__all__ = ["redis_server"]  # the session fixture


@pytest.fixture
def make_limitset(redis_server: RedisServer) -> MakeLimitSet:
    from aiolimits.redis import RedisBackend

    backend = RedisBackend(redis_server.url, prefix="contract")

    def make(
        limits: Iterable[AnyLimit] = (),
        *,
        clock: Callable[[], float] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> LimitSet:
        return LimitSet(
            limits,
            config=config,
            backend=backend,
            name=uuid.uuid4().hex,
            clock=time.monotonic if clock is None else clock,
        )

    return make


class TestRedisBackend(LimitSetContract):
    """Every contract test, on RedisBackend."""
