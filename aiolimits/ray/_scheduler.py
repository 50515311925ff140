"""The caller's side of a set kept in the limits actor: a :class:`Scheduler` whose every
decision is a call to the actor, and whose waiters wait for the actor's answer.

* ``acquire`` (async): one call, awaited through its future (no event loop blocks, trio works
  too): the actor grants at once or parks the request in the set's queue and answers when it is
  granted or timed out. A caller cancelled meanwhile sends ``abandon``: the actor takes the
  request out of its queue, or gives back a grant its caller never saw (§5).
* ``acquire_sync``: the same call, the thread blocked on its answer.
* ``try_acquire``, ``retry_after``, ``get_stats``: one blocking call each, with ``timeout``.
* ``update``, ``release``, ``pause``: handed to Ray and not awaited (§7): numbered per
  acquisition, applied by the actor in that order.
* Under a clock that drives its own timers (tests), every call is blocking and the answers of
  queued requests come back with the next reply, or from :meth:`_tick`, armed on that clock at the
  actor's next timer: the same protocol, driven by injected time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import ray
import ray.exceptions

from .._algorithms import RateState, SemaphoreState
from .._errors import BackendUnavailable
from .._scheduler import Items, Scheduler
from .._waiters import GRANTED, LEFT, WAITING, Cancellable, TimerClock, Waiter

__all__ = ["RayScheduler", "Ticket"]

log = logging.getLogger("aiolimits.ray")

_INF = math.inf

#: What a call to a dead, restarting or unreachable actor raises.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,
    ray.exceptions.GetTimeoutError,
    ray.exceptions.ActorUnavailableError,
    LookupError,
)


class Ticket:
    """The receipt of an acquisition granted by the actor: its id, and the sequence of the
    operations its caller sends (the actor applies them in that order)."""

    __slots__ = ("allowed", "hid", "seq")

    def __init__(self, hid: str, *, allowed: bool = False) -> None:
        self.hid = hid
        self.seq = itertools.count(1)
        #: Admitted without the actor (``on_unavailable="allow"``): nothing to send.
        self.allowed = allowed


class RayScheduler(Scheduler):
    """A :class:`Scheduler` for a set whose state and FIFO queue live in the limits actor."""

    timed_wakes = False
    forecasts_queue = False  # the actor's own scheduler forecasts its queue

    __slots__ = (
        "__weakref__",
        "_actor",
        "_answers",
        "_caller",
        "_failures",
        "_held",
        "_keys",
        "_lease",
        "_name",
        "_policy",
        "_simulated",
        "_snapshot",
        "_tick_timer",
        "_timeout",
        "_waiting",
        "remote",
    )

    def __init__(
        self,
        states: tuple[RateState, ...],
        clock: Callable[[], float],
        *,
        actor: Any,
        name: str,
        timeout: float,
        on_unavailable: str,
        lease_seconds: float,
    ) -> None:
        super().__init__(states, clock)
        self._lease = lease_seconds
        #: This process's acquisitions holding resource slots, whose leases it renews (None:
        #: the set has no resource limits).
        self._held: set[str] | None = (
            set() if any(isinstance(s, SemaphoreState) for s in states) else None
        )
        self._actor = actor
        self._name = name
        self._timeout = timeout
        self._policy = on_unavailable
        self._caller = uuid.uuid4().hex
        self._keys = [state.key for state in states]
        self._simulated = isinstance(clock, TimerClock)
        self.remote = True
        #: Queued requests of this process, by id: (waiter, start).
        self._waiting: dict[str, tuple[Waiter, float]] = {}
        # Guards ``_waiting`` and the state of its waiters. Not the scheduler's lock: Ray's
        # thread that brings answers must never wait for a thread that holds that lock while
        # it waits for an answer Ray's thread would bring (``ray.get``).
        self._answers = threading.Lock()
        self._failures: dict[Waiter, BaseException] = {}
        self._snapshot: dict[str, Any] | None = None
        self._tick_timer: Cancellable | None = None

    # -- calls -----------------------------------------------------------------------------

    def _now(self) -> float | None:
        return self.clock() if self._simulated else None

    def _requested(self, items: Items) -> dict[str, float]:
        asked = dict.fromkeys(self._keys, 0.0)
        for state, amount in items:
            asked[state.key] = amount
        return asked

    def _call(self, method: str, *args: Any) -> Any:
        """A blocking call: its result, once the replies it carries are applied."""
        ref = getattr(self._actor, method).remote(self._name, self._caller, *args, self._now())
        try:
            result, outcomes, next_timer = ray.get(ref, timeout=self._timeout)
        except UNAVAILABLE as exc:
            raise BackendUnavailable(
                f"the Ray limits actor did not answer for {self._name!r}: {exc}"
            ) from exc
        self._apply(outcomes, next_timer)
        return result

    def _send(self, method: str, *args: Any) -> None:
        """A call nobody waits for (``update``, ``release``, ``pause`` from any thread)."""
        if self._simulated:
            self._call(method, *args)
            return
        ref = getattr(self._actor, method).remote(self._name, self._caller, *args, None)
        ref.future().add_done_callback(_log_failure)

    def _apply(self, outcomes: list[tuple[Any, ...]], next_timer: float) -> None:
        for hid, *outcome in outcomes:
            self._deliver(hid, tuple(outcome))
        if self._simulated:
            timer = self._tick_timer
            if timer is not None:
                timer.cancel()
                self._tick_timer = None
            if next_timer < _INF and next_timer > self.clock():
                clock: Any = self.clock
                self._tick_timer = clock.call_at(next_timer, self._tick)

    def _tick(self) -> None:
        self._tick_timer = None
        with self.lock:
            self._call("tick")

    def _deliver(
        self, hid: str, outcome: tuple[Any, ...], error: BaseException | None = None
    ) -> None:
        """The answer for a queued request of this process."""
        with self._answers:
            self._deliver_locked(hid, outcome, error)

    def _deliver_locked(
        self, hid: str, outcome: tuple[Any, ...], error: BaseException | None
    ) -> None:
        entry = self._waiting.pop(hid, None)
        if entry is None:
            return
        waiter, start = entry
        if waiter.state != WAITING:
            return
        if error is None and outcome[0] == "granted":
            self._hold(hid)
            waiter.receipts = [Ticket(hid)] * len(waiter.items)
            waiter.granted_at = start + outcome[1]
            waiter.state = GRANTED
            self.granted += 1
        else:
            waiter.state = LEFT
            if error is None and outcome[0] == "refused":  # a limit changed (semantics §4)
                error = ValueError(outcome[1])
            if error is not None:
                self._failures[waiter] = error
            else:
                self.timed_out += 1
        waiter.notify()

    def _on_answer(self, hid: str, future: Any) -> None:
        """From Ray's thread: the answer of an awaited ``acquire``."""
        error: BaseException | None = None
        outcome: tuple[Any, ...] = ()
        try:
            outcome = future.result()[0]
        except BaseException as exc:
            error = BackendUnavailable(f"the Ray limits actor failed for {self._name!r}: {exc}")
        self._deliver(hid, outcome, error)

    # -- acquiring -------------------------------------------------------------------------

    def try_take(self, items: Items, now: float) -> list[Any] | None:
        hid = uuid.uuid4().hex
        try:
            taken = self._call("try_acquire", hid, self._requested(items))
        except BackendUnavailable:
            if self._policy == "allow":
                return [Ticket(hid, allowed=True)] * len(items)
            raise
        if not taken:
            return None
        self.granted += 1
        with self._answers:
            self._hold(hid)
        return [Ticket(hid)] * len(items)

    def _submit(
        self, waiter: Waiter, hid: str, start: float, timeout: float
    ) -> tuple[Any, ...] | None:
        """Send ``waiter``'s request as ``hid``: its outcome when known now (simulated
        clocks), else None and the answer comes to :meth:`_on_answer`."""
        requested = self._requested(waiter.items)
        self._waiting[hid] = (waiter, start)
        if self._simulated:
            try:
                outcome: tuple[Any, ...] = self._call("acquire", hid, requested, timeout)
            except BaseException:
                del self._waiting[hid]
                raise
            if outcome[0] != "queued":
                del self._waiting[hid]
                return outcome
            return None
        ref = self._actor.acquire.remote(self._name, self._caller, hid, requested, timeout, None)
        ref.future().add_done_callback(lambda future: self._on_answer(hid, future))
        return None

    def enqueue(self, waiter: Waiter, now: float) -> bool:
        """The thread door, after :meth:`try_take` failed: ask the actor to queue it."""
        timeout = waiter.deadline - now
        waiter.deadline += self._timeout  # the actor decides timeouts; this is the backstop
        hid = uuid.uuid4().hex
        outcome = self._submit(waiter, hid, now, timeout)
        if outcome is None:
            return True
        if outcome[0] == "timeout":
            self.timed_out += 1
            return False
        with self._answers:
            self._hold(hid)
        waiter.receipts = [Ticket(hid)] * len(waiter.items)
        waiter.granted_at, waiter.state = now + outcome[1], GRANTED
        self.granted += 1
        waiter.notify()
        return True

    async def take_first(
        self, items: Items, patience: float, new_waiter: Callable[[Items, float], Any]
    ) -> tuple[list[Any] | None, Any, float]:
        start = self.clock()
        waiter = new_waiter(items, start + patience + self._timeout)
        with self.lock:
            hid = uuid.uuid4().hex
            try:
                outcome = self._submit(waiter, hid, start, patience)
            except BackendUnavailable:
                if self._policy == "allow":
                    return [Ticket("", allowed=True)] * len(items), None, start
                raise
            if outcome is None:
                return None, waiter, start
            if outcome[0] == "timeout":
                self.timed_out += 1
                return None, None, start
            self.granted += 1
            with self._answers:
                self._hold(hid)
            return [Ticket(hid)] * len(items), None, start

    def after_wake(self, waiter: Waiter, now: float) -> float | None:
        gone: str | None = None
        with self._answers:
            waiter.consume_notification()
            if waiter.state != WAITING:
                return None
            if now < waiter.deadline:
                return waiter.deadline
            # The actor did not answer in time: leave, holding nothing.
            gone = self._forget(waiter)
            self._failures[waiter] = BackendUnavailable(
                f"the Ray limits actor did not answer in time for {self._name!r}"
            )
        if gone is not None:
            self._abandon_remote(gone, 1)
        return None

    def abandon(self, waiter: Waiter, now: float) -> None:
        """The door's waiter left (cancelled): the actor takes its request out of the queue, or
        gives back a grant it never saw."""
        gone: tuple[str, int] | None = None
        with self._answers:
            if waiter.state == WAITING:
                hid = self._forget(waiter)
                gone = None if hid is None else (hid, 1)
                self.cancelled += 1
            elif waiter.state == GRANTED:
                ticket = waiter.receipts[0] if waiter.receipts else None
                if isinstance(ticket, Ticket) and self._held is not None:
                    self._held.discard(ticket.hid)
                waiter.state = LEFT
                self.granted -= 1
                self.cancelled += 1
                if isinstance(ticket, Ticket) and not ticket.allowed:
                    gone = (ticket.hid, next(ticket.seq))
        if gone is not None:
            self._abandon_remote(*gone)

    def _forget(self, waiter: Waiter) -> str | None:
        """Under ``_answers``: take ``waiter`` out of this process's queued requests."""
        waiter.state = LEFT
        for hid, (queued, _start) in self._waiting.items():
            if queued is waiter:
                del self._waiting[hid]
                return hid
        return None

    def _abandon_remote(self, hid: str, seq: int) -> None:
        # An actor that is gone took with it whatever this request could hold.
        with contextlib.suppress(BackendUnavailable):
            self._send("operate", hid, seq, "abandon", None)

    def failure(self, waiter: Waiter) -> BaseException | None:
        return self._failures.pop(waiter, None) or super().failure(waiter)

    def head(self) -> Waiter | None:
        return None

    def catch_up(self, now: float) -> None:
        pass

    # -- after a grant ---------------------------------------------------------------------

    def _hold(self, hid: str) -> None:
        """Under ``_answers``: ``hid`` holds slots; its lease is renewed until released."""
        held = self._held
        if held is not None:
            if not held:
                RENEWER.add(self)
            held.add(hid)

    def renew(self) -> None:
        """From the renewer thread: extend the leases of this process's holdings."""
        held = self._held
        if not held:
            return
        with self._answers:
            hids = list(held)
        self._actor.renew.remote({self._name: hids}).future().add_done_callback(_log_failure)

    def _operate(self, ticket: Ticket, op: str, arg: Any) -> None:
        if op in ("release", "abandon") and self._held is not None:
            with self._answers:
                self._held.discard(ticket.hid)
        if ticket.allowed:
            return
        try:
            self._send("operate", ticket.hid, next(ticket.seq), op, arg)
        except BackendUnavailable:
            if self._policy != "allow":
                raise

    def release(self, items: Items, receipts: list[Any] | None = None) -> None:
        if receipts:
            self._operate(receipts[0], "release", None)

    def settle(
        self, state: RateState, receipt: Any, held: float, usage: float, now: float
    ) -> tuple[Any, float]:
        if isinstance(receipt, Ticket):
            self._operate(receipt, "update", {state.key: usage})
            return receipt, usage
        # A key the acquisition did not take: the actor settles it on the first key's ticket.
        return receipt, held

    def after_refund(self, now: float) -> None:
        pass

    def pause(self, until: float, now: float) -> None:
        self._send("pause", until - now)

    def change_limit(self, state: RateState, capacity: float, window: float, now: float) -> None:
        # The actor's set decides; this process's copy of the numbers (validation, ``limits``,
        # the statistics) follows at once. Handed off as a pause is, never awaited here.
        state.change(capacity, window, now)
        self._send("change_limit", state.key, capacity, None if window == 0 else window)

    # -- questions -------------------------------------------------------------------------

    def admit_time(self, items: Items, now: float) -> tuple[float, float]:
        at = now + self._call("retry_after", self._requested(items))
        return at, at

    def head_wake_at(self) -> float:
        return -_INF

    def queued_rate_at(self, items: Items, now: float) -> float:
        return -_INF

    def waiting_per_key(self) -> dict[str, int]:
        snapshot = self._snapshot = self._call("stats")
        self.granted = snapshot["granted"]
        self.timed_out = snapshot["timed_out"]
        self.cancelled = snapshot["cancelled"]
        self.refunded = snapshot["refunded"]
        self.paused_until = self.clock() + snapshot["paused_for"]
        return dict(snapshot["waiting_per_key"])

    def availability(self, now: float) -> dict[str, float]:
        snapshot = self._snapshot or self._call("stats")
        self.paused_until = now + snapshot["paused_for"]
        numbers = snapshot.get("numbers", {})
        for state in self.states:  # a change made by another process shows here
            capacity, window = numbers.get(state.key, (state.capacity, state.window))
            if (capacity, window) != (state.capacity, state.window):
                state.change(capacity, window, now)
        return dict(snapshot["available"])

    def waiting_count(self) -> int:
        snapshot = self._snapshot or self._call("stats")
        self._snapshot = None
        return int(snapshot["waiting"])


class Renewer:
    """One daemon thread per process that renews the leases of every RayScheduler holding
    resource slots, every third of the shortest lease (the actor frees a holding whose lease
    ran out: its holder died)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._schedulers: weakref.WeakSet[RayScheduler] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    def add(self, sched: RayScheduler) -> None:
        with self._lock:
            self._schedulers.add(sched)
            self._lock.notify()  # its lease may be shorter than the period slept on
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="aiolimits-ray-leases", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                schedulers = list(self._schedulers)
            period = min((s._lease for s in schedulers), default=30.0) / 3
            with self._lock:
                self._lock.wait(period)
            for sched in schedulers:
                try:
                    sched.renew()
                except Exception:  # noqa: PERF203 - one failing set must not stop the others
                    log.warning("aiolimits: renewing Ray leases failed", exc_info=True)


RENEWER = Renewer()


def _log_failure(future: Any) -> None:
    """From Ray's thread: a call sent without waiting failed; said in the log."""
    try:
        future.result()
    except Exception:
        log.warning("aiolimits: a call to the Ray limits actor failed", exc_info=True)
