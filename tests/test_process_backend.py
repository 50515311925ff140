"""The process backend: the LimitSet contract, then what only several processes can show.

Multi-process tests use ``multiprocessing`` with the spawn method: the children import this
module and attach to the same state by location and name, as independent processes would.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from aiolimits import LimitSet, ProcessBackend

from .contract import AnyLimit, LimitSetContract, MakeLimitSet

_names = itertools.count()


@pytest.fixture
def backend(tmp_path: Path) -> ProcessBackend:
    return ProcessBackend(tmp_path)


@pytest.fixture
def make_limitset(backend: ProcessBackend) -> MakeLimitSet:
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
            name=f"set-{next(_names)}",
            clock=time.monotonic if clock is None else clock,
        )

    return make


class TestProcessBackend(LimitSetContract):
    """Every contract test, on ProcessBackend (one process: the shared file is still used)."""
