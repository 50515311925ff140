"""The code in the README and the guides runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_readme_example_defines_a_working_limitset_and_caller() -> None:
    (block,) = python_blocks(ROOT / "README.md")
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    limits = namespace["limits"]
    anyio.run(namespace["ask"], "hello " * 100)
    stats = limits.get_stats()
    assert stats["granted"] == 1
    assert stats["refunded"] > 0  # the reservation above the 873 tokens used came back


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_testing_guide_examples_pass(backend: str) -> None:
    namespace: dict[str, Any] = {}
    for block in python_blocks(ROOT / "docs" / "testing.md"):
        exec(compile(block, "docs/testing.md", "exec"), namespace)
    namespace["test_second_request_must_wait_half_a_second"]()
    anyio.run(namespace["test_waiter_is_granted_when_the_clock_reaches_its_time"], backend=backend)


def test_process_backend_guide_example_attaches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "aiolimits._backends.process.runtime_directory", lambda: tmp_path / "aiolimits"
    )
    (block,) = python_blocks(ROOT / "docs" / "process-backend.md")
    first: dict[str, Any] = {}
    second: dict[str, Any] = {}
    exec(compile(block, "docs/process-backend.md", "exec"), first)
    exec(compile(block, "docs/process-backend.md", "exec"), second)  # another "worker"
    with first["limits"].try_acquire({"tokens": 1000}) as acq:
        assert acq.successful
        stats = second["limits"].get_stats()
    assert stats["limits"]["connections"]["in_use"] == 1
    assert stats["limits"]["tokens"]["available"] < 90_000
    assert (tmp_path / "aiolimits" / "myapp" / "openai.limits").exists()
