"""Shared fixtures: every async test runs on asyncio, asyncio + uvloop and trio."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import settings

# The contract suite's asserts live outside test modules, where every backend's test module
# imports them: have pytest rewrite them, so a failure shows its values.
pytest.register_assert_rewrite("tests.contract")

# Property tests: 1,000 examples per property unless a test sets its own; no per-example deadline
# (the machine is shared and noisy, and hypothesis deadlines are wall-clock assertions).
settings.register_profile("default", max_examples=1000, deadline=None)
settings.register_profile("quick", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]
if sys.platform == "win32":  # uvloop does not exist there
    del _BACKENDS[1]


@pytest.fixture(params=_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    backend: tuple[str, dict[str, object]] = request.param
    return backend
