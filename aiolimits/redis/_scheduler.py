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
* **Who calls Redis** (under the real clock): a lone async request asks itself, awaiting the
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
  clock such as :class:`aiolimits.testing.ManualClock`) drives the script's time instead, so the
  contract suite runs deterministically: a test hook, not for production.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import redis
import redis.client
import redis.exceptions

from .._algorithms import RateState, SemaphoreState
from .._door import retry_after_locked, stats_locked
from .._errors import BackendUnavailable
from .._limits import Limit
from .._scheduler import Items, Scheduler
from .._waiters import WAITING, Cancellable, TimerClock, Waiter, running_event_loop
from ._calls import NoAnswer, ScriptCalls
from ._leases import LeaseTerms
from ._link import GRACE, Circuit, Link, NotSent
from ._outbox import Outbox, Pending
from ._script import Lua, acquire_reply, decode_receipt, encode_receipt, limit_args, num
from ._threads import Hub, log

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

__all__ = ["RedisScheduler"]


def _on_loop() -> bool:
    """Whether this thread runs an event loop (asyncio, uvloop or trio): no Redis I/O here."""
    return running_event_loop() is not None


@attrs.frozen
class Batch:
    """A run of the queue asked for in one script call: its waiters, their lease holders, the
    time and epoch it was taken at, and the call's arguments after the time."""

    waiters: list[Waiter]
    holders: list[str]
    now: float
    epoch: int
    args: list[str]


class Local:
    """The receipt of a limit taken from the in-process fallback (``on_unavailable="local"``)."""

    __slots__ = ("receipt",)

    def __init__(self, receipt: Any) -> None:
        self.receipt = receipt


# The receipt of a limit admitted without Redis under on_unavailable="allow": nothing to settle.
ALLOWED: Any = object()


class RedisScheduler(Scheduler):
    """A :class:`Scheduler` whose decisions are made by the Lua script on the shared state."""

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
        "remote",
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
        redeclare: Callable[[], str] | None = None,
        model: RedisScheduler | None = None,
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

    # -- talking to the script ---------------------------------------------------------------

    def _call(self, op: str, now: float, *args: str, bound: float | None = None) -> Any:
        """One script call from this thread (see :meth:`ScriptCalls.call`), bounded by
        ``bound``, or the patience of the decision under way (None: the backend's timeout)."""
        return self.calls.call(
            self._hash, op, now, args, self._patience if bound is None else bound
        )

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

    def _local(self, now: float, server_now: float, t: float) -> float:
        """A script time as a time of this process's clock."""
        if self._simulated or math.isinf(t):
            return t
        return now + (t - server_now)

    def _item_args(self, items: Items) -> list[str]:
        out = [str(len(items))]
        for state, amount in items:
            out += self._args[state.key]
            out.append(num(amount))
        return out

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

    def _receipts(self, items: Items, holder: str, raw: Any) -> list[Any]:
        """The receipts of a grant from the script's reply; its leases are held from now on."""
        receipts, held = self._terms.receipts(items, holder, raw)
        if held:
            self._hold(holder, held)
        return receipts

    # -- the decisions of Scheduler, with the failure policy ---------------------------------

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
            if self._unavailable(exc) == "allow":
                return now, now, [ALLOWED] * len(items)
            # The in-process decision (not through admit_time: Redis was asked once already).
            rate_at, admit_at = Scheduler.admit_time(self, items, now)
            if admit_at > now:
                return rate_at, admit_at, None
            return rate_at, admit_at, [Local(r) for r in self._take(items, now)]

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

    # -- calls handed off by an event loop's thread, sent in order (the outbox) ------------

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
                args += [*self._args[state.key], num(amount), "0.0", encode_receipt(receipt)]
            if not self._simulated and _on_loop():
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
        if self._outbox.busy() or (not self._simulated and _on_loop()):
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

    def settle(
        self, state: RateState, receipt: Any, held: float, usage: float, now: float
    ) -> tuple[Any, float]:
        if isinstance(receipt, Local):
            inner, held_now = super().settle(state, receipt.receipt, held, usage, now)
            return Local(inner), held_now
        if receipt is ALLOWED:
            return receipt, usage  # nothing was taken in Redis: nothing to settle there
        if isinstance(receipt, Pending) or (not self._simulated and _on_loop()):
            # Sent later, in order after any update still to be sent (see _defer).
            return self._defer_settle(state, receipt, held, usage), usage
        if usage == held:
            return receipt, held
        args = [*self._args[state.key], num(held), num(usage), encode_receipt(receipt)]
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
                *self._args[state.key],
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
        if not self._simulated and _on_loop():
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
            # Under a simulated clock the script's time is ours: the exact end goes too.
            self._call("pause", now, num(until - now), num(until) if self._simulated else "")
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
        for state in self.states:
            args += self._args[state.key]
        try:
            self._flush()
            reply = self._call("stats", now, *args, bound=self._bound())
        except BackendUnavailable as exc:
            self._unavailable(exc)
            return super().availability(now)
        return self._read_stats(now, reply)

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

    # -- waiting across processes ------------------------------------------------------------

    def enqueue(self, waiter: Waiter, now: float) -> bool:
        self._hub.listen(self)
        if self._simulated:
            return super().enqueue(waiter, now)
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
        if self._simulated:
            return super().after_wake(waiter, now)
        waiter.consume_notification()
        if waiter.state != WAITING:
            return None
        is_head = next(iter(self.queue)) is waiter
        if now >= waiter.deadline or (is_head and waiter.rate_at > waiter.deadline):
            if waiter.rate_at > waiter.deadline or not self._unanswered():
                self._leave(waiter, now)
                self.timed_out += 1
                return None
            # Redis has not answered for the head: give it the round trip's grace, then decide
            # by the policy (the deadline holds whatever Redis does).
            if now < waiter.deadline + GRACE and not self._circuit.opened:
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
        if self._policy == "allow":
            receipts = [ALLOWED] * len(waiter.items)
        elif self._policy == "local":
            _rate_at, admit_at = Scheduler.admit_time(self, waiter.items, now)
            if admit_at <= now:
                receipts = [Local(r) for r in self._take(waiter.items, now)]
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
        if self._simulated:
            super()._dispatch(now, current)
        elif self.queue:
            # Something changed (a release, a refund, a pause, a new head): ask for the head now.
            self._epoch += 1  # an answer in flight predates it
            head = next(iter(self.queue))
            if head.wake_at > now:
                head.wake_at = now
            if _on_loop():
                self._signal()  # never a round trip on an event loop's thread
            else:
                self._dispatch_inline(now)

    def failure(self, waiter: Waiter) -> BaseException | None:
        return self._failures.pop(waiter, None)

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

    # -- the async door's first step: one direct call from the task, without thread hops -----

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
            holder = self._terms.new_holder()
        args = [holder, num(self._terms.seconds), *self._item_args(items)]
        try:
            reply = await self._ask_directly(conn, args, patience + GRACE)
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
            if self._policy == "allow":
                return [ALLOWED] * len(items), None, start
            return self._local_take(items, self.clock()), None, start
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

    # -- the async door's decision without waiting (the integrations' gate) ----------------

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
        for state in self.states:
            stats_args += self._args[state.key]
        first = (
            ["acquire", holder, num(self._terms.seconds), *self._item_args(items)]
            if barge
            else ["earliest", *self._item_args(items)]
        )
        try:
            replies = await self.calls.exchange(
                conn, self._hash, [first, ["stats", *stats_args]], GRACE
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
        receipts = (
            [ALLOWED] * len(items) if self._policy == "allow" else self._local_take(items, now)
        )
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

    def _local_take(self, items: Items, now: float) -> list[Any] | None:
        """Under the lock: the in-process decision of ``on_unavailable="local"``."""
        if self.queue:
            return None
        _rate_at, admit_at = Scheduler.admit_time(self, items, now)
        if admit_at > now:
            return None
        self.granted += 1
        return [Local(r) for r in self._take(items, now)]

    async def _ask_directly(
        self, conn: redis.Connection, args: list[str], bound: float
    ) -> list[Any]:
        """``acquire``, asked by the task itself; ends the hub's count of direct calls."""
        try:
            (reply,) = await self.calls.exchange(conn, self._hash, [["acquire", *args]], bound)
            return acquire_reply(reply)
        finally:
            self._hub.end_direct()

    # -- the dispatcher's work (its thread, never under the lock while calling Redis) --------

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
        for items, receipts in undo:
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
        declaration took the set's name: ValueError), or decide it in-process."""
        now = self.clock()
        for waiter in batch:
            if waiter.state != WAITING or waiter not in self.queue:
                continue
            if self._policy == "raise" or isinstance(exc, ValueError):
                self._unqueue(waiter)
                self._failures[waiter] = exc
                waiter.notify()
                continue
            if self._policy == "allow":
                receipts: list[Any] = [ALLOWED] * len(waiter.items)
            else:
                rate_at, admit_at = Scheduler.admit_time(self, waiter.items, now)
                if admit_at > now:
                    self._tell_head(waiter, rate_at, admit_at, now, always=True)
                    break
                receipts = [Local(r) for r in self._take(waiter.items, now)]
            del self.queue[waiter]
            if not self._grant(waiter, receipts, now):
                self._give_back(waiter.items, receipts, now)
        if self._policy != "raise" and not isinstance(exc, ValueError):
            log.warning("%s; applying on_unavailable=%r", exc, self._policy)

    # -- leases ------------------------------------------------------------------------------

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
