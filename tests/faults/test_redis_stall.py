"""RedisBackend against a stopped (SIGSTOP) or killed server: no event loop ever waits for Redis,
every call keeps its own timeout under every policy, the circuit opens and closes (issue #14).

The backend's ``timeout`` here is 2 s, so that a call that waited for Redis on an event loop, or
past its caller's timeout, would show as a gap of 2 s or more; the bounds below (``GAP``,
``LATE``) are far under that and far over a loaded machine's scheduling noise: they detect a
block, they do not time the library.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest

from aiolimits import BackendUnavailable, CallLimit, LimitSet, RateLimit, ResourceLimit

from .._redis_server import RedisServer, own_server, require_redis, wait_reachable

__all__ = ["own_server"]  # the fixture

pytestmark = pytest.mark.filterwarnings("error")

TIMEOUT = 2.0  # the backend's: any wait for Redis shows as >= 2 s
GAP = 1.0  # the longest a ticker on the loop may go unscheduled
LATE = 1.0  # how much later than its own timeout a call may return (the grace is 50 ms)
POLICIES = ["raise", "allow", "local"]


def redis_backend(server: RedisServer, policy: str, **kwargs: Any) -> Any:
    require_redis()
    from aiolimits.redis import RedisBackend

    return RedisBackend(server.url, timeout=TIMEOUT, on_unavailable=policy, **kwargs)


def limits_on(backend: Any) -> LimitSet:
    return LimitSet(
        [CallLimit(3600, 10_000), RateLimit("tokens", 3600, 1_000_000), ResourceLimit("conns", 50)],
        backend=backend,
        name=uuid.uuid4().hex,
    )


@contextmanager
def stopped(server: RedisServer) -> Iterator[None]:
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


class Ticker:
    """A task that sleeps 5 ms at a time on the loop, and records the longest it went without
    running: the loop's longest block."""

    def __init__(self) -> None:
        self.longest = 0.0

    async def run(self) -> None:
        while True:
            before = time.monotonic()
            await anyio.sleep(0.005)
            self.longest = max(self.longest, time.monotonic() - before)


async def lateness(limits: LimitSet, patience: float) -> tuple[Any, float]:
    """``acquire(timeout=patience)``: what it gave (the acquisition, or the error), and how long
    after ``patience`` it came back (negative: before)."""
    start = time.monotonic()
    try:
        outcome: Any = await limits.acquire({"tokens": 1}, timeout=patience).__aenter__()
    except (BackendUnavailable, TimeoutError) as exc:
        outcome = exc
    return outcome, time.monotonic() - start - patience


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.anyio
async def test_no_verb_of_a_task_waits_for_a_stopped_redis_on_the_event_loop(
    own_server: RedisServer, policy: str
) -> None:
    from aiolimits.integrations._common import Gate

    limits = limits_on(redis_backend(own_server, policy))
    gate: Gate[None] = Gate(
        limits, key=None, cost=lambda _: {"tokens": 1}, max_wait=0, headers=True
    )
    held = []
    for _ in range(3):  # held across the stop: updated and released while Redis is stopped
        acq = limits.acquire({"tokens": 100})
        held.append(await acq.__aenter__())
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(0.05)
        with stopped(own_server):
            for acq in held:
                acq.update({"tokens": 10})  # a refund: handed to the dispatcher thread
                async with acq:  # released on leaving: handed off too
                    pass
            limits.pause(0.001)
            for _ in range(3):
                try:
                    async with limits.acquire({"tokens": 1}, timeout=0.3) as acq:
                        acq.update({"tokens": 2})
                except (BackendUnavailable, TimeoutError):
                    assert policy == "raise"
                try:
                    verdict = await gate.enter(None)
                except BackendUnavailable:
                    assert policy == "raise"
                else:
                    assert verdict.admitted
                    await verdict.release()
            await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert ticker.longest < GAP


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.anyio
async def test_every_async_call_keeps_its_timeout_while_redis_is_stopped(
    own_server: RedisServer, policy: str
) -> None:
    limits = limits_on(redis_backend(own_server, policy))
    async with limits.acquire({"tokens": 1}):
        pass
    with stopped(own_server):
        # The first call finds Redis stopped within its own timeout; the later ones, and the
        # five concurrent ones, too (the circuit may be open by then: at once).
        outcomes = [await lateness(limits, 0.1), await lateness(limits, 0)]
        results: list[Any] = []

        async def one() -> None:
            results.append(await lateness(limits, 0.8))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(one)
        outcomes += results
    for outcome, late in outcomes:
        assert late < LATE, (outcome, late)
        if policy == "raise":
            assert isinstance(outcome, (BackendUnavailable, TimeoutError)), outcome
        else:  # fail open, or the fresh in-process limits admit
            assert not isinstance(outcome, BaseException), outcome
            outcome.release()


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_every_sync_call_keeps_its_timeout_and_the_circuit_answers_at_once(
    own_server: RedisServer, policy: str
) -> None:
    backend = redis_backend(own_server, policy)
    limits = limits_on(backend)
    assert limits.try_acquire({"tokens": 1}).successful
    with stopped(own_server):
        start = time.monotonic()
        try:
            with limits.acquire_sync({"tokens": 1}, timeout=0.1) as acq:
                assert policy != "raise"
                assert acq.successful
        except (BackendUnavailable, TimeoutError):
            assert policy == "raise"
        assert time.monotonic() - start < 0.1 + LATE
        # Nobody waited for the backend's timeout, so nobody learnt that Redis is gone: a call
        # without a timeout of its own does (one backend timeout), then every call answers at
        # once until the probe finds Redis back.
        start = time.monotonic()
        try:
            limits.try_acquire({"tokens": 1})
        except BackendUnavailable:
            assert policy == "raise"
        assert time.monotonic() - start < TIMEOUT + LATE
        assert backend._circuit.opened
        for _ in range(20):
            start = time.monotonic()
            try:
                acq = limits.acquire_sync({"tokens": 1}, timeout=5)
            except BackendUnavailable:
                assert policy == "raise"
            else:
                assert policy != "raise"
                acq.release()
            assert time.monotonic() - start < LATE  # not one backend timeout each
    wait_reachable(backend)  # the probe closes the circuit once Redis answers
    assert limits.try_acquire({"tokens": 1}).successful  # shared again


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_killed_redis_opens_the_circuit_and_a_restarted_one_closes_it(
    own_server: RedisServer,
) -> None:
    backend = redis_backend(own_server, "allow")
    limits = LimitSet([CallLimit(3600, 1)], backend=backend, name=uuid.uuid4().hex)
    async with limits.acquire():
        pass
    port = own_server.port
    own_server.stop()
    with anyio.fail_after(TIMEOUT + LATE):
        async with limits.acquire(timeout=5):  # fails open
            pass
    assert backend._circuit.opened
    for _ in range(10):  # at once: the circuit is open
        with anyio.fail_after(LATE):
            async with limits.acquire(timeout=5):
                pass
    restarted = RedisServer.start(port=port)
    try:
        await anyio.to_thread.run_sync(wait_reachable, backend)
        async with limits.acquire(timeout=5):  # the restarted server's fresh state: 1 call
            pass
        with pytest.raises(TimeoutError):
            async with limits.acquire(timeout=0.1):
                pytest.fail("the shared limit admitted a second call")
    finally:
        restarted.stop()


def test_a_release_that_could_not_be_sent_is_sent_once_redis_answers(
    own_server: RedisServer,
) -> None:
    backend = redis_backend(own_server, "raise", lease_seconds=600)
    limits = LimitSet([ResourceLimit("conns", 1)], backend=backend, name=uuid.uuid4().hex)
    held = limits.try_acquire()
    assert held.successful
    with stopped(own_server):
        with pytest.raises(BackendUnavailable):
            limits.try_acquire()  # finds Redis stopped: the circuit opens
        held.release()  # not sent: kept, and never raises
    wait_reachable(backend)
    other = LimitSet(
        [ResourceLimit("conns", 1)], backend=redis_backend(own_server, "raise"), name=limits.name
    )
    # The lease is 10 minutes long: only the release, sent when the circuit closed, frees it.
    assert other.get_stats()["limits"]["conns"]["in_use"] == 0
    assert other.try_acquire().successful


def test_threads_end_when_a_backend_is_closed_or_garbage(own_server: RedisServer) -> None:
    baseline = set(threading.enumerate())
    backend = redis_backend(own_server, "raise")
    limits = LimitSet([ResourceLimit("conns", 1)], backend=backend, name=uuid.uuid4().hex)
    held = limits.try_acquire()
    with pytest.raises(TimeoutError):
        limits.acquire_sync(timeout=0.05)  # queued: dispatcher, subscriber, renewer
    held.release()
    started = [t for t in threading.enumerate() if t not in baseline]
    assert started
    with backend:
        pass  # closed on leaving
    for thread in started:
        thread.join(10)
    assert [thread.name for thread in started if thread.is_alive()] == []
    with pytest.raises(BackendUnavailable):
        limits.try_acquire()  # a closed backend: the policy applies
