"""The one place that decides: atomic admission across limits, one FIFO queue, exact wake times.

Model (Go's ``rate.Reservation``, trio's ``ParkingLot``): a LimitSet's state is a handful of pure
algorithm state machines plus one FIFO queue of waiters, all guarded by one ``threading.Lock``.
Nothing under the lock awaits, sleeps or calls user code.

* A request is a tuple of ``(state, amount)`` items. It is admitted when *every* item is admissible
  at the same instant; then all are taken together. Otherwise nothing is taken (all-or-nothing), so
  a waiting request holds nothing another could use.
* Arrivals barge only into an empty queue. Otherwise they join its tail, and only the head is
  ever considered: grants follow arrival order, and a large request is never starved by small
  ones (the price is head-of-line blocking, documented in ``docs/limitset.md``).
* *Decide, then wait*: for the head, the algorithms answer "not before T" exactly. The head sleeps
  until T; a release, refund, cancellation or pause that may change T runs :meth:`_dispatch`,
  which grants the head (and the next, and the next, while they are admissible) and tells the new
  head its T. No polling, no periodic timer. A grant costs O(1) wake-ups: the granted waiter, and
  the new head so that it arms its timer.
* Invariant, after every operation under the lock: the queue is empty, or its head is not
  admissible before ``head.wake_at``, the time it becomes so (inf: only a release can). Once that
  time has come, the head's own timer grants it, or whoever takes the lock first (catch_up).
* Timer slack (``timer_slack``, default 0): the head's timer may be armed late, never early, at
  the first multiple of the slack at or after its wake time (:meth:`Scheduler.timer_at`). The
  one wake-up then grants, in queue order, every waiter admissible by that time: at a steady
  rate r one wake-up grants about ``r * slack`` waiters instead of one, and heads of different
  sets on one clock wake together. ``wake_at`` stays exact (anyone taking the lock after it, an
  arrival or a release, still grants the head then; a rounded time past the head's deadline is
  not used), and the rate is kept whenever a limit can hold ``r * slack`` units (a full bucket
  would otherwise overflow while its head sleeps on).
* Queue-aware timeouts (semantics §4): a request with a deadline that arrives behind others fails at
  once when the rate limits cannot admit it before its deadline even if every request ahead is
  granted at its own earliest time, in order, and nothing is released, refunded or cancelled.
  That answer comes from a :class:`Forecast`, a copy of the rate limits' state run ahead of now to
  the tail of the queue (Go's ``rate.Reservation`` keeps such a virtual state): each arrival costs
  O(1) on it, and it is rebuilt lazily, once, after a waiter leaves, a refund or a pause (a
  charge only takes room: the forecast stays a lower bound and is kept). Resource limits are
  left out of it: a slot depends on releases, which it ignores, so a full resource never fails
  a request at once.
* Limits that change at run time (semantics §4): :meth:`Scheduler.change_limit` changes one
  state's numbers (each algorithm keeps what is in use in use), sends away the waiters that ask
  more than the new capacity (a ``ValueError``, as on arrival), drops the forecast and runs the
  grant routine, so that a limit that grew admits its waiters at once and the head's wake time
  is the new one.

The async and thread doors (``_limitset.py``) call :meth:`try_take` and, when that fails, park a
waiter from ``_waiters.py`` with :meth:`enqueue` / :meth:`after_wake` / :meth:`abandon`.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from copy import deepcopy
from functools import partial
from typing import Any, ClassVar

from ._algorithms import RateState, SemaphoreState, too_large
from ._compiled import mypyc_attr
from ._waiters import GRANTED, LEFT, WAITING, TimerClock, Waiter

__all__ = ["Forecast", "Items", "Scheduler"]

Items = tuple[tuple[RateState, float], ...]

_INF = math.inf


def check_capacity(items: Items) -> None:
    """Raise the ValueError of an amount above its limit's capacity now."""
    for state, amount in items:
        if amount > state.capacity:
            raise too_large(state.key, amount, state.capacity)


# A plain Python class when compiled: mypyc's native subclasses of OrderedDict crash the GC.
@mypyc_attr(native_class=False)
class _NoQueue(OrderedDict["Waiter", None]):
    """The empty queue every scheduler starts with, shared until its first waiter arrives (most
    keyed states never see one). Reading it is reading an empty queue; only :meth:`enqueue`
    inserts, and it swaps in a queue of the scheduler's own first."""

    def __setitem__(self, key: Waiter, value: None) -> None:
        raise RuntimeError("internal error: a waiter was put into the shared empty queue")


_NO_QUEUE: OrderedDict[Waiter, None] = _NoQueue()

# Per scheduler class: whether it decides for the head with the base class's own methods
# (see Scheduler._dispatch); a subclass that answers otherwise (another process's waiter
# ahead, a decision made in Redis) always takes the general path.
_PLAIN_ADMIT: dict[type, bool] = {}


class Forecast:
    """The rate limits as they will be once every queued request has been granted, each at its
    own earliest time in queue order, assuming nothing is released, refunded or cancelled.

    Copies of the scheduler's rate states (resource states are left out: releases are ignored,
    so they never delay the forecast) on a virtual clock ``at`` that only moves forward: the
    time the last request it counts would be granted. Waiters queued without a deadline are
    only noted (``pending``) and run on the copies when a request with a deadline needs the
    answer, so an arrival that will never ask costs one append. It is a lower bound: grants
    later than forecast (a full resource, a late timer) only make the real times later.
    """

    __slots__ = ("at", "copies", "pending")

    def __init__(self, copies: dict[int, RateState], at: float, pending: list[Waiter]) -> None:
        #: The copy of each rate state, by ``id`` of the real one (which the waiters' items name).
        self.copies = copies
        #: The virtual clock: no operation on the copies is ever at an earlier time.
        self.at = at
        #: Queued waiters not yet run on the copies, in queue order.
        self.pending = pending

    def earliest(self, items: Items, now: float) -> float:
        """When the rate limits admit ``items`` after everything the forecast counts (and not
        before ``now``); runs the pending waiters first. Changes nothing else."""
        pending = self.pending
        if pending:
            for waiter in pending:
                self.take(waiter.items, self._rate_at(waiter.items, self.at))
            pending.clear()
        if now > self.at:
            self.at = now
        return self._rate_at(items, self.at)

    def take(self, items: Items, at: float) -> None:
        """Count ``items`` as granted at ``at`` (not before the virtual clock)."""
        copies = self.copies
        for state, amount in items:
            if not isinstance(state, SemaphoreState):
                copies[id(state)].take(amount, at)
        self.at = at

    def _rate_at(self, items: Items, at: float) -> float:
        # As ``Scheduler.admit_time``: each limit is asked at one time, the latest answer wins
        # (admissibility only grows with time while nothing is taken).
        copies = self.copies
        t = at
        for state, amount in items:
            if not isinstance(state, SemaphoreState):
                e = copies[id(state)].earliest(amount, at)
                if e > t:
                    t = e
        return t


# The backends and the keyed sets subclass it (in Python, when this module is compiled).
@mypyc_attr(allow_interpreted_subclasses=True)
class Scheduler:
    """The state and the queue of one LimitSet, with every decision about them."""

    # ``dropped`` and ``remote`` are slots of this class, which subclasses set (a slot of the
    # same name in a subclass would hide them from this class's compiled code).
    __slots__ = (
        "_credit",
        "_forecast",
        "_timed",
        "cancelled",
        "clock",
        "dropped",
        "granted",
        "lock",
        "paused_until",
        "queue",
        "refunded",
        "refused",
        "remote",
        "states",
        "timed_out",
        "timer_slack",
    )

    # Whether a new head's timer may be armed for it (``Waiter.notify_at``) instead of waking it
    # to arm it; a backend whose waiters must run when they become head clears it.
    timed_wakes: ClassVar[bool] = True

    # Whether a request arriving behind others is checked against the queue ahead (a
    # :class:`Forecast` over copies of ``states``). Only a scheduler whose ``states`` are what
    # its decisions are made on can; one that decides elsewhere (the Redis script) clears it
    # and checks a request's own amounts only, as the head does.
    forecasts_queue: ClassVar[bool] = True

    # PERF (benchmarks/queue_timeouts.py): building a forecast runs every queued request on the
    # copies. Each arrival earns this many such runs and a build spends one per queued request;
    # a build the credit does not cover is not made, and the arrival is checked on its own
    # amounts, as before queue-aware timeouts. So the forecast costs at most this much per
    # arrival, amortised, even when refunds or cancellations drop it again and again.
    forecast_budget: ClassVar[int] = 8

    def __init__(
        self,
        states: tuple[RateState, ...],
        clock: Callable[[], float],
        lock: threading.Lock | None = None,
    ) -> None:
        # Keyed sets pass one lock shared by all their keys.
        self.lock = threading.Lock() if lock is None else lock
        #: True once a keyed set dropped this scheduler's key (see ``_keyed.py``).
        self.dropped = False
        #: A backend that decides over the network sets this: its async door then queues
        #: without asking under the lock (a network call there would block the event loop).
        self.remote = False
        self.clock = clock
        self.states = states
        # Insertion-ordered, O(1) removal from the middle (cancellation) and O(1) head. The shared
        # empty one until the first waiter.
        self.queue: OrderedDict[Waiter, None] = _NO_QUEUE
        self.paused_until = -_INF
        self.granted = 0
        self.timed_out = 0
        self.cancelled = 0
        # Units refunded per key, created on the first refund.
        self.refunded: dict[str, float] | None = None
        # Waiters sent away by a change of a limit, with the error their door raises (created on
        # the first one): see :meth:`change_limit`.
        self.refused: dict[Waiter, BaseException] | None = None
        # A new head's wake-up may be armed by the one who makes it head (notify_at): delays on
        # this clock are real seconds (a simulated clock fires its own timers instead).
        self._timed = self.timed_wakes and not isinstance(clock, TimerClock)
        # Built on demand by the first arrival with a deadline behind others (see Forecast),
        # with the credit arrivals earn (forecast_budget).
        self._forecast: Forecast | None = None
        self._credit = 0
        #: Seconds a head's timer may fire after its wake time (validated by the doors, which
        #: set it after the backend made the scheduler): see :meth:`timer_at`.
        self.timer_slack = 0.0

    # -- decisions (under the lock) --------------------------------------------------------

    def timer_at(self, at: float, deadline: float = _INF) -> float:
        """When to wake a head whose wake time is ``at``: ``at`` itself without slack, else the
        first multiple of ``timer_slack`` at or after it (never earlier, less than one slack
        later), so that heads due close together share one wake-up; but ``at`` itself when
        that multiple would come after the waiter's ``deadline`` (the slack never makes a
        waiter that could be granted in time time out)."""
        slack = self.timer_slack
        if slack and -_INF < at < _INF:
            # fmod is exact and the sum of ``at`` and a non-negative number never rounds below it.
            late = at + (-at) % slack
            return late if late <= deadline else at
        return at

    def admit_time(self, items: Items, now: float) -> tuple[float, float]:
        """``(rate_at, admit_at)`` for ``items`` at ``now``, assuming nothing else happens.

        ``rate_at`` is when the rate limits (and a pause) allow it: a hard lower bound that only a
        refund can lower. ``admit_at`` is ``inf`` instead when a resource limit is full: only a
        release can help then. Each state is asked at ``now`` only (never at a future time, which
        would make the window algorithms forget entries that still count now).
        """
        at = self.paused_until if self.paused_until > now else now
        blocked = False
        for state, amount in items:
            t = state.earliest(amount, now)
            if t > at:
                if t == _INF:
                    blocked = True
                else:
                    at = t
        return at, (_INF if blocked else at)

    def _admit_head(self, head: Waiter, now: float) -> tuple[float, float, list[Any] | None]:
        """:meth:`_admit` for the head of the queue. A hook: the process backend answers
        ``admit_at = inf`` (and takes nothing) while a waiter of another process is ahead."""
        return self._admit(head.items, now)

    def _take(self, items: Items, now: float) -> list[Any]:
        # A loop, not a comprehension: on Python 3.11 that would be a function call more.
        receipts = []
        for state, amount in items:
            receipts.append(state.take(amount, now))
        return receipts

    def _admit(self, items: Items, now: float) -> tuple[float, float, list[Any] | None]:
        """``admit_time`` and, when that is now, the take: ``(rate_at, admit_at, receipts)``,
        receipts None when not admitted. One step, so that a shared backend can decide and take
        in one atomic round trip."""
        rate_at, admit_at = self.admit_time(items, now)
        if admit_at <= now:
            return rate_at, admit_at, self._take(items, now)
        return rate_at, admit_at, None

    def _timer_fired(self, head: Waiter) -> None:
        """The wake-up armed for ``head`` (``Waiter.notify_at``) is due: grant it, and with it
        every waiter behind it admissible by now (one wake-up for all of them with
        ``timer_slack``). A head not due by this clock yet, or no longer the head, is told to
        re-read its state instead."""
        with self.lock:
            if head.state != WAITING:
                return
            now = self.clock()
            if now >= head.wake_at and next(iter(self.queue)) is head:
                self._dispatch(now)
            else:
                head.notify()

    def catch_up(self, now: float) -> None:
        """Under the lock: grant a head whose wake time has come but which has not run yet.

        Between the head's wake time and the moment its own timer gets it running, anyone who
        takes the lock may grant it (FIFO is kept: only the head and those after it in order)."""
        queue = self.queue
        if queue and next(iter(queue)).wake_at <= now:
            self._dispatch(now)

    def try_take(self, items: Items, now: float) -> list[Any] | None:
        """Under the lock: take ``items`` now if nobody is queued and all admit; else None."""
        if self.queue:
            self.catch_up(now)
            if self.queue:
                return None
        if self.paused_until > now:
            return None
        for state, amount in items:
            if amount > state.capacity or not state.admits(amount, now):
                # Validated against the capacity before the lock; a change of the limit since
                # may have lowered it (semantics §4): the arrival's ValueError, nothing taken.
                check_capacity(items)
                return None
        self.granted += 1
        # A loop, not a comprehension: on Python 3.11 that would be a function call more.
        receipts = []
        for state, amount in items:
            receipts.append(state.take(amount, now))
        return receipts

    def _dispatch(self, now: float, current: Waiter | None = None) -> None:
        """Grant queued waiters from the head while they are admissible, then tell the new head
        when it will be. ``current`` is a waiter that is running right now and will re-read its
        state itself, so it is not notified."""
        queue = self.queue
        cls = type(self)
        plain = _PLAIN_ADMIT.get(cls)
        if plain is None:
            plain = _PLAIN_ADMIT[cls] = (
                cls._admit_head is Scheduler._admit_head
                and cls._admit is Scheduler._admit
                and cls.admit_time is Scheduler.admit_time
            )
        if plain and self.paused_until > now:
            plain = False
        while queue:
            head = next(iter(queue))
            if head is not current and head.cancel_pending():
                self._drop(head)
                continue
            if plain:
                # PERF (benchmarks/contended.py): a due head, the common case, asks each limit
                # whether it admits (``admits``: the answer of ``earliest(...) <= now``) and
                # takes, without the wake time ``_admit`` computes for a head that must wait.
                items = head.items
                for state, amount in items:
                    if amount > state.capacity or not state.admits(amount, now):
                        break
                else:
                    del queue[head]
                    taken = self._take(items, now)
                    if not self._grant(head, taken, now, wake=head is not current):
                        self._give_back(items, taken, now)
                    continue
            rate_at, admit_at, receipts = self._admit_head(head, now)
            if receipts is not None:
                del queue[head]
                if not self._grant(head, receipts, now, wake=head is not current):
                    self._give_back(head.items, receipts, now)
                continue
            if self._tell_head(head, rate_at, admit_at, now, current):
                return
        # Nobody left: the forecast would only keep copies and granted waiters alive.
        self._forecast = None

    # -- the grant routine: every scheduler's bookkeeping of a waiter's outcome --------------

    def _grant(self, waiter: Waiter, receipts: list[Any], at: float, *, wake: bool = True) -> bool:
        """Under the lock: ``waiter``, already out of the queue, is granted ``receipts`` at
        ``at`` and counted, and woken unless ``wake`` is False (it is running and reads its
        state itself). False when it cannot be woken (its event loop is gone): nobody will ever
        use or release the grant, so it ends LEFT, counted as cancelled, holding nothing, and the
        caller gives ``receipts`` back (:meth:`_give_back`)."""
        waiter.receipts = receipts
        waiter.granted_at = at
        waiter.state = GRANTED
        self.granted += 1
        if not wake or waiter.notify():
            return True
        waiter.receipts = None
        waiter.state = LEFT
        self.granted -= 1
        self.cancelled += 1
        return False

    def _unqueue(self, waiter: Waiter) -> None:
        """Under the lock: ``waiter`` leaves the queue without a grant (LEFT); the caller
        counts why and wakes it if needed."""
        del self.queue[waiter]
        waiter.state = LEFT
        self._forecast = None

    def _drop(self, waiter: Waiter) -> None:
        """Under the lock: a queued ``waiter`` that was cancelled, or cannot be woken any more,
        leaves the queue, counted as cancelled."""
        self._unqueue(waiter)
        self.cancelled += 1

    def _tell_head(
        self,
        head: Waiter,
        rate_at: float,
        admit_at: float,
        now: float,
        current: Waiter | None = None,
        *,
        always: bool = False,
    ) -> bool:
        """Under the lock: the head is not admissible before ``admit_at`` (``rate_at``: by the
        rate limits alone). Tell it its new wake time, or that the rate limits put it past its
        deadline (it then times out at once, even while a full resource blocks it too); told
        only when either changed, or ``always`` (its waiter sleeps until told). False when it
        could not be told (its event loop is gone): it was dropped and the next is the head."""
        head.rate_at = rate_at
        if not (always or head.wake_at != admit_at or rate_at > head.deadline):
            return True
        head.wake_at = admit_at
        if head is current:
            return True
        if self._timed and rate_at <= head.deadline:
            woken = head.notify_at(
                self.timer_at(admit_at, head.deadline), now, partial(self._timer_fired, head)
            )
        else:
            woken = head.notify()  # it times out at once, or arms its own timer
        if not woken:
            self._drop(head)
        return woken

    # -- the waiting protocol, used by the doors -------------------------------------------

    def enqueue(self, waiter: Waiter, now: float) -> bool:
        """Under the lock, after :meth:`try_take` failed: queue ``waiter``, or return False when
        its deadline is already known to be unreachable (the caller raises TimeoutError): the
        rate limits (or a pause) cannot admit it before its deadline, even with every request
        queued ahead granted at its own earliest time (see :class:`Forecast`)."""
        check_capacity(waiter.items)  # see try_take
        queue = self.queue
        deadline = waiter.deadline
        self._credit += self.forecast_budget
        if queue:
            if deadline == _INF:
                # Behind others and without a deadline: nothing to ask until it is the head.
                queue[waiter] = None
                forecast = self._forecast
                if forecast is not None:
                    pending = forecast.pending
                    pending.append(waiter)
                    if len(pending) > 2 * len(queue):
                        # Mostly granted already: rebuilding from the state now costs less
                        # than running them, and memory stays bounded by the queue.
                        self._forecast = None
                return True
            if self.forecasts_queue:
                if now >= deadline:
                    self.timed_out += 1
                    return False
                forecast = self._forecast or self._new_forecast(now)
                if forecast is not None:
                    rate_at = forecast.earliest(waiter.items, now)
                    if rate_at > deadline:
                        self.timed_out += 1
                        return False
                    forecast.take(waiter.items, rate_at)
                    queue[waiter] = None
                    return True
                # Beyond the budget of forecasts: checked on its own amounts, as the head is.
        rate_at, admit_at = self.admit_time(waiter.items, now)
        # The rate limits alone put admission after the deadline (a full resource does not: a
        # release may come in time, so such a waiter waits until its deadline).
        if rate_at > deadline or now >= deadline:
            self.timed_out += 1
            return False
        if not queue:
            waiter.wake_at = admit_at
            waiter.rate_at = rate_at
            self._forecast = None  # built again from the state as it is now, when needed
            if queue is _NO_QUEUE:
                queue = self.queue = OrderedDict()
        queue[waiter] = None
        return True

    def _new_forecast(self, now: float) -> Forecast | None:
        """A forecast from the state now, every queued waiter still to be run on it; None when
        the credit earned by arrivals does not cover that (see ``forecast_budget``)."""
        # The replays are what grows with the queue; the copies cost O(1) per event that
        # dropped the forecast (a refund, a waiter leaving, a pause), which paid for it.
        cost = len(self.queue) + 1
        if self._credit < cost:
            return None
        self._credit -= cost
        copies = {
            id(state): deepcopy(state)
            for state in self.states
            if not isinstance(state, SemaphoreState)
        }
        start = self.paused_until if self.paused_until > now else now
        forecast = self._forecast = Forecast(copies, start, list(self.queue))
        return forecast

    def queued_rate_at(self, items: Items, now: float) -> float:
        """Under the lock: when the rate limits could admit ``items`` behind the requests queued
        now (see :class:`Forecast`); -inf when nobody is queued, or this scheduler does not
        forecast, or not now (``forecast_budget``). Changes no decision."""
        if not self.queue or not self.forecasts_queue:
            return -_INF
        forecast = self._forecast or self._new_forecast(now)
        return -_INF if forecast is None else forecast.earliest(items, now)

    def forget_forecast(self) -> None:
        """Drop the forecast of the queue (see :class:`Forecast`): something other than a grant
        changed the rate limits or the queue ahead. A subclass whose state is changed from
        outside the scheduler (another process) calls it then."""
        self._forecast = None

    def after_wake(self, waiter: Waiter, now: float) -> float | None:
        """Under the lock, each time ``waiter`` wakes. Returns the clock time to sleep until
        (inf: until notified), or None when it is done: granted, or timed out (``waiter.state``
        is then GRANTED or LEFT; LEFT means the caller raises TimeoutError)."""
        waiter.consume_notification()
        if waiter.state != WAITING:
            return None
        queue = self.queue
        is_head = next(iter(queue)) is waiter
        if is_head and now >= waiter.wake_at:
            self._dispatch(now, current=waiter)
            if waiter.state == GRANTED:
                return None
        # The deadline has passed, or the rate limits already place our admission after it.
        if now >= waiter.deadline or (is_head and waiter.rate_at > waiter.deadline):
            self._leave(waiter, now)
            self.timed_out += 1
            return None
        return self.sleep_until(waiter)

    def sleep_until(self, waiter: Waiter) -> float:
        """Under the lock: the clock time a queued ``waiter`` sleeps until, unless notified
        before: its timer (:meth:`timer_at`) if it is the head, else its deadline (inf: none)."""
        deadline = waiter.deadline
        if self.head() is waiter:
            wake = self.timer_at(waiter.wake_at, deadline)
            if wake < deadline:
                return wake
        return deadline

    def abandon(self, waiter: Waiter, now: float) -> None:
        """Under the lock, when a waiter is cancelled (or its thread interrupted) while parked.
        If it was granted meanwhile, the grant goes back and passes to the next waiter; either way
        it ends holding nothing."""
        if waiter.state == WAITING:
            self._leave(waiter, now)
            self.cancelled += 1
        elif waiter.state == GRANTED:
            self.granted -= 1
            self.cancelled += 1
            receipts, waiter.receipts = waiter.receipts, None
            waiter.state = LEFT
            self._give_back(waiter.items, receipts, now)
            self._dispatch(now)

    def _leave(self, waiter: Waiter, now: float) -> None:
        was_head = next(iter(self.queue)) is waiter
        self._unqueue(waiter)
        if was_head:
            self._dispatch(now)

    def _give_back(self, items: Items, receipts: list[Any] | None, now: float) -> None:
        """Under the lock: return a grant nobody used: slots released, rate amounts refunded as
        semantics §3 allows. The caller dispatches when that may admit the head."""
        self._forecast = None
        for (state, amount), receipt in zip(items, receipts or (), strict=True):
            if isinstance(state, SemaphoreState):
                state.release(amount)
            else:
                state.refund(receipt, amount, now)

    # -- after a grant (under the lock) ----------------------------------------------------

    def release(self, items: Items, receipts: list[Any] | None = None) -> None:
        """Give back the resource slots of a finished acquisition (``receipts``: what its take
        returned; a shared backend names its leases with them)."""
        released = False
        for state, amount in items:
            if isinstance(state, SemaphoreState):
                state.release(amount)
                released = True
        if released and self.queue:
            self._dispatch(self.clock())

    def settle(
        self, state: RateState, receipt: Any, held: float, usage: float, now: float
    ) -> tuple[Any, float]:
        """Move one limit of an acquisition from ``held`` units to ``usage`` (§3 refund or
        charge). Returns the new receipt and the units now held."""
        if usage < held:
            given = state.refund(receipt, held - usage, now)
            if given > 0:
                # Room the forecast does not know of. (A charge only takes room: the forecast
                # stays a lower bound, and is kept.)
                self._forecast = None
                refunded = self.refunded
                if refunded is None:
                    refunded = self.refunded = {}
                refunded[state.key] = refunded.get(state.key, 0.0) + given
            return receipt, held - given
        if usage > held:
            return state.charge(receipt, usage - held, now), usage
        return receipt, held

    def after_refund(self, now: float) -> None:
        if self.queue:
            self._dispatch(now)

    def pause(self, until: float, now: float) -> None:
        """Admit nobody before ``until``; overlapping pauses keep the later end."""
        if until > self.paused_until:
            self.paused_until = until
            self._forecast = None
            if self.queue:
                self._dispatch(now)

    def change_limit(self, state: RateState, capacity: float, window: float, now: float) -> None:
        """Under the lock: the limit of ``state`` (one of ``states``) has ``capacity`` and
        ``window`` (validated) from ``now`` on (semantics §4). What is in use stays in use (the
        algorithm's ``change``); a queued request for more than the new capacity could never be
        admitted, so it leaves with the ``ValueError`` an arrival would get; the forecast is
        rebuilt when next needed; and the grant routine runs: a limit that grew admits its
        waiters at once, and the head learns its new wake time."""
        state.change(capacity, window, now)
        self._forecast = None
        self.refuse_above(state)
        if self.queue:
            self._dispatch(now)

    def refuse_above(self, state: RateState) -> None:
        """Under the lock, after the capacity of ``state`` changed (here, or in another process
        of a shared backend): the queued requests for more than it leave with the ValueError
        an arrival would get (their doors raise it, see :meth:`failure`)."""
        capacity = state.capacity
        queue = self.queue
        for waiter in [w for w in queue if any(s is state and n > capacity for s, n in w.items)]:
            self._unqueue(waiter)
            refused = self.refused
            if refused is None:
                refused = self.refused = {}
            amount = next(n for s, n in waiter.items if s is state)
            refused[waiter] = too_large(state.key, amount, capacity)
            waiter.notify()

    # -- introspection ---------------------------------------------------------------------

    def availability(self, now: float) -> dict[str, float]:
        """Units admissible now, per key. A shared backend also brings ``paused_until`` and
        ``refunded`` up to date from the shared state here."""
        return {state.key: state.available(now) for state in self.states}

    async def take_first(
        self, items: Items, patience: float, new_waiter: Callable[[Items, float], Any]
    ) -> tuple[list[Any] | None, Any, float]:
        """The async door's first step for a ``remote`` scheduler, which may await the network:
        ``(receipts, None, start)``, ``(None, waiter, start)`` (queued) or ``(None, None,
        start)`` (the deadline is out of reach). In-process schedulers decide under the lock
        instead (``try_take``, ``enqueue``)."""
        raise NotImplementedError("only a remote scheduler awaits its first step")

    def failure(self, waiter: Waiter) -> BaseException | None:
        """Why a waiter that was not granted left, if not a timeout (a change of a limit made
        its request too large; a shared backend that could not be reached). Consumed by the
        door, which raises it."""
        refused = self.refused
        return None if refused is None else refused.pop(waiter, None)

    def waiting_per_key(self) -> dict[str, int]:
        counts = {s.key: 0 for s in self.states}
        for waiter in self.queue:
            for state, _amount in waiter.items:
                counts[state.key] += 1
        return counts

    def head_wake_at(self) -> float:
        """When the head of the queue can be admitted (-inf: nobody is queued; inf: only a
        release can admit it). A hook: a shared backend answers for a head that waits behind
        another process's waiter."""
        return next(iter(self.queue)).wake_at if self.queue else -_INF

    def waiting_count(self) -> int:
        """Queued requests (a shared backend counts those of every process)."""
        return len(self.queue)

    def head(self) -> Waiter | None:
        return next(iter(self.queue)) if self.queue else None

    def refunded_units(self, key: str) -> float:
        return 0.0 if self.refunded is None else self.refunded.get(key, 0.0)
