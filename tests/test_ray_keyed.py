"""A KeyedLimitSet on the Ray backend: each client key's state and FIFO queue live in the limits
actor, made on first use and dropped once fresh, as in memory (semantics §8); a keyed set
pickled into Ray tasks attaches to the same keys."""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Any

import anyio
import pytest

from aiolimits import CallLimit, KeyedLimitSet, ResourceLimit

from ._ray_cluster import ray_cluster

__all__ = ["ray_cluster"]  # the session fixture

pytestmark = pytest.mark.usefixtures("ray_cluster")

ACTOR = "aiolimits-tests-keyed"


def _backend(**kwargs: Any) -> Any:
    from aiolimits.ray import RayBackend

    return RayBackend(ACTOR, **kwargs)


def _name() -> str:
    return uuid.uuid4().hex


def _remote(fn: Any) -> Any:
    import ray

    return ray.remote(num_cpus=0)(fn)


def _keys(ray: Any, name: str) -> dict[str, int]:
    """What the actor holds for the keyed set ``name``."""
    return dict(ray.get(_backend().actor().keys.remote(name), timeout=60))


def test_each_key_has_its_own_exact_limits() -> None:
    keyed = KeyedLimitSet([CallLimit(3600, 3)], backend=_backend(), name=_name())
    for key in ("a", "b"):
        taken = [keyed.try_acquire(key).successful for _ in range(4)]
        assert taken == [True, True, True, False]
    assert keyed.get_stats("a")["limits"]["call_count"]["available"] == pytest.approx(0, abs=0.01)
    assert keyed.get_stats("c")["limits"]["call_count"]["available"] == pytest.approx(3, abs=0.01)


@pytest.mark.anyio
async def test_the_guide_example_limits_each_user() -> None:
    import re

    here = await anyio.Path(__file__).resolve()
    text = await (here.parent.parent / "docs" / "ray.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[1]
    block = block.replace('name="per-user"', f'name="{_name()}"')
    block = block.replace("RayBackend()", f"RayBackend({ACTOR!r})")
    namespace: dict[str, Any] = {}
    exec(compile(block, "docs/ray.md", "exec"), namespace)
    for user in ("ann", "bob", "ann"):
        await namespace["handle"](user)
    per_user = namespace["per_user"]
    assert (per_user.get_stats("ann")["granted"], per_user.get_stats("bob")["granted"]) == (2, 1)


def test_a_keyed_set_of_other_limits_or_max_keys_is_refused() -> None:
    name = _name()
    KeyedLimitSet([CallLimit(60, 3)], backend=_backend(), name=name, max_keys=10)
    with pytest.raises(ValueError, match="other limits"):
        KeyedLimitSet([CallLimit(60, 4)], backend=_backend(), name=name, max_keys=10)
    with pytest.raises(ValueError, match="max_keys"):
        KeyedLimitSet([CallLimit(60, 3)], backend=_backend(), name=name, max_keys=11)
    with pytest.raises(ValueError, match="name"):
        KeyedLimitSet([CallLimit(60, 3)], backend=_backend())


@pytest.mark.anyio
async def test_change_limit_reaches_every_key_as_in_memory() -> None:
    from .contract._support import eventually

    limits = [CallLimit(3600, 3)]
    ray_keyed = KeyedLimitSet(limits, backend=_backend(), name=_name())
    memory = KeyedLimitSet(limits)
    for keyed in (ray_keyed, memory):
        assert [keyed.try_acquire("a").successful for _ in range(3)] == [True] * 3
        keyed.change_limit("call_count", capacity=5)
    expected = memory.get_stats("a")["limits"]["call_count"]["available"]
    assert expected == pytest.approx(2, abs=0.01)

    def changed() -> bool:  # handed off: the actor applies it soon
        available = ray_keyed.get_stats("a")["limits"]["call_count"]["available"]
        return bool(available == pytest.approx(expected, abs=0.01))

    await eventually(changed, within=30)
    for keyed in (ray_keyed, memory):
        assert [keyed.try_acquire("a").successful for _ in range(3)] == [True, True, False]
        assert [keyed.try_acquire("b").successful for _ in range(6)] == [True] * 5 + [False]
    with pytest.raises(ValueError, match="capacity"):
        ray_keyed.change_limit("call_count", capacity=-1)
    with pytest.raises(ValueError, match="not a limit"):
        ray_keyed.change_limit("tokens", capacity=1)


def _waiting_is(keyed: KeyedLimitSet, key: str, n: int) -> bool:
    return bool(keyed.get_stats(key)["waiting"] == n)


@pytest.mark.anyio
async def test_waiters_of_a_key_are_granted_in_arrival_order_and_other_keys_pass() -> None:
    from .contract._support import eventually

    keyed = KeyedLimitSet([ResourceLimit("conn", 1)], backend=_backend(), name=_name())
    holder = keyed.try_acquire("a")
    assert holder.successful
    order: list[int] = []

    async def wait(i: int) -> None:
        async with keyed.acquire("a", timeout=60):
            order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(wait, i)
            await eventually(partial(_waiting_is, keyed, "a", i + 1), within=60)
        # Key "a" is full, with a queue: key "b" is another client, admitted at once.
        with keyed.try_acquire("b") as other:
            assert other.successful
        holder.release()
    assert order == [0, 1, 2, 3]
    assert keyed.get_stats("a")["granted"] == 5


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_its_keys_queue_holding_nothing() -> None:
    keyed = KeyedLimitSet([ResourceLimit("conn", 1)], backend=_backend(), name=_name())
    holder = keyed.try_acquire("a")
    with anyio.move_on_after(0.2):
        async with keyed.acquire("a"):
            pytest.fail("admitted while the key's resource is full")
    holder.release()
    # Had the cancelled request stayed queued (or been granted), this would wait or fail.
    async with keyed.acquire("a", timeout=10) as acq:
        assert acq.successful
    stats = keyed.get_stats("a")
    assert (stats["cancelled"], stats["waiting"], stats["granted"]) == (1, 0, 2)


def test_fresh_keys_are_dropped_and_max_keys_bounds_the_rest(ray_cluster: Any) -> None:
    name = _name()
    keyed = KeyedLimitSet([ResourceLimit("conn", 1)], backend=_backend(), name=name)
    for i in range(20):
        with keyed.acquire_sync(f"k{i}", timeout=60):
            pass
        keyed.get_stats(f"k{i}")  # a question: the release went before it
    held = _keys(ray_cluster, name)
    # Each released key is fresh: new keys drop them as they come (a few at a time).
    assert held["dropped"] > 0
    assert held["keys"] < 20
    assert held["forgotten"] == 0

    name = _name()
    bounded = KeyedLimitSet([CallLimit(3600, 1)], backend=_backend(), name=name, max_keys=2)
    for i in range(5):
        with bounded.try_acquire(f"k{i}") as acq:
            assert acq.successful
        bounded.get_stats(f"k{i}")
    held = _keys(ray_cluster, name)
    assert held["keys"] == 2
    assert held["forgotten"] == 3  # used, not fresh: their clients start again from full
    # Asking about a key creates none.
    assert bounded.get_stats("never")["limits"]["call_count"]["available"] == pytest.approx(1)
    assert _keys(ray_cluster, name)["keys"] == 2


def test_a_key_with_waiters_or_slots_held_is_never_dropped(ray_cluster: Any) -> None:
    name = _name()
    keyed = KeyedLimitSet([ResourceLimit("conn", 1)], backend=_backend(), name=name, max_keys=1)
    holders = [keyed.try_acquire(f"k{i}") for i in range(3)]
    assert all(h.successful for h in holders)
    assert _keys(ray_cluster, name)["keys"] == 3  # over the bound: each holds its slot
    assert not keyed.try_acquire("k0").successful
    for holder in holders:
        holder.release()
    with keyed.acquire_sync("k0", timeout=60) as acq:
        assert acq.successful


def _hold_forever(keyed: KeyedLimitSet, ready: Any) -> None:
    """In a Ray task: take key "a"'s slot, say so, never release it (the test kills the task)."""
    import ray

    acq = keyed.acquire_sync("a", timeout=60)
    ray.get(ready.set.remote())
    del acq
    time.sleep(3600)


class _Flag:
    def __init__(self) -> None:
        self.flag = False

    def set(self) -> None:
        self.flag = True

    def get(self) -> bool:
        return self.flag


def test_a_killed_tasks_key_slot_comes_back_after_its_lease(ray_cluster: Any) -> None:
    keyed = KeyedLimitSet(
        [ResourceLimit("conn", 1)], backend=_backend(lease_seconds=1.0), name=_name()
    )
    ready = ray_cluster.remote(num_cpus=0)(_Flag).remote()
    ref = _remote(_hold_forever).remote(keyed, ready)
    deadline = time.monotonic() + 60
    while not ray_cluster.get(ready.get.remote()):
        assert time.monotonic() < deadline, "the task never took the slot"
        time.sleep(0.05)
    assert not keyed.try_acquire("a").successful  # held by the task, which renews its lease
    with keyed.try_acquire("b") as other:
        assert other.successful
    ray_cluster.cancel(ref, force=True)
    # Within one lease (plus a sweep) of the task's death, the slot is free again.
    with keyed.acquire_sync("a", timeout=30) as acq:
        assert acq.successful
    ray_cluster.kill(ready)


def _hammer(keyed: KeyedLimitSet, rounds: int) -> list[tuple[str, float, float]]:
    """In a Ray task: acquire keys "a" and "b" in turn; (key, granted, released) on the
    machine's monotonic clock, taken inside the held block."""
    out = []
    for i in range(rounds):
        key = "ab"[i % 2]
        with keyed.acquire_sync(key, timeout=60):
            got = time.monotonic()
            time.sleep(0.01)
            out.append((key, got, time.monotonic()))
    return out


def test_a_keyed_set_pickled_into_ray_tasks_never_exceeds_a_keys_limit(ray_cluster: Any) -> None:
    slots = 1
    keyed = KeyedLimitSet([ResourceLimit("conn", slots)], backend=_backend(), name=_name())
    logs = ray_cluster.get([_remote(_hammer).remote(keyed, 6) for _ in range(3)], timeout=120)
    spans = [span for log in logs for span in log]
    assert len(spans) == 18
    for key in "ab":
        mine = [(got, left) for k, got, left in spans if k == key]
        ends = [(got, 1) for got, _ in mine] + [(left, -1) for _, left in mine]
        held = 0
        for _t, step in sorted(ends):
            held += step
            assert held <= slots
        # (Not the key's "granted": a key fresh between two grants is dropped, and counts anew.)
        assert len(mine) == 9


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The acquisitions each call to the actor made by a keyed set's proxies carries."""
    from aiolimits.ray import _scheduler

    calls: list[int] = []
    go = _scheduler.KeyMux._go
    send = _scheduler.RayScheduler._send

    def joined(self: Any, entries: list[Any]) -> None:
        calls.append(sum(m[0] == "acquire" for _, messages, _ in entries for m in messages))
        go(self, entries)

    def alone(self: Any, messages: list[Any], answers: list[Any], *, wait: bool) -> None:
        if wait:  # sent by the proxy itself; the others go through the mux
            calls.append(sum(message[0] == "acquire" for message in messages))
        send(self, messages, answers, wait=wait)

    monkeypatch.setattr(_scheduler.KeyMux, "_go", joined)
    monkeypatch.setattr(_scheduler.RayScheduler, "_send", alone)
    return calls


@pytest.mark.anyio
async def test_concurrent_acquisitions_of_a_key_share_round_trips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_calls(monkeypatch)
    keyed = KeyedLimitSet([ResourceLimit("conn", 50)], backend=_backend(), name=_name())
    held = 0
    all_held = anyio.Event()

    async def hold() -> None:
        nonlocal held
        async with keyed.acquire("a", timeout=60):
            held += 1
            if held == 50:
                all_held.set()
            await all_held.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(hold)
    assert sum(calls) == 50
    # Each acquisition alone would be 50 calls; those of one loop iteration go together.
    assert len([n for n in calls if n]) < 25
    assert keyed.get_stats("a")["granted"] == 50


@pytest.mark.anyio
async def test_acquisitions_of_many_keys_share_round_trips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_calls(monkeypatch)
    keyed = KeyedLimitSet([ResourceLimit("conn", 1)], backend=_backend(), name=_name())
    held = 0
    all_held = anyio.Event()

    async def hold(key: str) -> None:
        nonlocal held
        async with keyed.acquire(key, timeout=60):
            held += 1
            if held == 50:
                all_held.set()
            await all_held.wait()

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(hold, f"k{i}")
    # 50 keys, each its own first acquisition: one call each alone; joined, far fewer.
    assert sum(calls) == 50
    assert len([n for n in calls if n]) < 25
    assert all(keyed.get_stats(f"k{i}")["granted"] == 1 for i in range(50))
