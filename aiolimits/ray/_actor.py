"""The limits actor: every named set of a RayBackend, decided in one async Ray actor.

Each set is a real in-process :class:`~aiolimits.LimitSet` (the memory backend) inside the actor,
so admission, FIFO order, refunds and timeouts are those of the tested core. Callers' waiters are
:class:`ActorWaiter` objects parked in that set's one FIFO queue: nothing waits in a task, the
actor runs the waiting protocol of ``_door.py`` itself, event by event (a grant, a release, a
timer), so every decision is made on the actor's event loop in the order events arrive.

A caller process sends its requests in batches (:meth:`LimitsActor.batch`: whatever its tasks
asked while the previous batch was on its way), answered at once: granted, refused, or queued. The
outcome of a queued request goes to the caller's outstanding :meth:`LimitsActor.wait` (or with its
next batch), so one round trip serves many waiters and nobody polls.

Ray starts calls of an async actor in no guaranteed order, even from one caller: the operations
on one acquisition (``update``, ``release``, ``abandon``) carry a sequence number and are applied
in that order (:class:`Holding`).

A KeyedLimitSet's keys are each such a set (:class:`KeyedShared`), found by ``(name, key)``: made
on the first request that needs one, dropped once fresh, ``max_keys`` bounding the rest, as the
memory KeyedLimitSet keeps its keys (semantics §8).

Time: the actor's ``time.monotonic``. A set declared by a caller on a clock that drives its own
timers (``aiolimits.testing.ManualClock``) gets a ManualClock in the actor instead, moved to the
caller's reading on every call (the contract suite's hook: same code, injected time).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import ray

from .._acquisition import HELD, RELEASED, Acquisition
from .._backends._declaration import declaration, mismatch
from .._limits import Limit
from .._limitset import LimitSet, changed_limit
from .._numbers import check_timer_slack
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

#: Operations kept for acquisitions the actor has not seen (see ``Shared.early``) at most.
MAX_EARLY = 10_000

#: Keys at the old end of a keyed set's order looked at for freshness per new key.
SWEEP_KEYS = 4


class ActorWaiter(Waiter):
    """A caller's request parked in a set's queue in the actor. Notifying it only marks it due:
    the actor runs it after the operation in progress (:meth:`Shared.run_due`)."""

    __slots__ = ("hid", "shared", "start", "timer", "until")

    def __init__(self, items: Items, deadline: float, shared: Shared, hid: str) -> None:
        super().__init__(items, deadline)
        self.shared = shared
        self.hid = hid
        self.start = 0.0
        self.timer: Cancellable | asyncio.TimerHandle | None = None
        #: When its timer fires (inf: none armed).
        self.until = _INF

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
        #: Outcomes of queued requests not yet returned, per caller, and the caller's
        #: outstanding ``wait``.
        self.finished: dict[str, list[tuple[Any, ...]]] = {}
        self.pollers: dict[str, asyncio.Future[None]] = {}
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
        return min((w.until for w in self.waiting.values()), default=_INF)

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
                wake = sched.timer_at(waiter.wake_at, waiter.deadline)
                self._arm(waiter, wake if sched.head() is waiter else _INF)
        outcome: tuple[Any, ...] = (QUEUED_OUTCOME,)
        if receipts is not None:
            waiter.receipts = receipts
            waiter.state = GRANTED
            waiter.granted_at = start
            outcome = self._hold(waiter)
        early = self.early.pop(hid, None)
        if early is not None:
            for seq, op, arg in early:
                self.operate(hid, seq, op, arg)
        return outcome

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

    def _arm(self, waiter: ActorWaiter, wake: float) -> None:
        """Under the lock: wake ``waiter`` at ``wake`` (its wake time with the set's timer
        slack, if head; else inf) or at its deadline, whichever comes first."""
        timer = waiter.timer
        if timer is not None:
            timer.cancel()
            waiter.timer = None
        until = waiter.until = wake if wake < waiter.deadline else waiter.deadline
        if until == _INF:
            return
        if self.manual is not None:
            waiter.timer = self.manual.call_at(until, waiter.notify)
        else:
            loop = asyncio.get_running_loop()
            delay = until - self.clock()
            waiter.timer = loop.call_later(max(delay, 0.0), self._fire, waiter)

    def _fire(self, waiter: ActorWaiter) -> None:
        waiter.timer, waiter.until = None, _INF
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
                    self._arm(waiter, until)
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
            self.finished.setdefault(caller, []).append((waiter.hid, *outcome))
            poller = self.pollers.pop(caller, None)
            if poller is not None and not poller.done():
                poller.set_result(None)

    # -- after the grant -------------------------------------------------------------------

    def operate(self, hid: str, seq: int, op: str, arg: Any) -> None:
        """Apply ``op`` (update, release, abandon) of acquisition ``hid`` in sequence order."""
        holding = self.holdings.get(hid)
        if holding is None:
            waiter = self.waiting.get(hid)
            if waiter is not None and op == "abandon":
                self._abandon(waiter)
            elif waiter is None:
                if len(self.early) >= MAX_EARLY:  # for requests that never came: forget
                    del self.early[next(iter(self.early))]
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

    # -- a key of a keyed set ----------------------------------------------------------------

    def busy(self) -> bool:
        """Someone waits, or holds resource slots (a key of a keyed set that is never dropped:
        its queue and slots live here only)."""
        return bool(self.waiting or self.due or self.pollers or self.finished) or (
            self.keep is None and bool(self.holdings)
        )

    def fresh(self) -> bool:
        """Indistinguishable from a key made now: nothing waiting, held or to be answered,
        no pause, every bucket full and every window empty."""
        if self.busy() or self.holdings or self.early:
            return False
        sched = self.sched
        with sched.lock:
            now = sched.clock()
            if sched.queue or sched.paused_until > now:
                return False
            return all(state.is_fresh(now) for state in sched.states)

    def try_acquire(self, hid: str, requested: Mapping[str, float]) -> bool:
        items = self.limitset._items(requested)
        sched = self.sched
        with sched.lock:
            start = sched.clock()
            receipts = sched.try_take(items, start)
        if receipts is None:
            return False
        waiter = ActorWaiter(items, _INF, self, hid)
        waiter.receipts, waiter.state = receipts, GRANTED
        waiter.start = waiter.granted_at = start
        self._hold(waiter)
        return True

    def apply(self, caller: str, message: tuple[Any, ...]) -> Any:
        """One message of ``caller``'s batch: its answer (None for those not answered)."""
        op, *args = message
        if op == "acquire":
            return self.acquire(caller, *args)
        if op == "operate":
            return self.operate(*args)
        if op == "try":
            return self.try_acquire(*args)
        if op == "pause":
            return self.limitset.pause(*args)
        if op == "change_limit":
            key, capacity, window = args
            return self.limitset.change_limit(key, capacity=capacity, window_seconds=window)
        if op == "slack":
            return self.limitset._set_timer_slack(check_timer_slack(*args))
        if op == "retry_after":
            return self.limitset.retry_after(*args)
        if op == "stats":
            return self.snapshot()
        raise ValueError(f"unknown operation {op!r}")

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


class KeyedShared:
    """One named KeyedLimitSet in the actor: a :class:`Shared` per client key, made on first
    use, dropped once fresh (no decision changes), ``max_keys`` bounding the rest, as the
    memory KeyedLimitSet does (semantics §8): at the bound a new key drops the oldest key not
    used since last looked at with nobody waiting and no resource slot held, fresh or not."""

    def __init__(
        self,
        name: str,
        limits: tuple[Limit, ...],
        *,
        manual: bool,
        lease: float,
        max_keys: int,
        paused_until: float,
    ) -> None:
        self.name = name
        self.limits = limits
        self.declared = declaration(limits)
        self.manual = manual
        self.lease = lease
        self.max_keys = max_keys
        #: Every key paused until then (``time.monotonic``): a restarted actor's keys.
        self.paused_until = paused_until
        #: Oldest first; a key's flag: used since the sweep last looked at it.
        self.keys: OrderedDict[str, Shared] = OrderedDict()
        self.used: set[str] = set()
        self.dropped = 0
        self.forgotten = 0

    def get(self, key: str, now: float | None, *, keep: bool = True) -> Shared:
        """The state of ``key``, made (and room made for it) if new; a new one is not kept
        unless ``keep`` (asking about a key creates none)."""
        shared = self.keys.get(key)
        if shared is not None:
            self.used.add(key)
            return shared
        start = None if not self.manual else (0.0 if now is None else now)
        shared = Shared(f"{self.name}[{key}]", self.limits, start, self.lease)
        if keep:
            self._make_room()
            self.keys[key] = shared
        pause = self.paused_until - time.monotonic()
        if pause > 0:
            shared.limitset.pause(pause)
        return shared

    def find(self, key: str) -> Shared | None:
        return self.keys.get(key)

    def change(self, index: int, capacity: float | None, window: float | None) -> None:
        """Change the numbers given (None: unchanged) of the limit at ``index`` for every key
        (semantics §4, applied to each key's state as the memory KeyedLimitSet does), and for
        the keys made later."""
        limit_key = self.limits[index].key
        changed = changed_limit(self.limits, limit_key, capacity, window)
        if changed is None:
            return
        _index, limit = changed
        limits = list(self.limits)
        limits[index] = limit
        self.limits = tuple(limits)
        for shared in self.keys.values():
            shared.limitset.change_limit(limit_key, capacity=capacity, window_seconds=window)
            shared.run_due()

    def _drop(self, key: str, *, fresh: bool) -> None:
        del self.keys[key]
        self.used.discard(key)
        if fresh:
            self.dropped += 1
        else:
            self.forgotten += 1

    def _make_room(self) -> None:
        keys = self.keys
        for _ in range(SWEEP_KEYS):
            if not keys:
                return
            key, shared = next(iter(keys.items()))
            if key in self.used or not shared.fresh():
                self.used.discard(key)
                keys.move_to_end(key)
            else:
                self._drop(key, fresh=True)
        if len(keys) < self.max_keys:
            return
        for _ in range(2 * len(keys)):
            key, shared = next(iter(keys.items()))
            if key in self.used or shared.busy():
                self.used.discard(key)
                keys.move_to_end(key)
                continue
            self._drop(key, fresh=shared.fresh())
            return


class LimitsActor:
    """The Ray actor (made remote by the backend, which also names it): every named set of one
    RayBackend. :meth:`batch` and :meth:`wait` answer with ``outcomes``, the caller's queued
    requests decided since, and ``next_timer``, when the caller's simulated clock must send its
    next (empty) batch (inf: never)."""

    def __init__(self) -> None:
        self.sets: dict[str, Shared] = {}
        #: The keyed sets, by name.
        self.keyed: dict[str, KeyedShared] = {}
        #: Ray restarted this actor (``max_restarts``): what its predecessor granted is lost.
        self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)

    def _set(
        self, name: str | tuple[str, str], now: float | None = None, *, keep: bool = True
    ) -> Shared:
        """The set ``name``, or (``(name, key)``) the state of a key of a keyed set, made if
        new (and kept unless not ``keep``)."""
        if isinstance(name, tuple):
            keyed = self.keyed.get(name[0])
            if keyed is not None:
                return keyed.get(name[1], now, keep=keep)
        else:
            shared = self.sets.get(name)
            if shared is not None:
                return shared
        raise LookupError(f"no limits named {name!r} in this actor (it restarted?)")

    def _find(self, name: str | tuple[str, str]) -> Shared | None:
        """The set or key ``name`` if the actor has it (never made here)."""
        if isinstance(name, tuple):
            keyed = self.keyed.get(name[0])
            return None if keyed is None else keyed.find(name[1])
        return self.sets.get(name)

    def _restart_pause(self, limits: tuple[Limit, ...]) -> float:
        """After a restart, how long nobody is admitted: the grants of the actor that died are
        lost, and each counts for one window at most, so none is admitted twice."""
        if not self.restarted:
            return 0.0
        windows = [getattr(limit, "window_seconds", 0.0) for limit in limits]
        return float(max(windows, default=0.0))

    async def declare(
        self, name: str, limits: tuple[Limit, ...], start: float | None, lease: float
    ) -> str | None:
        """Make the set ``name``, or check ``limits`` against it: None, or what differs."""
        if name in self.keyed:
            return f"{name!r} is a KeyedLimitSet in this actor, not a LimitSet"
        shared = self.sets.get(name)
        if shared is None:
            shared = self.sets[name] = Shared(name, limits, start, lease)
            pause = self._restart_pause(limits)
            if pause:
                shared.limitset.pause(pause)
            return None
        return mismatch(name, shared.declared, declaration(limits))

    async def declare_keyed(
        self,
        name: str,
        limits: tuple[Limit, ...],
        start: float | None,
        lease: float,
        max_keys: int,
    ) -> str | None:
        """Make the keyed set ``name``, or check ``limits`` and ``max_keys`` against it: None,
        or what differs."""
        if name in self.sets:
            return f"{name!r} is a LimitSet in this actor, not a KeyedLimitSet"
        keyed = self.keyed.get(name)
        if keyed is None:
            until = time.monotonic() + self._restart_pause(limits)
            self.keyed[name] = KeyedShared(
                name,
                limits,
                manual=start is not None,
                lease=lease,
                max_keys=max_keys,
                paused_until=until,
            )
            return None
        if keyed.max_keys != max_keys:
            return (
                f"the keyed set {name!r} was declared with max_keys={keyed.max_keys}, "
                f"not {max_keys}"
            )
        return mismatch(name, keyed.declared, declaration(limits))

    async def change_keyed(
        self, name: str, index: int, capacity: float | None, window: float | None
    ) -> None:
        """Change the limit at ``index`` of every key of the keyed set ``name``."""
        keyed = self.keyed.get(name)
        if keyed is None:
            raise LookupError(f"no keyed limits named {name!r} in this actor")
        keyed.change(index, capacity, window)

    async def keys(self, name: str) -> dict[str, int]:
        """The keys the keyed set ``name`` holds, and how many were dropped (fresh) or
        forgotten (at ``max_keys``)."""
        keyed = self.keyed.get(name)
        if keyed is None:
            raise LookupError(f"no keyed limits named {name!r} in this actor")
        return {"keys": len(keyed.keys), "dropped": keyed.dropped, "forgotten": keyed.forgotten}

    async def batch(
        self, request: tuple[str | tuple[str, str], str, list[tuple[Any, ...]], float | None]
    ) -> tuple[list[Any], list[tuple[Any, ...]], float]:
        """Apply the ``messages`` of ``request = (name, caller, messages, now)`` in order:
        ``(answers, outcomes, next_timer)``, one answer per message that asks a question
        (``acquire``, ``try``, ``retry_after``, ``stats``), in order; an exception object for
        one that failed. One argument: Ray serializes each argument of a call on its own.
        ``name`` is ``(name, key)`` for a key of a keyed set."""
        name, caller, messages, now = request
        if (
            isinstance(name, tuple)
            and self._find(name) is None
            and not any(message[0] in MAKES_KEY or _abandons(message) for message in messages)
        ):
            # Late operations on a key dropped meanwhile (it was fresh, or forgotten at
            # ``max_keys``): its state is gone with what they would settle; never made again.
            # (An abandon makes the key: it may come before its acquire, which it must meet.)
            return [], [], _INF
        shared = self._set(name, now, keep=not all(m[0] in PEEKS for m in messages))
        shared.at(now)
        answers: list[Any] = []
        for message in messages:
            try:
                answer = shared.apply(caller, message)
            except Exception as exc:
                answer = exc
            if message[0] in ASKING:
                answers.append(answer)
            shared.run_due()
        return answers, shared.take_finished(caller), shared.next_timer()

    async def batch_keys(
        self, name: str, batches: list[tuple[str, str, list[tuple[Any, ...]]]]
    ) -> list[Any]:
        """The batches of several keys of the keyed set ``name`` (``(key, caller,
        messages)``, those a process joined into one call): the reply to each, as
        :meth:`batch` gives it, or the exception that failed it."""
        replies: list[Any] = []
        for key, caller, messages in batches:
            reply: Any
            try:
                reply = await self.batch(((name, key), caller, messages, None))
            except Exception as exc:
                reply = exc
            replies.append(reply)
        return replies

    async def wait(
        self, name: str | tuple[str, str], caller: str, seconds: float
    ) -> tuple[list[tuple[Any, ...]], float]:
        """The outcomes of ``caller``'s queued requests: as soon as there is one, or after
        ``seconds`` (then maybe none). Each caller keeps one outstanding."""
        if isinstance(name, tuple) and name[0] in self.keyed:
            found = self._find(name)
            if found is None:  # a key with nothing queued was dropped: nothing to say
                return [], _INF
            shared = found
        else:
            shared = self._set(name)
        if not shared.finished.get(caller):
            future = asyncio.get_running_loop().create_future()
            previous = shared.pollers.pop(caller, None)
            if previous is not None and not previous.done():
                previous.set_result(None)
            shared.pollers[caller] = future
            try:
                await asyncio.wait((future,), timeout=seconds)
            finally:
                if shared.pollers.get(caller) is future:
                    del shared.pollers[caller]
        return shared.take_finished(caller), shared.next_timer()

    async def renew(self, leases: dict[str | tuple[str, str], list[str]]) -> None:
        """Holders still alive: the ids of their holdings with resource slots, per set (or
        ``(name, key)``)."""
        for name, hids in leases.items():
            shared = self._find(name)
            if shared is not None:
                shared.renew(hids)

    async def ping(self) -> bool:
        """Whether this actor is a restart (Ray made it again after it died)."""
        return self.restarted


#: The operations that use a key of a keyed set (and make it if new); the others (``operate``)
#: only finish what one of those began.
MAKES_KEY = frozenset({"acquire", "try", "pause", "change_limit", "slack", "retry_after", "stats"})


def _abandons(message: tuple[Any, ...]) -> bool:
    """``message`` gives back an acquisition its caller left (``operate ... abandon``)."""
    return bool(message[0] == "operate" and message[3] == "abandon")


#: The operations that only ask about a key: a key not held is answered as fresh, not made.
PEEKS = frozenset({"stats", "retry_after", "slack"})

#: The operations that are answered.
ASKING = frozenset({"acquire", "try", "retry_after", "stats"})
