"""The other processes of a process-shared LimitSet: are they alive, and how to wake them.

*Liveness.* A process is named by ``(pid, start)``, its pid and its start time in clock ticks
since boot (``/proc/<pid>/stat`` field 22), so a recycled pid is never mistaken for the process
that died. Once a peer has been checked, it is watched through a *pidfd* (``os.pidfd_open``),
which becomes readable when the process exits: asking again costs one ``poll`` with no wait,
and a thread can sleep on it.

*Wake-ups.* Each process that has waiters owns one unix datagram socket in the abstract
namespace (nothing on disk to clean up; it vanishes with the process) and one daemon thread, the
*listener*, blocked in ``poll`` on that socket and on the pidfds of the peers its waiters depend
on. A datagram means "the shared state changed in a way that may admit your head"; a pidfd means
"a peer died; reclaim what it held". Either way the listener takes the set's lock and runs the
scheduler's dispatch. While nothing happens it uses no CPU at all.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import threading
import weakref
from typing import Protocol

__all__ = ["Listener", "alive", "listener", "my_identity", "pidfd"]


def _start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return int(stat.rsplit(b")", 1)[1].split()[19])


_lock = threading.Lock()
_me: tuple[int, int] | None = None
_pidfds: dict[tuple[int, int], int] = {}
_dead: set[tuple[int, int]] = set()
forks = 0  # how many times this process's ancestors forked to make it (0: not a fork child)


def my_identity() -> tuple[int, int]:
    """``(pid, start)`` of this process."""
    global _me
    me = _me
    if me is None or me[0] != os.getpid():
        pid = os.getpid()
        start = _start_time(pid)
        assert start is not None
        me = _me = (pid, start)
    return me


# False on kernels older than 5.3 (no pidfd_open): liveness is then read from /proc each time,
# and a listener whose waiters depend on other processes re-checks them every LEASE seconds.
pidfds_work = hasattr(os, "pidfd_open")
LEASE = 1.0


def pidfd(peer: tuple[int, int]) -> int | None:
    """A pidfd for ``peer`` (readable once it exits), or None when it is not running (or when
    this kernel has no pidfds: see :data:`pidfds_work`)."""
    global pidfds_work
    with _lock:
        fd = _pidfds.get(peer)
        if fd is not None or peer in _dead or not pidfds_work:
            return fd if pidfds_work else None
        pid, start = peer
        if _start_time(pid) != start:
            _dead.add(peer)
            return None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            _dead.add(peer)
            return None
        except OSError:  # ENOSYS: a kernel before 5.3
            pidfds_work = False
            return None
        # The pid may have been recycled between the check and the open: check again.
        if _start_time(pid) != start:
            os.close(fd)
            _dead.add(peer)
            return None
        _pidfds[peer] = fd
        return fd


def alive(peer: tuple[int, int]) -> bool:
    """Whether ``peer`` is still running. Cheap after the first call: one poll of its pidfd."""
    if peer == my_identity():
        return True
    fd = pidfd(peer)
    if fd is None:
        return not pidfds_work and _start_time(peer[0]) == peer[1]
    p = select.poll()
    p.register(fd, select.POLLIN)
    if not p.poll(0):
        return True
    with _lock:
        if _pidfds.pop(peer, None) is not None:
            os.close(fd)
        _dead.add(peer)
    return False


class Pokeable(Protocol):
    def has_waiters(self) -> bool: ...

    def watched_peers(self) -> frozenset[tuple[int, int]]: ...

    def poked(self) -> None: ...


class Listener:
    """This process's wake-up socket and the thread that serves it (one per process)."""

    def __init__(self) -> None:
        self.address = b"\0aiolimits-%d-%s" % (os.getpid(), secrets.token_hex(8).encode())
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.setblocking(False)
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        # Registered by any thread, read by the listener: guarded by a lock, weakly held.
        self._guard = threading.Lock()
        self._schedulers: dict[int, weakref.ref[Pokeable]] = {}
        self._pid = os.getpid()
        thread = threading.Thread(target=self._run, name="aiolimits-process-listener", daemon=True)
        thread.start()

    def register(self, scheduler: Pokeable) -> None:
        with self._guard:
            if id(scheduler) not in self._schedulers:
                self._schedulers[id(scheduler)] = weakref.ref(scheduler, self._forget)

    def _forget(self, ref: weakref.ref[Pokeable]) -> None:
        with self._guard:
            for key, value in list(self._schedulers.items()):
                if value is ref:
                    del self._schedulers[key]

    def _waiting(self) -> list[Pokeable]:
        with self._guard:
            refs = list(self._schedulers.values())
        return [s for ref in refs if (s := ref()) is not None and s.has_waiters()]

    def send(self, address: bytes, message: bytes = b"!") -> None:
        """Wake the process listening on ``address``; never blocks. A peer that is gone or
        swamped (its queue of datagrams full: it has wake-ups pending anyway) is skipped."""
        with contextlib.suppress(OSError):
            self._sender.sendto(message, address)

    def rewatch(self) -> None:
        """Have the listener re-read which peers to watch (and nothing else)."""
        self.send(self.address, b"w")

    def _run(self) -> None:
        while True:
            # The listener must survive any one failure (a state file removed under it, say);
            # the waiters it could not serve still wake at their deadlines.
            with contextlib.suppress(Exception):
                self._serve()

    def _serve(self) -> None:
        sock_fd = self._sock.fileno()
        while True:
            poller = select.poll()
            poller.register(sock_fd, select.POLLIN)
            lease: int | None = None
            for scheduler in self._waiting():
                for peer in scheduler.watched_peers():
                    fd = pidfd(peer)
                    if fd is not None:
                        poller.register(fd, select.POLLIN)
                    elif not pidfds_work:
                        lease = int(LEASE * 1000)
            # Blocks until a datagram or a peer's exit: no timeout, no periodic wake-up (except
            # the lease without pidfds: then a timeout means "check the peers again").
            ready = poller.poll(lease)
            poke = not ready or any(fd != sock_fd for fd, _events in ready)
            try:
                while True:
                    if self._sock.recv(64) != b"w":
                        poke = True
            except BlockingIOError:
                pass
            if poke:
                for scheduler in self._waiting():
                    with contextlib.suppress(Exception):
                        scheduler.poked()


_listener: Listener | None = None


def listener() -> Listener:
    """The process's listener, started on first use (again in a forked child)."""
    global _listener
    with _lock:
        if _listener is None or _listener._pid != os.getpid():
            _listener = Listener()
        return _listener


def _after_fork() -> None:
    global _lock, _me, _listener, forks
    forks += 1
    _lock = threading.Lock()
    _me = None
    _listener = None
    _pidfds.clear()
    _dead.clear()


os.register_at_fork(after_in_child=_after_fork)
