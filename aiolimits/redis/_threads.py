"""The background threads of a Redis-backed LimitSet: dispatcher, subscriber, lease renewer.

Each holds its scheduler weakly and ends when the scheduler is garbage. None of them is a polling
loop: the dispatcher sleeps until signalled, the subscriber until a message comes, the renewer
for a third of a lease between renewals.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
import redis.client
import redis.exceptions

from .._errors import BackendUnavailable

if TYPE_CHECKING:
    from ._scheduler import RedisScheduler

__all__ = ["UNAVAILABLE", "Dispatcher", "Listener", "Renewer", "expire", "log"]

log = logging.getLogger("aiolimits.redis")

# What a call to an unreachable, stopped or restarting server raises (BusyLoadingError while it
# loads its data set after a restart; RedisClusterException when no node of a Cluster answers).
UNAVAILABLE = (
    redis.exceptions.RedisClusterException,
    redis.exceptions.ClusterError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)


def expire(ref: weakref.ref[RedisScheduler]) -> None:
    sched = ref()
    if sched is not None:
        sched._expired()


class Renewer:
    """Extends a scheduler's leases every third of a lease, while the scheduler lives."""

    def __init__(self, sched: RedisScheduler) -> None:
        self._sched = weakref.ref(sched)
        self._period = sched._lease / 3
        self._stop = threading.Event()  # set when the scheduler is garbage
        self._thread = threading.Thread(
            target=self._run, name=f"aiolimits-renew {sched._hash}", daemon=True
        )
        self._thread.start()
        weakref.finalize(sched, self._stop.set)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            sched = self._sched()
            if sched is None:
                return
            sched.renew()
            del sched


class Listener:
    """Subscribes to a set's wake-up channel and dispatches the local head on each message.
    Ends, closing its connection, when its scheduler is garbage."""

    def __init__(self, sched: RedisScheduler) -> None:
        self._sched = weakref.ref(sched)
        self._subscriber = sched._subscriber
        self._channel = sched._channel
        self._stopped = threading.Event()
        self._current: redis.client.PubSub | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"aiolimits-wake {sched._hash}", daemon=True
        )
        self._thread.start()
        weakref.finalize(sched, self.stop)

    def stop(self) -> None:
        self._stopped.set()
        pubsub = self._current
        connection: Any = None if pubsub is None else pubsub.connection  # None until subscribed
        if connection is not None:
            connection.disconnect()  # the blocked read in the thread returns

    def _run(self) -> None:
        delay = 0.05
        while not self._stopped.is_set():
            pubsub: redis.client.PubSub | None = None
            try:
                pubsub = self._subscriber()
                pubsub.subscribe(self._channel)
                # Published before the flag is read, as stop() sets the flag before it reads
                # this: one of the two sees the other, so the thread never blocks after stop().
                self._current = pubsub
                if self._stopped.is_set():
                    return
                delay = 0.05
                # Messages may have been missed while (re)subscribing.
                if not self._wake(None):
                    return
                for message in pubsub.listen():  # type: ignore[no-untyped-call]
                    if not self._wake(message.get("data")):
                        return
            except Exception as exc:
                if self._stopped.is_set() or self._sched() is None:
                    return
                if not isinstance(exc, UNAVAILABLE):
                    log.exception("the wake-up subscription of %s failed", self._channel)
                self._stopped.wait(delay)  # then subscribe again
                delay = min(delay * 2, 1.0)
            finally:
                self._current = None
                if pubsub is not None:
                    pubsub.close()

    def _wake(self, data: object) -> bool:
        sched = self._sched()
        if sched is None:
            return False
        try:
            sched.wake()
        except BackendUnavailable as exc:
            log.warning("could not dispatch after a wake-up on %s: %s", sched._hash, exc)
        return True


class Dispatcher:
    """The thread that makes a LimitSet's waiting-related Redis calls under the real clock: the
    batches of the queue (``dispatch_queue``), lease ends and unused grants given back. Waiters
    and releases only signal it, so no event loop ever blocks on Redis while waiting, and the
    acquisitions that queue while a call is in flight go out together in the next one."""

    def __init__(self, sched: RedisScheduler) -> None:
        self._sched = weakref.ref(sched)
        self._cond = threading.Condition(threading.Lock())
        self._signaled = False
        self._stopped = False
        self._jobs: list[Callable[[], object]] = []
        self._thread = threading.Thread(
            target=self._run, name=f"aiolimits-dispatch {sched._hash}", daemon=True
        )
        self._thread.start()
        weakref.finalize(sched, self.stop)

    def signal(self, job: Callable[[], object] | None = None) -> None:
        with self._cond:
            if job is not None:
                self._jobs.append(job)
            self._signaled = True
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._signaled and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._jobs:
                    return
                self._signaled = False
                jobs, self._jobs = self._jobs, []
            for job in jobs:
                _run_logged(job)
            sched = self._sched()
            if sched is None:
                return
            _run_logged(sched.dispatch_queue)
            del sched


def _run_logged(job: Callable[[], object]) -> None:
    """Run a job of the dispatcher thread; a failure is logged (there is nobody to raise to)."""
    try:
        job()
    except Exception:
        log.exception("a background Redis call of aiolimits failed")
