"""Calls handed off by an event loop's thread, sent in order: the outbox of one scheduler.

A sync verb called from a task (``update``, a release through ``__aexit__``, ``pause``) must not
wait for Redis on the task's loop. Its call goes into the scheduler's :class:`Outbox` instead
and the verb returns; the call is sent before any later call of that scheduler (the next one made
under the lock sends it first) or, if none comes, by the set's dispatcher thread. What a caller
can observe is in ``docs/redis.md``: a refund or a release reaches Redis one round trip later, a
release that cannot be delivered is sent again once Redis answers (ending a lease twice is
harmless), and a lease expires anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from .._errors import BackendUnavailable
from ._calls import NoAnswer
from ._failure import Circuit, NotSent, log

__all__ = ["Outbox", "Pending", "Sender"]

#: A call handed off: its operation, its arguments made when it is sent (None: nothing to send
#: any more), what gets the reply, and the text logged when it is lost (None: it may run twice,
#: so it is sent again once Redis answers).
Entry = tuple[str, Callable[[], list[str] | None], Callable[[Any], object] | None, str | None]


class Sender(Protocol):
    """What an outbox sends through: its scheduler."""

    def send_deferred(self, op: str, words: list[str]) -> Any:
        """One script call of ``op`` with ``words``, now, from this thread."""

    def retry_outbox(self) -> None:
        """Send the outbox again (the circuit calls it once Redis answers)."""


class Pending:
    """The receipt of a usage update handed off: the receipt and the units held once it has
    been sent, the ones before until then. A later update of the same limit reads them when it
    is sent, after this one."""

    __slots__ = ("held", "receipt")

    def __init__(self, receipt: Any, held: float) -> None:
        self.receipt = receipt
        self.held = held


class Outbox:
    """The calls one scheduler handed off, in order, guarded by the scheduler's lock.

    Args:
        lock: the scheduler's lock; every method but :meth:`send` is called holding it.
        circuit: the backend's circuit: a call not sent while it is open waits for it to close.
    """

    __slots__ = ("_circuit", "_entries", "_retrying", "_sending", "_sent")

    def __init__(self, lock: threading.Lock, circuit: Circuit) -> None:
        self._entries: list[Entry] = []
        self._circuit = circuit
        # Sending the entries again waits for the circuit to close.
        self._retrying = False
        # The dispatcher thread is sending the first entry (without the lock), and the
        # condition (on the lock) a caller waits on for it to end.
        self._sending = False
        self._sent = threading.Condition(lock)

    def busy(self) -> bool:
        """Whether calls wait to be sent, or one is being sent."""
        return self._sending or bool(self._entries)

    def defer(
        self,
        op: str,
        args: Callable[[], list[str] | None],
        done: Callable[[Any], object] | None = None,
        lost: str | None = None,
    ) -> None:
        """Hand off the call ``op`` (its arguments made when it is sent, None: nothing to send).
        ``done`` gets the reply; ``lost``: a timed-out call that may not be sent again (it may
        have run) is logged with that text, else (ending a lease, which may run twice) it is sent
        again once Redis answers. A call not sent (Redis known to be unreachable) is sent once
        Redis answers again. The caller signals the dispatcher thread."""
        self._entries.append((op, args, done, lost))

    def flush(self, sender: Sender, bound: float | None, timeout: float, name: str) -> None:
        """Before a call of this caller: send the entries first, in order, after the one the
        dispatcher thread may be sending (waiting at most ``bound``, or ``timeout``).

        Raises:
            NoAnswer: the dispatcher thread's call did not end in time.
        """
        if self._sending:
            wait = timeout if bound is None else min(bound, timeout)
            if not self._sent.wait_for(lambda: not self._sending, timeout=wait):
                raise NoAnswer(f"Redis did not answer for the limits {name!r} in time")
        while (first := self._first()) is not None:
            op, words, done = first
            try:
                reply = sender.send_deferred(op, words)
            except Exception as exc:
                if not self._failed(exc, sender):
                    return
                continue
            self._answered(reply, done)

    def send(self, sender: Sender) -> None:
        """On the dispatcher thread: send the entries, in order, one call at a time without the
        lock (an event loop's thread that takes it meanwhile never waits for Redis)."""
        while True:
            with self._sent:
                if self._sending or (first := self._first()) is None:
                    return
                op, words, done = first
                self._sending = True
            outcome: Any
            try:
                outcome = sender.send_deferred(op, words)
                failed = False
            except Exception as exc:
                outcome, failed = exc, True
            with self._sent:
                self._sending = False
                self._sent.notify_all()
                if not failed:
                    self._answered(outcome, done)
                elif not self._failed(outcome, sender):
                    return

    def retry(self, sender: Sender) -> None:
        """Redis answers again: send what waited for it (from the circuit's probe)."""
        with self._sent:
            self._retrying = False
        self.send(sender)

    def _first(self) -> tuple[str, list[str], Callable[[Any], object] | None] | None:
        """The first entry with something to send (those without are dropped), or None."""
        entries = self._entries
        while entries:
            op, args, done, _lost = entries[0]
            words = args()
            if words is not None:
                return op, words, done
            entries.pop(0)
        return None

    def _answered(self, reply: Any, done: Callable[[Any], object] | None) -> None:
        self._entries.pop(0)
        if done is not None:
            done(reply)

    def _failed(self, exc: Exception, sender: Sender) -> bool:
        """The first entry failed with ``exc``; whether to go on with the next one (False: it
        waits, and the rest behind it, until Redis answers)."""
        op, _args, _done, lost = self._entries[0]
        if isinstance(exc, NotSent):
            if not self._retrying:
                self._retrying = True
                self._circuit.later(sender.retry_outbox)
            return False
        if isinstance(exc, BackendUnavailable):
            if lost is None and self._circuit.opened:
                return True  # sent again once Redis answers (NotSent on the next turn)
            self._entries.pop(0)
            log.warning("%s: %s", lost or f"could not send {op}", exc)
            return True
        self._entries.pop(0)
        log.error("a deferred Redis call of aiolimits failed: %r", exc)
        return True
