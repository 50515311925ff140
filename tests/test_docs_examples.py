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
    block = python_blocks(ROOT / "docs" / "process-backend.md")[0]
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


def test_keyed_guide_middleware_limits_each_client_and_answers_429() -> None:
    blocks = python_blocks(ROOT / "docs" / "keyed.md")
    middleware = next(b for b in blocks if "class PerClientLimit" in b)
    namespace: dict[str, Any] = {}
    exec(compile(middleware, "docs/keyed.md", "exec"), namespace)
    served: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        served.append(scope["client"][0])

    wrapped = namespace["PerClientLimit"](app)
    answers: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    async def receive() -> dict[str, Any]:  # pragma: no cover - the examples never read
        return {"type": "http.request"}

    async def main() -> None:
        for _ in range(11):  # the burst limit is 10 per second
            await wrapped({"type": "http", "client": ("10.0.0.1", 5000)}, receive, send)
        await wrapped({"type": "http", "client": ("10.0.0.2", 5000)}, receive, send)

    anyio.run(main)
    assert served == ["10.0.0.1"] * 10 + ["10.0.0.2"]  # one client's excess, not another's
    start = answers[0]
    assert start["status"] == 429
    assert dict(start["headers"])[b"retry-after"] == b"1"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_keyed_guide_fan_out_settles_usage_per_tenant(backend: str) -> None:
    blocks = python_blocks(ROOT / "docs" / "keyed.md")
    fan_out = next(b for b in blocks if "per_tenant = KeyedLimitSet" in b)
    namespace: dict[str, Any] = {}

    class Response:
        total_tokens = 700
        text = "ok"

    async def call_provider(prompt: str, *, api_key: str, max_tokens: int) -> Response:
        return Response()

    namespace["call_provider"] = call_provider
    exec(compile(fan_out, "docs/keyed.md", "exec"), namespace)
    per_tenant = namespace["per_tenant"]
    assert anyio.run(namespace["complete"], "key-a", "hello " * 40, backend=backend) == "ok"
    stats = per_tenant.get_stats("key-a")
    assert stats["granted"] == 1
    assert stats["refunded"] == 1060 - 700  # the estimate (240 // 4 + 1000) less the real usage
    namespace["on_rate_limited"]("key-b", 5.0, whole_account=False)
    assert per_tenant.get_stats("key-b")["paused_for"] == pytest.approx(5.0, abs=0.5)
    assert per_tenant.get_stats("key-a")["paused_for"] == 0.0
    namespace["on_rate_limited"]("key-b", 5.0, whole_account=True)
    assert per_tenant.get_keys_stats()["paused_for"] > 4.0
