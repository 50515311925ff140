"""What the parts of the contract share.

The backend factory protocol, shorthands for limits and algorithms, and the helpers that drive
tasks and threads against a LimitSet.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import attrs
import pytest

from aiolimits import (
    Acquisition,
    Backend,
    CallLimit,
    LimitSet,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)
from aiolimits.testing import ManualClock

AnyLimit = RateLimit | CallLimit | ResourceLimit
Requested = Mapping[str, float] | None

TB = RateLimitAlgorithm.TokenBucket
GCRA = RateLimitAlgorithm.GCRA
LEAKY = RateLimitAlgorithm.LeakyBucket
SLIDING = RateLimitAlgorithm.SlidingWindow
FIXED = RateLimitAlgorithm.FixedWindow
ALGORITHMS = [pytest.param(a, id=a.value) for a in RateLimitAlgorithm]

NAN = float("nan")
INF = math.inf


class MakeLimitSet(Protocol):
    """Builds a LimitSet with fresh state on the backend under test.

    ``clock=None`` means the backend's real monotonic clock.
    """

    def __call__(
        self,
        limits: Iterable[AnyLimit] = (),
        *,
        clock: Callable[[], float] | None = None,
        config: Mapping[str, Any] | None = None,
        timer_slack: float = 0.0,
    ) -> LimitSet: ...


def limitset_factory(backend: Backend, names: Callable[[], str | None]) -> MakeLimitSet:
    """The ``make_limitset`` factory for ``backend``: each call a new set named ``names()``
    (shared backends need a fresh name for fresh state), on ``time.monotonic`` by default."""

    def make(
        limits: Iterable[AnyLimit] = (),
        *,
        clock: Callable[[], float] | None = None,
        config: Mapping[str, Any] | None = None,
        timer_slack: float = 0.0,
    ) -> LimitSet:
        return LimitSet(
            limits,
            config=config,
            timer_slack=timer_slack,
            backend=backend,
            name=names(),
            clock=time.monotonic if clock is None else clock,
        )

    return make


# -- helpers for async tests ------------------------------------------------------------------


#: What a backend does off the tasks' path (a shared backend's I/O thread, a task's round trip
#: it awaits): each probe answers whether that work is done and a count of the rounds of it
#: done so far. A backend's test module adds one per set it makes (see ``background_work``).
BACKGROUND: list[Callable[[], tuple[bool, int]]] = []


@contextlib.contextmanager
def background_work() -> Iterator[list[Callable[[], tuple[bool, int]]]]:
    """The probes :func:`settle` waits for, for one test: cleared when it ends."""
    try:
        yield BACKGROUND
    finally:
        BACKGROUND.clear()


async def _tasks_blocked() -> None:
    # A few plain checkpoints first: anyio's asyncio ``wait_all_tasks_blocked`` sleeps 0.1 s of
    # real time whenever it finds a runnable task, and the chains of wake-ups in these tests
    # are short.
    for _ in range(4):
        await anyio.lowlevel.checkpoint()
    # Bounded: a task that never blocks (a waiter in a busy loop) fails the test, not hangs it.
    with anyio.fail_after(10):
        await anyio.wait_all_tasks_blocked()


def _background() -> tuple[bool, tuple[int, ...]]:
    seen = [probe() for probe in BACKGROUND]
    return all(done for done, _ in seen), tuple(rounds for _, rounds in seen)


async def settle() -> None:
    """Let every task that can run do so, until all of them wait for something, and the
    backend's own work (``BACKGROUND``) is done: a task it woke has run too (seen done twice,
    with the same rounds, around a pass in which every task ran)."""
    await _tasks_blocked()
    if not BACKGROUND:
        return
    with anyio.fail_after(10):
        while True:
            done, rounds = _background()
            if done:
                await _tasks_blocked()
                if _background() == (True, rounds):
                    return
            else:
                # A thread or a round trip, which no checkpoint waits for.
                await anyio.sleep(0.0005)
                await _tasks_blocked()


async def eventually(predicate: Callable[[], bool], *, within: float = 10.0) -> None:
    """Wait in real time until ``predicate()`` holds; for threads, which ``settle`` cannot see."""
    with anyio.fail_after(within):
        # ASYNC110: a thread changes what the predicate reads; no event can be awaited for it.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.002)


@attrs.define(eq=False)
class Attempt:
    """One task's ``async with limitset.acquire(...)``, observed from outside.

    ``state`` moves from "waiting" to "held" (inside the block), then "done" (left the block),
    or to "timed out" (``error`` holds the exception) or "cancelled".
    """

    name: str
    state: str = "waiting"
    acquisition: Acquisition | None = None
    granted_at: float | None = None
    error: BaseException | None = None
    leave: anyio.Event = attrs.field(factory=anyio.Event)
    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)


class Crowd:
    """Tasks acquiring from one LimitSet, started one at a time so that arrival order is known."""

    def __init__(
        self, tg: anyio.abc.TaskGroup, limitset: LimitSet, clock: Callable[[], float]
    ) -> None:
        self._tg = tg
        self._limitset = limitset
        self._clock = clock
        self.grants: list[tuple[str, float]] = []  # (name, clock reading) in grant order

    async def arrive(
        self,
        name: str,
        requested: Requested = None,
        *,
        # ASYNC109: this is LimitSet.acquire's own timeout, passed on: the thing under test.
        timeout: float | None = None,  # noqa: ASYNC109
        hold: bool = False,
    ) -> Attempt:
        """Start a task acquiring ``requested`` and let it run until it waits or is done.

        With ``hold`` it stays in the block until ``attempt.leave`` is set.
        """
        attempt = Attempt(name)
        self._tg.start_soon(self._run, attempt, requested, timeout, hold)
        await settle()
        return attempt

    async def _run(
        self,
        attempt: Attempt,
        requested: Requested,
        timeout: float | None,  # noqa: ASYNC109 - LimitSet.acquire's timeout, as in arrive()
        hold: bool,
    ) -> None:
        with attempt.scope:
            try:
                async with self._limitset.acquire(requested, timeout=timeout) as acq:
                    attempt.acquisition = acq
                    attempt.granted_at = self._clock()
                    attempt.state = "held"
                    self.grants.append((attempt.name, attempt.granted_at))
                    if hold:
                        await attempt.leave.wait()
            except TimeoutError as exc:
                attempt.state = "timed out"
                attempt.error = exc
                return
            attempt.state = "done"
            return
        attempt.state = "cancelled"  # reached only when the scope caught a cancellation


@contextlib.asynccontextmanager
async def crowd(
    limitset: LimitSet, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[Crowd]:
    """A task group of acquiring tasks; whatever is still running at the end is cancelled."""
    async with anyio.create_task_group() as tg:
        yield Crowd(tg, limitset, clock)
        tg.cancel_scope.cancel()


class WorkerThreads:
    """Functions run in worker threads (``anyio.to_thread``), their return values collected."""

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        self.results: list[object] = []

    def start(self, fn: Callable[[], object]) -> None:
        self._tg.start_soon(self._run, fn)

    async def _run(self, fn: Callable[[], object]) -> None:
        self.results.append(await anyio.to_thread.run_sync(fn, abandon_on_cancel=True))


@contextlib.asynccontextmanager
async def worker_threads(clock: ManualClock | None = None) -> AsyncIterator[WorkerThreads]:
    """A task group for threads. On the way out, ``clock`` jumps an hour ahead so that a thread
    still waiting on it (the test failed) times out instead of hanging the process: asyncio's
    worker threads are not daemons. Threads given no ManualClock must use a real timeout."""
    try:
        async with anyio.create_task_group() as tg:
            yield WorkerThreads(tg)
    finally:
        if clock is not None:
            clock.advance(3600)


def stats_of(limitset: LimitSet, key: str) -> dict[str, Any]:
    per_key: dict[str, Any] = limitset.get_stats()["limits"][key]
    return per_key
