"""A local Ray cluster for the Ray backend's tests: one per test session, shut down at its end.

Skipped with the reason when ``ray`` is not importable, unless ``AIOLIMITS_REQUIRE_RAY=1``
(``.ci/run`` sets it), where that is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest


def import_ray() -> Any:
    """``ray``, or skip (fail when ``AIOLIMITS_REQUIRE_RAY=1``)."""
    try:
        import ray
    except ImportError as exc:
        if os.environ.get("AIOLIMITS_REQUIRE_RAY") == "1":
            pytest.fail(f"AIOLIMITS_REQUIRE_RAY=1 but ray cannot be imported: {exc}")
        pytest.skip(f"ray is not installed ({exc}); pip install 'aiolimits[ray]'")
    return ray


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """``ray``, initialised once for the session on this machine (2 CPUs, no dashboard)."""
    ray = import_ray()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Each test module that imports this fixture has its own copy of it: the first to run
    # starts Ray, and shuts it down at the end of the session.
    owner = not ray.is_initialized()
    if owner:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            namespace="aiolimits-tests",
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        yield ray
    finally:
        if owner:
            ray.shutdown()
