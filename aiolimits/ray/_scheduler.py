"""The caller's side of a set kept in the limits actor: a :class:`Scheduler` whose every
decision is made by the actor, and whose waiters wait for the actor's answer.

* **Batches** (coalescing): every request of this process to the set is a message in its
  outbox, and one call to the actor (:meth:`LimitsActor.batch`) carries all the messages the
  outbox holds. A message that asks a question (``acquire``, ``try_acquire``, ``retry_after``,
  ``get_stats``) goes out at once when no batch with questions is on its way; a task's
  acquisition that finds one on its way is sent by the courier thread once its event loop lets
  go of the interpreter (with what the other tasks of that loop iteration asked); beyond
  ``MAX_ASKING`` batches on their way, questions wait for the next reply and go with the batch
  sent then. Under load, one round trip serves all the acquisitions the process made
  meanwhile. A message nobody waits for (``update``, ``release``,
  ``pause``, a cancellation) rides with the next batch, or goes on its own after
  ``LINGER_SECONDS`` (the courier thread): an acquisition that follows a release shares its
  round trip.
* ``acquire`` (async or ``acquire_sync``): its message is answered granted, timed out, or
  queued; the outcome of a queued one comes back on the process's one outstanding ``wait``
  call, which the actor answers as soon as one of its requests is decided (no polling). A
  caller cancelled meanwhile sends ``abandon``: the actor takes the request out of its queue,
  or gives back a grant its caller never saw (§5).
* ``try_acquire``, ``retry_after``, ``get_stats`` block for their answer, ``timeout`` at most
  (a thread that sends the batch itself waits on ``ray.get``, the others on the answer).
* ``update``, ``release``, ``pause`` return at once (§7): numbered per acquisition, applied by
  the actor in that order.
* Under a clock that drives its own timers (tests), every batch is sent at once and waited
  for, and the outcomes of queued requests come back with the next answer, or with the empty
  batch :meth:`_tick` sends at the actor's next timer: the same protocol, driven by injected
  time.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import math
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import ray
import ray.exceptions

from .._algorithms import RateState, SemaphoreState
from .._backends._base import KeyProxy
from .._errors import BackendUnavailable
from .._scheduler import Items, Scheduler
from .._waiters import GRANTED, LEFT, WAITING, AsyncioWaiter, Cancellable, TimerClock, Waiter

__all__ = ["KeyMux", "RayKeyProxy", "RayScheduler", "Ticket"]

log = logging.getLogger("aiolimits.ray")

_INF = math.inf

#: What a call to a dead, restarting or unreachable actor raises.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,
    ray.exceptions.GetTimeoutError,
    ray.exceptions.ActorUnavailableError,
    LookupError,
)

#: How long a message nobody waits for (a release, an update) waits for a batch to ride with.
LINGER_SECONDS = 0.001

#: Batches with questions a process has on their way to the actor at most: what is asked
#: meanwhile waits for one of them to come back, and goes with the next batch.
MAX_ASKING = 2

#: How long the actor holds a ``wait`` call with nothing to say (then it is made again).
POLL_SECONDS = 10.0


class Ticket:
    """The receipt of an acquisition granted by the actor: its id, and the sequence of the
    operations its caller sends (the actor applies them in that order)."""

    __slots__ = ("allowed", "hid", "seq")

    def __init__(self, hid: str, *, allowed: bool = False) -> None:
        self.hid = hid
        self.seq = itertools.count(1)
        #: Admitted without the actor (``on_unavailable="allow"``): nothing to send.
        self.allowed = allowed


class Answer:
    """The answer to a question a thread waits for (``try``, ``retry_after``, ``stats``)."""

    __slots__ = ("error", "event", "hid", "value")

    def __init__(self, hid: str = "") -> None:
        self.event = threading.Event()
        #: The acquisition a ``try`` grants: given back if its answer comes too late.
        self.hid = hid
        self.value: Any = None
        self.error: BaseException | None = None


class RayScheduler(Scheduler):
    """A :class:`Scheduler` for a set whose state and FIFO queue live in the limits actor."""

    timed_wakes = False
    forecasts_queue = False  # the actor's own scheduler forecasts its queue

    __slots__ = (
        "__weakref__",
        "_actor",
        "_answers",
        "_asking",
        "_caller",
        "_failures",
        "_held",
        "_ids",
        "_keys",
        "_lane_of",
        "_lanes",
        "_lease",
        "_name",
        "_out",
        "_out_answers",
        "_policy",
        "_polling",
        "_reserved",
        "_simulated",
        "_slack",
        "_snapshot",
        "_target",
        "_tick_timer",
        "_timeout",
        "_waiting",
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
        key: str | None = None,
    ) -> None:
        self._simulated = isinstance(clock, TimerClock)
        # Guards the outbox, ``_waiting`` and the state of its waiters. Not the scheduler's
        # lock: Ray's thread that brings answers must never wait for a thread that holds that
        # lock while it waits for an answer Ray's thread would bring.
        self._answers = threading.Lock()
        self._out: list[tuple[Any, ...]] = []
        #: Who waits for the answers of the questions in ``_out``, in order: the id of an
        #: acquisition, or an Answer.
        self._out_answers: list[str | Answer] = []
        #: Batches with questions on their way (or about to go: see :meth:`_post`).
        self._asking = 0
        self._reserved = False  # one of them is the courier's to send
        self._polling = False  # a ``wait`` call is on its way
        self._slack = 0.0
        self._actor = actor
        self._name = name
        #: What the actor finds the state by: the set's name, or ``(name, key)`` for a key of a
        #: keyed set.
        self._target: str | tuple[str, str] = name if key is None else (name, key)
        self._caller = uuid.uuid4().hex
        self._ids = itertools.count()
        super().__init__(states, clock)
        self._lease = lease_seconds
        #: This process's acquisitions holding resource slots, whose leases it renews (None:
        #: the set has no resource limits).
        self._held: set[str] | None = (
            set() if any(isinstance(s, SemaphoreState) for s in states) else None
        )
        self._timeout = timeout
        self._policy = on_unavailable
        self._keys = [state.key for state in states]
        self.remote = True
        #: Requests of this process sent and not yet decided, by id: (waiter, start, lane).
        self._waiting: dict[str, tuple[Waiter, float, int | None]] = {}
        #: The decided task waiters of each event loop's thread not yet woken, in the actor's
        #: order: each is woken once the one before it ran (see :meth:`_wake_locked`).
        self._lanes: dict[int, deque[Waiter]] = {}
        self._lane_of: dict[Waiter, int] = {}
        self._failures: dict[Waiter, BaseException] = {}
        self._snapshot: dict[str, Any] | None = None
        self._tick_timer: Cancellable | None = None

    @property
    def timer_slack(self) -> float:
        """The actor's set wakes its heads with this slack (the last one a caller set)."""
        return self._slack

    @timer_slack.setter
    def timer_slack(self, slack: float) -> None:
        if slack != self._slack:
            self._slack = slack
            self._post(("slack", slack))

    # -- the outbox ------------------------------------------------------------------------

    def _now(self) -> float | None:
        return self.clock() if self._simulated else None

    def _requested(self, items: Items) -> dict[str, float]:
        asked = dict.fromkeys(self._keys, 0.0)
        for state, amount in items:
            asked[state.key] = amount
        return asked

    def _post(
        self, message: tuple[Any, ...], answer: str | Answer | None = None, *, soon: bool = False
    ) -> bool:
        """Put ``message`` in the outbox, and send the outbox now if it may go (see the module
        docstring). True when this thread sent it and its answer is applied. ``soon`` (a task's
        acquisition), when a batch is on its way already: the courier thread sends the second
        one, once this event loop lets go of the interpreter, so that what the other tasks of
        this loop iteration ask goes too."""
        with self._answers:
            self._out.append(message)
            if answer is not None:
                self._out_answers.append(answer)
            # A lone request goes at once; one that finds a batch on its way waits for the
            # courier (or for that batch's reply), gathering what this loop asks meanwhile.
            reserve = (
                soon
                and not self._simulated
                and not self._reserved
                and 0 < self._asking < MAX_ASKING
            )
            if reserve:
                self._asking += 1
                self._reserved = True
                batch = None
            else:
                batch = self._take_locked(force=self._simulated)
        if reserve:
            COURIER.call_soon(self._send_reserved)
            return False
        if batch is not None:
            self._send(*batch, wait=self._simulated or isinstance(answer, Answer))
            return True
        if answer is None:
            COURIER.linger(self)
        return False

    def _take_locked(
        self, *, force: bool
    ) -> tuple[list[tuple[Any, ...]], list[str | Answer]] | None:
        """Under ``_answers``: the outbox to send now, if it may go (``force``: whatever it
        holds, even with a batch of questions on its way)."""
        if not self._out or not (force or (self._out_answers and self._asking < MAX_ASKING)):
            return None
        batch = self._out, self._out_answers
        self._out, self._out_answers = [], []
        if batch[1]:
            self._asking += 1
        return batch

    def _send_reserved(self) -> None:
        """From the courier thread: send the outbox as the batch :meth:`_post` reserved."""
        with self._answers:
            self._reserved = False
            batch = self._out, self._out_answers
            self._out, self._out_answers = [], []
            if not batch[1]:  # another thread sent those questions meanwhile
                self._asking -= 1
        if batch[0]:
            self._send(*batch, wait=False)

    def flush(self) -> None:
        """Send what lingers in the outbox (the courier thread, at exit)."""
        with self._answers:
            batch = self._take_locked(force=True)
        if batch is not None:
            self._send(*batch, wait=False)

    def _send(
        self, messages: list[tuple[Any, ...]], answers: list[str | Answer], *, wait: bool
    ) -> None:
        """One call to the actor with ``messages``; ``wait``: block for its reply (at most
        ``timeout``) and apply it here, else it is applied on Ray's thread when it comes."""
        try:
            ref = self._actor.batch.remote((self._target, self._caller, messages, self._now()))
        except Exception as exc:  # Ray shut down, actor handle unusable
            self._replied(answers, None, exc)
            return
        if not wait:
            ref.future().add_done_callback(lambda future: self._on_reply(answers, future))
            return
        try:
            reply = ray.get(ref, timeout=self._timeout)
        except Exception as exc:
            self._replied(answers, None, exc)
            # A late reply may still grant: what it grants is given back.
            ref.future().add_done_callback(lambda future: self._on_late_reply(answers, future))
            return
        self._replied(answers, reply, None)

    def _on_reply(self, answers: list[str | Answer], future: Any) -> None:
        """From Ray's thread: the reply to a batch."""
        try:
            reply = future.result()
        except Exception as exc:
            self._replied(answers, None, exc)
        else:
            self._replied(answers, reply, None)

    def _on_late_reply(self, answers: list[str | Answer], future: Any) -> None:
        """From Ray's thread: the reply to a batch its sender stopped waiting for; whatever it
        granted goes back (the requests already failed)."""
        with contextlib.suppress(Exception):
            granted, _outcomes, _next_timer = future.result()
            for answer, value in zip(answers, granted, strict=False):
                if isinstance(answer, Answer) and answer.hid and value is True:
                    self._abandon_remote(answer.hid, 1)

    def _replied(
        self, answers: list[str | Answer], reply: Any, error: BaseException | None
    ) -> None:
        """Apply the reply to a batch (or its failure), then send what queued meanwhile."""
        values: list[Any] = []
        if error is None:
            values, outcomes, next_timer = reply
        else:
            if not answers:  # else those waiting for the answers are told
                log.warning("aiolimits: a call to the Ray limits actor failed: %s", error)
            error = BackendUnavailable(
                f"the Ray limits actor did not answer for {self._name!r}: {error}"
            )
        gone: list[str] = []
        with self._answers:
            for answer, value in itertools.zip_longest(answers, values):
                failed = error or (value if isinstance(value, BaseException) else None)
                if isinstance(answer, Answer):
                    if not answer.event.is_set():
                        answer.value, answer.error = value, failed
                        answer.event.set()
                elif answer is not None:
                    if failed is not None and self._policy != "allow":
                        gone.append(answer)  # the actor may have it: given back
                    self._acquired_locked(answer, value, failed)
            if answers:
                self._asking -= 1
            batch = self._take_locked(force=False)
        if error is None:
            self._apply(outcomes, next_timer)
        for hid in gone:
            self._abandon_remote(hid, 1)
        if batch is not None:
            self._send(*batch, wait=False)

    def _ask(self, message: tuple[Any, ...], hid: str = "") -> Any:
        """Send a question and wait for its answer (at most ``timeout``)."""
        answer = Answer(hid)
        if not self._post(message, answer) and not answer.event.wait(self._timeout):
            with self._answers:
                late = not answer.event.is_set()
                if late:
                    answer.error = BackendUnavailable(
                        f"the Ray limits actor did not answer in time for {self._name!r}"
                    )
                    answer.event.set()  # what comes later is not for this caller
                    if hid:  # in the outbox or on its way: what it grants is given back
                        self._out.append(("operate", hid, 1, "abandon", None))
            if late and hid:
                COURIER.linger(self)
        if answer.error is not None:
            raise answer.error
        return answer.value

    # -- answers ---------------------------------------------------------------------------

    def _apply(self, outcomes: list[tuple[Any, ...]], next_timer: float) -> None:
        """The outcomes of this process's queued requests, and (simulated clocks) when the
        actor's next timer is due."""
        if outcomes:
            with self._answers:
                for hid, *outcome in outcomes:
                    self._acquired_locked(hid, tuple(outcome), None)
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
            with self._answers:
                batch = self._take_locked(force=True) or ([], [])
            self._send(*batch, wait=True)

    def _acquired_locked(
        self, hid: str, outcome: tuple[Any, ...] | None, error: BaseException | None
    ) -> None:
        """Under ``_answers``: the actor's answer for request ``hid`` of this process."""
        entry = self._waiting.get(hid)
        if entry is None:
            return
        waiter, start, lane = entry
        if error is None and outcome is not None and outcome[0] == "queued":
            if not self._polling and not self._simulated:
                self._polling = True
                COURIER.call_soon(self._poll)
            return
        del self._waiting[hid]
        if waiter.state != WAITING:
            return
        if error is not None and self._policy == "allow":
            waiter.receipts = [Ticket(hid, allowed=True)] * len(waiter.items)
            waiter.granted_at, waiter.state = start, GRANTED
            self.granted += 1
        elif error is None and outcome is not None and outcome[0] == "granted":
            self._hold(hid)
            waiter.receipts = [Ticket(hid)] * len(waiter.items)
            waiter.granted_at = start + outcome[1]
            waiter.state = GRANTED
            self.granted += 1
        else:
            waiter.state = LEFT
            if error is None and outcome is not None and outcome[0] == "refused":
                error = ValueError(outcome[1])  # sent away by a change of a limit (semantics §4)
            if error is not None:
                self._failures[waiter] = error
            else:
                self.timed_out += 1
        self._wake_locked(waiter, lane)

    def _wake_locked(self, waiter: Waiter, lane: int | None) -> None:
        """Under ``_answers``: wake a decided ``waiter``. The task waiters of one event loop
        are woken one after the other, in the order the actor decided them, so that its tasks
        see their grants in FIFO order (a loop may run tasks woken together in any order: trio
        does). A thread waiter is woken at once: a thread blocked in a sync call is never behind
        a task of its own loop."""
        if lane is None:
            waiter.notify()
            return
        queue = self._lanes.setdefault(lane, deque())
        queue.append(waiter)
        self._lane_of[waiter] = lane
        if len(queue) == 1:
            waiter.notify()

    def _woken_locked(self, waiter: Waiter) -> None:
        """Under ``_answers``: ``waiter`` ran (or left): wake the next one of its lane."""
        lane = self._lane_of.pop(waiter, None)
        if lane is None:
            return
        queue = self._lanes[lane]
        was_first = queue[0] is waiter
        queue.remove(waiter)
        if not queue:
            del self._lanes[lane]
        elif was_first:
            queue[0].notify()

    def _poll(self) -> None:
        """Ask the actor for the outcomes of this process's queued requests (one call at a
        time, made again while some are queued)."""
        try:
            ref = self._actor.wait.remote(self._target, self._caller, POLL_SECONDS)
            ref.future().add_done_callback(self._on_poll)
        except Exception as exc:
            self._poll_failed(exc)

    def _on_poll(self, future: Any) -> None:
        try:
            outcomes, _next_timer = future.result()
        except Exception as exc:
            self._poll_failed(exc)
            return
        self._apply(outcomes, _INF)
        with self._answers:
            self._polling = bool(self._waiting)
        if self._polling:
            self._poll()

    def _poll_failed(self, exc: BaseException) -> None:
        """The actor is gone (or Ray is): every queued request of this process fails."""
        log.warning("aiolimits: waiting on the Ray limits actor failed: %s", exc)
        error = BackendUnavailable(f"the Ray limits actor failed for {self._name!r}: {exc}")
        with self._answers:
            self._polling = False
            for hid in list(self._waiting):
                self._acquired_locked(hid, None, error)

    # -- acquiring -------------------------------------------------------------------------

    def _new_id(self) -> str:
        """A new acquisition's id: this caller's, numbered (unique in the actor)."""
        return f"{self._caller}{next(self._ids)}"

    def try_take(self, items: Items, now: float) -> list[Any] | None:
        hid = self._new_id()
        try:
            taken = self._ask(("try", hid, self._requested(items)), hid)
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
        self, waiter: Waiter, start: float, timeout: float, lane: int | None, *, soon: bool = False
    ) -> None:
        """Send ``waiter``'s request; its answer comes to :meth:`_acquired_locked`."""
        hid = self._new_id()
        if self._simulated:
            # Every answer comes with a reply it waits for: no backstop timer to arm.
            waiter.deadline = _INF
        with self._answers:
            self._waiting[hid] = (waiter, start, lane)
        self._post(("acquire", hid, self._requested(waiter.items), timeout), hid, soon=soon)

    def enqueue(self, waiter: Waiter, now: float) -> bool:
        """The thread door, after :meth:`try_take` failed: ask the actor to queue it."""
        timeout = waiter.deadline - now
        waiter.deadline += self._timeout  # the actor decides timeouts; this is the backstop
        self._submit(waiter, now, timeout, None)
        return True

    async def take_first(
        self, items: Items, patience: float, new_waiter: Callable[[Items, float], Any]
    ) -> tuple[list[Any] | None, Any, float]:
        start = self.clock()
        waiter = new_waiter(items, start + patience + self._timeout)
        with self.lock:
            # asyncio runs the tasks it is told to wake in that order: no lane needed.
            lane = None if isinstance(waiter, AsyncioWaiter) else threading.get_ident()
            self._submit(waiter, start, patience, lane, soon=True)
        with self._answers:
            if waiter.state == WAITING:
                return None, waiter, start
            # Answered already (the batch was sent and waited for here): never parks.
            waiter.consume_notification()
            self._woken_locked(waiter)
        failure = self._failures.pop(waiter, None)
        if failure is not None:
            raise failure
        if waiter.state == GRANTED:
            return waiter.receipts, None, start
        return None, None, start

    def after_wake(self, waiter: Waiter, now: float) -> float | None:
        gone: str | None = None
        with self._answers:
            waiter.consume_notification()
            if waiter.state != WAITING:
                self._woken_locked(waiter)
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
            self._woken_locked(waiter)
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
        for hid, (queued, _start, _lane) in self._waiting.items():
            if queued is waiter:
                del self._waiting[hid]
                return hid
        return None

    def _abandon_remote(self, hid: str, seq: int) -> None:
        self._post(("operate", hid, seq, "abandon", None))

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
                COURIER.renew(self)
            held.add(hid)

    def renew(self) -> None:
        """From the courier thread: extend the leases of this process's holdings."""
        held = self._held
        if not held:
            return
        with self._answers:
            hids = list(held)
        ref = self._actor.renew.remote({self._target: hids})
        ref.future().add_done_callback(self._renewed)

    def _renewed(self, future: Any) -> None:
        """From Ray's thread: a renewal's reply. An actor that died took this process's
        holdings with it: nothing to renew any more, and said once."""
        try:
            future.result()
        except ray.exceptions.RayActorError as exc:
            with self._answers:
                if self._held:
                    self._held.clear()
                    log.warning("aiolimits: the Ray limits actor died, leases dropped: %s", exc)
        except Exception as exc:
            log.warning("aiolimits: renewing leases on the Ray limits actor failed: %s", exc)

    def _operate(self, ticket: Ticket, op: str, arg: Any) -> None:
        if op in ("release", "abandon") and self._held is not None:
            with self._answers:
                self._held.discard(ticket.hid)
        if not ticket.allowed:
            self._post(("operate", ticket.hid, next(ticket.seq), op, arg))

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
        self._post(("pause", until - now))

    def change_limit(self, state: RateState, capacity: float, window: float, now: float) -> None:
        # The actor's set decides; this process's copy of the numbers (validation, ``limits``,
        # the statistics) follows at once. Handed off as a pause is, never awaited here.
        state.change(capacity, window, now)
        self._post(("change_limit", state.key, capacity, None if window == 0 else window))

    # -- questions -------------------------------------------------------------------------

    def admit_time(self, items: Items, now: float) -> tuple[float, float]:
        at = now + self._ask(("retry_after", self._requested(items)))
        return at, at

    def head_wake_at(self) -> float:
        return -_INF

    def queued_rate_at(self, items: Items, now: float) -> float:
        return -_INF

    def waiting_per_key(self) -> dict[str, int]:
        snapshot = self._snapshot = self._ask(("stats",))
        self.granted = snapshot["granted"]
        self.timed_out = snapshot["timed_out"]
        self.cancelled = snapshot["cancelled"]
        self.refunded = snapshot["refunded"]
        self.paused_until = self.clock() + snapshot["paused_for"]
        return dict(snapshot["waiting_per_key"])

    def availability(self, now: float) -> dict[str, float]:
        snapshot = self._snapshot or self._ask(("stats",))
        self.paused_until = now + snapshot["paused_for"]
        numbers = snapshot.get("numbers", {})
        for state in self.states:  # a change made by another process shows here
            capacity, window = numbers.get(state.key, (state.capacity, state.window))
            if (capacity, window) != (state.capacity, state.window):
                state.change(capacity, window, now)
        return dict(snapshot["available"])

    def waiting_count(self) -> int:
        snapshot = self._snapshot or self._ask(("stats",))
        self._snapshot = None
        return int(snapshot["waiting"])


class RayKeyProxy(RayScheduler, KeyProxy):
    """The proxy of one key of a keyed set kept in the limits actor: a :class:`RayScheduler`
    whose messages name the key (the actor keeps the key's state and queue). The batches it
    sends without waiting go through its set's :class:`KeyMux`, which joins those of every key
    of this process into one call."""

    __slots__ = ("_mux",)

    def __init__(
        self, states: tuple[RateState, ...], clock: Callable[[], float], *, mux: KeyMux, **kw: Any
    ) -> None:
        super().__init__(states, clock, **kw)
        self._mux = mux

    def idle(self) -> bool:
        with self._answers:
            return not (self._waiting or self._held or self._out or self._asking)

    def _send(
        self, messages: list[tuple[Any, ...]], answers: list[str | Answer], *, wait: bool
    ) -> None:
        if wait:
            super()._send(messages, answers, wait=True)
        else:
            self._mux.send(self, messages, answers)


class KeyMux:
    """Coalescing across the keys of a keyed set: the batches its key proxies send without
    waiting, joined into one call to the actor (:meth:`LimitsActor.batch_keys`) while
    ``MAX_ASKING`` such calls are on their way; each reply goes to its proxy as the reply to
    its own batch."""

    __slots__ = ("_actor", "_flying", "_lock", "_name", "_pending")

    def __init__(self, actor: Any, name: str) -> None:
        self._actor = actor
        self._name = name
        self._lock = threading.Lock()
        self._pending: list[tuple[RayKeyProxy, list[tuple[Any, ...]], list[str | Answer]]] = []
        self._flying = 0

    def send(
        self, proxy: RayKeyProxy, messages: list[tuple[Any, ...]], answers: list[str | Answer]
    ) -> None:
        with self._lock:
            self._pending.append((proxy, messages, answers))
            if self._flying >= MAX_ASKING:
                return  # goes with the next call, when one of those comes back
            self._flying += 1
            entries, self._pending = self._pending, []
        self._go(entries)

    def _go(
        self, entries: list[tuple[RayKeyProxy, list[tuple[Any, ...]], list[str | Answer]]]
    ) -> None:
        batches = [(proxy._target[1], proxy._caller, messages) for proxy, messages, _ in entries]
        try:
            ref = self._actor.batch_keys.remote(self._name, batches)
        except Exception as exc:  # Ray shut down, actor handle unusable
            self._done(entries, [exc] * len(entries))
            return
        ref.future().add_done_callback(lambda future: self._on_reply(entries, future))

    def _on_reply(
        self,
        entries: list[tuple[RayKeyProxy, list[tuple[Any, ...]], list[str | Answer]]],
        future: Any,
    ) -> None:
        """From Ray's thread: the replies to a joined call."""
        try:
            replies = list(future.result())
        except Exception as exc:
            replies = [exc] * len(entries)
        self._done(entries, replies)

    def _done(
        self,
        entries: list[tuple[RayKeyProxy, list[tuple[Any, ...]], list[str | Answer]]],
        replies: list[Any],
    ) -> None:
        for (proxy, _messages, answers), reply in zip(entries, replies, strict=False):
            # Nor may it keep this mux stuck: every call on its way must be counted back.
            try:
                if isinstance(reply, BaseException):
                    proxy._replied(answers, None, reply)
                else:
                    proxy._replied(answers, reply, None)
            except Exception:  # noqa: PERF203 - one proxy failing must not stop the others
                log.exception("aiolimits: applying a reply of the Ray limits actor failed")
        with self._lock:
            if not self._pending:
                self._flying -= 1
                return
            entries, self._pending = self._pending, []
        self._go(entries)


class Courier:
    """One daemon thread per process, for every RayScheduler: sends what lingers in an outbox
    (``LINGER_SECONDS`` after it was put there, unless a batch took it along), makes the
    ``wait`` calls, and renews the leases of the schedulers holding resource slots every third
    of the shortest lease (the actor frees a holding whose lease ran out: its holder died)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._renewing: weakref.WeakSet[RayScheduler] = weakref.WeakSet()
        self._lingering: dict[RayScheduler, float] = {}
        self._soon: list[Callable[[], None]] = []
        self._renew_at = 0.0
        self._thread: threading.Thread | None = None

    def _start_locked(self) -> None:
        self._lock.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="aiolimits-ray", daemon=True)
            self._thread.start()

    def renew(self, sched: RayScheduler) -> None:
        with self._lock:
            self._renewing.add(sched)
            self._renew_at = 0.0  # now: its lease may be shorter than the period slept on
            self._start_locked()

    def linger(self, sched: RayScheduler) -> None:
        with self._lock:
            if sched not in self._lingering:
                self._lingering[sched] = time.monotonic() + LINGER_SECONDS
                self._start_locked()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on this thread (a call to Ray not made under a caller's lock)."""
        with self._lock:
            self._soon.append(fn)
            self._start_locked()

    def flush(self) -> None:
        """Send every outbox now (at exit)."""
        with self._lock:
            lingering = list(self._lingering)
            self._lingering.clear()
        for sched in lingering:
            with contextlib.suppress(Exception):
                sched.flush()

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                soon, self._soon = self._soon, []
                due = [s for s, at in self._lingering.items() if at <= now]
                for sched in due:
                    del self._lingering[sched]
                renewing = list(self._renewing) if now >= self._renew_at else []
                if renewing:
                    self._renew_at = now + min(s._lease for s in renewing) / 3
                if not (soon or due or renewing):
                    until = min(self._lingering.values(), default=_INF)
                    if self._renewing:
                        until = min(until, self._renew_at)
                    self._lock.wait(until - now if until < _INF else None)
                    continue
            for fn in soon:
                fn()
            for sched in due:
                sched.flush()
            for sched in renewing:
                try:
                    sched.renew()
                except Exception:  # noqa: PERF203 - one failing set must not stop the others
                    log.warning("aiolimits: renewing Ray leases failed", exc_info=True)


COURIER = Courier()
atexit.register(COURIER.flush)
