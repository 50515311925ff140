"""The scheduler of a LimitSet whose state lives in Redis.

It is the in-process :class:`~aiolimits._scheduler.Scheduler` — one lock, one FIFO queue of this
process's waiters, decide-then-wait — with the decisions made by the Lua script instead of by
local state: taking (``try_take``, and the grant of the head in ``_dispatch`` through ``_admit``),
asking (``admit_time``), giving back (``release``, ``settle``, ``_give_back``), pausing, and the
statistics. Everything about waiting is unchanged, so the doors are those of every backend.

Design, and what it costs:

* **One round trip per uncontended acquisition**: the script decides for every limit of the
  set and takes them all at once, or takes nothing and answers when it could (Redis server time,
  converted to this process's clock as a delay).
* **Local FIFO, runs decided together**: the waiters of one process queue here; one script
  call ("batch") decides the head and the waiters behind it in queue order, granting them up to
  the first that does not fit, whose time becomes the head's wake time. Across processes there
  is no common queue: when several processes' heads are due, the first to ask wins (see
  ``docs/redis.md``).
* **Who calls Redis**: a lone async request asks itself, awaiting the
  answer on its loop (``take_first``: nobody queued, nothing in flight; a refusal puts it first
  in the queue); otherwise the async door only queues (``enqueue``) and a waiter only signals
  when its time has come (``after_wake``); the set's dispatcher thread (``_threads.Hub``) makes
  those calls with the lock released, so no event loop blocks on Redis and what queues during a
  call goes out in the next one (coalescing). The verbs that must
  answer at once (``try_take``, ``admit_time``, ``settle``, ``pause``, ``availability``, a release
  of slots) call directly, under the lock, with a timeout; so do the dispatches they cause
  (``_dispatch_inline``), so that their effect is visible when they return, as in memory. An
  answer the dispatcher got before another was applied is stale (``_epoch``): asked again.
* **Wake-ups across processes**: a release or refund in another process is published by the
  script on the set's channel; the subscriber thread makes the head due and signals.
* **Keyed sets**: the proxy of one client key of a KeyedLimitSet is this scheduler over the key's
  own hash (``_keys.py``); the threads (dispatcher, subscriber, renewer) belong to the set's
  :class:`~aiolimits.redis._threads.Hub` and serve every scheduler of the set.
* **Leases**: resource slots are leases named by a holder id per acquisition; a renewer thread
  extends this process's leases while held, so a process that dies frees its slots within one
  lease. A renewal that finds its lease gone is logged and counted (``leases_lost``).
* **Time**: the script reads Redis server time. A clock that drives its own timers (a simulated
  clock such as :class:`aiolimits.testing.ManualClock`) is the script's time instead, and fires
  the expiry timers: time injected, the code path is the same (the threads, the hand-offs and
  the calls), so the contract suite, on such a clock, tests the path production runs.

Layout, by concern: ``_calls.py`` (the protocol: bounded script calls from a thread or a task),
``_link.py`` (connections), ``_failure.py`` (the circuit and the failure policy's receipts),
``_outbox.py`` (calls handed off by an event loop), ``_leases.py`` (holder ids and leased keys),
``_base.py`` (the scheduler's state and its ways to Redis), ``_batch.py`` (the dispatcher's
batches), ``_direct.py`` (the async door's own round trips), and here the decisions every door
uses and the waiting protocol. The grant bookkeeping is the in-process scheduler's
(``Scheduler._grant``, ``_drop``, ``_tell_head``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

from .._algorithms import RateState, SemaphoreState
from .._errors import BackendUnavailable
from .._scheduler import Items
from .._waiters import GRANTED, WAITING, Waiter
from ._base import on_loop
from ._direct import DirectCalls
from ._failure import ALLOWED, GRACE, Local, NotSent, on_background_thread
from ._outbox import Pending
from ._script import acquire_reply, decode_receipt, encode_receipt, num
from ._threads import log

__all__ = ["RedisScheduler"]


class RedisScheduler(DirectCalls):
    """A :class:`Scheduler` whose decisions are made by the Lua script on the shared state.

    Layered by concern: :class:`~aiolimits.redis._base.RedisBase` (state, script calls, outbox,
    leases), :class:`~aiolimits.redis._batch.Batching` (the dispatcher's batches),
    :class:`~aiolimits.redis._direct.DirectCalls` (the async door's own round trips), and here
    the decisions every door uses and the waiting protocol."""

    __slots__ = ()

    def admit_time(self, items: Items, now: float) -> tuple[float, float]:
        try:
            self._flush()
            reply = self._call("earliest", now, *self._item_args(items), bound=self._bound())
        except BackendUnavailable as exc:
            if self._unavailable(exc) == "allow":
                return now, now
            return super().admit_time(items, now)
        server_now = float(reply[0])
        self._watch_expiry(now, self.calls.local(now, server_now, float(reply[3])))
        return (
            self.calls.local(now, server_now, float(reply[1])),
            self.calls.local(now, server_now, float(reply[2])),
        )

    def _admit(self, items: Items, now: float) -> tuple[float, float, list[Any] | None]:
        try:
            self._flush(self._hint)
            return self._acquire(items, now)
        except BackendUnavailable as exc:
            self._unavailable(exc)  # raises under "raise"
            # The policy's decision (not through admit_time: Redis was asked once already).
            return self._fallback(items, now)

    def _acquire(self, items: Items, now: float) -> tuple[float, float, list[Any] | None]:
        holder = self._terms.new_holder()
        reply = acquire_reply(
            self._call(
                "acquire",
                now,
                holder,
                num(self._terms.seconds),
                *self._item_args(items),
                bound=self._bound(),
            )
        )
        if reply[0] != 1:
            server_now = float(reply[1])
            self._watch_expiry(now, self.calls.local(now, server_now, float(reply[4])))
            rate_at = self.calls.local(now, server_now, float(reply[2]))
            admit_at = self.calls.local(now, server_now, float(reply[3]))
            self._refused = (items, now, rate_at, admit_at)
            return rate_at, admit_at, None
        return now, now, self._receipts(items, holder, reply[2:])

    def try_take(self, items: Items, now: float) -> list[Any] | None:
        if self._fast_busy or self.paused_until > now:
            # An earlier async request is being decided, or a pause made on an event loop is
            # being sent.
            self._hint = None
            return None
        if self.queue:
            self.catch_up(now)
            if self.queue:
                self._hint = None
                return None
        _rate_at, _admit_at, receipts = self._admit(items, now)
        if receipts is not None:
            self.granted += 1
        return receipts

    def change_limit(self, state: RateState, capacity: float, window: float, now: float) -> None:
        """The script carries the state in Redis over (semantics §4) and records the numbers
        now (``"!n"``) with a new digest (``"!h"``), which makes every other client read them
        before its next call; the script's wake-up tells their waiters. Here the numbers apply
        at once. From an event loop's thread it is handed off, in order, as a pause is."""
        key = state.key
        old = self._arguments()[key]
        new = [old[0], old[1], num(capacity), num(window)]
        digest: list[str] = []

        def words() -> list[str]:
            numbers = {s.key: [s.capacity, s.window] for s in self.states}
            numbers[key] = [capacity, window]
            text = json.dumps(numbers, sort_keys=True)
            made = hashlib.sha1(f"{self.calls.tag}|{text}".encode(), usedforsecurity=False)
            digest[:] = [made.hexdigest()[:16]]
            return [*old, num(capacity), num(window), text, digest[0]]

        def done(_reply: Any) -> None:
            self.calls.tag = f"d{digest[0]}"  # a plain set's calls carry one, whatever the clock

        def apply() -> None:  # here: this process's numbers and fallback state
            self._args[key] = new
            state.change(capacity, window, now)
            self.refuse_above(state)

        if on_loop():
            self._defer("change", words, done=done, lost=f"could not change {key!r} in Redis")
            apply()  # sent before any other call of this process (see _defer)
            return
        try:
            self._flush()
            self._call("change", now, *words())
        except BackendUnavailable as exc:
            self._unavailable(exc)  # "raise": nothing changed; otherwise it applies here
            apply()
            return
        done(None)
        apply()
        if self.queue:
            self._dispatch(now)

    def _give_back(self, items: Items, receipts: Sequence[Any] | None, now: float) -> None:
        """Give back a grant nobody used: rate amounts refunded as far as §3 allows, leases
        ended. Failures are logged: what cannot be refunded stays used, a lease expires."""
        if receipts and isinstance(receipts[0], Local):
            for (state, amount), receipt in zip(items, receipts, strict=True):
                if isinstance(state, SemaphoreState):
                    state.release(amount)
                else:
                    state.refund(receipt.receipt, amount, now)
            return
        if not receipts or receipts[0] is ALLOWED:
            return
        rates = [
            (state, receipt, amount)
            for (state, amount), receipt in zip(items, receipts, strict=True)
            if state.key not in self._terms.resources
        ]
        holder = self._forget_leases(items, receipts)
        if rates:
            args = [str(len(rates))]
            for state, receipt, amount in rates:
                args += [*self._arguments()[state.key], num(amount), "0.0", encode_receipt(receipt)]
            if on_loop() or on_background_thread():
                # No round trip on a loop's thread, nor under the lock on the backend's own.
                self._defer("settle", lambda: args, lost="could not give back an unused grant")
            else:
                try:
                    self._flush()
                    self._call("settle", now, *args)
                except BackendUnavailable as exc:
                    log.warning("could not give back an unused grant: %s", exc)
        if holder is not None:
            self._end_lease(holder, self._terms.keys(items))

    def release(self, items: Items, receipts: list[Any] | None = None) -> None:
        if receipts and isinstance(receipts[0], Local):
            super().release(items)
            return
        if not receipts or receipts[0] is ALLOWED:
            return
        holder = self._forget_leases(items, receipts)
        if holder is None:
            return
        # Like every in-process release, a slot released is free for this process's next call
        # (sent before it), and the head is asked at once.
        self._end_lease(holder, self._terms.keys(items))
        if self.queue:
            self._dispatch(self.clock())

    def settle(
        self, state: RateState, receipt: Any, held: float, usage: float, now: float
    ) -> tuple[Any, float]:
        if isinstance(receipt, Local):
            inner, held_now = super().settle(state, receipt.receipt, held, usage, now)
            return Local(inner), held_now
        if receipt is ALLOWED:
            return receipt, usage  # nothing was taken in Redis: nothing to settle there
        if isinstance(receipt, Pending) or (on_loop()):
            # Sent later, in order after any update still to be sent (see _defer).
            return self._defer_settle(state, receipt, held, usage), usage
        if usage == held:
            return receipt, held
        args = [*self._arguments()[state.key], num(held), num(usage), encode_receipt(receipt)]
        try:
            self._flush()
            reply = self._call("settle", now, "1", *args, bound=self._bound())
        except BackendUnavailable as exc:
            self._unavailable(exc)
            return receipt, held  # not recorded: a refund is lost, a charge goes uncounted
        new_receipt, held_now, given = reply[2]
        if float(given) > 0:
            self._refunded[state.key] += float(given)
        return decode_receipt(new_receipt), float(held_now)

    def _defer_settle(self, state: RateState, receipt: Any, held: float, usage: float) -> Pending:
        """A usage update handed off (see :meth:`_defer`): its receipt, complete once sent."""
        out = Pending(receipt, held)

        def args() -> list[str] | None:
            prior, before = receipt, held
            if isinstance(prior, Pending):  # an earlier update of the limit, sent before this
                prior, before = prior.receipt, prior.held
            out.receipt, out.held = prior, before  # until this one is answered
            if prior is ALLOWED or usage == before:
                out.held = usage if prior is ALLOWED else before
                return None
            return [
                "1",
                *self._arguments()[state.key],
                num(before),
                num(usage),
                encode_receipt(prior),
            ]

        def done(reply: Any) -> None:
            new_receipt, held_now, given = reply[2]
            out.receipt, out.held = decode_receipt(new_receipt), float(held_now)
            if float(given) > 0:
                self._refunded[state.key] += float(given)

        self._defer("settle", args, done=done, lost=f"could not report the usage of {state.key!r}")
        return out

    def pause(self, until: float, now: float) -> None:
        if on_loop():
            # Sent later (see _defer); meanwhile this process admits nobody before ``until``
            # itself (try_take and the async door look at it).
            if until > self.paused_until:
                self.paused_until = until
            self._defer(
                "pause",
                lambda: [num(max(until - self.clock(), 0.0)), ""],
                lost=f"could not pause {self._hash} in Redis (paused in this process)",
            )
            return
        try:
            self._flush()
            # Time injected, the script's time is ours: the exact end goes too.
            end = num(until) if self.calls.injected_time else ""
            self._call("pause", now, num(until - now), end)
        except BackendUnavailable as exc:
            if self._unavailable(exc) == "allow":
                return
            super().pause(until, now)
            return
        if self.queue:
            self._dispatch(now)

    def availability(self, now: float) -> dict[str, float]:
        answered, self._answered = self._answered, None
        if answered is not None:
            return answered
        args = [str(len(self.states))]
        limit_args = self._arguments()
        for state in self.states:
            args += limit_args[state.key]
        try:
            self._flush()
            reply = self._call("stats", now, *args, bound=self._bound())
        except BackendUnavailable as exc:
            self._unavailable(exc)
            return super().availability(now)
        return self._read_stats(now, reply)

    def enqueue(self, waiter: Waiter, now: float) -> bool:
        self._hub.listen(self)
        refused, self._refused = self._refused, None
        if refused is not None and refused[0] is waiter.items and refused[1] == now:
            # try_take was just refused for this request (acquire_sync): use that answer.
            rate_at, admit_at = refused[2], refused[3]
            if rate_at > waiter.deadline or now >= waiter.deadline:
                self.timed_out += 1
                return False
            if not self.queue:
                waiter.wake_at, waiter.rate_at = admit_at, rate_at
                self.queue[waiter] = None
                return True
        # Queued without asking: due at once (``wake_at``); the dispatcher asks for it when it
        # is the head, and a deadline the rate limits already exclude fails it then.
        waiter.wake_at = now
        waiter.rate_at = -math.inf
        self.queue[waiter] = None
        if next(iter(self.queue)) is waiter:
            self._signal()
        return True

    def after_wake(self, waiter: Waiter, now: float) -> float | None:
        until = self._after_wake(waiter, now)
        if until is None and waiter.state == GRANTED and not self._ran(waiter):
            return math.inf  # granted after a task of its loop that has not run yet
        return until

    def abandon(self, waiter: Waiter, now: float) -> None:
        if waiter.state == GRANTED:
            self._ran(waiter, leaving=True)
        super().abandon(waiter, now)

    def _after_wake(self, waiter: Waiter, now: float) -> float | None:
        waiter.consume_notification()
        if waiter.state != WAITING:
            return None
        is_head = next(iter(self.queue)) is waiter
        if now >= waiter.deadline or (is_head and waiter.rate_at > waiter.deadline):
            # Redis's last answer admits the head by its deadline (due exactly then): it is
            # asked for now, as a head due before its deadline is.
            due = is_head and -math.inf < waiter.rate_at and waiter.wake_at <= waiter.deadline
            if waiter.rate_at > waiter.deadline or not (due or self._unanswered()):
                self._leave(waiter, now)
                self.timed_out += 1
                return None
            # Redis has not answered for the head: give it the round trip's grace, then decide
            # by the policy (the deadline holds whatever Redis does).
            if now < waiter.deadline + GRACE and not self._circuit.opened:
                if due:
                    self._signal()
                return waiter.deadline + GRACE
            self._no_answer(waiter, now)
            return None
        if is_head and now >= waiter.wake_at:
            self._signal()  # the dispatcher asks, and notifies this waiter with the answer
            return waiter.deadline
        wake = self.timer_at(waiter.wake_at, waiter.deadline) if is_head else math.inf
        return wake if wake < waiter.deadline else waiter.deadline

    def _unanswered(self) -> bool:
        """Under the lock: the head of the queue waits for Redis's first answer about it."""
        head = next(iter(self.queue), None)
        return head is not None and head.rate_at == -math.inf

    def _no_answer(self, waiter: Waiter, now: float) -> None:
        """Under the lock: ``waiter``'s deadline (and grace) passed without an answer from Redis:
        the failure policy decides (``"raise"``: a timeout, or BackendUnavailable when Redis is
        known to be unreachable)."""
        receipts: list[Any] | None = None
        if self._policy != "raise":
            receipts = self._fallback(waiter.items, now)[2]
        elif self._circuit.opened:
            self._failures[waiter] = NotSent(f"Redis is unreachable ({self._circuit.reason})")
        if receipts is None:
            self._leave(waiter, now)
            self.timed_out += 1
            return
        was_head = next(iter(self.queue)) is waiter
        del self.queue[waiter]
        self._grant(waiter, receipts, now, wake=False)  # it is running: see after_wake
        if was_head:
            self._dispatch(now)

    def _dispatch(self, now: float, current: Waiter | None = None) -> None:
        if self.queue:
            # Something changed (a release, a refund, a pause, a new head): ask for the head now.
            self._epoch += 1  # an answer in flight predates it
            head = next(iter(self.queue))
            if head.wake_at > now:
                head.wake_at = now
            if on_loop():
                self._signal()  # never a round trip on an event loop's thread
            else:
                self._dispatch_inline(now)
