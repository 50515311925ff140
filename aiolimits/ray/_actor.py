"""The limits actor: every named set of a RayBackend, decided in one async Ray actor.

Each set is a real in-process :class:`~aiolimits.LimitSet` (the memory backend) inside the actor,
so admission, FIFO order, refunds and timeouts are those of the tested core. Callers' waiters are
:class:`ActorWaiter` objects parked in that set's one FIFO queue: nothing waits in a task, the
actor runs the waiting protocol of ``_door.py`` itself, event by event (a grant, a release, a
timer), so every decision is made on the actor's event loop in the order events arrive.

Ray starts calls of an async actor in no guaranteed order, even from one caller: the operations
on one acquisition (``update``, ``release``, ``abandon``) carry a sequence number and are applied
in that order (:class:`Holding`).

Time: the actor's ``time.monotonic``. A set declared by a caller on a clock that drives its own
timers (``aiolimits.testing.ManualClock``) gets a ManualClock in the actor instead, moved to the
caller's reading on every call (the contract suite's hook: same code, injected time).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from .._acquisition import HELD, RELEASED, Acquisition
from .._backends._declaration import declaration, mismatch
from .._limits import Limit
from .._limitset import LimitSet
from .._scheduler import Items, Scheduler
from .._waiters import GRANTED, WAITING, Cancellable, Waiter
from ..testing import ManualClock

__all__ = ["LimitsActor"]

_INF = math.inf

#: Outcomes of an acquisition, as sent to callers.
GRANTED_OUTCOME = "granted"
TIMEOUT_OUTCOME = "timeout"
QUEUED_OUTCOME = "queued"
#: A queued request above a capacity a change of the limit lowered: ``(REFUSED, message)``.
REFUSED_OUTCOME = "refused"

#: See ``Shared.keep``.
MAX_RESOURCE_FREE_HOLDINGS = 100_000


class ActorWaiter(Waiter):
    """A caller's request parked in a set's queue in the actor. Notifying it only marks it due:
    the actor runs it after the operation in progress (:meth:`Shared.run_due`)."""

    __slots__ = ("future", "hid", "shared", "start", "timer")

    def __init__(self, items: Items, deadline: float, shared: Shared, hid: str) -> None:
        super().__init__(items, deadline)
        self.shared = shared
        self.hid = hid
        self.start = 0.0
        self.timer: Cancellable | asyncio.TimerHandle | None = None
        self.future: asyncio.Future[tuple[Any, ...]] | None = None

    def notify(self) -> bool:
        if not self.notified:
            self.notified = True
            self.shared.due.append(self)
        return True


class Holding:
    """A granted acquisition in the actor, and the operations of its caller not yet applied."""

    __slots__ = ("acq", "expires", "next_seq", "parked", "waiter")

    def __init__(self, acq: Acquisition, waiter: ActorWaiter, expires: float) -> None:
        self.acq = acq
        self.waiter = waiter
        #: When its resource slots go back unless the holder renews (``time.monotonic``).
        self.expires = expires
        self.next_seq = 1
        self.parked: dict[int, tuple[str, Any]] = {}


class Shared:
    """One named set in the actor: its LimitSet, its waiters and its holdings."""

    def __init__(
        self, name: str, limits: tuple[Limit, ...], start: float | None, lease: float
    ) -> None:
        self.name = name
        #: Seconds a holding with resource slots lasts without a renewal from its holder.
        self.lease = lease
        self.sweeper: asyncio.TimerHandle | None = None
        self.declared = declaration(limits)
        self.manual = None if start is None else ManualClock(start)
        clock: Callable[[], float] = time.monotonic if self.manual is None else self.manual
        self.limitset = LimitSet(limits, clock=clock)
        self.sched: Scheduler = self.limitset._scheduler
        self.clock = clock
        self.waiting: dict[str, ActorWaiter] = {}
        self.holdings: dict[str, Holding] = {}
        #: Operations that arrived before their acquisition (abandon before the acquire ran).
        self.early: dict[str, list[tuple[int, str, Any]]] = {}
        self.due: list[ActorWaiter] = []
        #: Outcomes of queued requests not yet returned, per caller (simulated clocks only).
        self.finished: dict[str, list[tuple[Any, ...]]] = {}
        self.callers: dict[str, str] = {}
        #: Callers of a set without resource limits never say they are done (release gives
        #: nothing back): its oldest holdings are forgotten beyond this many, after which a late
        #: ``update`` of one is ignored.
        self.keep = MAX_RESOURCE_FREE_HOLDINGS if not self.limitset._has_resources else None

    # -- time ------------------------------------------------------------------------------

    def at(self, now: float | None) -> None:
        """Move a simulated clock to the caller's reading (fires the timers now due)."""
        if self.manual is not None and now is not None and now > self.manual():
            self.manual.set(now)
        self.run_due()

    def next_timer(self) -> float:
        if self.manual is None:
            return _INF
        times = [w.deadline if w.wake_at > w.deadline else w.wake_at for w in self.waiting.values()]
        return min(times, default=_INF)

    # -- acquiring -------------------------------------------------------------------------

    def acquire(
        self, caller: str, hid: str, requested: Mapping[str, float], timeout: float
    ) -> tuple[Any, ...]:
        items = self.limitset._items(requested)
        sched = self.sched
        waiter = ActorWaiter(items, _INF, self, hid)
        with sched.lock:
            start = sched.clock()
            waiter.start = start
            waiter.deadline = start + timeout
            receipts = sched.try_take(items, start)
            if receipts is None:
                if not sched.enqueue(waiter, start):
                    return (TIMEOUT_OUTCOME,)
                self.waiting[hid] = waiter
                self.callers[hid] = caller
                self._arm(waiter)
        if receipts is not None:
            waiter.receipts = receipts
            waiter.state = GRANTED
            waiter.granted_at = start
            return self._hold(waiter)
        early = self.early.pop(hid, None)
        if early is not None:
            for seq, op, arg in early:
                self.operate(hid, seq, op, arg)
        return (QUEUED_OUTCOME,)

    def _hold(self, waiter: ActorWaiter) -> tuple[Any, ...]:
        acq = Acquisition(self.limitset, self.sched, waiter.items, HELD, waiter.receipts)
        holdings = self.holdings
        holdings[waiter.hid] = Holding(acq, waiter, time.monotonic() + self.lease)
        if self.keep is not None:
            if len(holdings) > self.keep:
                del holdings[next(iter(holdings))]
        elif self.sweeper is None:
            self._arm_sweeper()
        return (GRANTED_OUTCOME, waiter.granted_at - waiter.start)

    def _arm(self, waiter: ActorWaiter) -> None:
        """Under the lock: wake ``waiter`` at its wake time (if head) or its deadline."""
        timer = waiter.timer
        if timer is not None:
            timer.cancel()
            waiter.timer = None
        wake = waiter.wake_at if self.sched.head() is waiter else _INF
        until = wake if wake < waiter.deadline else waiter.deadline
        if until == _INF:
            return
        if self.manual is not None:
            waiter.timer = self.manual.call_at(until, waiter.notify)
        else:
            loop = asyncio.get_running_loop()
            delay = until - self.clock()
            waiter.timer = loop.call_later(max(delay, 0.0), self._fire, waiter)

    def _fire(self, waiter: ActorWaiter) -> None:
        waiter.timer = None
        with self.sched.lock:
            waiter.notify()
        self.run_due()

    def run_due(self) -> None:
        """Run the waiting protocol for every waiter notified since: grant, time out, or
        sleep again until its new wake time."""
        sched = self.sched
        while self.due:
            waiter = self.due.pop(0)
            with sched.lock:
                if waiter.hid not in self.waiting:
                    waiter.notified = False
                    continue
                until = sched.after_wake(waiter, sched.clock())
                if until is not None:
                    self._arm(waiter)
                    continue
                if waiter.timer is not None:
                    waiter.timer.cancel()
                    waiter.timer = None
                del self.waiting[waiter.hid]
                failure = sched.failure(waiter)
            if waiter.state == GRANTED:
                outcome = self._hold(waiter)
            elif failure is not None:  # sent away by a change of a limit (semantics §4)
                outcome = (REFUSED_OUTCOME, str(failure))
            else:
                outcome = (TIMEOUT_OUTCOME,)
            caller = self.callers.pop(waiter.hid, "")
            if waiter.future is not None:
                if not waiter.future.done():
                    waiter.future.set_result(outcome)
            else:
                self.finished.setdefault(caller, []).append((waiter.hid, *outcome))

    # -- after the grant -------------------------------------------------------------------

    def operate(self, hid: str, seq: int, op: str, arg: Any) -> None:
        """Apply ``op`` (update, release, abandon) of acquisition ``hid`` in sequence order."""
        holding = self.holdings.get(hid)
        if holding is None:
            waiter = self.waiting.get(hid)
            if waiter is not None and op == "abandon":
                self._abandon(waiter)
            elif waiter is None:
                self.early.setdefault(hid, []).append((seq, op, arg))
            return
        holding.parked[seq] = (op, arg)
        while holding.next_seq in holding.parked:
            op, arg = holding.parked.pop(holding.next_seq)
            holding.next_seq += 1
            if op == "update":
                holding.acq.update(arg)
            elif op == "release":
                holding.acq.release()
                del self.holdings[hid]
                return
            elif op == "abandon":
                # Granted, but its caller left before it knew: give everything back (§5).
                with self.sched.lock:
                    self.sched.abandon(holding.waiter, self.clock())
                holding.acq._state = RELEASED  #: the give-back above returned its slots
                del self.holdings[hid]
                self.run_due()
                return

    def _abandon(self, waiter: ActorWaiter) -> None:
        with self.sched.lock:
            if waiter.timer is not None:
                waiter.timer.cancel()
                waiter.timer = None
            if waiter.state == WAITING:
                self.sched.abandon(waiter, self.clock())
            del self.waiting[waiter.hid]
            self.callers.pop(waiter.hid, None)
        if waiter.future is not None and not waiter.future.done():
            waiter.future.set_result((TIMEOUT_OUTCOME,))
        self.run_due()

    # -- leases ----------------------------------------------------------------------------

    def renew(self, hids: list[str]) -> None:
        expires = time.monotonic() + self.lease
        for hid in hids:
            holding = self.holdings.get(hid)
            if holding is not None:
                holding.expires = expires

    def _arm_sweeper(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - the actor's methods run on its loop
            return
        self.sweeper = loop.call_later(self.lease / 3, self._sweep)

    def _sweep(self) -> None:
        """Give back the slots of holdings whose holder stopped renewing (it died)."""
        self.sweeper = None
        now = time.monotonic()
        for hid, holding in list(self.holdings.items()):
            if holding.expires <= now:
                del self.holdings[hid]
                holding.acq.release()
        self.run_due()
        if self.holdings:
            self._arm_sweeper()

    def take_finished(self, caller: str) -> list[tuple[Any, ...]]:
        return self.finished.pop(caller, [])

    def snapshot(self) -> dict[str, Any]:
        sched = self.sched
        with sched.lock:
            now = sched.clock()
            sched.catch_up(now)
            return {
                "waiting_per_key": sched.waiting_per_key(),
                "waiting": sched.waiting_count(),
                "available": sched.availability(now),
                "granted": sched.granted,
                "timed_out": sched.timed_out,
                "cancelled": sched.cancelled,
                "refunded": dict(sched.refunded or {}),
                "paused_for": max(0.0, sched.paused_until - now),
                "numbers": {s.key: (s.capacity, s.window) for s in sched.states},
            }


class LimitsActor:
    """The Ray actor (made remote by the backend, which also names it): every named set of one
    RayBackend. Every method answers ``(result, outcomes, next_timer)``: ``outcomes`` are the
    caller's queued requests decided since (simulated clocks only), ``next_timer`` when the
    caller's simulated clock must call :meth:`tick` (inf: never)."""

    def __init__(self) -> None:
        self.sets: dict[str, Shared] = {}

    def _set(self, name: str) -> Shared:
        shared = self.sets.get(name)
        if shared is None:
            raise LookupError(f"no limits named {name!r} in this actor (it restarted?)")
        return shared

    def _reply(self, shared: Shared, caller: str, result: Any) -> tuple[Any, ...]:
        return result, shared.take_finished(caller), shared.next_timer()

    async def declare(
        self, name: str, limits: tuple[Limit, ...], start: float | None, lease: float
    ) -> str | None:
        """Make the set ``name``, or check ``limits`` against it: None, or what differs."""
        shared = self.sets.get(name)
        if shared is None:
            self.sets[name] = Shared(name, limits, start, lease)
            return None
        return mismatch(name, shared.declared, declaration(limits))

    async def acquire(  # noqa: PLR0917 - called as .remote(...), positionally
        self,
        name: str,
        caller: str,
        hid: str,
        requested: dict[str, float],
        timeout: float,
        now: float | None,
    ) -> tuple[Any, ...]:
        shared = self._set(name)
        shared.at(now)
        outcome = shared.acquire(caller, hid, requested, timeout)
        if outcome[0] == QUEUED_OUTCOME and now is None:
            # Waits here, on the actor's loop: the caller awaits the answer, nobody polls.
            waiter = shared.waiting.get(hid)
            if waiter is not None:
                future = waiter.future = asyncio.get_running_loop().create_future()
                try:
                    outcome = await future
                except asyncio.CancelledError:
                    if hid in shared.waiting:
                        shared._abandon(waiter)
                    raise
            else:  # decided meanwhile (abandoned early)
                outcome = (TIMEOUT_OUTCOME,)
        return self._reply(shared, caller, outcome)

    async def try_acquire(
        self, name: str, caller: str, hid: str, requested: dict[str, float], now: float | None
    ) -> tuple[Any, ...]:
        shared = self._set(name)
        shared.at(now)
        items = shared.limitset._items(requested)
        sched = shared.sched
        with sched.lock:
            start = sched.clock()
            receipts = sched.try_take(items, start)
        if receipts is None:
            return self._reply(shared, caller, False)
        waiter = ActorWaiter(items, _INF, shared, hid)
        waiter.receipts, waiter.state, waiter.start, waiter.granted_at = (
            receipts,
            GRANTED,
            start,
            start,
        )
        shared._hold(waiter)
        return self._reply(shared, caller, True)

    async def operate(  # noqa: PLR0917 - called as .remote(...), positionally
        self, name: str, caller: str, hid: str, seq: int, op: str, arg: Any, now: float | None
    ) -> tuple[Any, ...]:
        shared = self._set(name)
        shared.at(now)
        shared.operate(hid, seq, op, arg)
        shared.run_due()
        return self._reply(shared, caller, None)

    async def pause(
        self, name: str, caller: str, seconds: float, now: float | None
    ) -> tuple[Any, ...]:
        shared = self._set(name)
        shared.at(now)
        shared.limitset.pause(seconds)
        shared.run_due()
        return self._reply(shared, caller, None)

    async def change_limit(  # noqa: PLR0917 - called as .remote(...), positionally
        self,
        name: str,
        caller: str,
        key: str,
        capacity: float | None,
        window: float | None,
        now: float | None,
    ) -> tuple[Any, ...]:
        shared = self._set(name)
        shared.at(now)
        shared.limitset.change_limit(key, capacity=capacity, window_seconds=window)
        shared.run_due()
        return self._reply(shared, caller, None)

    async def retry_after(
        self, name: str, caller: str, requested: dict[str, float], now: float | None
    ) -> tuple[Any, ...]:
        shared = self._set(name)
        shared.at(now)
        return self._reply(shared, caller, shared.limitset.retry_after(requested))

    async def stats(self, name: str, caller: str, now: float | None) -> tuple[Any, ...]:
        shared = self._set(name)
        shared.at(now)
        return self._reply(shared, caller, shared.snapshot())

    async def tick(self, name: str, caller: str, now: float | None) -> tuple[Any, ...]:
        shared = self._set(name)
        shared.at(now)
        return self._reply(shared, caller, None)

    async def renew(self, leases: dict[str, list[str]]) -> None:
        """Holders still alive: the ids of their holdings with resource slots, per set."""
        for name, hids in leases.items():
            shared = self.sets.get(name)
            if shared is not None:
                shared.renew(hids)

    async def ping(self) -> bool:
        return True
