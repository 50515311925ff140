"""The LimitSet contract (``tests/contract/``) run against the default in-process backend.

Async tests run on asyncio, asyncio + uvloop and trio (the ``anyio_backend`` fixture).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from aiolimits import LimitSet, MemoryBackend

from .contract import AnyLimit, LimitSetContract, MakeLimitSet


@pytest.fixture
def make_limitset() -> MakeLimitSet:
    def make(
        limits: Iterable[AnyLimit] = (),
        *,
        clock: Callable[[], float] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> LimitSet:
        return LimitSet(
            limits,
            config=config,
            backend=MemoryBackend(),
            clock=time.monotonic if clock is None else clock,
        )

    return make


class TestMemoryBackend(LimitSetContract):
    """Every contract test, on MemoryBackend."""
