"""RayBackend on a local Ray cluster: what the contract suite cannot show from one process.

Ray tasks (other processes) share one set through the limits actor: no limit is ever exceeded
(checked from a log of grant times), the queue is FIFO across tasks, a set pickled into a task
attaches to the same state; and the backend's own arguments and failure policies.
"""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Any

import anyio
import pytest

from aiolimits import BackendUnavailable, CallLimit, LimitSet, RateLimit, ResourceLimit
from aiolimits.testing import ManualClock

from ._ray_cluster import ray_cluster

__all__ = ["ray_cluster"]  # the session fixture

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _backend(**kwargs: Any) -> Any:
    from aiolimits.ray import RayBackend

    return RayBackend("aiolimits-tests", **kwargs)


def _name() -> str:
    return uuid.uuid4().hex


def _remote(fn: Any) -> Any:
    import ray

    return ray.remote(num_cpus=0)(fn)


def _hammer(limits: LimitSet, rounds: int) -> list[tuple[float, float]]:
    """In a Ray task: acquire ``rounds`` times; (granted, released) on the machine's monotonic
    clock, taken inside the held block, so each interval lies within the actor's."""
    out = []
    for _ in range(rounds):
        with limits.acquire_sync(timeout=60):
            got = time.monotonic()
            time.sleep(0.01)
            out.append((got, time.monotonic()))
    return out


def test_eight_ray_tasks_never_exceed_any_limit(ray_cluster: Any) -> None:
    rate, slots = 20, 2
    limits = LimitSet(
        [CallLimit(1, rate), ResourceLimit("conn", slots)], backend=_backend(), name=_name()
    )
    hammer = _remote(_hammer)
    logs = ray_cluster.get([hammer.remote(limits, 6) for _ in range(8)], timeout=120)
    spans = sorted(span for log in logs for span in log)
    assert len(spans) == 48
    # The resource: never more than `slots` holders at once.
    events = sorted([(t, 1) for t, _ in spans] + [(t, -1) for _, t in spans], key=lambda e: e)
    held = 0
    for _t, step in events:
        held += step
        assert held <= slots
    # The token bucket (burst `rate`, `rate` per second): in any interval of length d, at most
    # rate + rate·d grants; 0.25 s of slack for the delay between a grant and its log entry
    # (with no rate limit at all the 48 grants would come within about half a second, far more).
    grants = [t for t, _ in spans]
    for i, start in enumerate(grants):
        for j in range(i, len(grants)):
            d = grants[j] - start
            assert j - i + 1 <= rate + rate * (d + 0.25)
    assert limits.get_stats()["granted"] == 48


def _waiting_is(limits: LimitSet, n: int) -> bool:
    return bool(limits.get_stats()["waiting"] == n)


def _queue_then_take(limits: LimitSet) -> float:
    with limits.acquire_sync(timeout=60):
        return time.monotonic()


@pytest.mark.anyio
async def test_ray_tasks_are_granted_in_arrival_order(ray_cluster: Any) -> None:
    from .contract._support import eventually

    limits = LimitSet([ResourceLimit("conn", 1)], backend=_backend(), name=_name())
    holder = limits.try_acquire()
    assert holder.successful
    task = _remote(_queue_then_take)
    refs = []
    for i in range(4):
        refs.append(task.remote(limits))
        await eventually(partial(_waiting_is, limits, i + 1), within=60)
    holder.release()
    times = await anyio.to_thread.run_sync(lambda: ray_cluster.get(refs, timeout=60))
    assert times == sorted(times)
    assert limits.get_stats()["granted"] == 5


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_actors_queue_holding_nothing() -> None:
    limits = LimitSet([ResourceLimit("conn", 1)], backend=_backend(), name=_name())
    holder = limits.try_acquire()
    with anyio.move_on_after(0.2):
        async with limits.acquire():
            pytest.fail("admitted while the resource is full")
    holder.release()
    # Had the cancelled request stayed queued (or been granted), this would wait or fail.
    async with limits.acquire(timeout=10) as acq:
        assert acq.successful
    stats = limits.get_stats()
    assert (stats["cancelled"], stats["waiting"], stats["granted"]) == (1, 0, 2)


def _attach(limits: LimitSet) -> dict[str, Any]:
    with limits.acquire_sync({"tokens": 3}):
        pass
    return limits.get_stats()


def test_a_set_pickled_into_a_task_shares_the_state(ray_cluster: Any) -> None:
    limits = LimitSet([RateLimit("tokens", 60, 10)], backend=_backend(), name=_name())
    stats = ray_cluster.get(_remote(_attach).remote(limits), timeout=60)
    assert stats["granted"] == 1
    assert limits.get_stats()["limits"]["tokens"]["available"] == pytest.approx(7, abs=0.01)


def test_attaching_with_other_limits_says_what_differs() -> None:
    name = _name()
    LimitSet([CallLimit(60, 5)], backend=_backend(), name=name)
    with pytest.raises(ValueError, match="other limits"):
        LimitSet([CallLimit(60, 6)], backend=_backend(), name=name)


def test_bad_arguments_are_refused() -> None:
    from aiolimits.ray import RayBackend

    with pytest.raises(ValueError, match="name is required"):
        LimitSet([CallLimit(60, 5)], backend=_backend())
    with pytest.raises(ValueError, match=r"clock must be time\.monotonic"):
        LimitSet([CallLimit(60, 5)], backend=_backend(), name=_name(), clock=time.perf_counter)
    with pytest.raises(ValueError, match="on_unavailable"):
        RayBackend(on_unavailable="local")
    with pytest.raises(ValueError, match="timeout"):
        RayBackend(timeout=float("nan"))
    with pytest.raises(TypeError, match="timeout"):
        RayBackend(timeout="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="actor_name"):
        RayBackend("")


def test_a_manual_clock_drives_the_actors_decisions() -> None:
    clock = ManualClock()
    limits = LimitSet([RateLimit("tokens", 10, 10)], backend=_backend(), name=_name(), clock=clock)
    assert limits.try_acquire({"tokens": 10}).successful
    assert limits.retry_after({"tokens": 5}) == pytest.approx(5.0)
    clock.advance(5)
    assert limits.try_acquire({"tokens": 5}).successful


def _kill(ray: Any, actor_name: str) -> None:
    """Kill the limits actor, and return once it is dead (``ray.kill`` only asks for it)."""
    actor = ray.get_actor(actor_name)
    ray.kill(actor)
    for _ in range(1000):  # each a round trip: calls made before the death sank in succeed
        try:
            ray.get(actor.ping.remote(), timeout=30)
        except ray.exceptions.RayActorError:  # noqa: PERF203 - the loop ends there
            return
    pytest.fail(f"the actor {actor_name!r} still answers after ray.kill")


def test_a_dead_actor_raises_backend_unavailable_or_admits_as_configured(
    ray_cluster: Any,
) -> None:
    from aiolimits.ray import RayBackend

    actor_name = f"doomed-{_name()}"
    strict = LimitSet(
        [ResourceLimit("conn", 1)], backend=RayBackend(actor_name, timeout=5), name="x"
    )
    lenient = LimitSet(
        [ResourceLimit("conn", 1)],
        backend=RayBackend(actor_name, timeout=5, on_unavailable="allow"),
        name="x",
    )
    assert strict.try_acquire().successful
    _kill(ray_cluster, actor_name)
    with pytest.raises(BackendUnavailable):
        strict.try_acquire()
    with lenient.try_acquire() as acq:  # fail open: admitted, and nothing to release
        assert acq.successful


@pytest.mark.anyio
async def test_the_guide_example_runs_in_a_ray_task(ray_cluster: Any) -> None:
    import re

    from .contract._support import eventually

    here = await anyio.Path(__file__).resolve()
    text = await (here.parent.parent / "docs" / "ray.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[0]
    block = block.replace('name="openai"', f'name="{_name()}"')
    namespace: dict[str, Any] = {}
    exec(compile(block, "docs/ray.md", "exec"), namespace)
    limits = namespace["limits"]
    ref = namespace["summarize"].remote(limits, "x" * 400)
    used = await anyio.to_thread.run_sync(lambda: ray_cluster.get(ref, timeout=60))
    assert used == 200
    assert limits.get_stats()["granted"] == 1
    # The task's release was handed off as it left the block (semantics §7): it lands soon.
    await eventually(lambda: limits.get_stats()["limits"]["connections"]["in_use"] == 0)


def _hold_forever(limits: LimitSet, ready: Any) -> None:
    """In a Ray task: take the slot, say so, and never release it (the test kills the task)."""
    import ray

    acq = limits.acquire_sync(timeout=60)
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


def test_a_killed_tasks_slot_comes_back_after_its_lease(ray_cluster: Any) -> None:
    limits = LimitSet([ResourceLimit("conn", 1)], backend=_backend(lease_seconds=1.0), name=_name())
    ready = ray_cluster.remote(num_cpus=0)(_Flag).remote()
    ref = _remote(_hold_forever).remote(limits, ready)
    deadline = time.monotonic() + 60
    while not ray_cluster.get(ready.get.remote()):
        assert time.monotonic() < deadline, "the task never took the slot"
        time.sleep(0.05)
    assert not limits.try_acquire().successful  # held by the task, which renews its lease
    ray_cluster.cancel(ref, force=True)
    # Within one lease (plus a sweep) of the task's death, the slot is free again.
    with limits.acquire_sync(timeout=30) as acq:
        assert acq.successful
    ray_cluster.kill(ready)


def test_a_live_holder_keeps_its_slot_past_many_leases() -> None:
    limits = LimitSet([ResourceLimit("conn", 1)], backend=_backend(lease_seconds=0.3), name=_name())
    with limits.acquire_sync():
        time.sleep(1.5)  # five leases: only renewals keep it
        assert not limits.try_acquire().successful
    with limits.acquire_sync(timeout=10):
        pass


def _pool_in_task(pool: Any) -> list[str]:
    configs = []
    for _ in range(2):
        with pool.acquire_sync(timeout=60) as acq:
            configs.append(acq.config["account"])
    return configs


def test_a_pool_of_ray_sets_pickled_into_a_task_shares_their_state(ray_cluster: Any) -> None:
    from aiolimits import LimitPool

    sets = [
        LimitSet(
            [ResourceLimit("conn", 1)],
            backend=_backend(),
            name=_name(),
            config={"account": account},
        )
        for account in ("a", "b")
    ]
    held = sets[0].try_acquire()  # the driver holds account a's only slot
    assert held.successful
    # LeastWait asks every set (in the actor) and picks the one that admits soonest.
    pool = LimitPool(sets, load_balancing="least_wait")
    configs = ray_cluster.get(_remote(_pool_in_task).remote(pool), timeout=60)
    assert configs == ["b", "b"]
    assert sets[1].get_stats()["granted"] == 2
    held.release()


def test_a_restarted_actor_admits_nobody_for_the_longest_window(ray_cluster: Any) -> None:
    from aiolimits.ray import RayBackend

    actor_name = f"phoenix-{_name()}"
    limits = (CallLimit(3600, 5), ResourceLimit("conn", 2))
    backend = RayBackend(actor_name, timeout=30, actor_options={"max_restarts": 1})
    before = LimitSet(limits, backend=backend, name="x")
    assert before.try_acquire().successful
    actor = ray_cluster.get_actor(actor_name)
    ray_cluster.kill(actor, no_restart=False)
    for _ in range(1000):  # each a round trip (Ray holds calls while it restarts the actor)
        try:
            if ray_cluster.get(actor.ping.remote(), timeout=60):
                break
        except ray_cluster.exceptions.ActorUnavailableError:
            continue
    # A set attached after the restart: the calls granted before it are lost, and could all
    # still count in the provider's window, so the new actor admits nobody for that window.
    after = LimitSet(limits, backend=RayBackend(actor_name, timeout=30), name="x")
    assert not after.try_acquire().successful
    assert after.retry_after() == pytest.approx(3600, abs=60)
    # The set attached before now shares the new actor's state (same name): refused too.
    assert not before.try_acquire().successful
    ray_cluster.kill(ray_cluster.get_actor(actor_name))


@pytest.mark.anyio
async def test_concurrent_acquisitions_of_a_process_share_round_trips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiolimits.ray import _scheduler

    calls: list[int] = []
    send = _scheduler.RayScheduler._send

    def counted(self: Any, messages: list[Any], answers: list[Any], *, wait: bool) -> None:
        calls.append(sum(message[0] == "acquire" for message in messages))
        send(self, messages, answers, wait=wait)

    monkeypatch.setattr(_scheduler.RayScheduler, "_send", counted)
    limits = LimitSet([ResourceLimit("conn", 50)], backend=_backend(), name=_name())
    held = 0
    all_held = anyio.Event()

    async def hold() -> None:
        nonlocal held
        async with limits.acquire(timeout=60):
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
    assert limits.get_stats()["granted"] == 50
