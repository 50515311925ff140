"""How a Redis backend reaches its server: the callers' own connections, bounded round trips, and
the circuit that remembers an unreachable server until a probe finds it back.

Three rules, from ``docs/redis.md``:

* **No caller connects on an event loop.** A connection is made by a short-lived thread
  (:meth:`Link.warm`) or by the backend's background threads; a task that finds no connected one
  ready lets the set's dispatcher thread ask for it instead, and a thread waits for one at most
  as long as its call may take.
* **Every round trip is bounded by its caller**: at most the backend's ``timeout``, and less when
  the caller's own deadline (plus :data:`GRACE`) comes first. A call that reaches the backend's
  ``timeout`` without an answer, or that cannot connect, trips the circuit.
* **A circuit** (:class:`Circuit`): while it is open, every call fails at once, without I/O
  (:class:`NotSent`), so a failure policy applies in microseconds rather than after one timeout
  per call. A probe thread sends ``PING`` with a backoff (50 ms doubling to 500 ms) and closes the
  circuit when the server answers; the calls that could not be sent and must not be lost (ending
  leases, refunds) are sent then.

Only redis-py's public connection API is used (``send_command``, ``read_response(timeout=)``,
``connect``, ``disconnect``), with one exception: a task waits for its answer on its own event
loop by the readability of the connection's socket (``Connection._sock``), which no public API
offers without a thread hop per call (see ``RedisScheduler._direct_call``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import redis
import redis.exceptions

from .._errors import BackendUnavailable

__all__ = ["GRACE", "UNAVAILABLE", "Circuit", "Link", "NotSent", "log"]

log = logging.getLogger("aiolimits.redis")

#: How much longer than its own timeout a call may take: the round trip that decides it.
GRACE: Final = 0.05

# What a call to an unreachable, stopped or restarting server raises (BusyLoadingError while it
# loads its data set after a restart; RedisClusterException when no node of a Cluster answers).
UNAVAILABLE = (
    redis.exceptions.RedisClusterException,
    redis.exceptions.ClusterError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)

# The probe's backoff between attempts, in seconds.
_PROBE_FIRST: Final = 0.05
_PROBE_MOST: Final = 0.5


class NotSent(BackendUnavailable):
    """Redis is known to be unreachable (the circuit is open): the call was not sent, so sending
    it again later cannot apply it twice."""


class Circuit:
    """Whether a backend's Redis is known to be unreachable, and the probe that finds it back.

    Args:
        probe: one attempt to reach the server (raises when it cannot); called on the probe's
            thread only.
        label: names the probe thread and the log lines.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_label",
        "_lock",
        "_probe",
        "_retry",
        "opened",
        "reachable",
        "reason",
    )

    def __init__(self, probe: Callable[[], object], label: str) -> None:
        self._probe = probe
        self._label = label
        self._lock = threading.Lock()
        #: Read without the lock on every call: a stale read costs one call, sent or refused.
        self.opened = False
        self.reason = ""
        self._retry: list[Callable[[], object]] = []  # to send once Redis answers again
        self._closed = threading.Event()  # the backend was closed: no probe any more
        # Set while the circuit is closed (tests wait on it; nothing in the library does).
        self.reachable = threading.Event()
        self.reachable.set()

    def check(self) -> None:
        """Raise :class:`NotSent` while the circuit is open."""
        if self.opened:
            raise NotSent(
                f"Redis is unreachable ({self.reason}); "
                "calls fail at once until a probe finds it back"
            )

    def trip(self, exc: BaseException) -> None:
        """A call found Redis unreachable: open the circuit, and start the probe."""
        with self._lock:
            if self.opened or self._closed.is_set():
                return
            self.opened = True
            self.reachable.clear()
            self.reason = str(exc) or type(exc).__name__
            thread = threading.Thread(
                target=_probe_until_reached,
                args=(weakref.ref(self), self._probe, self._closed),
                name=f"aiolimits-probe {self._label}",
                daemon=True,
            )
        log.warning("Redis is unreachable for %s (%s): the circuit is open", self._label, exc)
        thread.start()

    def later(self, job: Callable[[], object]) -> None:
        """Run ``job`` (a call that must not be lost) once the circuit closes again; now, on
        this thread, when it already is closed."""
        with self._lock:
            if self.opened:
                self._retry.append(job)
                return
        _run_logged(job)

    def _reached(self) -> None:
        with self._lock:
            self.opened = False
            jobs, self._retry = self._retry, []
            self.reachable.set()
        log.warning("Redis answers %s again: the circuit is closed", self._label)
        for job in jobs:
            _run_logged(job)

    def close(self) -> None:
        """The backend is closed: every call fails at once from now on, nothing is probed, and
        what waited to be sent again is dropped (leases expire by themselves)."""
        self._closed.set()
        with self._lock:
            self._retry = []
            self.opened = True
            self.reachable.clear()
            self.reason = "the RedisBackend was closed"


def _probe_until_reached(
    ref: weakref.ref[Circuit], probe: Callable[[], object], closed: threading.Event
) -> None:
    """The probe thread: tries ``probe`` with a backoff until it succeeds (then closes the
    circuit), the backend is closed, or the circuit is garbage."""
    delay = _PROBE_FIRST
    while not closed.wait(delay):
        if ref() is None:
            return
        try:
            probe()
        except Exception:
            delay = min(delay * 2, _PROBE_MOST)
            continue
        circuit = ref()
        if circuit is not None and not closed.is_set():
            circuit._reached()
        return


def _run_logged(job: Callable[[], object]) -> None:
    try:
        job()
    except Exception:
        log.exception("a deferred Redis call of aiolimits failed")


def _disconnect_all(connections: list[redis.Connection]) -> None:
    for conn in connections:
        conn.disconnect()  # type: ignore[no-untyped-call]
    connections.clear()


def ping(make: Callable[[], redis.Connection], timeout: float) -> None:
    """One ``PING`` on a connection of its own (the probe of a single server)."""
    conn = make()
    try:
        conn.connect()  # type: ignore[no-untyped-call]
        conn.send_command("PING")  # type: ignore[no-untyped-call]
        conn.read_response(timeout=timeout)
    finally:
        conn.disconnect()  # type: ignore[no-untyped-call]


class Link:
    """The connections a single-server backend's callers use for their own round trips.

    A caller takes a connected connection (:meth:`take`, never any I/O), makes its round trip
    and gives it back (:meth:`give`). Connections are made by a short-lived thread
    (:meth:`warm`), never by a task on its event loop; a thread with no deadline of its own may
    connect one itself (:meth:`connect`).

    Args:
        pool: the blocking client's pool, whose connection class and settings are used.
        circuit: tripped when a connection cannot be made.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_cond",
        "_idle",
        "_make",
        "_warming",
        "circuit",
        "timeout",
    )

    #: Idle connections kept at most (more are closed when given back).
    KEEP: Final = 16

    def __init__(self, pool: redis.ConnectionPool, circuit: Circuit, timeout: float) -> None:
        kwargs: dict[str, Any] = dict(pool.connection_kwargs)
        self._make: Callable[[], redis.Connection] = partial(pool.connection_class, **kwargs)
        self.circuit = circuit
        self.timeout = timeout
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[redis.Connection] = []
        self._warming = False
        self._closed = False
        weakref.finalize(self, _disconnect_all, self._idle)  # garbage: its sockets closed

    def new(self) -> redis.Connection:
        """A connection not yet connected (for the probe)."""
        return self._make()

    def ready(self) -> bool:
        """Whether a connected connection is idle."""
        return bool(self._idle)

    def take(self) -> redis.Connection | None:
        """A connected connection, or None (then :meth:`warm` makes one). No I/O."""
        with self._cond:
            return self._idle.pop() if self._idle else None

    def give(self, conn: redis.Connection) -> None:
        """Give back a connection after a complete round trip (its socket holds nothing)."""
        with self._cond:
            if not self._closed and len(self._idle) < self.KEEP:
                self._idle.append(conn)
                self._cond.notify()
                return
        conn.disconnect()  # type: ignore[no-untyped-call]

    def connect(self) -> redis.Connection:
        """Connect a new connection on this thread (at most ``timeout``; never on a loop)."""
        conn = self._make()
        try:
            conn.connect()  # type: ignore[no-untyped-call]
        except UNAVAILABLE as exc:
            conn.disconnect()  # type: ignore[no-untyped-call]
            self.circuit.trip(exc)
            raise
        return conn

    def warm(self) -> None:
        """Have a short-lived thread connect one more connection, unless one is being made."""
        with self._cond:
            if self._warming or self._closed:
                return
            self._warming = True
        threading.Thread(target=self._warm, name="aiolimits-connect", daemon=True).start()

    def _warm(self) -> None:
        try:
            conn = self.connect()
        except Exception:
            conn = None
        with self._cond:
            self._warming = False
            self._cond.notify_all()
        if conn is not None:
            self.give(conn)

    def wait(self, bound: float) -> redis.Connection | None:
        """A connected connection within ``bound`` seconds (having a thread make one), or None
        when none came in time or none could be made."""
        conn = self.take()
        if conn is not None:
            return conn
        self.warm()
        with self._cond:
            self._cond.wait_for(lambda: self._idle or not self._warming, timeout=bound)
            return self._idle.pop() if self._idle else None

    def close(self) -> None:
        """Close the idle connections; those in use are closed when given back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for conn in idle:
            conn.disconnect()  # type: ignore[no-untyped-call]
