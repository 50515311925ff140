from __future__ import annotations

import pytest

from aiolimits import LimitSet, RateLimit

pytestmark = pytest.mark.anyio


async def test_acquire_runs_on_every_backend(anyio_backend: tuple[str, dict[str, object]]) -> None:
    limits = LimitSet([RateLimit("tokens", 1, 10)])
    async with limits.acquire({"tokens": 5}) as acq:
        assert acq.successful
    assert limits.get_stats()["granted"] == 1
