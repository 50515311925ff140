"""The LimitSet contract (``tests/contract/``) run against RayBackend on a local Ray cluster.

Every LimitSet gets its own ``name`` in one limits actor. Under a
:class:`~aiolimits.testing.ManualClock` the set in the actor runs on a manual clock moved to the
caller's reading on every call (the backend's hook: the same code, injected time).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from ._ray_cluster import ray_cluster
from .contract import LimitSetContract, MakeLimitSet, limitset_factory

__all__ = ["ray_cluster"]  # the session fixture


@pytest.fixture
def make_limitset(ray_cluster: Any) -> MakeLimitSet:
    from aiolimits.ray import RayBackend

    return limitset_factory(RayBackend("aiolimits-contract"), lambda: uuid.uuid4().hex)


class TestRayBackend(LimitSetContract):
    """Every contract test, on RayBackend."""

    release_hands_off = True  # a release is handed to Ray and returns (semantics §7)
