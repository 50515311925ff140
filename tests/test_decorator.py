"""``limited``: the decorator of LimitSet and LimitPool, for async and plain functions."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

import anyio
import anyio.to_thread
import pytest

from aiolimits import CallLimit, LimitPool, LimitSet, RateLimit, ResourceLimit
from aiolimits.testing import ManualClock
from tests.contract._support import settle

pytestmark = pytest.mark.anyio

Backend = tuple[str, dict[str, object]]


def make_limits(clock: ManualClock | None = None) -> LimitSet:
    """10 tokens per 10 s (one a second) and one connection, on a clock that moves by hand."""
    limits: list[CallLimit | RateLimit | ResourceLimit] = [
        CallLimit(60, 100),
        RateLimit("tokens", 10, 10),
        ResourceLimit("conn", 1),
    ]
    return LimitSet(limits, config={"api_key": "k"}, clock=clock or ManualClock())


def tokens_left(limits: LimitSet) -> float:
    available: float = limits.get_stats()["limits"]["tokens"]["available"]
    return available


def in_use(limits: LimitSet) -> int:
    used: int = limits.get_stats()["limits"]["conn"]["in_use"]
    return used


# -- async functions ---------------------------------------------------------------------------


async def test_async_function_runs_inside_an_acquisition(anyio_backend: Backend) -> None:
    limits = make_limits()
    seen: list[int] = []

    @limits.limited({"tokens": 3})
    async def ask(prompt: str, *, retries: int = 2) -> str:
        """Ask the model."""
        seen.append(in_use(limits))
        await anyio.lowlevel.checkpoint()
        return f"{prompt}:{retries}"

    assert await ask("hi") == "hi:2"
    assert await ask("yo", retries=5) == "yo:5"
    assert seen == [1, 1]  # the slot is held while the function runs
    assert in_use(limits) == 0
    assert tokens_left(limits) == 4
    assert limits.get_stats()["granted"] == 2


async def test_async_function_waits_for_its_turn(anyio_backend: Backend) -> None:
    clock = ManualClock()
    limits = make_limits(clock)
    done: list[float] = []

    @limits.limited({"tokens": 6, "conn": 0})
    async def work() -> None:
        done.append(clock())

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        tg.start_soon(work)  # 4 tokens left: needs 2 more, 2 s at 1 token/s
        await settle()
        assert done == [0.0]
        clock.advance(2.0)
        await settle()
        assert done == [0.0, 2.0]


async def test_cost_computes_requested_from_the_call_arguments(anyio_backend: Backend) -> None:
    limits = make_limits()
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def cost(prompt: str, *, max_tokens: int = 1) -> Mapping[str, int]:
        calls.append(((prompt,), {"max_tokens": max_tokens}))
        return {"tokens": len(prompt) + max_tokens}

    @limits.limited(cost=cost)
    async def complete(prompt: str, *, max_tokens: int = 1) -> int:
        return max_tokens

    assert await complete("abc", max_tokens=4) == 4
    assert calls == [(("abc",), {"max_tokens": 4})]
    assert tokens_left(limits) == 3  # 10 - (3 + 4)
    assert await complete("ab") == 1  # the cost sees only what the caller passed: defaults apply
    assert tokens_left(limits) == 0


async def test_cost_with_a_bad_result_takes_nothing_and_raises(anyio_backend: Backend) -> None:
    limits = make_limits()

    @limits.limited(cost=lambda n: {"tokens": n})
    async def spend(n: int) -> None:
        pytest.fail("ran without an acquisition")

    with pytest.raises(ValueError, match="tokens"):
        await spend(11)  # above capacity
    with pytest.raises(ValueError, match="tokens"):
        await spend(-1)
    assert limits.get_stats()["granted"] == 0
    assert in_use(limits) == 0


async def test_async_exception_propagates_and_releases(anyio_backend: Backend) -> None:
    limits = make_limits()

    @limits.limited({"tokens": 1})
    async def fail() -> None:
        raise LookupError("downstream")

    with pytest.raises(LookupError, match="downstream"):
        await fail()
    assert in_use(limits) == 0
    with pytest.raises(LookupError):
        await fail()  # the one slot came back: it is granted again at once
    assert limits.get_stats()["granted"] == 2


async def test_cancelled_call_releases(anyio_backend: Backend) -> None:
    limits = make_limits()

    @limits.limited({"tokens": 1})
    async def hang() -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.01):
        await hang()
    assert in_use(limits) == 0


# -- plain functions ---------------------------------------------------------------------------


def test_sync_function_runs_inside_an_acquisition() -> None:
    limits = make_limits()

    @limits.limited({"tokens": 2})
    def add(a: int, b: int = 1) -> int:
        assert in_use(limits) == 1
        return a + b

    assert add(1) == 2
    assert add(2, b=3) == 5
    assert in_use(limits) == 0
    assert tokens_left(limits) == 6


def test_sync_function_with_cost() -> None:
    limits = make_limits()

    @limits.limited(cost=lambda items, **_: {"tokens": len(items)})
    def upload(items: list[str], *, bucket: str = "b") -> str:
        return bucket

    assert upload(["a", "b", "c"], bucket="x") == "x"
    assert tokens_left(limits) == 7


def test_sync_exception_propagates_and_releases() -> None:
    limits = make_limits()

    @limits.limited({"tokens": 1})
    def fail() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        fail()
    assert in_use(limits) == 0
    with pytest.raises(KeyError):
        fail()
    assert limits.get_stats()["granted"] == 2


async def test_sync_function_in_a_worker_thread(anyio_backend: Backend) -> None:
    limits = make_limits()

    @limits.limited({"tokens": 1})
    def work(x: int) -> int:
        return x * 2

    assert await anyio.to_thread.run_sync(work, 21) == 42
    with pytest.raises(RuntimeError, match="event loop"):
        work(1)  # on the event loop's thread it would block the loop
    assert limits.get_stats()["granted"] == 1


# -- what the decorator keeps ------------------------------------------------------------------


def test_signature_name_and_doc_are_preserved() -> None:
    limits = make_limits()

    async def original_async(prompt: str, *, max_tokens: int = 100) -> str:
        """Docs."""
        return prompt

    def original_sync(a: int, /, b: str = "x", *args: float, **kw: bool) -> list[int]:
        return [a]

    for original in (original_async, original_sync):
        wrapped = limits.limited({"tokens": 1})(original)
        assert inspect.signature(wrapped) == inspect.signature(original)
        assert wrapped.__name__ == original.__name__
        assert wrapped.__doc__ == original.__doc__
        assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(limits.limited({"tokens": 1})(original_async))
    assert not inspect.iscoroutinefunction(limits.limited({"tokens": 1})(original_sync))


def _typing_is_preserved() -> None:  # pragma: no cover - checked by mypy, never run
    limits = make_limits()

    @limits.limited({"tokens": 1})
    async def a(x: int) -> str:
        return str(x)

    @limits.limited(cost=lambda x: {"tokens": x})
    def s(x: int) -> bytes:
        return b""

    coroutine_fn: Callable[[int], Coroutine[Any, Any, str]] = a
    plain_fn: Callable[[int], bytes] = s
    # With the parameter types lost, these ignores would be unused, an error under mypy --strict.
    a("1").close()  # type: ignore[arg-type]
    s("1")  # type: ignore[arg-type]
    del coroutine_fn, plain_fn


# -- validation at decoration time -------------------------------------------------------------


def test_bad_requested_is_rejected_at_decoration_time() -> None:
    limits = make_limits()
    with pytest.raises(ValueError, match="nope"):
        limits.limited({"nope": 1})
    with pytest.raises(ValueError, match="tokens"):
        limits.limited({"tokens": 11})  # above capacity: could never be admitted
    with pytest.raises(TypeError, match="tokens"):
        limits.limited({"tokens": "1"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="requested=None"):
        limits.limited()  # the set has a plain RateLimit: what would None take?
    assert limits.get_stats()["granted"] == 0


def test_requested_and_cost_are_mutually_exclusive() -> None:
    limits = make_limits()
    with pytest.raises(ValueError, match="not both"):
        limits.limited({"tokens": 1}, cost=lambda: {"tokens": 1})
    with pytest.raises(TypeError, match="cost must be a callable"):
        limits.limited(cost={"tokens": 1})  # type: ignore[arg-type]


def test_requested_is_a_snapshot_taken_when_decorating() -> None:
    limits = make_limits()
    requested = {"tokens": 2}

    @limits.limited(requested)
    def f() -> None:
        pass

    requested["tokens"] = 50  # would be rejected; the decorator keeps what it checked
    f()
    assert tokens_left(limits) == 8


def test_generator_functions_are_refused() -> None:
    limits = LimitSet()

    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> Any:
        yield 1

    for fn in (gen, agen):
        with pytest.raises(TypeError, match="generator"):
            limits.limited()(fn)
    with pytest.raises(TypeError, match="decorates a function"):
        limits.limited()(42)  # type: ignore[call-overload]


def test_empty_set_decorates_with_requested_none() -> None:
    limits = LimitSet()

    @limits.limited()
    def f() -> int:
        return 1

    assert f() == 1
    assert repr(limits.limited()).startswith("<limited requested=None by <LimitSet")


# -- on a pool ---------------------------------------------------------------------------------


async def test_pool_decorator_spreads_calls_over_the_sets(anyio_backend: Backend) -> None:
    clock = ManualClock()
    sets = [
        LimitSet([RateLimit("tokens", 60, 10)], config={"set": i}, clock=clock) for i in range(2)
    ]
    pool = LimitPool(sets)

    @pool.limited({"tokens": 4})
    async def call() -> None:
        pass

    @pool.limited(cost=lambda n: {"tokens": n})
    def sync_call(n: int) -> None:
        pass

    for _ in range(3):
        await call()
    assert [s.get_stats()["limits"]["tokens"]["available"] for s in sets] == [2, 6]
    await anyio.to_thread.run_sync(sync_call, 5)
    assert [s.get_stats()["limits"]["tokens"]["available"] for s in sets] == [2, 1]
    with pytest.raises(ValueError, match="tokens"):
        pool.limited({"tokens": 11})
