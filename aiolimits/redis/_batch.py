"""The dispatcher's work: runs of the queue decided in one script call each ("batches").

The waiters of one process queue in their scheduler; one ``batch`` call decides the head and the
waiters behind it (at most 64) in queue order, granting them up to the first that does not fit,
whose time becomes the head's wake time. The set's dispatcher thread makes these calls with the
lock released (:meth:`Batching.dispatch_queue`; for many keys of a keyed set at once, in one
pipelined round trip: ``_threads._dispatch_together``); a caller on a thread that must see the
effect at once makes them under the lock (:meth:`Batching._dispatch_inline`). An answer taken
before something else changed the head's chances (``_epoch``) is stale: asked again. When Redis
does not answer, the failure policy decides the batch (``"raise"``, ``"allow"``, ``"local"``).
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs

from .._errors import BackendUnavailable
from .._scheduler import Items
from .._waiters import WAITING, Waiter
from ._base import RedisBase
from ._calls import StaleNumbers
from ._script import num
from ._threads import log

__all__ = ["Batch", "Batching"]


@attrs.frozen
class Batch:
    """A run of the queue asked for in one script call: its waiters, their lease holders, the
    time and epoch it was taken at, and the call's arguments after the time."""

    waiters: list[Waiter]
    holders: list[str]
    now: float
    epoch: int
    args: list[str]


class Batching(RedisBase):
    """The dispatcher's work of a Redis-backed scheduler (see the module's docstring)."""

    __slots__ = ()

    def dispatch_queue(self) -> None:
        """Ask Redis for the due head and the waiters behind it, in one call per batch, and
        apply the answer: grants in queue order up to the first refusal, whose time goes to the
        new head. Repeats while whole batches are granted and more are queued. What an event
        loop handed off goes first."""
        self.send_outbox()
        while (asked := self.batch_to_ask()) is not None:
            try:
                reply = self._call("batch", asked.now, *asked.args)
            except (BackendUnavailable, ValueError) as exc:
                self.batch_failed(asked, exc)
                return
            if not self.batch_answered(asked, reply):
                return  # the head waits for its time, a release or a refund

    # The three steps of dispatch_queue, also taken for many keys of a keyed set at once, their
    # calls sent in one round trip (``_threads._dispatch_each``).

    def batch_to_ask(self) -> Batch | None:
        """The due head and the waiters behind it, to ask Redis for (None: none is due)."""
        with self.lock:
            now = self.clock()
            batch = self._due_batch(now)
            if not batch:
                return None
            holders = [self._terms.new_holder() for _ in batch]
            return Batch(batch, holders, now, self._epoch, self._batch_args(batch, holders))

    def batch_command(self, asked: Batch) -> list[str]:
        """The words of the script call for ``asked`` (for a pipeline of many)."""
        return self.calls.command(self._hash, "batch", asked.now, asked.args)

    def batch_answered(self, asked: Batch, reply: Any) -> bool:
        """Apply Redis's ``reply`` to ``asked``; True when the whole batch was granted and no
        time was given back (more may be due: ask again)."""
        with self.lock:
            undo = self._apply(asked.waiters, asked.holders, reply, asked.now, asked.epoch)
            for items, receipts in undo:  # handed to the outbox (on this thread, see _give_back)
                self._give_back(items, receipts, self.clock())
        return not (len(reply[2]) < len(asked.waiters) or reply[3])

    def batch_failed(self, asked: Batch, exc: BackendUnavailable | ValueError) -> None:
        with self.lock:
            self._batch_failed(asked.waiters, exc)

    def _dispatch_inline(self, now: float) -> None:
        """Under the lock: what the dispatcher thread does, done now by the caller (a release,
        a refund, a pause, a waiter leaving), so that its effect is visible when it returns."""
        try:
            self._flush()
        except BackendUnavailable:
            self._signal()  # the dispatcher asks once what it sends is sent
            return
        while True:
            batch = self._due_batch(now)
            if not batch:
                return
            holders = [self._terms.new_holder() for _ in batch]
            try:
                reply = self._call("batch", now, *self._batch_args(batch, holders))
            except (BackendUnavailable, ValueError) as exc:
                self._batch_failed(batch, exc)
                return
            for items, receipts in self._apply(batch, holders, reply, now, self._epoch):
                self._give_back(items, receipts, now)
            if len(reply[2]) < len(batch) or reply[3]:
                return
            now = self.clock()

    def _due_batch(self, now: float) -> list[Waiter]:
        """Under the lock: the head, if it is due, and the waiters behind it (at most 64);
        waiters whose cancellation is already pending are dropped."""
        queue = self.queue
        while queue:
            head = next(iter(queue))
            if not head.cancel_pending():
                break
            self._drop(head)
        if not queue or self._fast_busy or next(iter(queue)).wake_at > now:
            return []
        return list(itertools.islice(queue, 64))

    def _batch_args(self, batch: list[Waiter], holders: list[str]) -> list[str]:
        args = [num(self._terms.seconds), str(len(batch))]
        for waiter, holder in zip(batch, holders, strict=True):
            args.append(holder)
            args += self._item_args(waiter.items)
        return args

    def _apply(
        self, batch: list[Waiter], holders: list[str], reply: Any, now: float, epoch: int
    ) -> list[tuple[Items, list[Any]]]:
        """Under the lock: grant the admitted waiters still queued, give the first refused one
        its times (unless something changed since the batch was asked for, ``epoch``: then it
        is asked again). Returns the grants nobody can use any more (left meanwhile), to undo."""
        fresh = epoch == self._epoch
        self._epoch += 1
        server_now = float(reply[0])
        undo: list[tuple[Items, list[Any]]] = []
        local_now = self.clock()
        for waiter, holder, raw in zip(batch, holders, reply[2], strict=False):
            receipts, held = self._terms.receipts(waiter.items, holder, raw)
            if waiter.state != WAITING or waiter not in self.queue:
                undo.append((waiter.items, receipts))
                continue
            del self.queue[waiter]
            if not self._grant(waiter, receipts, local_now):
                undo.append((waiter.items, receipts))  # its event loop is gone
            elif held:
                self._hold(holder, held)
        refused = reply[3]
        if refused and self.queue:
            head = next(iter(self.queue))
            if fresh and head is batch[len(reply[2])] and head.state == WAITING:
                self._watch_expiry(now, self.calls.local(now, server_now, float(refused[2])))
                # Told always: a due head sleeps until it is told (see after_wake).
                if not self._tell_head(
                    head,
                    self.calls.local(now, server_now, float(refused[0])),
                    self.calls.local(now, server_now, float(refused[1])),
                    now,
                    always=True,
                ):
                    self._signal()  # it was dropped: ask for the next head
            else:
                # The head, or what Redis knows, changed while it answered: ask again.
                if head.wake_at > local_now:
                    head.wake_at = local_now
                self._signal()
        return undo

    def _batch_failed(self, batch: list[Waiter], exc: BackendUnavailable | ValueError) -> None:
        """Under the lock: Redis did not answer for a batch: fail it (``"raise"``, or another
        declaration took the set's name: ValueError), or decide it in-process. A batch asked
        with numbers another client changed since is asked again, once the waiters above a
        lowered capacity are sent away."""
        if isinstance(exc, StaleNumbers):
            for state in self.states:
                self.refuse_above(state)
            self._signal()
            return
        now = self.clock()
        for waiter in batch:
            if waiter.state != WAITING or waiter not in self.queue:
                continue
            if self._policy == "raise" or isinstance(exc, ValueError):
                self._unqueue(waiter)
                self._failures[waiter] = exc
                waiter.notify()
                continue
            rate_at, admit_at, receipts = self._fallback(waiter.items, now)
            if receipts is None:
                self._tell_head(waiter, rate_at, admit_at, now, always=True)
                break
            del self.queue[waiter]
            if not self._grant(waiter, receipts, now):
                self._give_back(waiter.items, receipts, now)
        if self._policy != "raise" and not isinstance(exc, ValueError):
            log.warning("%s; applying on_unavailable=%r", exc, self._policy)
