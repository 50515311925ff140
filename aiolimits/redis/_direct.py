"""The async door's direct calls: a task asks Redis itself, awaiting the answer on its loop.

A lone async request (nobody queued, nothing in flight, a connected connection ready) makes its
own round trip (:meth:`DirectCalls.take_first`) instead of handing its request to the dispatcher
thread: no thread hop. The integrations' gate decides in one awaited round trip too
(:meth:`DirectCalls.attempt`: ``acquire`` and ``stats`` pipelined). Neither ever connects or waits
for Redis on the loop's thread: without a connected connection ready, the request queues (the
dispatcher asks) or is decided under the lock within one round trip's grace; while Redis is known
to be unreachable, the failure policy applies at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions

from .._door import retry_after_locked, stats_locked
from .._errors import BackendUnavailable
from .._limits import Limit
from .._scheduler import Items, Scheduler
from ._batch import Batching
from ._calls import NoAnswer
from ._failure import GRACE
from ._script import acquire_reply, num

__all__ = ["DirectCalls"]


class DirectCalls(Batching):
    """The async door's first step and its decision without waiting, for a Redis-backed
    scheduler (see the module's docstring)."""

    __slots__ = ()

    async def take_first(
        self, items: Items, patience: float, new_waiter: Callable[[Items, float], Any]
    ) -> tuple[list[Any] | None, Any, float]:
        """The async door's first step under the real clock: ``(receipts, None, start)``,
        ``(None, waiter, start)`` (queued), or ``(None, None, start)`` (the rate limits already
        place it after its deadline, ``patience`` seconds away). When nobody is queued, nothing
        is being decided and a connected connection is ready, the task asks Redis itself,
        awaiting the answer on its own event loop (no thread hop) for at most its patience plus
        the grace of one round trip; otherwise it queues and the dispatcher asks for it with
        the others. While Redis is known to be unreachable, the policy applies at once."""
        with self.lock:
            start = self.clock()
            if self._circuit.opened:
                # No I/O: the decision fails at once, and the policy decides (or raises).
                receipts = self.try_take(items, start)
                if receipts is not None:
                    return receipts, None, start
                waiter = new_waiter(items, start + patience)
                if not self.enqueue(waiter, start):
                    return None, None, start
                return None, waiter, start
            conn = None
            if (
                not self.queue
                and not self._fast_busy
                and not self._outbox.busy()  # what was handed off goes first (dispatcher)
                and self.paused_until <= start
                and self.calls.link is not None
                and self._hub.take_direct()  # a keyed set bounds its connections in use
            ):
                conn = self.calls.link.take()
                if conn is None:
                    self._hub.end_direct()
                    self.calls.link.warm()  # for the next one; the dispatcher asks for this one
            if conn is None:
                waiter = new_waiter(items, start + patience)
                if not self.enqueue(waiter, start):
                    return None, None, start  # the deadline is already out of reach
                return None, waiter, start
            self._fast_busy = True
            epoch = self._epoch
            # A set without resource limits leases nothing: its calls name no holder, and
            # repeat the same words (see ScriptCalls._packed).
            holder = self._terms.new_holder() if self._terms.resources else ""
            args = [holder, num(self._terms.seconds), *self._item_args(items)]
        try:
            reply = await self._ask_directly(conn, args, patience + GRACE, start)
        except BaseException as exc:
            with self.lock:
                self._fast_busy = False
                if self.queue:
                    self._signal()
                if isinstance(exc, (BackendUnavailable, redis.exceptions.ResponseError)):
                    decided = self._direct_failed(exc, items, patience, start, new_waiter)
                    if decided is not None:
                        return decided
            raise
        with self.lock:
            self._fast_busy = False
            return self._direct_answered(
                reply,
                items,
                holder,
                patience=patience,
                start=start,
                epoch=epoch,
                new_waiter=new_waiter,
            )

    def _direct_failed(
        self,
        exc: BackendUnavailable | redis.exceptions.ResponseError,
        items: Items,
        patience: float,
        start: float,
        new_waiter: Callable[[Items, float], Any],
    ) -> tuple[list[Any] | None, Any, float] | None:
        """Under the lock: what ``take_first`` returns after its direct call failed (None: it
        raises ``exc``)."""
        if isinstance(exc, NoAnswer) and self._policy != "raise":
            # Not answered within the caller's time: the policy decides now.
            return self._fallback_take(items, self.clock()), None, start
        if isinstance(exc, BackendUnavailable) and self._policy == "raise":
            return None
        # The dispatcher asks again (an error reply: the script to load, the set to declare
        # again), or applies the policy to it, first in the queue.
        waiter = new_waiter(items, start + patience)
        if not self.enqueue(waiter, start):
            return None, None, start
        self.queue.move_to_end(waiter, last=False)
        waiter.wake_at = start
        self._signal()
        return None, waiter, start

    def _direct_answered(
        self,
        reply: list[Any],
        items: Items,
        holder: str,
        *,
        patience: float,
        start: float,
        epoch: int,
        new_waiter: Callable[[Items, float], Any],
    ) -> tuple[list[Any] | None, Any, float]:
        """Under the lock: what ``take_first`` returns for Redis's answer ``reply``."""
        now = self.clock()
        if reply[0] == 1:
            receipts = self._receipts(items, holder, reply[2:])
            self.granted += 1
            if self.queue:
                self._signal()
            return receipts, None, start
        server_now = float(reply[1])
        rate_at = self.calls.local(start, server_now, float(reply[2]))
        admit_at = self.calls.local(start, server_now, float(reply[3]))
        waiter = new_waiter(items, start + patience)
        if rate_at > waiter.deadline or now >= waiter.deadline:
            self.timed_out += 1
            if self.queue:
                self._signal()
            return None, None, start
        self._hub.listen(self)
        # First in the queue: it arrived before those that queued while Redis answered.
        self.queue[waiter] = None
        self.queue.move_to_end(waiter, last=False)
        if epoch == self._epoch:
            waiter.rate_at, waiter.wake_at = rate_at, admit_at
            self._watch_expiry(now, self.calls.local(start, server_now, float(reply[4])))
        else:  # something changed meanwhile: ask again
            waiter.rate_at, waiter.wake_at = -math.inf, now
            self._signal()
        return None, waiter, start

    async def attempt(
        self, items: Items, limits: Sequence[Limit]
    ) -> tuple[list[Any] | None, float, dict[str, Any]]:
        """``(receipts, retry_after, stats)`` for ``try_acquire`` from a task in one awaited
        round trip: ``acquire`` (or, while others are queued, ``earliest``) and ``stats``,
        pipelined on a connection of the link. Without a connected one ready, or while Redis is
        known to be unreachable, the answers are made under the lock as the sync verbs make
        them (at once while unreachable)."""
        with self.lock:
            start = self.clock()
            conn = None
            if not self._circuit.opened and self.calls.link is not None and not self._outbox.busy():
                conn = self.calls.link.take()
                if conn is None:
                    self.calls.link.warm()
            if conn is None:
                # Under the lock on the task's loop: every call waits one round trip's grace
                # at most (at once while Redis is known to be unreachable).
                self._patience = GRACE
                try:
                    return self._attempt_locked(items, limits, start)
                finally:
                    self._patience = None
            barge = not self.queue and not self._fast_busy and self.paused_until <= start
            holder = ""
            if barge:
                self._fast_busy = True
                holder = self._terms.new_holder()
            stats_args = [str(len(self.states))]
            limit_args = self._arguments()
            for state in self.states:
                stats_args += limit_args[state.key]
            first = (
                ["acquire", holder, num(self._terms.seconds), *self._item_args(items)]
                if barge
                else ["earliest", *self._item_args(items)]
            )
        try:
            replies = await self.calls.exchange(
                conn, self._hash, [first, ["stats", *stats_args]], GRACE, start
            )
        except (BackendUnavailable, redis.exceptions.ResponseError) as exc:
            with self.lock:
                self._fast_busy = False
                return self._attempt_failed(exc, items, limits)
        with self.lock:
            self._fast_busy = False
            now = self.clock()
            granted: list[Any] | None = None
            if barge:
                reply = acquire_reply(replies[0])
                if reply[0] == 1:
                    granted = self._receipts(items, holder, reply[2:])
                    self.granted += 1
                    at = now
                else:
                    at = self.calls.local(start, float(reply[1]), float(reply[3]))
            else:
                reply = replies[0]
                at = self.calls.local(start, float(reply[0]), float(reply[2]))
            at = max(at, self.head_wake_at())
            self._answered = self._read_stats(start, replies[1])
            stats = stats_locked(limits, self, now)
            if self.queue:
                self._signal()
            return granted, 0.0 if granted is not None else max(0.0, at - now), stats

    def _attempt_failed(
        self,
        exc: BackendUnavailable | redis.exceptions.ResponseError,
        items: Items,
        limits: Sequence[Limit],
    ) -> tuple[list[Any] | None, float, dict[str, Any]]:
        """Under the lock: the answers of ``attempt`` after its round trip failed."""
        if self.queue:
            self._signal()
        now = self.clock()
        if not isinstance(exc, NoAnswer):
            # Unreachable (the policy applies at once now), or an error reply (the sync path
            # loads the script, or declares the set again, within the grace).
            self._patience = GRACE
            try:
                return self._attempt_locked(items, limits, now)
            finally:
                self._patience = None
        if self._policy == "raise":
            raise exc
        receipts = self._fallback_take(items, now)
        wait = 0.0
        if receipts is None:  # the in-process limits ("local") refused it
            wait = max(0.0, Scheduler.admit_time(self, items, now)[1] - now)
        self._answered = Scheduler.availability(self, now)
        return receipts, wait, stats_locked(limits, self, now)

    def _attempt_locked(
        self, items: Items, limits: Sequence[Limit], now: float
    ) -> tuple[list[Any] | None, float, dict[str, Any]]:
        receipts = self.try_take(items, now)
        wait = 0.0 if receipts is not None else retry_after_locked(self, items, now)
        return receipts, wait, stats_locked(limits, self, now)

    async def _ask_directly(
        self, conn: redis.Connection, args: list[str], bound: float, now: float
    ) -> list[Any]:
        """``acquire``, asked by the task itself; ends the hub's count of direct calls."""
        try:
            (reply,) = await self.calls.exchange(conn, self._hash, [["acquire", *args]], bound, now)
            return acquire_reply(reply)
        finally:
            self._hub.end_direct()
