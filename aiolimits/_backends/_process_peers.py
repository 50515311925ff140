"""The other processes of a process-shared LimitSet: are they alive, and how to wake them.

*Identity.* A process is named by ``(pid, start, ns)``: its pid, its start time in clock ticks
since boot (``/proc/<pid>/stat`` field 22), so a recycled pid is never mistaken for the process
that died, and the inode of its PID namespace (``/proc/self/ns/pid``), since a pid means
something else in another namespace (another container sharing the directory).

*Liveness.* A peer in this PID namespace, once checked, is watched through a *pidfd*
(``os.pidfd_open``), which becomes readable when the process exits: asking again costs one
``poll`` with no wait, and a thread can sleep on it. A peer in another namespace cannot be
checked by pid at all; instead every process that records anything in a directory (slots held,
waiters) first takes an exclusive ``flock`` on a *life file* of its own there,
``.life-<ns>-<pid>-<start>``, held until it exits (the kernel drops it then, whichever
namespace asks). Such a peer is alive while its life file is locked; the listener re-checks it
every :data:`LEASE` seconds while it waits on it (no pidfd to sleep on).

*Wake-ups.* Each process that has waiters owns, in each directory it uses, one unix datagram
socket bound to a path in that private (0700) directory, ``.wake-<ns>-<pid>-<random>``, mode
0600: other users cannot even connect to it, so a flood from them costs nothing. One daemon
thread per process, the *listener*, blocks in ``poll`` on those sockets and on the pidfds of
the peers its waiters depend on. A datagram means "the shared state changed in a way that may
admit your head"; a pidfd means "a peer died; reclaim what it held". Either way the listener
takes the set's lock and runs the scheduler's dispatch. While nothing happens it uses no CPU.
Sockets and life files of dead processes are removed by whoever finds them dead; a process
removes its own at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import os
import secrets
import select
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = ["Directory", "Listener", "directory", "listener", "my_identity"]

Peer = tuple[int, int, int]  # pid, start time, pid namespace


def _start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return int(stat.rsplit(b")", 1)[1].split()[19])


def _namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # pragma: no cover - Linux has had it since 3.8
        return 0


_lock = threading.Lock()
_me: Peer | None = None
_pidfds: dict[Peer, int] = {}
_dead: set[Peer] = set()
forks = 0  # how many times this process's ancestors forked to make it (0: not a fork child)


def my_identity() -> Peer:
    """``(pid, start, ns)`` of this process."""
    global _me
    me = _me
    if me is None or me[0] != os.getpid():
        pid = os.getpid()
        start = _start_time(pid)
        assert start is not None
        me = _me = (pid, start, _namespace())
    return me


# False on kernels older than 5.3 (no pidfd_open): liveness is then read from /proc each time,
# and a listener whose waiters depend on other processes re-checks them every LEASE seconds.
pidfds_work = hasattr(os, "pidfd_open")
LEASE = 1.0


def local(peer: Peer) -> bool:
    """Whether ``peer`` is in this process's PID namespace (its pid means something here)."""
    return peer[2] == my_identity()[2]


def pidfd(peer: Peer) -> int | None:
    """A pidfd for ``peer`` (readable once it exits), or None when it is not running, is in
    another PID namespace, or this kernel has no pidfds (see :data:`pidfds_work`)."""
    global pidfds_work
    if not local(peer):
        return None
    with _lock:
        fd = _pidfds.get(peer)
        if fd is not None or peer in _dead or not pidfds_work:
            return fd if pidfds_work else None
        pid, start, _ns = peer
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


def _alive_here(peer: Peer) -> bool:
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


def _life_name(peer: Peer) -> str:
    pid, start, ns = peer
    return f".life-{ns}-{pid}-{start}"


class Pokeable(Protocol):
    def has_waiters(self) -> bool: ...

    def watched_peers(self) -> frozenset[Peer]: ...

    def poked(self) -> None: ...


class _Handles:
    """What a :class:`Directory` holds open, closed when the directory is no longer used (a
    finalizer must not hold the directory object itself)."""

    __slots__ = ("address", "fd", "life", "making", "sender", "sock")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # Held while this process's socket or life file is made: two threads making them at
        # once would each open the life file, and the second one's flock would fail.
        self.making = threading.Lock()
        self.sock: socket.socket | None = None
        self.address = b""
        self.life: int | None = None
        self.sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sender.setblocking(False)

    def close_own(self, *, unlink: bool) -> None:
        """Drop this process's socket and life file (removing them when ``unlink``)."""
        if self.sock is not None:
            if unlink:
                with contextlib.suppress(OSError):
                    os.unlink(self.address, dir_fd=self.fd)
            found = _listener
            if found is not None and found._pid == os.getpid():
                found.remove(self.sock)
            self.sock.close()
            self.sock = None
            self.address = b""
        if self.life is not None:
            if unlink:
                with contextlib.suppress(OSError):
                    os.unlink(_life_name(my_identity()), dir_fd=self.fd)
            os.close(self.life)
            self.life = None

    def close(self) -> None:
        """No scheduler uses the directory any more: close everything (removing what is ours)."""
        if self.fd >= 0:
            with contextlib.suppress(Exception):
                self.close_own(unlink=True)
            self.sender.close()
            os.close(self.fd)
            self.fd = -1


class Directory:
    """One checked private directory, as this process uses it: its descriptor (everything is
    reached through it), and this process's wake-up socket and life file there. Held by the
    schedulers that use it; closed (its socket and life file removed) when none does."""

    __slots__ = ("__weakref__", "_h", "_prefix", "fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self._h = _Handles(fd)
        self._prefix = f"/proc/self/fd/{fd}/".encode()
        weakref.finalize(self, self._h.close)

    @property
    def address(self) -> bytes:
        return self._h.address

    def wake_address(self) -> bytes:
        """This process's wake-up socket in this directory (made, and listened to, on first
        use). Its name goes into the shared state for the others to send to."""
        h = self._h
        if h.sock is not None:
            return h.address
        me = my_identity()
        with h.making:
            if h.sock is None:
                name = f".wake-{me[2]}-{me[0]}-{secrets.token_hex(6)}".encode()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    sock.bind(self._prefix + name)
                    os.chmod(name, 0o600, dir_fd=self.fd)
                    sock.setblocking(False)
                except BaseException:
                    sock.close()
                    raise
                h.sock, h.address = sock, name
                listener().add(sock)
            return h.address

    def send(self, name: bytes, message: bytes = b"!") -> None:
        """Wake the process whose socket here is ``name``; never blocks. A peer that is gone or
        swamped (its queue of datagrams full: it has wake-ups pending anyway) is skipped."""
        if name.startswith(b".wake-") and b"/" not in name:
            with contextlib.suppress(OSError):
                self._h.sender.sendto(message, self._prefix + name)

    def keep_alive(self) -> None:
        """Hold this process's life file here (before recording anything in a shared state)."""
        h = self._h
        if h.life is not None:
            return
        name = _life_name(my_identity())
        with h.making:
            # Unless another thread of this process made it meanwhile.
            if h.life is None:
                fd = os.open(
                    name,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=self.fd,
                )
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BaseException:
                    os.close(fd)
                    raise
                h.life = fd

    def alive(self, peer: Peer) -> bool:
        """Whether ``peer`` (which recorded something in a state file here) still runs."""
        if peer == my_identity():
            return True
        if local(peer):
            return _alive_here(peer)
        # Another PID namespace: its pid means nothing here; its life file tells.
        name = _life_name(peer)
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot tell: never judge a live holder dead
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True  # locked: it runs
        else:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self.fd)
            return False
        finally:
            os.close(fd)

    def buried(self, peer: Peer, address: bytes) -> None:
        """``peer`` was found dead: remove what it left here."""
        if address.startswith(b".wake-") and b"/" not in address:
            with contextlib.suppress(OSError):
                os.unlink(address, dir_fd=self.fd)
        if local(peer):
            with contextlib.suppress(OSError):
                os.unlink(_life_name(peer), dir_fd=self.fd)

    def close_own(self, *, unlink: bool) -> None:
        """Drop this process's socket and life file here (removing them when ``unlink``)."""
        self._h.close_own(unlink=unlink)


_directories: dict[tuple[int, int], weakref.ref[Directory]] = {}


def directory(path: str, opener: Callable[[str], int]) -> Directory:
    """This process's :class:`Directory` for ``path``, opened (and checked) by ``opener``. One per
    directory however it is spelled, while schedulers use it; it is checked again at every
    attach."""
    fd = opener(path)
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with _lock:
            ref = _directories.get(key)
            found = ref() if ref is not None else None
            if found is None or found.fd < 0:
                found = Directory(fd, path)
                _directories[key] = weakref.ref(found, functools.partial(_drop, key))
                fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
    return found


def _drop(key: tuple[int, int], _ref: object) -> None:
    ref = _directories.get(key)
    if ref is not None and ref() is None:
        del _directories[key]


def _live_directories() -> list[Directory]:
    return [d for ref in list(_directories.values()) if (d := ref()) is not None]


class Listener:
    """This process's wake-up thread, serving its sockets in every directory (one per process)."""

    def __init__(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Registered by any thread, read by the listener: guarded by a lock, weakly held.
        self._guard = threading.Lock()
        self._schedulers: dict[int, weakref.ref[Pokeable]] = {}
        self._socks: list[socket.socket] = []
        self._pid = os.getpid()
        thread = threading.Thread(target=self._run, name="aiolimits-process-listener", daemon=True)
        thread.start()

    def add(self, sock: socket.socket) -> None:
        with self._guard:
            self._socks.append(sock)
        self.rewatch()

    def remove(self, sock: socket.socket) -> None:
        with self._guard:
            if sock in self._socks:
                self._socks.remove(sock)
        self.rewatch()

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

    def rewatch(self) -> None:
        """Have the listener re-read which peers to watch (and nothing else)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"w")

    def _run(self) -> None:
        while True:
            # The listener must survive any one failure (a state file removed under it, say);
            # the waiters it could not serve still wake at their deadlines.
            with contextlib.suppress(Exception):
                self._serve()

    def _serve(self) -> None:
        while True:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            with self._guard:
                socks = {sock.fileno(): sock for sock in self._socks if sock.fileno() >= 0}
            for fd in socks:
                poller.register(fd, select.POLLIN)
            lease: int | None = None
            for scheduler in self._waiting():
                for peer in scheduler.watched_peers():
                    peer_fd = pidfd(peer)
                    if peer_fd is not None:
                        poller.register(peer_fd, select.POLLIN)
                    elif not pidfds_work or not local(peer):
                        lease = int(LEASE * 1000)
            # Blocks until a datagram or a peer's exit: no timeout, no periodic wake-up (except
            # the lease for peers without a pidfd: then a timeout means "check them again").
            ready = poller.poll(lease)
            poke = not ready
            for fd, _events in ready:
                if fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                elif fd in socks:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            socks[fd].recv(64)
                            poke = True
                else:
                    poke = True  # a pidfd: a peer died
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


def _at_exit() -> None:
    for found in _live_directories():
        with contextlib.suppress(Exception):
            found.close_own(unlink=True)


atexit.register(_at_exit)


def _after_fork() -> None:
    global _lock, _me, _listener, forks
    forks += 1
    _lock = threading.Lock()
    _me = None
    _listener = None
    _pidfds.clear()
    _dead.clear()
    # The parent's socket and life files stay the parent's: close this copy, remove nothing.
    for found in _live_directories():
        found.close_own(unlink=False)


os.register_at_fork(after_in_child=_after_fork)
