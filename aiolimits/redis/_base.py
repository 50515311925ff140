"""The state of a Redis-backed scheduler and its ways to Redis (the base of ``RedisScheduler``).

What every layer of the Redis scheduler uses: the fields, one script call from a thread
(:meth:`RedisBase._call`, bounded by its caller), the outbox of calls an event loop handed off,
the leases this process holds and renews, the timer of a lease's expiry, and the signal to the
set's dispatcher thread. See ``_scheduler.py`` for the design.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis

from .._algorithms import RateState
from .._errors import BackendUnavailable
from .._limits import Limit
from .._scheduler import Items, Scheduler
from .._waiters import LEFT, Cancellable, TimerClock, TrioWaiter, Waiter, running_event_loop
from ._calls import NoAnswer, Numbers, ScriptCalls
from ._failure import ALLOWED, GRACE, Circuit, Local, NotSent, on_background_thread
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
        "_lanes",
        "_leases",
        "_numbers_read",
        "_outbox",
        "_patience",
        "_policy",
        "_refunded",
        "_refused",
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
        # The async door never asks under the lock: a lone request asks Redis itself, awaiting
        # the answer on its loop (``take_first``), and the others queue for the dispatcher
        # thread. Whatever the clock: a simulated one only injects the script's time
        # (``ScriptCalls``). Set here, on the base's slot: a class attribute of the same name
        # would hide the slot from Python code only, and the compiled core would read False.
        self.remote = True
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
        # The numbers of limits another client changed, read by a call, not yet taken (see
        # _adopt).
        self._numbers_read: list[Numbers] = []
        # Counts what may change an answer of Redis for the head (answers applied, releases
        # elsewhere): a refusal that the dispatcher got before one of them is stale.
        self._epoch = 0
        self._failures: dict[Waiter, BaseException] = {}
        # An async request is being decided directly (``take_first``): it is ahead of the queue.
        self._fast_busy = False
        # How this set calls the script (shared by the schedulers of a keyed set). A simulated
        # clock (``simulated``: one that fires its own timers) is the script's time: the only
        # thing it changes.
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
        # The granted trio waiters not yet run, by the thread of their loop, in grant order:
        # each is woken once the one before it ran (see _grant).
        self._lanes: dict[int, deque[Waiter]] = {}
        self.leases_lost = 0

    def _call(self, op: str, now: float, *args: str, bound: float | None = None) -> Any:
        """One script call from this thread (see :meth:`ScriptCalls.call`), bounded by
        ``bound``, or the patience of the decision under way (None: the backend's timeout)."""
        return self.calls.call(
            self._hash, op, now, args, self._patience if bound is None else bound
        )

    def _adopt(self, numbers: Numbers) -> list[tuple[list[str], list[str]]]:
        """The numbers of the limits now, read from Redis after another client changed some
        (semantics §4). Returns the script arguments of each limit that changed, before and
        after, for the call under way. A call from a caller's thread holds the lock: this
        process's arguments, numbers and fallback state take the numbers now. One of the
        backend's own threads may not (a batch is asked without it): the numbers are noted and
        taken under the lock before the arguments are next read (:meth:`_arguments`). Its
        queued waiters above a lowered capacity are sent away by the batch that finds the
        change (``_batch.py``)."""
        changed = []
        args = dict(self._args)  # a copy: another thread may take noted numbers meanwhile
        for key, (capacity, window) in numbers.items():
            old = args.get(key)
            if old is None:
                continue
            new = [old[0], old[1], num(capacity), num(window)]
            if new != old:
                changed.append((old, new))
        self._numbers_read.append(numbers)  # list.append: atomic, taken under the lock
        if not on_background_thread():
            self._arguments()
        return changed

    def _arguments(self) -> dict[str, list[str]]:
        """Under the lock: the script arguments of each limit, by key, once the numbers read
        from Redis since (:meth:`_adopt`) are taken: this process's arguments, numbers and
        fallback state change to them."""
        read = self._numbers_read
        while read:
            numbers = read.pop(0)
            now = self.clock()
            for state in self.states:
                capacity, window = numbers.get(state.key, (state.capacity, state.window))
                if (capacity, window) == (state.capacity, state.window):
                    continue
                old = self._args[state.key]
                self._args[state.key] = [old[0], old[1], num(capacity), num(window)]
                state.change(capacity, window, now)
        return self._args

    def refuse_above(self, state: RateState) -> None:
        self._arguments()  # the numbers another client set count
        super().refuse_above(state)

    def _grant(self, waiter: Waiter, receipts: list[Any], at: float, *, wake: bool = True) -> bool:
        """:meth:`Scheduler._grant`, with the trio tasks of one loop woken one after the other,
        in grant order: trio runs the tasks woken together in any order, and a batch (or a
        dispatch from another thread) grants several at once. A later one is woken when the one
        before it has run (:meth:`_ran`); asyncio runs the tasks it is told to wake in that
        order, and a thread waits for no other."""
        if type(waiter) is not TrioWaiter:
            return super()._grant(waiter, receipts, at, wake=wake)
        lane = self._lanes.get(waiter._thread)
        if not wake:  # it runs now: after the ones of its loop granted before (after_wake)
            if lane is not None:
                lane.append(waiter)
            return super()._grant(waiter, receipts, at, wake=False)
        if lane is None:
            if not super()._grant(waiter, receipts, at):
                return False
            self._lanes[waiter._thread] = deque((waiter,))
            return True
        super()._grant(waiter, receipts, at, wake=False)
        lane.append(waiter)
        return True

    def _ran(self, waiter: Waiter, *, leaving: bool = False) -> bool:
        """Under the lock: a granted ``waiter`` runs, or leaves (cancelled). Wakes the next
        trio task of its loop granted after it (see :meth:`_grant`); False when it runs before
        its turn (one granted before it has not run yet): it sleeps until woken."""
        if type(waiter) is not TrioWaiter:
            return True
        lane = self._lanes.get(waiter._thread)
        if lane is None or waiter not in lane:
            return True
        if lane[0] is not waiter:
            if not leaving:
                return False
            lane.remove(waiter)
            return True
        lane.popleft()
        gave_back = False
        while lane:
            nxt = lane[0]
            if nxt.notify():
                break
            # Its loop is gone: nobody will use or release the grant (as Scheduler._grant).
            lane.popleft()
            receipts, nxt.receipts = nxt.receipts, None
            nxt.state = LEFT
            self.granted -= 1
            self.cancelled += 1
            self._give_back(nxt.items, receipts, self.clock())
            gave_back = True
        if not lane:
            del self._lanes[waiter._thread]
        if gave_back and self.queue:
            self._dispatch(self.clock())
        return True

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
        args = self._arguments() if self._numbers_read else self._args
        for state, amount in items:
            out += args[state.key]
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
        # On the dispatcher thread: the circuit may run this at once on the thread that found
        # it closed again, which may hold the lock (Outbox.flush).
        self._signal(lambda: self._outbox.retry(self))

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
        if self._outbox.busy() or on_loop() or on_background_thread():
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
        if isinstance(self.clock, TimerClock):
            # Time injected: the expiry is a time of that clock, which fires its own timers.
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
            head = next(iter(self.queue))
            now = self.clock()
            if head.wake_at > now:
                head.wake_at = now
            self._signal()

    def quiet(self) -> tuple[bool, int]:
        """Whether nothing of this scheduler is on its way to or from Redis (a task's own round
        trip, a call handed off, a connection being made, the dispatcher thread's work), and a
        count of the dispatcher's rounds (see :meth:`Hub.quiet`). For an observer that waits
        for the background work to be done, as the contract suite's ``settle`` does."""
        idle, rounds = self._hub.quiet()
        with self.lock:
            busy = self._fast_busy or self._outbox.busy() or self.calls.exchanges > 0
        link = self.calls.link
        return idle and not busy and (link is None or not link.warming()), rounds

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
