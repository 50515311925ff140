"""The state of a Redis-backed scheduler and its ways to Redis (the base of ``RedisScheduler``).

What every layer of the Redis scheduler uses: the fields, one script call from a thread
(:meth:`RedisBase._call`, bounded by its caller), the outbox of calls an event loop handed off,
the leases this process holds and renews, the timer of a lease's expiry, and the signal to the
set's dispatcher thread. See ``_scheduler.py`` for the design.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis

from .._algorithms import RateState
from .._errors import BackendUnavailable
from .._limits import Limit
from .._scheduler import Items, Scheduler
from .._waiters import Cancellable, TimerClock, Waiter, running_event_loop
from ._calls import NoAnswer, Numbers, ScriptCalls
from ._failure import ALLOWED, GRACE, Circuit, Local, NotSent
from ._leases import LeaseTerms
from ._link import Link
from ._outbox import Outbox
from ._script import Lua, limit_args, num
from ._threads import Hub, log

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

    from ._batch import Batch

__all__ = ["RedisBase", "on_loop"]


def on_loop() -> bool:
    """Whether this thread runs an event loop (asyncio, uvloop or trio): no Redis I/O here."""
    return running_event_loop() is not None


class RedisBase(Scheduler):
    """The state a Redis-backed scheduler keeps, and its ways to Redis: script calls, the outbox
    of calls handed off, leases, the expiry timer and the dispatcher thread. The layers above
    decide (``_batch.py``, ``_direct.py``, ``_scheduler.py``)."""

    # Its waiters' wake times come from Redis and are re-asked when they run.
    timed_wakes = False
    forecasts_queue = False  # the script decides on state in Redis: see Scheduler.forecasts_queue

    __slots__ = (
        "__weakref__",
        "_answered",
        "_args",
        "_channel",
        "_circuit",
        "_epoch",
        "_expiry_at",
        "_expiry_timer",
        "_failures",
        "_fast_busy",
        "_hash",
        "_hint",
        "_hub",
        "_leases",
        "_outbox",
        "_patience",
        "_policy",
        "_refunded",
        "_refused",
        "_simulated",
        "_terms",
        "calls",
        "leases_lost",
    )

    def __init__(
        self,
        states: tuple[RateState, ...],
        clock: Callable[[], float],
        *,
        client: redis.Redis | RedisCluster,
        hub: Hub,
        script: Lua,
        hash_key: str,
        limits: Sequence[Limit],
        lease_seconds: float,
        simulated: bool,
        on_unavailable: str,
        circuit: Circuit,
        timeout: float,
        link: Link | None = None,
        declared: str = "",
        redeclare: Callable[[], tuple[str, Numbers]] | None = None,
        model: RedisBase | None = None,
    ) -> None:
        super().__init__(states, clock)
        # This scheduler puts waiters into its queue itself, and keeps every key's refund tally
        # (they come from Redis).
        self.queue = OrderedDict()
        self._refunded: dict[str, float] = {state.key: 0.0 for state in states}
        self.refunded = self._refunded
        self._hub = hub  # the set's threads, shared with its other schedulers (keyed sets)
        self._hash = hash_key
        self._channel = f"{hash_key}:wake"
        if model is None:
            self._args = {limit.key: limit_args(limit) for limit in limits}
            self._terms = LeaseTerms(limits, lease_seconds)
        else:
            # Another scheduler of the same keyed set: its limits' arguments and lease terms
            # (one holder id prefix and counter for the whole set).
            self._args, self._terms = model._args, model._terms
        self._simulated = simulated
        # Under the real clock, the async door queues without asking and this process's
        # dispatcher thread asks Redis for the queue (see Dispatcher); under a simulated clock
        # every decision is made inline, so that a test sees it done when its tasks are blocked.
        self.remote = not simulated
        # Counts what may change an answer of Redis for the head (answers applied, releases
        # elsewhere): a refusal that the dispatcher got before one of them is stale.
        self._epoch = 0
        self._failures: dict[Waiter, BaseException] = {}
        # An async request is being decided directly (``take_first``): it is ahead of the queue.
        self._fast_busy = False
        # How this set calls the script (shared by the schedulers of a keyed set).
        self.calls: ScriptCalls = (
            ScriptCalls(
                client=client,
                script=script,
                circuit=circuit,
                timeout=timeout,
                link=link,
                injected_time=simulated,
                declared=declared,
                redeclare=redeclare,
            )
            if model is None
            else model.calls
        )
        if redeclare is not None:
            # The numbers of limits another client changed, read by a call (held weakly: the
            # calls must not keep this scheduler alive).
            adopt = weakref.WeakMethod(self._adopt)
            self.calls.adopt = lambda numbers: [] if (m := adopt()) is None else m(numbers)
        self._circuit = circuit  # shared by every set of the backend
        # The bound of the next try_take, set by the blocking door from its caller's timeout;
        # and of every call while a task decides under the lock (attempt without a connection).
        self._hint: float | None = None
        self._patience: float | None = None
        # The last refusal of try_take, for the enqueue that follows it in the same step.
        self._refused: tuple[Items, float, float, float] | None = None
        # Calls handed off by an event loop's thread, to send first (see _defer).
        self._outbox = Outbox(self.lock, circuit)
        # Availability Redis just gave with another answer (attempt), for the statistics made
        # of it next, under the same lock hold.
        self._answered: dict[str, float] | None = None
        self._policy = on_unavailable
        self._expiry_at = math.inf
        self._expiry_timer: Cancellable | None = None
        self._leases: dict[str, tuple[str, ...]] = {}  # holder -> resource keys held
        self.leases_lost = 0

    def _call(self, op: str, now: float, *args: str, bound: float | None = None) -> Any:
        """One script call from this thread (see :meth:`ScriptCalls.call`), bounded by
        ``bound``, or the patience of the decision under way (None: the backend's timeout)."""
        return self.calls.call(
            self._hash, op, now, args, self._patience if bound is None else bound
        )

    def _adopt(self, numbers: Numbers) -> list[tuple[list[str], list[str]]]:
        """The numbers of the limits now, read from Redis after another client changed some
        (semantics §4): this process's script arguments, numbers and fallback state take them.
        Returns the script arguments of each limit that changed, before and after. Its queued
        waiters above a lowered capacity are sent away under the lock, by the batch that finds
        the change (``_batch.py``)."""
        changed = []
        now = self.clock()
        for state in self.states:
            capacity, window = numbers.get(state.key, (state.capacity, state.window))
            if (capacity, window) == (state.capacity, state.window):
                continue
            old = self._args[state.key]
            new = self._args[state.key] = [old[0], old[1], num(capacity), num(window)]
            changed.append((old, new))
            state.change(capacity, window, now)
        return changed

    def bound_next_call(self, timeout: float) -> None:
        """Under the lock, from the blocking door: the next ``try_take`` answers within
        ``timeout`` (its caller's) plus the round trip's grace."""
        self._hint = timeout + GRACE

    def _bound(self) -> float | None:
        """The bound of a call that must answer now: its caller's (None: the backend's
        timeout). The sync questions (``try_acquire``, ``retry_after``, ``get_stats``) have
        none: on an event loop they wait for one round trip (``attempt`` is their async twin),
        and not at all while Redis is known to be unreachable."""
        hint, self._hint = self._hint, None
        return hint

    def _unavailable(self, exc: BackendUnavailable) -> str:
        """The policy to apply now that Redis did not answer (re-raises under "raise")."""
        if self._policy == "raise":
            raise exc
        log.warning("%s; applying on_unavailable=%r", exc, self._policy)
        return self._policy

    def _item_args(self, items: Items) -> list[str]:
        out = [str(len(items))]
        for state, amount in items:
            out += self._args[state.key]
            out.append(num(amount))
        return out

    def _receipts(self, items: Items, holder: str, raw: Any) -> list[Any]:
        """The receipts of a grant from the script's reply; its leases are held from now on."""
        receipts, held = self._terms.receipts(items, holder, raw)
        if held:
            self._hold(holder, held)
        return receipts

    def _defer(
        self,
        op: str,
        args: Callable[[], list[str] | None],
        *,
        done: Callable[[Any], object] | None = None,
        lost: str | None = None,
    ) -> None:
        """Under the lock, instead of a round trip on an event loop's thread: hand the call off
        (see :meth:`Outbox.defer`); the dispatcher thread sends it unless a call made under the
        lock first does."""
        self._outbox.defer(op, args, done, lost)
        self._signal()

    def _flush(self, bound: float | None = None) -> None:
        """Under the lock, before a call of this caller: send the outbox first, in order (see
        :meth:`Outbox.flush`), waiting at most ``bound`` (or the decision's patience) for the
        call the dispatcher thread may be sending: NoAnswer then."""
        try:
            self._outbox.flush(
                self, self._patience if bound is None else bound, self.calls.timeout, self._hash
            )
        except NoAnswer:
            if self._patience is not None:
                self._patience = 0.0  # the rest of this decision waits no more
            raise

    def send_deferred(self, op: str, words: list[str]) -> Any:
        """A call of the outbox, sent now (see :class:`Sender`)."""
        return self._call(op, self.clock(), *words)

    def send_outbox(self) -> None:
        """On the dispatcher thread: send what an event loop handed off (:meth:`Outbox.send`)."""
        self._outbox.send(self)

    def retry_outbox(self) -> None:
        self._outbox.retry(self)

    def _hold(self, holder: str, keys: tuple[str, ...]) -> None:
        self._leases[holder] = keys
        self._hub.hold(self)

    def renew(self) -> None:
        """Extend every lease this process holds (the renewer thread calls it)."""
        with self.lock:
            leases = list(self._leases.items())
            if not leases:
                return
            now = self.clock()
        for holder, keys in leases:
            try:
                reply = self._call("renew", now, holder, num(self._terms.seconds), *keys)
            except BackendUnavailable as exc:
                log.warning("could not renew the lease %s on %s: %s", holder, self._hash, exc)
                continue
            if int(reply[1]) < len(keys):
                with self.lock:
                    if holder in self._leases:  # not released meanwhile: the lease ran out
                        self.leases_lost += 1
                        log.error(
                            "the lease %s on %s expired before it was renewed: its resource "
                            "slots may now be held by others",
                            holder,
                            self._hash,
                        )

    def _forget_leases(self, items: Items, receipts: Sequence[Any]) -> str | None:
        """Stop renewing the lease of an acquisition; its holder id (None: it holds none)."""
        holder = self._terms.holder_of(items, receipts)
        if holder is not None:
            self._leases.pop(holder, None)
        return holder

    def _end_lease(self, holder: str, keys: tuple[str, ...]) -> None:
        """Under the lock: end a lease in Redis; never raises, never waits on an event loop.
        A lease that cannot be ended now is ended once Redis answers again (ending one is
        idempotent), and expires by itself within ``lease_seconds`` anyway (it is no longer
        renewed)."""
        words = [holder, *keys]
        if self._outbox.busy() or (not self._simulated and on_loop()):
            self._defer("release", lambda: words)
            return
        for attempt in (1, 2):
            try:
                self._call("release", self.clock(), *words)
            except BackendUnavailable as exc:
                # A call refused before it was sent (a node gone: after a Cluster failover the
                # client has just read the new topology) is made once more at once.
                if (
                    attempt == 1
                    and not isinstance(exc, NotSent)
                    and isinstance(exc.__cause__, redis.exceptions.ConnectionError)
                ):
                    continue
                log.warning("could not end the lease %s yet (sent again later): %s", holder, exc)
                self._defer("release", lambda: words)
            break

    def _watch_expiry(self, now: float, at: float) -> None:
        """Dispatch once at ``at``, when a lease that blocks a full resource runs out: its
        holder may have died, and no release will come."""
        if math.isinf(at) or at <= now or at >= self._expiry_at:
            return
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._expiry_at = at
        if self._simulated and isinstance(self.clock, TimerClock):
            self._expiry_timer = self.clock.call_at(at, self._expired)
        else:
            # The hub's timer holds the scheduler weakly: a pending expiry keeps nothing alive.
            self._expiry_timer = self._hub.call_later(at - now, self)

    def _expired(self) -> None:
        with self.lock:
            self._expiry_at = math.inf
            self._expiry_timer = None
        self.wake()

    def wake(self) -> None:
        """Another process released or refunded, or a lease ran out: the head may be
        admissible now."""
        with self.lock:
            self._epoch += 1  # a refusal in flight (a batch, a direct call) predates this
            if not self.queue:
                return
            if self._simulated:
                self._dispatch(self.clock())
                return
            head = next(iter(self.queue))
            now = self.clock()
            if head.wake_at > now:
                head.wake_at = now
            self._signal()

    def _signal(self, job: Callable[[], object] | None = None) -> None:
        self._hub.signal(self, job)

    # -- what the dispatcher thread calls: the batches, made by the layer above (``_batch.py``)

    def dispatch_queue(self) -> None:
        raise NotImplementedError

    def batch_to_ask(self) -> Batch | None:
        raise NotImplementedError

    def batch_command(self, asked: Batch) -> list[str]:
        raise NotImplementedError

    def batch_answered(self, asked: Batch, reply: Any) -> bool:
        raise NotImplementedError

    def batch_failed(self, asked: Batch, exc: BackendUnavailable | ValueError) -> None:
        raise NotImplementedError

    def _read_stats(self, now: float, reply: Any) -> dict[str, float]:
        server_now = float(reply[0])
        paused = self.calls.local(now, server_now, float(reply[1]))
        if paused > self.paused_until or self.paused_until <= now:
            self.paused_until = paused
        out: dict[str, float] = {}
        for state, entry in zip(self.states, reply[3:], strict=True):
            out[state.key] = float(entry[0])
            self._refunded[state.key] = float(entry[2])
        return out

    def _fallback(self, items: Items, now: float) -> tuple[float, float, list[Any] | None]:
        """Under the lock, Redis not answering: the decision of the failure policy (``"allow"``
        or ``"local"``; ``"raise"`` never asks), as ``(rate_at, admit_at, receipts)``: admitted
        without Redis (receipts :data:`ALLOWED`), or by the set's in-process limits (receipts
        :class:`Local`; None: not before ``admit_at``). Counts nothing."""
        if self._policy == "allow":
            return now, now, [ALLOWED] * len(items)
        rate_at, admit_at = Scheduler.admit_time(self, items, now)
        if admit_at > now:
            return rate_at, admit_at, None
        return rate_at, admit_at, [Local(r) for r in self._take(items, now)]

    def _fallback_take(self, items: Items, now: float) -> list[Any] | None:
        """Under the lock: :meth:`_fallback` for a request that is not queued, counted when
        granted; the in-process limits admit nobody ahead of this process's queue."""
        if self.queue and self._policy != "allow":
            return None
        receipts = self._fallback(items, now)[2]
        if receipts is not None:
            self.granted += 1
        return receipts

    def failure(self, waiter: Waiter) -> BaseException | None:
        return self._failures.pop(waiter, None) or super().failure(waiter)
