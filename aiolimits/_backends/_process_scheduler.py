"""The scheduler of the process backend: the core scheduler over state shared through a file.

How it reuses the core: :class:`ProcessScheduler` *is* the memory backend's scheduler; only its
``lock`` differs. Entering the lock takes a thread lock, then the file lock, and, if another
process changed the state since this one last saw it, loads the shared state into this
process's state objects in place; leaving it writes the state back if it changed. Every
decision therefore runs on the current shared state, atomically across all processes, with the
exact maths of the memory backend (all five algorithms, refunds, overage, pause, counters).

Waiting across processes: every waiter gets a ticket from a shared counter when it queues, and
the shared state lists the tickets of all waiting requests in arrival order. An arrival takes
at once only when no ticket is queued anywhere, and a process grants its own head only while no
other process's ticket is ahead of it: one FIFO queue over all processes. Only the process of
the first ticket can grant it (its request lives in its memory), so whoever changes the state
in a way that may admit that head (a release, a refund, a pause, a waiter leaving, a grant that
made it first) sends its process a datagram; its listener thread then runs the dispatch.
Rate waits still sleep until the computed time.

Crashes: the kernel drops the file lock of a dead process, and the state on file is always a
complete copy (two slots, see ``_process_file``). Resource slots are recorded per holder
``(pid, start time, pid namespace)`` (see ``_process_peers`` for how a holder in another
namespace is judged); a holder found dead (when a request finds a resource full, when
``get_stats``/``retry_after`` look, when a waiter's listener sees its pidfd fire, at attach) has
its slots reclaimed and its tickets dropped.

The data of a slot of the state file is ``marshal`` (format 2, no back-references, so equal
states give equal bytes) of plain ints, floats, strs, bytes, tuples, lists and one dict. It is
read only from a file this user owns and nobody else may write (checked when opened: see
``_process_file``), whose crc matched, and it is then checked for shape before use
(:func:`_check_shared`): a damaged or foreign state is a clear ``ValueError``. Every number in
it is finite: the only infinities of the algorithms (``-inf`` as "never" for a pause or a
fixed window not yet started) are stored as ``None``, and a state holding any other non-finite
number is refused, never written.

Layout 4 of that data, a tuple: ``(4, (boot id, clock tag, declaration JSON), (granted,
timed out, cancelled, paused until, [refunded per key]), [(capacity, window, state) per key],
[ticket], {owner:
(wake-up socket name, (slots held per resource limit))}, next ticket)``, where an owner is
``(pid, start, pid namespace, serial)`` and a ticket ``(number, owner, (key indexes))``.
"""

from __future__ import annotations

import itertools
import json
import marshal
import math
import re
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Protocol

from .._algorithms import RateState, SemaphoreState
from .._limits import Limit
from .._numbers import MAX_CAPACITY, MAX_WINDOW, MIN_CAPACITY, MIN_WINDOW
from .._scheduler import Items, Scheduler
from .._waiters import Waiter
from . import _process_peers as peers
from ._declaration import declaration, declaration_json, mismatch
from ._process_codec import StateCodec
from ._process_file import StateFile, StateFileError

__all__ = ["LAYOUT", "ProcessScheduler", "Storage", "boot_id", "clock_tag"]

_INF = math.inf
#: The layout of a set's state (a key's record in a keyed table has the same).
LAYOUT: Final = 4
_MARSHAL_VERSION = 2  # no back-references: equal states always give equal bytes
_serials = itertools.count(1)
_NON_FINITE = re.compile(rb"g.{6}[\xf0-\xff][\x7f\xff]", re.DOTALL)
_NUMBER_TYPES: Final = frozenset({int, float})
_TUPLE5 = b"(\x05\x00\x00\x00"  # marshal's header of a 5-tuple (see ProcessScheduler._prefix)

Owner = tuple[int, int, int, int]  # pid, start time, pid namespace, serial in its process
Ticket = tuple[int, Owner, tuple[int, ...]]  # number, owner, indexes of the keys it names


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # pragma: no cover - Linux always has it
        return "unknown"


def clock_tag(clock: Callable[[], float]) -> str:
    """Which clock the shared times are on. ``time.monotonic`` (CLOCK_MONOTONIC) is one clock for
    the whole machine; any other clock is private to the process and object that uses it."""
    if clock is time.monotonic:
        return "monotonic"
    pid, start, ns = peers.my_identity()
    return f"private:{pid}:{start}:{ns}:{id(clock)}:{type(clock).__qualname__}"


def _finite_list(values: Any) -> bool:
    # sum() propagates inf and nan at C speed; a finite list whose sum overflows is checked one
    # by one (the accepted numbers keep sums finite, so that does not happen in practice).
    return math.isfinite(sum(values)) or all(map(math.isfinite, values))


def _finite(shared: Any) -> bool:
    """Whether every number of a state about to be stored is finite (None stands for -inf)."""
    _layout, _meta, counters, states, _tickets, owners, _next = shared
    if not _finite_list([x for x in counters[:4] if x is not None]):
        return False
    if not _finite_list(counters[4]):
        return False
    for value in states:
        if not _finite_value(value):
            return False
    return all(_finite_list(holding) for _address, holding in owners.values())


def _finite_value(value: Any) -> bool:
    if type(value) is tuple or type(value) is list:
        # A flat sequence of numbers (most values) is summed at C speed; one holding None, a
        # sequence or anything else, or whose sum is not a finite float, is checked item by item.
        try:
            if math.isfinite(sum(value)):
                return True
        except (TypeError, OverflowError):
            pass
        return all(map(_finite_value, value))
    return value is None or isinstance(value, int) or math.isfinite(value)


def _is_int(x: Any) -> bool:
    return type(x) is int


def _is_num(x: Any) -> bool:
    return (type(x) is float and math.isfinite(x)) or type(x) is int


def _numbers_ok(state: tuple[Any, ...]) -> bool:
    """A stored limit's numbers are in the ranges a limit accepts (a window of 0: a resource)."""
    capacity, window = state[0], state[1]
    return (
        _is_num(capacity)
        and _is_num(window)
        and MIN_CAPACITY <= capacity <= MAX_CAPACITY
        and (window == 0 or MIN_WINDOW <= window <= MAX_WINDOW)
    )


def _numbers(values: Any) -> bool:
    """Whether ``values`` are all finite ints or floats (one C-speed pass in the usual case)."""
    return set(map(type, values)) <= _NUMBER_TYPES and _finite_list(values)


def _check_shared(shared: Any, keys: int) -> str | None:
    """What is wrong with a decoded state of this layout, or None. Checks the shape and that
    every number is finite; the values of the algorithm states are checked by shape only (each
    is a few numbers or lists of numbers, see ``_process_codec``)."""
    _layout, _meta, counters, states, tickets, owners, next_ticket = shared
    if not (
        type(counters) is tuple
        and len(counters) == 5
        and type(counters[0]) is int
        and type(counters[1]) is int
        and type(counters[2]) is int
        and (counters[3] is None or _is_num(counters[3]))
        and type(counters[4]) is list
        and len(counters[4]) == keys
        and _numbers(counters[4])
    ):
        return "bad counters"
    if type(states) is not list or len(states) != keys:
        return "bad limit states"
    for state in states:
        # _numbers_ok, inline: a comparison is false for nan, so the ranges also refuse inf and nan.
        if not (
            type(state) is tuple
            and len(state) == 3
            and type(state[0]) in _NUMBER_TYPES
            and type(state[1]) in _NUMBER_TYPES
            and MIN_CAPACITY <= state[0] <= MAX_CAPACITY
            and (state[1] == 0 or MIN_WINDOW <= state[1] <= MAX_WINDOW)
            and _finite_value(state[2])
        ):
            return "bad limit states"
    if not isinstance(tickets, list) or not _is_int(next_ticket):
        return "bad queue"
    for ticket in tickets:
        if not (
            isinstance(ticket, tuple)
            and len(ticket) == 3
            and _is_int(ticket[0])
            and isinstance(ticket[1], tuple)
            and len(ticket[1]) == 4
            and all(map(_is_int, ticket[1]))
            and isinstance(ticket[2], tuple)
            and all(_is_int(i) and 0 <= i < keys for i in ticket[2])
        ):
            return "bad ticket"
    if not isinstance(owners, dict):
        return "bad holders"
    for owner, entry in owners.items():
        if not (
            isinstance(owner, tuple)
            and len(owner) == 4
            and all(map(_is_int, owner))
            and isinstance(entry, tuple)
            and len(entry) == 2
            and type(entry[0]) is bytes
            and isinstance(entry[1], tuple)
            and all(map(_is_num, entry[1]))
        ):
            return "bad holder"
    return None


class Storage(Protocol):
    """Where a scheduler's shared state is kept: a :class:`StateFile`, or the record of one key in
    a keyed table (``_process_keyed``). Every method but ``close`` runs under ``lock()``."""

    path: str

    def lock(self) -> None: ...

    def unlock(self) -> None: ...

    def changed(self) -> bool: ...

    def read(self) -> tuple[bytes | None, bool]: ...

    def write(self, data: bytes) -> None: ...

    def forget(self) -> None: ...

    def close(self) -> None: ...


class ProcessScheduler(Scheduler):
    """The core scheduler over state shared through a :class:`StateFile`; it is its own lock."""

    # A head may be held back by another process's waiter (``_admit_head``), whose wake-ups
    # come by datagram: a new head is woken to arm its own timer, the path those were built on.
    timed_wakes = False

    __slots__ = (
        "__weakref__",
        "_base_in_use",
        "_bytes",
        "_codec",
        "_dir",
        "_file",
        "_first",
        "_foreign",
        "_forks",
        "_head",
        "_holding",
        "_index",
        "_keys",
        "_local",
        "_me",
        "_meta",
        "_mine",
        "_name",
        "_next_ticket",
        "_owners",
        "_poke",
        "_refunded",
        "_sems",
        "_watch",
    )

    def __init__(  # noqa: PLR0917 - built in one place, by ProcessBackend.attach
        self,
        directory: peers.Directory,
        filename: str,
        name: str,
        limits: tuple[Limit, ...],
        states: tuple[RateState, ...],
        clock: Callable[[], float],
    ) -> None:
        self._meta = (boot_id(), clock_tag(clock), declaration_json(limits))
        self._setup(directory, name, states, clock)
        self._file: Storage = StateFile(directory.fd, filename, f"{directory.path}/{filename}")
        try:
            self._attach(name, limits)
        except BaseException:
            self._file.close()
            raise
        weakref.finalize(self, self._file.close)

    def _setup(
        self,
        directory: peers.Directory,
        name: str,
        states: tuple[RateState, ...],
        clock: Callable[[], float],
    ) -> None:
        """Everything but the declaration and the storage (a state file here; a keyed table's
        record elsewhere, the table holding the declaration)."""
        super().__init__(states, clock)
        # Every key's tally is part of the shared state, so it exists from the start.
        self.refunded: dict[str, float] = {state.key: 0.0 for state in states}
        self._refunded = self.refunded
        self._keys = tuple(self.refunded)  # the keys, in the order of the states
        # The doors use `with sched.lock:`; here the lock is this object (__enter__/__exit__),
        # which also loads and stores the shared state. Not a threading.Lock, hence the ignore.
        self.lock = self  # type: ignore[assignment]
        self._local = threading.Lock()
        self._name = name
        self._codec = StateCodec(states)
        self._index = {id(state): i for i, state in enumerate(states)}
        self._sems = [(i, s) for i, s in enumerate(states) if isinstance(s, SemaphoreState)]
        pid, start, ns = peers.my_identity()
        self._me: Owner = (pid, start, ns, next(_serials))
        self._forks = peers.forks
        self._bytes = b""
        self._head: tuple[object, bytes] = (None, b"")  # see _prefix
        self._foreign: list[Ticket] = []  # other processes' waiting tickets, in order
        self._mine: dict[Waiter, tuple[int, tuple[int, ...]]] = {}
        self._owners: dict[Owner, tuple[bytes, tuple[float, ...]]] = {}
        self._holding = [0.0 for _ in self._sems]
        self._base_in_use = [0.0 for _ in self._sems]
        self._next_ticket = 1
        self._first: int | None = None
        self._poke = False
        self._watch: frozenset[peers.Peer] = frozenset()
        self._dir = directory

    # -- attaching ---------------------------------------------------------------------------

    def _attach(self, name: str, limits: tuple[Limit, ...]) -> None:
        with self._local:
            self._file.lock()
            try:
                data, _intact = self._file.read()
                fresh = True
                shared = None if data is None else self._decode(data)
                if data is not None and shared is not None:
                    fresh = not self._usable(name, limits, shared)
                    if not fresh:
                        self._load(data, shared)
                if fresh:
                    self._bytes = b""  # write our fresh states
                else:
                    self._reap(self.clock())
                poke = self._store()
            finally:
                self._file.unlock()
        if poke is not None:  # a dead process's waiter was first: tell the next one
            self._dir.send(poke)

    def _usable(self, name: str, limits: tuple[Limit, ...], shared: Any) -> bool:
        """Whether the stored state is this set's. False when it is stale (from a previous boot,
        or on the private clock of a process that is gone): it is then replaced.

        Raises:
            ValueError: it was declared with other limits, is on another clock, or was written
                by another version of the file layout.
        """
        _boot, clock, decl = shared[1]
        if clock != self._meta[1]:
            if clock.startswith("private:"):
                pid, start, ns = (int(x) for x in clock.split(":")[1:4])
                if not self._dir.alive((pid, start, ns)):
                    return False
            raise ValueError(
                f"the shared state {name!r} is on another clock ({clock}) than this LimitSet "
                f"({self._meta[1]}); processes can share only time.monotonic"
            )
        if decl != self._meta[2]:
            message = mismatch(name, json.loads(decl), declaration(limits))
            if message is not None:
                raise ValueError(message)
            # The same limits, spelled otherwise by an older version: keep the stored spelling.
            self._meta = (*self._meta[:2], decl)
        return True

    # -- the lock ----------------------------------------------------------------------------

    def __enter__(self) -> None:
        if self._forks != peers.forks:
            raise RuntimeError(
                "this LimitSet was created before os.fork(); build it (or unpickle it) in "
                "the child process instead"
            )
        self._local.acquire()
        try:
            file = self._file
            file.lock()
            try:
                if file.changed():
                    self._reload()
            except BaseException:
                file.unlock()
                raise
        except BaseException:
            self._local.release()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            try:
                poke = self._store()
            finally:
                self._file.unlock()
            if poke is not None:
                self._dir.send(poke)
        finally:
            self._local.release()

    def _reload(self) -> None:
        data, intact = self._file.read()
        if data is None or not intact:
            # Truncated or overwritten by something else while in use: the file was made an
            # empty state file again; what this process last saw goes back into it.
            warnings.warn(
                f"the shared state {self._name!r} at {self._file.path} was damaged (truncated "
                "or overwritten) while in use; it was written again from this process's last "
                "view of it (changes made since by other processes are lost)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._bytes = b""  # write it back on leaving the lock
            return
        shared = self._decode(data)
        if shared is None or shared[1] != self._meta:
            raise StateFileError(
                f"the shared state {self._name!r} at {self._file.path} was replaced by the state "
                "of another set (other limits, clock or boot) while in use"
            )
        self._load(data, shared)

    def _decode(self, data: bytes) -> Any:
        """The stored state, checked for shape and finite numbers.

        Raises:
            StateFileError: it is not a state of this layout (a ``ValueError``).
        """
        prefix = self._prefix()
        if prefix and data.startswith(prefix):
            # Our layout and declaration, as this process encodes them: only the rest is decoded.
            try:
                rest = marshal.loads(_TUPLE5 + data[len(prefix) :])
            except (EOFError, ValueError, TypeError):
                rest = None
            if isinstance(rest, tuple) and len(rest) == 5:
                return (LAYOUT, self._meta, *rest)
        try:
            shared = marshal.loads(data)
        except (EOFError, ValueError, TypeError):
            shared = None
        if (
            isinstance(shared, tuple)
            and len(shared) >= 2
            and isinstance(shared[1], tuple)
            and len(shared[1]) == 3
            and shared[1][0] != self._meta[0]
        ):
            return None  # from a previous boot: replaced whatever its layout
        if not isinstance(shared, tuple) or len(shared) != 7:
            self._damaged("not a state tuple")
        if shared[0] != LAYOUT:
            raise ValueError(
                f"the shared state {self._name!r} at {self._file.path} was made by another "
                "version of aiolimits; stop the processes using it (or remove the file)"
            )
        meta = shared[1]
        if not (isinstance(meta, tuple) and len(meta) == 3 and all(type(m) is str for m in meta)):
            self._damaged("bad declaration")
        return shared

    def _damaged(self, problem: str) -> None:
        raise StateFileError(
            f"the shared state {self._name!r} at {self._file.path} is damaged or was not "
            f"written by this version of aiolimits ({problem}); stop the processes using it, "
            "then remove it"
        )

    def _load(self, data: bytes, shared: Any) -> None:
        try:
            problem = _check_shared(shared, len(self.states))
        except (TypeError, ValueError, OverflowError):
            problem = "bad numbers"
        if problem is not None:
            self._damaged(problem)
        _layout, _meta, counters, states, tickets, owners, next_ticket = shared
        self.granted, self.timed_out, self.cancelled, paused, refunded = counters
        self.paused_until = -_INF if paused is None else paused
        self._refunded.update(zip(self._keys, refunded, strict=True))
        changed = self._codec.load(states)
        if tickets:
            me = self._me
            self._foreign = [t for t in tickets if t[1] != me]
            self._first = tickets[0][0]
        else:
            self._foreign = tickets
            self._first = None
        self._owners = owners
        if self._sems:
            mine = owners.get(self._me)
            self._holding = list(mine[1]) if mine is not None else [0.0 for _ in self._sems]
            self._base_in_use = [s.in_use for _i, s in self._sems]
        self._next_ticket = next_ticket
        self._bytes = data
        self.forget_forecast()  # another process changed the state the forecast was made from
        for state in changed:  # another process changed a limit (semantics §4)
            self.refuse_above(state)

    def _tickets(self) -> list[Ticket]:
        """All waiting tickets in order; also brings this process's owner entry up to date
        (its slots held, and its wake-up address while it has waiters)."""
        me = self._me
        if self._mine:
            queue = self.queue
            self._mine = {w: t for w, t in self._mine.items() if w in queue}
        if self._mine:
            tickets = self._foreign + [(n, me, keys) for n, keys in self._mine.values()]
            tickets.sort()
        else:
            tickets = self._foreign
        if self._sems:
            holding, base = self._holding, self._base_in_use
            for j, (_i, state) in enumerate(self._sems):
                if state.in_use != base[j]:
                    holding[j] += state.in_use - base[j]
                    base[j] = state.in_use
            if self._mine or any(holding):
                self._dir.keep_alive()
                address = self._dir.wake_address() if self._mine else b""
                self._owners[me] = (address, tuple(holding))
            elif me in self._owners:
                del self._owners[me]
        elif self._mine:
            self._dir.keep_alive()
            self._owners[me] = (self._dir.wake_address(), ())
        elif me in self._owners:
            del self._owners[me]
        return tickets

    def _store(self) -> bytes | None:
        """Write the state back if it changed. Returns the address of a process to wake."""
        me = self._me
        queue = self.queue
        tickets = self._tickets() if self._mine or self._sems or self._owners else self._foreign
        owners = self._owners
        paused = self.paused_until
        counters = (
            self.granted,
            self.timed_out,
            self.cancelled,
            None if paused == -_INF else paused,
            list(self._refunded.values()),  # in the order of the states
        )
        states = self._codec.dump()
        next_ticket = self._next_ticket
        shared = (LAYOUT, self._meta, counters, states, tickets, owners, next_ticket)
        prefix = self._prefix()
        if prefix:
            # The layout and declaration are encoded once (see _prefix); the rest is the body,
            # the only part that can hold a float.
            body = marshal.dumps((counters, states, tickets, owners, next_ticket), _MARSHAL_VERSION)
            data = prefix + body[5:]
        else:
            body = data = marshal.dumps(shared, _MARSHAL_VERSION)
        if queue:
            watch = frozenset(o[:3] for o in owners if o[:3] != me[:3])
            if watch != self._watch:
                self._watch = watch
                peers.listener().rewatch()
        if data == self._bytes:
            self._poke = False
            return None
        try:
            if _NON_FINITE.search(body) is not None:  # see _check_finite
                self._check_finite(body, shared)
            self._bytes = self._write(data, shared)
        except BaseException:
            self._file.forget()  # reload next time: what is on file is the truth
            self._bytes = b""
            raise
        if not tickets:
            self._first = None
            self._poke = False
            return None
        first = tickets[0]
        poke, self._poke = self._poke, False
        if first[1] == me or (first[0] == self._first and not poke):
            self._first = first[0]
            return None
        self._first = first[0]
        return owners[first[1]][0] or None

    def _prefix(self) -> bytes:
        """The encoded state's first bytes, the same in every version of it: ``marshal`` of a
        7-tuple is its type and length, then each item's encoding, so the layout number and
        the declaration (``_meta``) are encoded once per declaration, not at every store. b""
        if this Python's marshal does not work that way (the whole tuple is then encoded)."""
        meta = self._meta
        cached = self._head
        if cached[0] is meta:
            return cached[1]
        prefix = b"(\x07\x00\x00\x00" + marshal.dumps((LAYOUT, meta), _MARSHAL_VERSION)[5:]
        sample: tuple[Any, ...] = (LAYOUT, meta, (1, 2.5, None), [], [], {}, 3)
        whole = marshal.dumps(sample, _MARSHAL_VERSION)
        if whole != prefix + marshal.dumps(sample[2:], _MARSHAL_VERSION)[5:]:
            prefix = b""  # pragma: no cover - marshal format 2 encodes tuples that way
        self._head = (meta, prefix)
        return prefix

    def _write(self, data: bytes, shared: Any) -> bytes:
        """Store ``data`` (``shared``, encoded) as the next version of the state; returns the
        encoded state as it now is (``data``)."""
        self._file.write(data)
        return data

    def _check_finite(self, data: bytes, shared: Any) -> None:
        # Marshal writes a float as b"g" and its 8 IEEE bytes, little-endian; a non-finite one
        # has all exponent bits set, hence a last byte 0x7f or 0xff after one of 0xf0-0xff. No
        # match of that pattern (the caller's search, the usual case) proves every float
        # finite; only a match (which other bytes may also make) is checked number by number.
        if _finite(shared):
            return
        raise ValueError(
            f"refusing to store a non-finite number in the shared state {self._name!r} at "
            f"{self._file.path}: {shared[2:4]!r}"
        )

    # -- crashed peers ---------------------------------------------------------------------

    def _reap(self, now: float) -> bool:
        """Reclaim what dead processes held: slots back, tickets dropped. Under the lock."""
        me = self._me[:3]
        alive = self._dir.alive
        dead = [o for o in self._owners if o[:3] != me and not alive(o[:3])]
        if not dead:
            return False
        for owner in dead:
            address, holding = self._owners.pop(owner)
            self._dir.buried(owner[:3], address)
            for j, (_i, state) in enumerate(self._sems):
                if holding[j]:
                    state.in_use -= holding[j]
                    self._base_in_use[j] -= holding[j]
        gone = set(dead)
        self._foreign = [t for t in self._foreign if t[1] not in gone]
        self._poke = True
        return True

    def _blocked_by_resource(self, items: Items, now: float) -> bool:
        return any(isinstance(s, SemaphoreState) and s.earliest(a, now) == _INF for s, a in items)

    # -- the scheduler, across processes -----------------------------------------------------

    def catch_up(self, now: float) -> None:
        # Also where get_stats() and retry_after() look: reclaim what dead peers held first, so
        # that they answer for the live group (a check of one pidfd per peer).
        if len(self._owners) > (self._me in self._owners) and self._reap(now) and self.queue:
            self._dispatch(now)
        super().catch_up(now)

    def try_take(self, items: Items, now: float) -> list[Any] | None:
        if self._foreign and not (self._reap(now) and not self._foreign):
            return None  # someone in another process queued first: no barging
        receipts = super().try_take(items, now)
        if (
            receipts is None
            and len(self._owners) > (self._me in self._owners)
            and self._blocked_by_resource(items, now)
            and self._reap(now)
        ):
            if self.queue:
                self._dispatch(now)
            receipts = super().try_take(items, now)
        return receipts

    def enqueue(self, waiter: Waiter, now: float) -> bool:
        if not super().enqueue(waiter, now):
            return False
        keys = tuple(self._index[id(state)] for state, _amount in waiter.items)
        self._mine[waiter] = (self._next_ticket, keys)
        self._next_ticket += 1
        if self._foreign and next(iter(self.queue)) is waiter:
            waiter.wake_at = _INF  # another process's waiter is first: wait to be told
        peers.listener().register(self)
        return True

    def _admit_head(self, head: Waiter, now: float) -> tuple[float, float, list[Any] | None]:
        foreign = self._foreign
        if foreign and foreign[0][0] < self._mine[head][0]:
            rate_at, _admit_at = self.admit_time(head.items, now)
            return rate_at, _INF, None
        return super()._admit_head(head, now)

    def head_wake_at(self) -> float:
        queue = self.queue
        if not queue:
            return -_INF
        head = next(iter(queue))
        if self._foreign and self._foreign[0][0] < self._mine[head][0]:
            # Held back by another process's waiter, whose wake time only that process knows:
            # the head's own rate time is a lower bound (not inf, which means "only a release").
            return head.rate_at
        return head.wake_at

    def release(self, items: Items, receipts: list[Any] | None = None) -> None:
        super().release(items, receipts)
        self._poke = True

    def after_refund(self, now: float) -> None:
        super().after_refund(now)
        self._poke = True

    def pause(self, until: float, now: float) -> None:
        super().pause(until, now)
        self._poke = True

    def change_limit(self, state: RateState, capacity: float, window: float, now: float) -> None:
        # Stored with the state on leaving the lock (a local file write); the first waiting
        # process is told, as after a release, and grants what the change admits.
        super().change_limit(state, capacity, window, now)
        self._poke = True

    def abandon(self, waiter: Waiter, now: float) -> None:
        super().abandon(waiter, now)
        self._poke = True

    def waiting_count(self) -> int:
        return len(self.queue) + len(self._foreign)

    def waiting_per_key(self) -> dict[str, int]:
        counts = super().waiting_per_key()
        states = self.states
        for _n, _owner, keys in self._foreign:
            for i in keys:
                counts[states[i].key] += 1
        return counts

    # -- the listener's side ---------------------------------------------------------------

    def has_waiters(self) -> bool:
        return bool(self.queue)

    def watched_peers(self) -> frozenset[peers.Peer]:
        return self._watch

    def poked(self) -> None:
        """On the listener thread: the state changed, or a peer died; grant what we can."""
        with self:
            now = self.clock()
            self._reap(now)
            if self.queue:
                self._dispatch(now)

    def __repr__(self) -> str:
        return f"<ProcessScheduler {self._name!r} at {self._file.path}>"
