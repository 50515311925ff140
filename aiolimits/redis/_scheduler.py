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
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import redis
import redis.client
import redis.exceptions

from .._algorithms import RateState, SemaphoreState
from .._errors import BackendUnavailable
from .._limits import Limit, ResourceLimit
from .._scheduler import Items, Scheduler
from .._waiters import GRANTED, LEFT, WAITING, Cancellable, TimerClock, Waiter
from ._script import Lua, acquire_reply, decode_receipt, encode_receipt, limit_args, num
from ._threads import UNAVAILABLE, Hub, log

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

__all__ = ["RedisScheduler"]

# anyio >= 4.7 names it wait_readable; before, wait_socket_readable (deprecated since).
_wait_readable: Any = getattr(anyio, "wait_readable", None) or anyio.wait_socket_readable


def _resp(args: Sequence[str], encoding: str, errors: str) -> bytes:
    """A command as the bytes of the Redis protocol: what redis-py's packer makes of these
    strings, without its per-argument type dispatch (the direct call's share of a round trip)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode(encoding, errors)
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` comes of a connection refused while connecting (so nothing was sent on
    it): a ConnectionRefusedError among its causes."""
    seen: BaseException | None = exc
    for _ in range(8):  # the chains redis-py makes are short
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
        "_args",
        "_channel",
        "_client",
        "_direct",
        "_encoding",
        "_epoch",
        "_expiry_at",
        "_expiry_timer",
        "_failures",
        "_fast_busy",
        "_hash",
        "_holders",
        "_hub",
        "_lease",
        "_leases",
        "_me",
        "_policy",
        "_refunded",
        "_refused",
        "_resources",
        "_script",
        "_simulated",
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
        direct: tuple[redis.ConnectionPool, float] | None = None,
        model: RedisScheduler | None = None,
    ) -> None:
        super().__init__(states, clock)
        # This scheduler puts waiters into its queue itself, and keeps every key's refund tally
        # (they come from Redis).
        self.queue = OrderedDict()
        self._refunded: dict[str, float] = {state.key: 0.0 for state in states}
        self.refunded = self._refunded
        self._client = client
        self._hub = hub  # the set's threads, shared with its other schedulers (keyed sets)
        self._script = script
        self._hash = hash_key
        self._channel = f"{hash_key}:wake"
        if model is None:
            self._args = {limit.key: limit_args(limit) for limit in limits}
            self._resources = {limit.key for limit in limits if isinstance(limit, ResourceLimit)}
            self._me = uuid.uuid4().hex
            self._holders = itertools.count()
        else:
            # Another scheduler of the same keyed set: its limits' arguments, and one holder id
            # prefix and counter for the whole set (so that a proxy made again for a key never
            # reuses an earlier proxy's lease holder id).
            self._args, self._resources = model._args, model._resources
            self._me, self._holders = model._me, model._holders
        self._lease = lease_seconds
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
        # The pool and timeout for those direct calls (a single server; None: always queue).
        self._direct = direct
        # How the direct calls encode their arguments (as the pool's connections would).
        kwargs = direct[0].connection_kwargs if direct is not None else {}
        self._encoding = (
            str(kwargs.get("encoding", "utf-8")),
            str(kwargs.get("encoding_errors", "strict")),
        )
        # The last refusal of try_take, for the enqueue that follows it in the same step.
        self._refused: tuple[Items, float, float, float] | None = None
        self._policy = on_unavailable
        self._expiry_at = math.inf
        self._expiry_timer: Cancellable | None = None
        self._leases: dict[str, tuple[str, ...]] = {}  # holder -> resource keys held
        self.leases_lost = 0

    # -- talking to the script ---------------------------------------------------------------

    def _call(self, op: str, now: float, *args: str) -> Any:
        """One script call; the time is the server's, or ``now`` under a simulated clock.

        A call is never sent twice, with one exception that cannot apply it twice: a Cluster
        node that refused the connection was sent nothing. After a failover, the first call of
        a process goes to the old master (its map of the Cluster changes only when a call fails);
        the refusal makes the client read the map again, and the call goes to the new master."""
        for attempt in (1, 2):
            try:
                return self._script(
                    self._client, self._hash, [op, num(now) if self._simulated else "", *args]
                )
            except UNAVAILABLE as exc:  # noqa: PERF203 (two attempts at most; try is free)
                if attempt == 1 and not isinstance(self._client, redis.Redis) and _refused(exc):
                    continue
                raise BackendUnavailable(
                    f"Redis did not answer for the limits {self._hash!r} in time: {exc}"
                ) from exc
        raise AssertionError("unreachable")

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
        holder = f"{self._me}:{next(self._holders)}"
        reply = acquire_reply(
            self._call("acquire", now, holder, num(self._lease), *self._item_args(items))
        )
        if reply[0] != 1:
            server_now = float(reply[1])
            self._watch_expiry(now, self._local(now, server_now, float(reply[4])))
            rate_at = self._local(now, server_now, float(reply[2]))
            admit_at = self._local(now, server_now, float(reply[3]))
            self._refused = (items, now, rate_at, admit_at)
            return rate_at, admit_at, None
        return now, now, self._receipts(items, holder, reply[2:])

    def _receipts(self, items: Items, holder: str, raw: Any) -> list[Any]:
        """The receipts of a grant from the script's reply; its leases are held from now on
        (a resource limit's receipt is the holder id of its lease)."""
        receipts: list[Any] = []
        held: list[str] = []
        for (state, _amount), receipt in zip(items, raw, strict=True):
            if state.key in self._resources:
                receipts.append(holder)
                held.append(state.key)
            else:
                receipts.append(decode_receipt(receipt))
        if held:
            self._hold(holder, tuple(held))
        return receipts

    # -- the decisions of Scheduler, with the failure policy ---------------------------------

    def admit_time(self, items: Items, now: float) -> tuple[float, float]:
        try:
            reply = self._call("earliest", now, *self._item_args(items))
        except BackendUnavailable as exc:
            if self._unavailable(exc) == "allow":
                return now, now
            return super().admit_time(items, now)
        server_now = float(reply[0])
        self._watch_expiry(now, self._local(now, server_now, float(reply[3])))
        return (
            self._local(now, server_now, float(reply[1])),
            self._local(now, server_now, float(reply[2])),
        )

    def _admit(self, items: Items, now: float) -> tuple[float, float, list[Any] | None]:
        try:
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
        if self._fast_busy:
            return None  # an earlier async request is being decided
        if self.queue:
            self.catch_up(now)
            if self.queue:
                return None
        _rate_at, _admit_at, receipts = self._admit(items, now)
        if receipts is not None:
            self.granted += 1
        return receipts

    def _give_back(self, waiter: Waiter, now: float, *, dispatch: bool) -> None:
        receipts = waiter.receipts or ()
        waiter.receipts = None
        self._undo(waiter.items, receipts, now)
        if dispatch:
            self._dispatch(now)

    def _undo(self, items: Items, receipts: Sequence[Any], now: float) -> None:
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
            if state.key not in self._resources
        ]
        try:
            if rates:
                args = [str(len(rates))]
                for state, receipt, amount in rates:
                    args += [*self._args[state.key], num(amount), "0.0", encode_receipt(receipt)]
                self._call("settle", now, *args)
        except BackendUnavailable as exc:
            log.warning("could not give back an unused grant: %s", exc)
        self._end_leases(items, receipts)

    def release(self, items: Items, receipts: list[Any] | None = None) -> None:
        if receipts and isinstance(receipts[0], Local):
            super().release(items)
        # Inline, like every in-process release: a slot released is free for the next call of
        # this process at once, and the head is asked at once too.
        elif (
            receipts
            and receipts[0] is not ALLOWED
            and self._end_leases(items, receipts)
            and self.queue
        ):
            self._dispatch(self.clock())

    def _end_leases(self, items: Items, receipts: Sequence[Any]) -> bool:
        """End the leases of an acquisition; False when it had none. Never raises: a lease that
        cannot be ended now expires within ``lease_seconds`` (it is no longer renewed)."""
        keys = [state.key for state, _amount in items if state.key in self._resources]
        if not keys:
            return False
        holder = next(r for (s, _a), r in zip(items, receipts, strict=True) if s.key in keys)
        self._leases.pop(holder, None)
        for attempt in (1, 2):
            try:
                self._call("release", self.clock(), holder, *keys)
            except BackendUnavailable as exc:
                # Ending a lease is idempotent, so a call refused before it was sent (a node gone:
                # after a Cluster failover the client has just read the new topology) is safely
                # made once more. A timeout is not retried: it already waited its bound.
                if attempt == 1 and isinstance(exc.__cause__, redis.exceptions.ConnectionError):
                    continue
                log.warning("could not end the lease %s (it expires by itself): %s", holder, exc)
            break
        return True

    def settle(
        self, state: RateState, receipt: Any, held: float, usage: float, now: float
    ) -> tuple[Any, float]:
        if isinstance(receipt, Local):
            inner, held_now = super().settle(state, receipt.receipt, held, usage, now)
            return Local(inner), held_now
        if receipt is ALLOWED:
            return receipt, usage  # nothing was taken in Redis: nothing to settle there
        if usage == held:
            return receipt, held
        args = [*self._args[state.key], num(held), num(usage), encode_receipt(receipt)]
        try:
            reply = self._call("settle", now, "1", *args)
        except BackendUnavailable as exc:
            self._unavailable(exc)
            return receipt, held  # not recorded: a refund is lost, a charge goes uncounted
        new_receipt, held_now, given = reply[2]
        if float(given) > 0:
            self._refunded[state.key] += float(given)
        return decode_receipt(new_receipt), float(held_now)

    def pause(self, until: float, now: float) -> None:
        try:
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
        args = [str(len(self.states))]
        for state in self.states:
            args += self._args[state.key]
        try:
            reply = self._call("stats", now, *args)
        except BackendUnavailable as exc:
            self._unavailable(exc)
            return super().availability(now)
        server_now = float(reply[0])
        self.paused_until = self._local(now, server_now, float(reply[1]))
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
            self._leave(waiter, now)
            self.timed_out += 1
            return None
        if is_head and now >= waiter.wake_at:
            self._signal()  # the dispatcher asks, and notifies this waiter with the answer
            return waiter.deadline
        wake = waiter.wake_at if is_head else math.inf
        return wake if wake < waiter.deadline else waiter.deadline

    def _dispatch(self, now: float, current: Waiter | None = None) -> None:
        if self._simulated:
            super()._dispatch(now, current)
        elif self.queue:
            # Something changed (a release, a refund, a pause, a new head): ask for the head now.
            self._epoch += 1  # an answer in flight predates it
            head = next(iter(self.queue))
            if head.wake_at > now:
                head.wake_at = now
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
        place it after its deadline, ``patience`` seconds away). When nobody is queued and
        nothing is being decided, the task asks Redis itself, awaiting the answer on its own
        event loop (no thread hop); otherwise it queues and the dispatcher asks for it with the
        others."""
        with self.lock:
            start = self.clock()
            direct = (
                not self.queue
                and not self._fast_busy
                and self._direct is not None
                and self._hub.take_direct()  # a keyed set bounds its connections in use
            )
            if not direct:
                waiter = new_waiter(items, start + patience)
                if not self.enqueue(waiter, start):
                    return None, None, start  # the deadline is already out of reach
                return None, waiter, start
            self._fast_busy = True
            epoch = self._epoch
            holder = f"{self._me}:{next(self._holders)}"
        args = [holder, num(self._lease), *self._item_args(items)]
        try:
            reply = await self._ask_directly(args)
        except BaseException as exc:
            with self.lock:
                self._fast_busy = False
                if self.queue:
                    self._signal()
            if isinstance(exc, BackendUnavailable) and self._policy != "raise":
                # The dispatcher applies the policy to it, first in the queue.
                with self.lock:
                    waiter = new_waiter(items, start + patience)
                    if not self.enqueue(waiter, start):
                        return None, None, start
                    self.queue.move_to_end(waiter, last=False)
                return None, waiter, start
            raise
        with self.lock:
            self._fast_busy = False
            now = self.clock()
            if reply[0] == 1:
                receipts = self._receipts(items, holder, reply[2:])
                self.granted += 1
                if self.queue:
                    self._signal()
                return receipts, None, start
            server_now = float(reply[1])
            rate_at = self._local(start, server_now, float(reply[2]))
            admit_at = self._local(start, server_now, float(reply[3]))
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
                self._watch_expiry(now, self._local(start, server_now, float(reply[4])))
            else:  # something changed meanwhile: ask again
                waiter.rate_at, waiter.wake_at = -math.inf, now
                self._signal()
            return None, waiter, start

    async def _ask_directly(self, args: list[str]) -> list[Any]:
        """``acquire``, asked by the task itself; ends the hub's count of direct calls."""
        try:
            return acquire_reply(await self._direct_call("acquire", args))
        finally:
            self._hub.end_direct()

    async def _direct_call(self, op: str, args: list[str]) -> Any:
        """One script call from a task: sent on a pooled connection of the blocking client, the
        answer awaited on the task's own event loop (at most ``timeout``; shielded, so that an
        answer Redis gives is never lost to a cancellation)."""
        assert self._direct is not None
        pool, timeout = self._direct
        try:
            conn = pool.get_connection()  # connects, if it must
        except UNAVAILABLE as exc:
            raise BackendUnavailable(
                f"Redis did not answer for the limits {self._hash!r} in time: {exc!r}"
            ) from exc
        done = False
        try:
            # One scope, shielded and with the deadline (fail_after would nest a second one:
            # each costs a noticeable share of a loopback round trip).
            deadline = anyio.current_time() + timeout
            with anyio.CancelScope(shield=True, deadline=deadline):
                loaded = False
                while True:
                    functions = self._script.functions
                    command = self._script.command(self._hash, [op, "", *args], functions=functions)
                    conn.send_packed_command(  # type: ignore[no-untyped-call]
                        [_resp(command, *self._encoding)]
                    )
                    await _wait_readable(conn._sock)
                    try:
                        reply = conn.read_response()
                    except redis.exceptions.ResponseError as exc:
                        # Not run (no library or script there): loaded, and sent once more.
                        if not self._script.recover(self._client, exc, functions, loaded):
                            raise
                        loaded = loaded or functions == self._script.functions
                        continue
                    done = True
                    return reply
        except (TimeoutError, *UNAVAILABLE) as exc:
            raise BackendUnavailable(
                f"Redis did not answer for the limits {self._hash!r} in time: {exc!r}"
            ) from exc
        finally:
            if not done:
                conn.disconnect()  # type: ignore[no-untyped-call]  # an answer may be on its way
            pool.release(conn)
        # The deadline passed: the scope swallowed its own cancellation.
        raise BackendUnavailable(
            f"Redis did not answer for the limits {self._hash!r} in time: {TimeoutError()!r}"
        )

    # -- the dispatcher's work (its thread, never under the lock while calling Redis) --------

    def dispatch_queue(self) -> None:
        """Ask Redis for the due head and the waiters behind it, in one call per batch, and
        apply the answer: grants in queue order up to the first refusal, whose time goes to the
        new head. Repeats while whole batches are granted and more are queued."""
        while (asked := self.batch_to_ask()) is not None:
            try:
                reply = self._call("batch", asked.now, *asked.args)
            except BackendUnavailable as exc:
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
            holders = [f"{self._me}:{next(self._holders)}" for _ in batch]
            return Batch(batch, holders, now, self._epoch, self._batch_args(batch, holders))

    def batch_command(self, asked: Batch) -> list[str]:
        """The words of the script call for ``asked`` (for a pipeline of many)."""
        args = ["batch", num(asked.now) if self._simulated else "", *asked.args]
        return self._script.command(self._hash, args, functions=self._script.functions)

    def batch_answered(self, asked: Batch, reply: Any) -> bool:
        """Apply Redis's ``reply`` to ``asked``; True when the whole batch was granted and no
        time was given back (more may be due: ask again)."""
        with self.lock:
            undo = self._apply(asked.waiters, asked.holders, reply, asked.now, asked.epoch)
        for items, receipts in undo:
            self._undo(items, receipts, self.clock())
        return not (len(reply[2]) < len(asked.waiters) or reply[3])

    def batch_failed(self, asked: Batch, exc: BackendUnavailable) -> None:
        with self.lock:
            self._batch_failed(asked.waiters, exc)

    def _dispatch_inline(self, now: float) -> None:
        """Under the lock: what the dispatcher thread does, done now by the caller (a release,
        a refund, a pause, a waiter leaving), so that its effect is visible when it returns."""
        while True:
            batch = self._due_batch(now)
            if not batch:
                return
            holders = [f"{self._me}:{next(self._holders)}" for _ in batch]
            try:
                reply = self._call("batch", now, *self._batch_args(batch, holders))
            except BackendUnavailable as exc:
                self._batch_failed(batch, exc)
                return
            for items, receipts in self._apply(batch, holders, reply, now, self._epoch):
                self._undo(items, receipts, now)
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
            del queue[head]
            head.state = LEFT
            self.cancelled += 1
        if not queue or self._fast_busy or next(iter(queue)).wake_at > now:
            return []
        return list(itertools.islice(queue, 64))

    def _batch_args(self, batch: list[Waiter], holders: list[str]) -> list[str]:
        args = [num(self._lease), str(len(batch))]
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
            receipts: list[Any] = []
            held: list[str] = []
            for (state, _amount), receipt in zip(waiter.items, raw, strict=True):
                if state.key in self._resources:
                    receipts.append(holder)
                    held.append(state.key)
                else:
                    receipts.append(decode_receipt(receipt))
            if waiter.state != WAITING or waiter not in self.queue:
                undo.append((waiter.items, receipts))
                continue
            if held:
                self._hold(holder, tuple(held))
            del self.queue[waiter]
            waiter.receipts = receipts
            waiter.granted_at = local_now
            waiter.state = GRANTED
            self.granted += 1
            if not waiter.notify():  # its event loop is gone
                self._leases.pop(holder, None)
                waiter.state = LEFT
                waiter.receipts = None
                self.granted -= 1
                self.cancelled += 1
                undo.append((waiter.items, receipts))
        refused = reply[3]
        if refused and self.queue:
            head = next(iter(self.queue))
            if fresh and head is batch[len(reply[2])] and head.state == WAITING:
                rate_at = self._local(now, server_now, float(refused[0]))
                head.rate_at = rate_at
                head.wake_at = self._local(now, server_now, float(refused[1]))
                self._watch_expiry(now, self._local(now, server_now, float(refused[2])))
                head.notify()
            else:
                # The head, or what Redis knows, changed while it answered: ask again.
                if head.wake_at > local_now:
                    head.wake_at = local_now
                self._signal()
        return undo

    def _batch_failed(self, batch: list[Waiter], exc: BackendUnavailable) -> None:
        """Under the lock: Redis did not answer for a batch: fail it (``"raise"``), or decide
        it in-process."""
        now = self.clock()
        for waiter in batch:
            if waiter.state != WAITING or waiter not in self.queue:
                continue
            if self._policy == "raise":
                del self.queue[waiter]
                waiter.state = LEFT
                self._failures[waiter] = exc
                waiter.notify()
                continue
            if self._policy == "allow":
                receipts: list[Any] | None = [ALLOWED] * len(waiter.items)
            else:
                rate_at, admit_at = Scheduler.admit_time(self, waiter.items, now)
                receipts = None
                if admit_at <= now:
                    receipts = [Local(r) for r in self._take(waiter.items, now)]
                else:
                    waiter.rate_at, waiter.wake_at = rate_at, admit_at
                    waiter.notify()
                    break
            del self.queue[waiter]
            waiter.receipts = receipts
            waiter.granted_at = now
            waiter.state = GRANTED
            self.granted += 1
            waiter.notify()
        if self._policy != "raise":
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
                reply = self._call("renew", now, holder, num(self._lease), *keys)
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
