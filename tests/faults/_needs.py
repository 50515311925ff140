"""What a fault test needs from the machine: root, or a tool on PATH.

Like the Redis tests (``tests/_redis_server.py``): a missing need skips the test with the reason,
unless ``AIOLIMITS_REQUIRE_ROOT=1`` (set by ``.ci/run``, which runs as root), where it fails, so CI
cannot pass by skipping the fault tests it exists to run.
"""

from __future__ import annotations

import os
import shutil

import pytest

_REQUIRED = "AIOLIMITS_REQUIRE_ROOT"


def _missing(reason: str) -> None:
    if os.environ.get(_REQUIRED) == "1":
        pytest.fail(f"{reason}, and {_REQUIRED}=1 requires the root fault tests to run")
    pytest.skip(reason)


def require_root() -> None:
    """Skip the calling test unless it runs as root (fail under AIOLIMITS_REQUIRE_ROOT=1)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _missing("this fault test needs root (it mounts a tmpfs, or runs as another user)")


def require_tool(name: str) -> str:
    """The path of command ``name``; skip (fail under AIOLIMITS_REQUIRE_ROOT=1) without it."""
    path = shutil.which(name)
    if path is None:
        _missing(f"this fault test needs {name!r} on PATH")
    assert path is not None
    return path
