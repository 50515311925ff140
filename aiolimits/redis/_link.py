"""How a Redis backend reaches its server: the callers' own connections, bounded round trips.

Two rules, from ``docs/redis.md`` (the circuit that remembers an unreachable server is in
``_failure.py``):

* **No caller connects on an event loop.** A connection is made by a short-lived thread
  (:meth:`Link.warm`) or by the backend's background threads; a task that finds no connected one
  ready lets the set's dispatcher thread ask for it instead, and a thread waits for one at most
  as long as its call may take.
* **Every round trip is bounded by its caller**: at most the backend's ``timeout``, and less when
  the caller's own deadline (plus ``GRACE``) comes first. A call that reaches the backend's
  ``timeout`` without an answer, or that cannot connect, trips the circuit.

Only redis-py's public connection API is used (``send_command``, ``read_response(timeout=)``,
``connect``, ``disconnect``), and its hook for connection classes: a connection of the link is of
a subclass of the pool's connection class (:func:`socketed`) whose ``_connect``, the method each
connection class implements to make its socket (redis-py's TCP, TLS and Unix classes override
it), keeps the socket it makes. A task waits for its answer on its own event loop by that
socket's readability (see ``ScriptCalls.exchange`` in ``_calls.py``): no thread hop per call.
"""

from __future__ import annotations

import socket
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import redis
import redis.exceptions

from ._failure import UNAVAILABLE, Circuit

__all__ = ["Link", "ping", "socket_of", "socketed"]

_SOCKETED: dict[type[Any], type[Any]] = {}


def socketed(kind: type[redis.Connection]) -> type[redis.Connection]:
    """A subclass of the connection class ``kind`` that keeps the socket each connect makes
    (see the module's docstring; :func:`socket_of` reads it)."""
    made = _SOCKETED.get(kind)
    if made is None:

        def _connect(self: Any) -> Any:
            sock = kind._connect(self)  # type: ignore[no-untyped-call]
            self.aiolimits_socket = sock
            return sock

        made = type(f"Socketed{kind.__name__}", (kind,), {"_connect": _connect})
        _SOCKETED[kind] = made
    return made


def socket_of(conn: redis.Connection) -> socket.socket:
    """The socket of a connected connection of a :class:`Link`."""
    sock: socket.socket = conn.aiolimits_socket  # type: ignore[attr-defined]
    return sock


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
        self._make: Callable[[], redis.Connection] = partial(
            socketed(pool.connection_class), **kwargs
        )
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

    def warming(self) -> bool:
        """Whether a connection is being made."""
        return self._warming

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
