"""Tasks, event loops and threads sharing one LimitSet (semantics §4): fair, exact, no deadlock.

Waiters of every kind (asyncio, uvloop and trio tasks, on loops running in their own threads, and
plain threads in ``acquire_sync``) sit in one FIFO queue. These tests check that they are granted
in arrival order, that under a real-time hammering from all of them at once no limit is exceeded
and nobody is lost, that a grant handed back across threads reaches the next waiter, that
``acquire_sync`` refuses to block an event loop, and that the thin real-time waiting layer wakes
neither early nor late.

Real time only where it is the point, with small windows and generous bounds: no test asserts a
tight wall-clock duration. Grant times are bracketed with readings of the LimitSet's own clock
(``[reading before acquiring + acq.waited, reading inside the block]``), and the rate checks only
count grants whose bracket proves where they fell, so they cannot fail on a slow machine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import anyio
import pytest

from aiolimits import Acquisition, CallLimit, LimitSet, RateLimit, ResourceLimit
from aiolimits._algorithms.fixed_window import window_index
from aiolimits._waiters import AsyncioWaiter, TrioWaiter
from aiolimits.testing import ManualClock

T = TypeVar("T")
Backend = tuple[str, dict[str, object]]

# Generous bounds for a loaded two-core machine; normally everything takes milliseconds.
PATIENCE = 10.0

needs_uvloop = pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not exist there")


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll from a plain thread until ``predicate()`` holds; fail after PATIENCE seconds."""
    deadline = time.monotonic() + PATIENCE
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {PATIENCE}s waiting for {what}")
        time.sleep(0.001)


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """The same from a task: yield until ``predicate()`` holds."""
    with anyio.move_on_after(PATIENCE):
        # Polling: threads change what is watched, and they cannot set an anyio.Event.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.001)
        return
    pytest.fail(f"timed out after {PATIENCE}s waiting for {what}")


def waiting(limits: LimitSet) -> int:
    n: int = limits.get_stats()["waiting"]
    return n


def queued_sync(limits: LimitSet, n: int) -> None:
    """From a plain thread: wait until exactly ``n`` waiters are queued."""
    wait_until(lambda: waiting(limits) == n, f"{n} waiter(s) to be queued")


async def queued(limits: LimitSet, n: int) -> None:
    """From a task: wait until exactly ``n`` waiters are queued."""
    await wait_for(lambda: waiting(limits) == n, f"{n} waiter(s) to be queued")


# -- event loops on their own threads -------------------------------------------------------------


class AsyncioLoopThread:
    """An asyncio (or uvloop) event loop running forever on a thread of its own."""

    def __init__(self, *, use_uvloop: bool = False) -> None:
        if use_uvloop:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.name = "uvloop" if use_uvloop else "asyncio"
        self.thread = threading.Thread(target=self.loop.run_forever, name=self.name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop's thread, as a loop callback, and return its result."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def callback() -> None:
            try:
                result.set_result(fn())
            except Exception as exc:  # handed to the caller
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(callback)
        return result.result(timeout=PATIENCE)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep the loop busy in a callback; what is posted meanwhile runs afterwards, in order."""
        busy, done = threading.Event(), threading.Event()

        def hold() -> None:
            busy.set()
            done.wait(PATIENCE)

        self.loop.call_soon_threadsafe(hold)
        assert busy.wait(PATIENCE)
        try:
            yield
        finally:
            done.set()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive()
        self.loop.close()


class TrioThread:
    """A trio run on a thread of its own, accepting tasks from other threads."""

    name = "trio"

    def __init__(self) -> None:
        import trio

        self._ready = threading.Event()
        self.thread = threading.Thread(
            target=trio.run, args=(self._main,), name="trio", daemon=True
        )
        self.thread.start()
        if not self._ready.wait(PATIENCE):
            raise RuntimeError("the trio thread did not start")

    async def _main(self) -> None:
        import trio

        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as self._nursery:
            self._ready.set()
            await self._stop.wait()

    def submit(self, fn: Callable[[], Awaitable[T]]) -> concurrent.futures.Future[T]:
        import trio

        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        async def run() -> None:
            try:
                result.set_result(await fn())
            except Exception as exc:  # handed to the caller
                result.set_exception(exc)

        trio.from_thread.run_sync(self._nursery.start_soon, run, trio_token=self.token)
        return result

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the trio thread, inside the run but outside any task's await."""
        import trio

        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def close(self) -> None:
        import trio

        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive()


class Loops:
    def __init__(self) -> None:
        self.asyncio = AsyncioLoopThread()
        self.uvloop = AsyncioLoopThread(use_uvloop=True) if sys.platform != "win32" else None
        self.trio = TrioThread()

    def all(self) -> list[AsyncioLoopThread | TrioThread]:
        found = [self.asyncio, self.uvloop, self.trio]
        return [loop for loop in found if loop is not None]

    def close(self) -> None:
        for loop in self.all():
            loop.close()


@pytest.fixture
def loops() -> Iterator[Loops]:
    running = Loops()
    try:
        yield running
    finally:
        running.close()


class ThreadKind:
    """Plain threads, with the same ``submit`` as the loops."""

    name = "thread"

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except Exception as exc:  # handed to the caller
                result.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()
        return result


# -- FIFO across kinds ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_waiters_of_every_kind_are_granted_in_arrival_order(loops: Loops) -> None:
    limits = LimitSet([ResourceLimit("conn", 1)])
    holder = limits.try_acquire()
    assert holder.successful
    order: list[str] = []
    order_lock = threading.Lock()
    threads = ThreadKind()

    def record(name: str) -> None:
        with order_lock:
            order.append(name)

    def sync_waiter(name: str) -> Callable[[], None]:
        def run() -> None:
            with limits.acquire_sync():
                record(name)

        return run

    def async_waiter(name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            async with limits.acquire():
                record(name)

        return run

    kinds: list[str] = ["thread", *(loop.name for loop in loops.all())] * 4
    random.Random(7).shuffle(kinds)
    expected: list[str] = []
    futures: list[concurrent.futures.Future[None]] = []
    for n, kind in enumerate(kinds):
        name = f"{n}:{kind}"
        if kind == "thread":
            futures.append(threads.submit(sync_waiter(name)))
        elif kind == "trio":
            futures.append(loops.trio.submit(async_waiter(name)))
        else:
            loop = loops.asyncio if kind == "asyncio" else loops.uvloop
            assert loop is not None
            futures.append(loop.submit(async_waiter(name)))
        expected.append(name)
        queued_sync(limits, n + 1)

    holder.release()
    for future in futures:
        future.result(timeout=PATIENCE)
    assert order == expected
    stats = limits.get_stats()
    assert (stats["waiting"], stats["granted"]) == (0, len(kinds) + 1)
    assert stats["limits"]["conn"]["in_use"] == 0


# -- a grant handed back across threads -----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["asyncio", pytest.param("uvloop", marks=needs_uvloop), "trio"])
def test_task_cancelled_after_a_cross_thread_grant_hands_it_to_a_thread(
    loops: Loops, kind: str
) -> None:
    """The first waiter is a task on a loop in another thread; the release comes from this
    thread, and the task is cancelled before it can resume. The plain thread queued behind it
    must get the slot."""
    limits = LimitSet([ResourceLimit("conn", 1)])
    holder = limits.try_acquire()
    entered: list[str] = []
    handle: list[Any] = []  # the asyncio task, or the trio cancel scope

    async def first_on_asyncio() -> None:
        handle.append(asyncio.current_task())
        async with limits.acquire():
            entered.append("first")

    async def first_on_trio() -> None:
        import trio

        with trio.CancelScope() as scope:
            handle.append(scope)
            async with limits.acquire():
                entered.append("first")

    def second() -> None:
        with limits.acquire_sync(timeout=PATIENCE):
            entered.append("second")

    loop = loops.uvloop if kind == "uvloop" else loops.asyncio
    assert loop is not None
    if kind == "trio":
        first_done = loops.trio.submit(first_on_trio)
    else:
        first_done = loop.submit(first_on_asyncio)
    queued_sync(limits, 1)
    second_done = ThreadKind().submit(second)
    queued_sync(limits, 2)

    if kind == "trio":

        def cancel_then_release() -> None:
            # trio takes the cancelled task out of its wait at once; the release then grants
            # it (it is still first in the queue) before it runs again.
            handle[0].cancel()
            holder.release()

        loops.trio.call(cancel_then_release)
    else:
        # While the loop is held busy, the release (from this thread) grants the task and posts
        # its wake-up to the loop, and the cancellation is posted right behind it: the task is
        # cancelled before it runs again.
        with loop.held():
            holder.release()
            loop.loop.call_soon_threadsafe(handle[0].cancel)
    second_done.result(timeout=PATIENCE)
    if kind == "trio":
        first_done.result(timeout=PATIENCE)  # the cancel scope caught the cancellation
    else:
        with pytest.raises(concurrent.futures.CancelledError):
            first_done.result(timeout=PATIENCE)
    assert entered == ["second"]
    stats = limits.get_stats()
    assert (stats["granted"], stats["cancelled"], stats["waiting"]) == (2, 1, 0)
    assert stats["limits"]["conn"]["in_use"] == 0


# -- hammering one LimitSet from everywhere at once -----------------------------------------------


class Ledger:
    """What the workers saw, under one lock: concurrent holders, grants, timeouts."""

    def __init__(self, slots: int) -> None:
        self.lock = threading.Lock()
        self.slots = slots
        self.holding = 0
        self.max_holding = 0
        self.overfull: list[int] = []
        # (earliest possible grant time, latest possible grant time, tokens)
        self.grants: list[tuple[float, float, int]] = []
        self.timeouts = 0

    def enter(self, earliest: float, latest: float, tokens: int) -> None:
        with self.lock:
            self.holding += 1
            self.max_holding = max(self.max_holding, self.holding)
            if self.holding > self.slots:
                self.overfull.append(self.holding)
            self.grants.append((earliest, latest, tokens))

    def leave(self) -> None:
        with self.lock:
            self.holding -= 1

    def timed_out(self) -> None:
        with self.lock:
            self.timeouts += 1


def assert_token_bucket_envelope(
    grants: list[tuple[float, float, int]], capacity: float, rate: float
) -> None:
    """In every interval [a, b], the grants known to lie in it sum to at most C + r·(b - a).

    A grant is known to lie in [a, b] when its whole bracket does; a = the earliest time of one
    grant, b = the latest time of another."""
    by_earliest = sorted(grants)
    for i, (a, _latest, _tokens) in enumerate(by_earliest):
        total = 0
        for latest, tokens in sorted((g[1], g[2]) for g in by_earliest[i:]):
            total += tokens
            assert total <= capacity + rate * (latest - a) + 1e-6, (
                f"{total} tokens granted within [{a}, {latest}]"
            )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_threads_tasks_and_event_loops_hammering_one_limitset_stay_within_every_limit() -> None:
    slots = 3
    tokens_capacity, tokens_window = 20, 0.05  # token bucket: bursts of 20, 400 per second
    calls_capacity, calls_window = 15, 0.1  # fixed windows of 100 ms, 15 calls each
    limits = LimitSet(
        [
            ResourceLimit("conn", slots),
            RateLimit("tokens", tokens_window, tokens_capacity),
            CallLimit(calls_window, calls_capacity, "fixed_window"),
        ]
    )
    clock = time.monotonic  # the LimitSet's clock
    ledger = Ledger(slots)
    rounds, tasks_per_loop = 12, 5
    errors: list[BaseException] = []

    def plan(seed: int) -> list[tuple[int, float | None, float]]:
        """Per round: tokens, timeout (one in ten gives up after 5 ms), time to hold."""
        rng = random.Random(seed)
        return [
            (rng.randint(1, 3), 0.005 if rng.random() < 0.1 else None, rng.random() * 0.002)
            for _ in range(rounds)
        ]

    def sync_worker(seed: int) -> None:
        for tokens, timeout, hold in plan(seed):
            before = clock()
            try:
                with limits.acquire_sync({"tokens": tokens}, timeout=timeout) as acq:
                    ledger.enter(before + acq.waited, clock(), tokens)
                    time.sleep(hold)
                    ledger.leave()
            except TimeoutError:
                ledger.timed_out()

    async def async_worker(seed: int) -> None:
        for tokens, timeout, hold in plan(seed):
            before = clock()
            try:
                async with limits.acquire({"tokens": tokens}, timeout=timeout) as acq:
                    ledger.enter(before + acq.waited, clock(), tokens)
                    await anyio.sleep(hold)
                    ledger.leave()
            except TimeoutError:
                ledger.timed_out()

    async def async_main(seed: int) -> None:
        async with anyio.create_task_group() as tg:
            for k in range(tasks_per_loop):
                tg.start_soon(async_worker, seed + k)

    def guarded(target: Callable[..., object], *args: object) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:  # reported by the test, not lost in a thread
                errors.append(exc)

        return threading.Thread(target=run, daemon=True)

    import trio

    workers = [guarded(sync_worker, seed) for seed in (1, 2, 3)]
    workers.append(guarded(asyncio.run, async_main(100)))
    workers.append(guarded(trio.run, async_main, 300))
    if sys.platform != "win32":
        import uvloop

        workers.append(guarded(uvloop.run, async_main(200)))
    attempts = rounds * (3 + tasks_per_loop * (len(workers) - 3))

    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 30  # no deadlock, no lost wake-up (normally ~2 s)
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    if any(worker.is_alive() for worker in workers):
        pytest.fail(f"workers still blocked after 30 s: {limits.get_stats()}")
    assert not errors, errors

    assert not ledger.overfull, f"more than {slots} holders at once: {ledger.overfull}"
    assert ledger.max_holding <= slots
    stats = limits.get_stats()
    assert stats["waiting"] == 0
    assert stats["limits"]["conn"]["in_use"] == 0
    assert stats["granted"] == len(ledger.grants)
    assert stats["timed_out"] == ledger.timeouts
    assert stats["cancelled"] == 0
    assert len(ledger.grants) + ledger.timeouts == attempts
    assert len(ledger.grants) > attempts // 2

    # tokens, a token bucket: never more than a burst plus the refill (semantics §3).
    assert_token_bucket_envelope(ledger.grants, tokens_capacity, tokens_capacity / tokens_window)
    # call_count, fixed windows: at most capacity grants known to fall in each window.
    per_window: dict[int, int] = {}
    for earliest, latest, _tokens in ledger.grants:
        k = window_index(earliest, calls_window)
        if k == window_index(latest, calls_window):
            per_window[k] = per_window.get(k, 0) + 1
    assert max(per_window.values()) <= calls_capacity


# -- acquire_sync never blocks an event loop ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("slot", ["free", "taken"])
async def test_acquire_sync_in_a_task_raises_runtime_error(
    anyio_backend: Backend, slot: str
) -> None:
    limits = LimitSet([ResourceLimit("conn", 1), RateLimit("tokens", 1, 10)], clock=ManualClock())
    holder = limits.try_acquire({"tokens": 1}) if slot == "taken" else None
    with pytest.raises(RuntimeError, match="event loop"):
        limits.acquire_sync({"tokens": 1})
    with pytest.raises(RuntimeError, match="event loop"):
        limits.acquire_sync({"tokens": 1}, timeout=0)
    stats = limits.get_stats()  # nothing taken, nobody queued
    assert stats["waiting"] == 0
    assert stats["granted"] == (1 if holder else 0)
    assert stats["limits"]["conn"]["in_use"] == (1 if holder else 0)
    assert stats["limits"]["tokens"]["available"] == (9 if holder else 10)


@pytest.mark.timeout(60)
def test_acquire_sync_raises_in_callbacks_of_loops_on_other_threads(loops: Loops) -> None:
    limits = LimitSet([ResourceLimit("conn", 1)])

    def attempt() -> str:
        try:
            limits.acquire_sync()
        except RuntimeError as exc:
            return str(exc)
        return "acquired"

    for loop in loops.all():
        # A plain callback of the loop, not a task: the thread still runs the loop.
        assert "event loop" in loop.call(attempt), loop.name
    assert limits.get_stats()["granted"] == 0
    # The same call from a plain thread works.
    with limits.acquire_sync(timeout=PATIENCE) as acq:
        assert acq.successful


@pytest.mark.anyio
async def test_acquire_sync_works_in_a_worker_thread_of_a_loop(anyio_backend: Backend) -> None:
    limits = LimitSet([ResourceLimit("conn", 1)])
    holder = limits.try_acquire()

    def in_thread() -> float:
        with limits.acquire_sync(timeout=PATIENCE) as acq:
            return acq.waited

    async with anyio.create_task_group() as tg:
        result: list[float] = []

        async def run() -> None:
            result.append(await anyio.to_thread.run_sync(in_thread))

        tg.start_soon(run)
        await queued(limits, 1)
        holder.release()  # from the loop's thread: wakes the worker thread
    assert result[0] > 0
    assert limits.get_stats()["limits"]["conn"]["in_use"] == 0


# -- the real-time waiting layer ------------------------------------------------------------------


class FreezableClock:
    """``time.monotonic``, which a test may hold still for a moment; it never goes back.

    Holding it still while draining a bucket and queueing waiters gives them one exact start
    time, so ``acq.waited`` alone says exactly when each was granted."""

    def __init__(self) -> None:
        self._frozen: float | None = None

    def __call__(self) -> float:
        frozen = self._frozen
        return time.monotonic() if frozen is None else frozen

    def freeze(self) -> float:
        self._frozen = time.monotonic()
        return self._frozen

    def thaw(self) -> None:
        self._frozen = None


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["task", "thread"])
async def test_waiters_on_a_token_bucket_are_granted_not_before_their_time(
    anyio_backend: Backend, kind: str
) -> None:
    # 10 tokens per 0.25 s: 40 per second, so 4 tokens refill in 0.1 s.
    clock = FreezableClock()
    limits = LimitSet([RateLimit("tokens", 0.25, 10)], clock=clock)
    clock.freeze()
    assert limits.try_acquire({"tokens": 10}).successful  # empty at t0, exactly
    waited: dict[int, float] = {}

    async def task_waiter(i: int) -> None:
        async with limits.acquire({"tokens": 4}) as acq:
            waited[i] = acq.waited

    def thread_waiter(i: int) -> None:
        with limits.acquire_sync({"tokens": 4}, timeout=PATIENCE) as acq:
            waited[i] = acq.waited

    async def run_thread_waiter(i: int) -> None:
        await anyio.to_thread.run_sync(thread_waiter, i)

    with anyio.fail_after(PATIENCE):
        async with anyio.create_task_group() as tg:
            for i in (1, 2, 3):
                tg.start_soon(task_waiter if kind == "task" else run_thread_waiter, i)
                await queued(limits, i)
            clock.thaw()
    # Waiter i is admissible once 4·i tokens have refilled since t0: at t0 + 0.1·i exactly.
    # Never before (up to float rounding); later only by scheduling delays.
    assert sorted(waited) == [1, 2, 3]
    for i, w in waited.items():
        assert w >= 0.1 * i - 1e-9, (i, w)
        assert w < 0.1 * i + PATIENCE / 2, (i, w)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["task", "thread"])
@pytest.mark.parametrize(("slack", "most_wake_ups"), [(0.0, 8), (0.2, 2)])
async def test_timer_slack_grants_waiters_due_close_together_at_one_wake_up_on_a_real_clock(
    anyio_backend: Backend, kind: str, slack: float, most_wake_ups: int
) -> None:
    # 40 tokens per second: waiter i (from 0) is admissible 0.025 * (i + 1) s after t0. With a
    # slack of 0.2 s the wake-ups fall on multiples of 0.2 s, and the 8 due times (0.175 s
    # apart at most) lie in at most two of them: every grant happens at one of at most two
    # instants (one ``now`` per dispatch), whatever the delays of a loaded machine. Without
    # slack each waiter has its own wake-up.
    clock = FreezableClock()
    limits = LimitSet([RateLimit("tokens", 0.25, 10)], clock=clock, timer_slack=slack)
    clock.freeze()
    assert limits.try_acquire({"tokens": 10}).successful  # empty at t0, exactly
    order: list[int] = []
    waited: dict[int, float] = {}

    async def task_waiter(i: int) -> None:
        async with limits.acquire({"tokens": 1}) as acq:
            waited[i] = acq.waited
            order.append(i)

    def thread_waiter(i: int) -> None:
        with limits.acquire_sync({"tokens": 1}, timeout=PATIENCE) as acq:
            waited[i] = acq.waited
            order.append(i)

    async def run_thread_waiter(i: int) -> None:
        await anyio.to_thread.run_sync(thread_waiter, i)

    with anyio.fail_after(PATIENCE):
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(task_waiter if kind == "task" else run_thread_waiter, i)
                await queued(limits, i + 1)
            waiters = list(limits._scheduler.queue)
            clock.thaw()
    assert sorted(order) == list(range(8))
    granted_at = [w.granted_at for w in waiters]  # in queue order
    assert granted_at == sorted(granted_at)  # FIFO
    for i, w in waited.items():
        assert w >= 0.025 * (i + 1) - 1e-9, (i, w)  # never before its time
    instants = {w.granted_at for w in waiters}
    assert len(instants) <= most_wake_ups
    if slack:
        assert len(instants) < 8


@pytest.mark.anyio
async def test_an_asyncio_task_sleeps_once_until_its_time_even_when_it_becomes_head(
    anyio_backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Waiters 2 and 3 queue behind waiter 1. Each becomes head when the one before is granted,
    # and the scheduler arms its wake-up on its loop then (notify_at): it is not woken only to
    # arm the timer itself, so each task parks once, and is granted when it wakes. (A trio task
    # wakes to arm its own timer: it parks twice.)
    sleeps: dict[int, int] = {}  # id(waiter) -> sleeps

    def counting(sleep: Any) -> Any:
        async def wrapper(self: Any, delay: float | None) -> None:
            sleeps[id(self)] = sleeps.get(id(self), 0) + 1
            await sleep(self, delay)

        return wrapper

    for cls in (AsyncioWaiter, TrioWaiter):
        monkeypatch.setattr(cls, "sleep", counting(cls.sleep))
    clock = FreezableClock()
    limits = LimitSet([RateLimit("tokens", 0.25, 10)], clock=clock)
    clock.freeze()
    assert limits.try_acquire({"tokens": 10}).successful  # empty at t0, exactly
    waited: dict[int, float] = {}
    order: list[int] = []  # id(waiter) of waiters 1, 2, 3

    async def task_waiter(i: int) -> None:
        async with limits.acquire({"tokens": 4}) as acq:
            waited[i] = acq.waited

    with anyio.fail_after(PATIENCE):
        async with anyio.create_task_group() as tg:
            for i in (1, 2, 3):
                tg.start_soon(task_waiter, i)
                await queued(limits, i)
                order.append(id(list(limits._scheduler.queue)[-1]))
            clock.thaw()
    assert sorted(waited) == [1, 2, 3]
    for i, w in waited.items():
        assert w >= 0.1 * i - 1e-9, (i, w)  # never before its time
    expected = [1, 1, 1] if anyio_backend_name == "asyncio" else [1, 2, 2]
    assert [sleeps[w] for w in order] == expected


@pytest.mark.anyio
async def test_a_head_cancelled_while_its_wake_up_is_armed_passes_its_turn_on(
    anyio_backend: Backend,
) -> None:
    # Waiter 2 becomes head when waiter 1 is granted, with its wake-up armed for it at t0 + 0.2;
    # it is cancelled before then. Waiter 3 is then head, due at t0 + 0.2 (waiter 2 took nothing),
    # and is granted then, not before; nothing stays queued or taken.
    clock = FreezableClock()
    limits = LimitSet([RateLimit("tokens", 0.25, 10)], clock=clock)
    clock.freeze()
    assert limits.try_acquire({"tokens": 10}).successful  # empty at t0, exactly
    waited: dict[int, float] = {}
    first = anyio.Event()
    second = anyio.CancelScope()

    async def task_waiter(i: int) -> None:
        async with limits.acquire({"tokens": 4}) as acq:
            waited[i] = acq.waited
            if i == 1:
                first.set()

    async def cancellable() -> None:
        with second:
            await task_waiter(2)

    with anyio.fail_after(PATIENCE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(task_waiter, 1)
            await queued(limits, 1)
            tg.start_soon(cancellable)
            await queued(limits, 2)
            tg.start_soon(task_waiter, 3)
            await queued(limits, 3)
            clock.thaw()
            await first.wait()
            second.cancel()
    assert sorted(waited) == [1, 3]
    assert waited[3] >= 0.2 - 1e-9
    stats = limits.get_stats()
    assert (stats["waiting"], stats["granted"], stats["cancelled"]) == (0, 3, 1)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["task", "thread"])
async def test_a_refund_wakes_a_waiter_at_once(anyio_backend: Backend, kind: str) -> None:
    # One token every 6 s. The clock stands still until the refund, so that it gives back all
    # 10 tokens (the bucket has not refilled at all) and the grant it causes is exact.
    clock = FreezableClock()
    limits = LimitSet([RateLimit("tokens", 60, 10)], clock=clock)
    clock.freeze()
    holder = limits.try_acquire({"tokens": 10})
    got: list[Acquisition] = []

    async def task_waiter() -> None:
        async with limits.acquire({"tokens": 5}) as acq:  # 30 s away by refill alone
            got.append(acq)

    def thread_waiter() -> None:
        with limits.acquire_sync({"tokens": 5}, timeout=60) as acq:
            got.append(acq)

    async def run_thread_waiter() -> None:
        await anyio.to_thread.run_sync(thread_waiter)

    # Far less than the 30 s the refill would take; normally milliseconds.
    with anyio.fail_after(PATIENCE):
        async with anyio.create_task_group() as tg:
            tg.start_soon(task_waiter if kind == "task" else run_thread_waiter)
            await queued(limits, 1)
            assert not got
            holder.update({"tokens": 0})  # all 10 back
            # The refund itself granted the waiter, before anything else ran.
            stats = limits.get_stats()
            assert (stats["waiting"], stats["granted"], stats["refunded"]) == (0, 2, 10)
            clock.thaw()
    assert got[0].waited == 0.0  # granted at the instant of the refund
    available = limits.get_stats()["limits"]["tokens"]["available"]
    assert 5 <= available < 5 + PATIENCE / 6
