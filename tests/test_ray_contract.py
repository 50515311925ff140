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


_NO_TIMER_SLACK = (
    "timer_slack is not forwarded to the limits actor yet: its set wakes each head at its exact "
    "time, which the slack tests tell apart (never early either way)"
)


class TestRayBackend(LimitSetContract):
    """Every contract test, on RayBackend."""

    release_hands_off = True  # a release is handed to Ray and returns (semantics §7)

    @pytest.fixture(autouse=True)
    def _timer_slack_not_forwarded(self, request: pytest.FixtureRequest) -> None:
        name = request.node.name
        if name.startswith(
            (
                "test_timer_slack_keeps_a_large_request_in_its_turn",
                "test_timer_slack_never_delays_a_grant_a_release_or_an_arrival_makes",
                "test_timer_slack_never_carries_a_wake_up_past_the_waiters_deadline",
            )
        ) or (name.startswith("test_timer_slack_grants_nearby") and name.endswith("-0.25]")):
            request.applymarker(pytest.mark.xfail(reason=_NO_TIMER_SLACK, strict=True))
