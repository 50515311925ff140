"""The background threads of a Redis-backed set: dispatcher, subscriber, lease renewer.

A :class:`Hub` owns them for one set and serves every scheduler of that set: the one scheduler of
a LimitSet, or the scheduler of every key a KeyedLimitSet uses in this process (thousands of keys
may have waiters at once: they share one dispatcher thread, one subscription connection and one
renewer, not three threads each). The hub holds its schedulers weakly; each scheduler holds its
hub, so the threads end once the set and all its schedulers are garbage.

None of them is a polling loop: the dispatcher sleeps until signalled or until the next expiry
timer, the subscriber until a message comes, the renewer for a third of a lease between renewals.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import redis.client
import redis.exceptions

from .._errors import BackendUnavailable
from ._failure import UNAVAILABLE, background_thread, log

if TYPE_CHECKING:
    from ._base import RedisBase

__all__ = ["UNAVAILABLE", "Hub", "log", "stoppable"]

#: The most tasks of a keyed set that ask Redis themselves at once (each on a pooled connection of
#: its own, see ``RedisScheduler.take_first``); more queue, and the dispatcher asks for them.
DIRECT_CALLS = 8

T = TypeVar("T")


class _Registry:
    """A hub's schedulers, held weakly, under a lock of their own: doors add to them while the
    threads take snapshots of them."""

    __slots__ = ("_by_channel", "_holders", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # By wake-up channel: the scheduler a message on it wakes.
        self._by_channel: weakref.WeakValueDictionary[str, RedisBase] = (
            weakref.WeakValueDictionary()
        )
        self._holders: weakref.WeakSet[RedisBase] = weakref.WeakSet()  # hold leases

    def route(self, sched: RedisBase) -> None:
        with self._lock:
            if self._by_channel.get(sched._channel) is not sched:
                self._by_channel[sched._channel] = sched

    def get(self, channel: str) -> RedisBase | None:
        with self._lock:
            return self._by_channel.get(channel)

    def routed(self) -> list[RedisBase]:
        with self._lock:
            return list(self._by_channel.values())

    def hold(self, sched: RedisBase) -> None:
        with self._lock:
            self._holders.add(sched)

    def holders(self) -> list[RedisBase]:
        with self._lock:
            return list(self._holders)


class Hub:
    """The threads of one set, shared by its schedulers, each started on first need.

    Args:
        label: names the threads (the set's Redis key, or its keys' pattern).
        subscriber: opens a new subscription connection.
        channel: the wake-up channel to subscribe to, or (``pattern``) the glob pattern matching
            the wake-up channels of every key of a keyed set.
        lease_seconds: the lease of the schedulers' resource slots (renewed every third).
    """

    __slots__ = (
        "__weakref__",
        "_channel",
        "_direct",
        "_label",
        "_lease",
        "_lock",
        "_pattern",
        "_registry",
        "_subscriber",
        "dispatcher",
        "listener",
        "renewer",
    )

    def __init__(
        self,
        label: str,
        subscriber: Callable[[], redis.client.PubSub],
        channel: str,
        *,
        pattern: bool,
        lease_seconds: float,
    ) -> None:
        self._label = label
        self._subscriber = subscriber
        self._channel = channel
        self._pattern = pattern
        self._lease = lease_seconds
        self._lock = threading.Lock()
        self._registry = _Registry()
        self._direct = 0  # direct calls in flight (a keyed set's)
        self.dispatcher: Dispatcher | None = None
        self.listener: Listener | None = None
        self.renewer: Renewer | None = None

    def take_direct(self) -> bool:
        """May a task ask Redis itself now? Always for a LimitSet (its one scheduler asks once
        at a time); for a keyed set, while fewer than ``DIRECT_CALLS`` do (the others queue),
        so that thousands of keys never hold as many connections."""
        if not self._pattern:
            return True
        with self._lock:
            if self._direct >= DIRECT_CALLS:
                return False
            self._direct += 1
            return True

    def end_direct(self) -> None:
        if self._pattern:
            with self._lock:
                self._direct -= 1

    def signal(self, sched: RedisBase, job: Callable[[], object] | None = None) -> None:
        """Have the dispatcher thread run ``job``, then ask Redis for ``sched``'s queue."""
        dispatcher = self.dispatcher
        if dispatcher is None:
            with self._lock:
                if self.dispatcher is None:
                    self.dispatcher = Dispatcher(self, self._label)
                dispatcher = self.dispatcher
        dispatcher.signal(sched, job)

    def call_later(self, delay: float, sched: RedisBase) -> Timer:
        """Run ``sched._expired()`` on the dispatcher thread in ``delay`` seconds (a lease that
        blocks a full resource runs out then): one thread for every timer of the set."""
        dispatcher = self.dispatcher
        if dispatcher is None:
            with self._lock:
                if self.dispatcher is None:
                    self.dispatcher = Dispatcher(self, self._label)
                dispatcher = self.dispatcher
        return dispatcher.call_later(delay, sched)

    def listen(self, sched: RedisBase) -> None:
        """``sched`` has a waiter: route the wake-ups of its channel to it (instead of to an
        earlier scheduler of the same key, which a keyed set dropped while it was idle), and
        make sure the subscription runs."""
        self._registry.route(sched)
        if self.listener is None:
            with self._lock:
                if self.listener is None:
                    listener = Listener(self._label, self._subscriber, self._channel, self._pattern)
                    listener.start(self._registry)
                    weakref.finalize(self, listener.stop)
                    self.listener = listener

    def quiet(self) -> tuple[bool, int]:
        """Whether the dispatcher thread has nothing to do (and the subscriber, once started,
        has subscribed and woken the schedulers), and how many rounds of work the dispatcher
        has done: an observer that sees it quiet twice with the same count, with its own tasks run
        in between, has seen everything it did (the contract suite's ``settle``)."""
        listener = self.listener
        subscribing = listener is not None and not listener.listening
        dispatcher = self.dispatcher
        if dispatcher is None:
            return not subscribing, 0
        idle, rounds = dispatcher.quiet()
        return idle and not subscribing, rounds

    def close(self) -> None:
        """End the hub's threads now (its backend is being closed); the dispatcher runs the
        jobs already handed to it first. A scheduler used afterwards starts them again."""
        with self._lock:
            dispatcher, self.dispatcher = self.dispatcher, None
            listener, self.listener = self.listener, None
            renewer, self.renewer = self.renewer, None
        if dispatcher is not None:
            dispatcher.stop()
        if listener is not None:
            listener.stop()
        if renewer is not None:
            renewer.stop.set()

    def hold(self, sched: RedisBase) -> None:
        """``sched`` holds leases: renew them while it lives."""
        self._registry.hold(sched)
        if self.renewer is None:
            with self._lock:
                if self.renewer is None:
                    renewer = Renewer(self._label, self._lease / 3, self._registry)
                    weakref.finalize(self, renewer.stop.set)
                    self.renewer = renewer


_STOPPABLE: dict[type[Any], type[Any]] = {}


def stoppable(kind: type[Any]) -> type[Any]:
    """A subclass of the connection class ``kind`` that refuses to connect again once its
    subscription was stopped (``aiolimits_stopped``), so that closing its socket ends the
    listener's read for good."""
    made = _STOPPABLE.get(kind)
    if made is None:

        def connect(self: Any) -> None:
            if getattr(self, "aiolimits_stopped", False):
                raise redis.exceptions.ConnectionError("the wake-up subscription was stopped")
            kind.connect(self)

        made = _STOPPABLE[kind] = type(f"Stoppable{kind.__name__}", (kind,), {"connect": connect})
    return made


class Renewer:
    """Extends the leases of a set's schedulers every third of a lease, while the hub lives."""

    def __init__(self, label: str, period: float, registry: _Registry) -> None:
        self._period = period
        self._registry = registry
        self.stop = threading.Event()  # set when the hub is garbage
        self._thread = threading.Thread(
            target=self._run, name=f"aiolimits-renew {label}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        background_thread()
        while not self.stop.wait(self._period):
            _each(self._registry.holders(), "renew")


class Listener:
    """Subscribes to a set's wake-up channel (or, for a keyed set, the pattern of its keys'
    channels) and wakes the scheduler a message names. Ends, closing its connection, when its
    hub is garbage."""

    def __init__(
        self,
        label: str,
        subscriber: Callable[[], redis.client.PubSub],
        channel: str,
        pattern: bool,
    ) -> None:
        self._label = label
        self._subscriber = subscriber
        self._channel = channel
        self._pattern = pattern
        self._stopped = threading.Event()
        self._current: redis.client.PubSub | None = None
        self.subscriptions = 0  # how many times it subscribed (a new connection each)
        # Whether it is subscribed and has woken the schedulers since (see Hub.quiet).
        self.listening = False

    def start(self, registry: _Registry) -> None:
        thread = threading.Thread(
            target=self._run, args=(registry,), name=f"aiolimits-wake {self._label}", daemon=True
        )
        thread.start()

    def stop(self) -> None:
        self._stopped.set()
        pubsub = self._current
        connection: Any = None if pubsub is None else pubsub.connection  # None until subscribed
        if connection is not None:
            # redis-py reconnects a subscription's connection whenever it reads on a closed one:
            # a stoppable connection refuses to, once stopped.
            connection.aiolimits_stopped = True
            connection.disconnect()  # the blocked read in the thread returns

    def _run(self, registry: _Registry) -> None:
        background_thread()
        delay = 0.05
        while not self._stopped.is_set():
            pubsub: redis.client.PubSub | None = None
            try:
                pubsub = self._subscriber()
                if self._pattern:
                    pubsub.psubscribe(self._channel)
                else:
                    pubsub.subscribe(self._channel)
                self.subscriptions += 1
                # Published before the flag is read, as stop() sets the flag before it reads
                # this: one of the two sees the other, so the thread never blocks after stop().
                self._current = pubsub
                if self._stopped.is_set():
                    return
                delay = 0.05
                # Messages may have been missed while (re)subscribing: wake every scheduler.
                _each(registry.routed(), "wake")
                self.listening = True
                for message in pubsub.listen():  # type: ignore[no-untyped-call]
                    channel = message.get("channel")
                    if isinstance(channel, bytes):
                        channel = channel.decode("utf-8", "replace")
                    _each([registry.get(channel)], "wake")
            except Exception as exc:
                if self._stopped.is_set():
                    return
                if not isinstance(exc, UNAVAILABLE):
                    log.exception("the wake-up subscription of %s failed", self._channel)
                self._stopped.wait(delay)  # then subscribe again
                delay = min(delay * 2, 1.0)
            finally:
                self._current = None
                self.listening = False
                if pubsub is not None:
                    pubsub.close()


def _each(schedulers: Sequence[RedisBase | None], what: str) -> None:
    """``wake()`` or ``renew()`` each scheduler given; the list (this frame's only reference
    to them) is gone when it returns, so the thread keeps none of them alive."""
    for sched in schedulers:
        if sched is None:
            continue
        try:
            if what == "wake":
                sched.wake()
            elif what == "renew":
                sched.renew()
            else:
                sched._expired()
        except BackendUnavailable as exc:
            log.warning("could not dispatch after a wake-up on %s: %s", sched._hash, exc)
        except Exception:
            log.exception("a background Redis call of aiolimits failed")


class Timer:
    """An expiry timer of the dispatcher thread; :meth:`cancel` makes it do nothing."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Dispatcher:
    """The thread that makes a set's waiting-related Redis calls under the real clock: the
    batches of each signalled scheduler's queue (``dispatch_queue``), lease ends and unused
    grants given back, and the expiry timers. Waiters and releases only signal it, so no event
    loop ever blocks on Redis while waiting, and the acquisitions that queue while a call is in
    flight go out together in the next one."""

    def __init__(self, hub: Hub, label: str) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._pending: dict[RedisBase, None] = {}  # signalled, in order
        self._stopped = False
        self._jobs: list[Callable[[], object]] = []
        self._timers: list[tuple[float, int, Timer, weakref.ref[RedisBase]]] = []
        self._order = itertools.count()
        #: Rounds of work done, and whether one is under way (see :meth:`Hub.quiet`).
        self.rounds = 0
        self.working = False
        self._thread = threading.Thread(
            target=self._run, name=f"aiolimits-dispatch {label}", daemon=True
        )
        self._thread.start()
        weakref.finalize(hub, self.stop)

    def signal(self, sched: RedisBase, job: Callable[[], object] | None = None) -> None:
        with self._cond:
            if job is not None:
                self._jobs.append(job)
            self._pending[sched] = None
            self._cond.notify()

    def quiet(self) -> tuple[bool, int]:
        """Whether it has nothing to do, and how many rounds of work it has done."""
        with self._cond:
            return not (self.working or self._pending or self._jobs), self.rounds

    def call_later(self, delay: float, sched: RedisBase) -> Timer:
        timer = Timer()
        with self._cond:
            entry = (time.monotonic() + delay, next(self._order), timer, weakref.ref(sched))
            heapq.heappush(self._timers, entry)
            if self._timers[0] is entry:
                self._cond.notify()  # sooner than what the thread sleeps until
        return timer

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        background_thread()
        while True:
            with self._cond:
                while True:
                    if self._stopped and not self._jobs:
                        return
                    if self._pending or self._jobs:
                        break
                    timeout = None
                    if self._timers:
                        timeout = self._timers[0][0] - time.monotonic()
                        if timeout <= 0:
                            break
                    self._cond.wait(timeout)
                self.working = True
                jobs, self._jobs = self._jobs, []
                pending, self._pending = self._pending, {}
                due: list[weakref.ref[RedisBase]] = []
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _at, _n, timer, ref = heapq.heappop(self._timers)
                    if not timer.cancelled:
                        due.append(ref)
            _run_all(jobs)
            _each([ref() for ref in due], "expired")
            _dispatch_each(list(pending))
            # Nothing of this round stays referenced while the thread sleeps: a job or a
            # scheduler kept here would keep its hub, and so this thread, alive.
            del jobs, pending, due
            with self._cond:
                # After the round's notifications: an observer that sees it done sees them.
                self.rounds += 1
                self.working = False


def _dispatch_each(schedulers: list[RedisBase]) -> None:
    """Ask Redis for the due queues of ``schedulers`` (the keys of a keyed set with waiters, or
    a LimitSet's one). On a single server, the calls for many keys go out together, in one
    round trip per round (a pipeline, not a transaction: each call is its own atomic script);
    what is left, and a Cluster's, one call after another."""
    if len(schedulers) > 1:
        left = _run_logged(partial(_dispatch_together, schedulers))
        if left is not None:  # else it failed: every one is asked alone
            schedulers = left
    for sched in schedulers:
        _run_logged(sched.dispatch_queue)


def _dispatch_together(schedulers: list[RedisBase]) -> list[RedisBase]:
    """Rounds of one pipelined call per due scheduler of the same single-server client, while
    any batch was granted whole; returns the schedulers left to ask one by one (those of
    another client or of a Cluster, and any whose call came back with an error reply, which
    ``dispatch_queue`` handles: a script to load again, say)."""
    client = schedulers[0].calls.client
    if not isinstance(client, redis.Redis) or schedulers[0]._circuit.opened:
        return schedulers  # (while Redis is unreachable each fails at once)
    together = [s for s in schedulers if s.calls.client is client]
    alone = [s for s in schedulers if s.calls.client is not client]
    while together:
        asked = []
        for sched in together:
            sched.send_outbox()  # what an event loop handed off goes first
            batch = sched.batch_to_ask()
            if batch is not None:
                asked.append((sched, batch))
        if not asked:
            break
        pipe = client.pipeline(transaction=False)
        for sched, batch in asked:
            pipe.execute_command(*sched.batch_command(batch))  # type: ignore[no-untyped-call]
        try:
            replies = pipe.execute(raise_on_error=False)
        except UNAVAILABLE as exc:
            asked[0][0]._circuit.trip(exc)
            for sched, batch in asked:
                message = f"Redis did not answer for the limits {sched._hash!r} in time: {exc}"
                sched.batch_failed(batch, BackendUnavailable(message))
            break
        together = []
        for (sched, batch), reply in zip(asked, replies, strict=True):
            if isinstance(reply, Exception):
                alone.append(sched)  # not run (an error reply): asked again alone
            elif sched.batch_answered(batch, reply):
                together.append(sched)
    return alone


def _run_all(jobs: list[Callable[[], object]]) -> None:
    for job in jobs:
        _run_logged(job)


def _run_logged(job: Callable[[], T]) -> T | None:
    """Run a job of a background thread; a failure is logged (there is nobody to raise to)."""
    try:
        return job()
    except Exception:
        log.exception("a background Redis call of aiolimits failed")
        return None
