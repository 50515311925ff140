"""The LimitSet contract (``tests/contract/``) run against the default in-process backend.

Async tests run on asyncio, asyncio + uvloop and trio (the ``anyio_backend`` fixture).
"""

from __future__ import annotations

import pytest

from aiolimits import MemoryBackend

from .contract import LimitSetContract, MakeLimitSet, limitset_factory


@pytest.fixture
def make_limitset() -> MakeLimitSet:
    return limitset_factory(MemoryBackend(), lambda: None)


class TestMemoryBackend(LimitSetContract):
    """Every contract test, on MemoryBackend."""
