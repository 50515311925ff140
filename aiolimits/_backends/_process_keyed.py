"""KeyedLimitSet on the process backend: every key's state in one shared table file.

``KeyedLimitSet(limits, backend=ProcessBackend(...), name=...)`` in every worker attaches them all
to ``<directory>/<name>.keyed``: a header, then a hash table of fixed-size *records*, one per live
key. A key's record holds what a plain set's state file holds (its algorithm states, counters,
FIFO tickets of waiters in any process, and the slots each process holds: see
``_process_scheduler``), so a key's proxy in this process is a :class:`ProcessScheduler` whose
storage is that record instead of a file. Every algorithm, refunds, pause, FIFO across processes
and the reclaiming of a dead holder's slots work per key exactly as for a plain set.

*The table.* Records live in *shards* of :data:`SLOTS` consecutive slots; a key's shard and its
home slot come from a keyed hash (BLAKE2b, 128 bits, with a random secret stored in the header)
of the key's UTF-8 bytes: the key itself is never stored, so a huge key, or one with ``/`` or NUL,
costs only its hashing, and clients who do not know the secret cannot aim many keys at one shard
(two keys with one hash would share their limits: at 128 bits, never in practice).
A key lives at the first slot from its home (linear probing, wrapping within the shard); a
removed record closes the gap by shifting later records back (no tombstones). Each shard has
its own lock: an open-file-description byte-range lock (``F_OFD_SETLKW``) on a byte of its own,
which the kernel drops when the process dies, plus a thread lock in this process (such locks do
not exclude threads sharing one open file). So keys in different shards never wait for each other.

*Records.* ``flags`` (live, used since the sweep looked, data in an overflow file), the data's
length and crc, the key's hash and a version number, then the data (``marshal``, the layout of
a plain set's state with no declaration) if it fits. A record that outgrows its slot keeps its
data in a state file of its own, ``<name>.keyed.<hash>.ov`` (a :class:`StateFile`: two copies,
crc-checked); its record then says so, with the data's length and crc. A record is written with one
``pwrite`` within one page, so a ``kill -9`` never tears it; a record that fails its crc is taken
for a fresh key (with a warning), since erring on the side of admitting is what a forgotten key
does anyway.

*Keys come and go.* A key is written to the table only when its state is not fresh; an update
that leaves it fresh (every bucket full, every window empty, no slot held, no waiter, no pause)
removes its record. A key created later first looks at up to three records from its shard's
CLOCK hand: a fresh one is removed, one used since last looked at loses its flag, an unused one
still recovering stops the look. At ``max_keys`` live keys (the counts of all shards), it then
removes the first record in its shard not used since last looked at that has no waiter and no
slot held: that client starts again from full limits (semantics §8). The bound is soft, as in
memory: keys holding slots or waiters are never removed.

*Limits that change* (``KeyedLimitSet.change_limit``, semantics §4). A change is written once,
in the header page: each limit's numbers now, a generation (the count of changes) and the last
:data:`HISTORY` changes with their times, crc-checked, written holding every shard's lock. A
record carries the generation its states follow; at a key's next decision (any process) the
changes made since are applied to its state, each at its own time (the record was written before
it), or, for a record older than every change kept, the numbers now in one step at the last
change's time. A key with no record starts with the numbers now. Processes with waiters are told.

The file is read and written with ``pread``/``pwrite`` only (never mapped), created private
(0600, ``O_NOFOLLOW``, in the checked directory) and complete under a temporary name; the pages
of a slot are reserved with ``posix_fallocate`` before its first record is written, so a full
filesystem is a clear ``OSError`` at that moment, never a crash. The table is sparse: it takes
memory only for the pages its records touch.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import json
import marshal
import math
import os
import secrets
import struct
import sys
import threading
import warnings
import weakref
import zlib
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from .._algorithms import RateState, new_state
from .._limits import Limit
from .._scheduler import Items
from . import _process_peers as peers
from ._base import KeyProxy
from ._declaration import declaration, declaration_json, mismatch
from ._process_codec import StateCodec
from ._process_file import StateFile, StateFileError, open_private, reserve
from ._process_scheduler import LAYOUT, ProcessScheduler, _numbers_ok, boot_id, clock_tag

__all__ = ["KeyedTable", "ProcessKeys"]

MAGIC: Final = b"AIOLIMKY"
FORMAT: Final = 1
HEADER: Final = 4096
#: Slots per shard: a shard is the unit of locking and of the CLOCK order.
SLOTS: Final = 256
_PAGE: Final = 4096
_MARSHAL_VERSION: Final = 2
_SWEEP: Final = 3
_LOCKS_AT: Final = 1 << 40  # the byte locked for shard s is _LOCKS_AT + s (beyond any data)
#: Where the header page keeps the limits' numbers now and the changes made (``change_limit``).
_CHANGES_AT: Final = 512
_CHANGES_ROOM: Final = HEADER - _CHANGES_AT
#: The changes kept: a key last written before the oldest of them catches up in one step.
HISTORY: Final = 32

# magic, format, header size, file id, secret, shards, record size, max_keys, meta length
_HEAD = struct.Struct("<8sIIQ16sIIQI")
_CRC = struct.Struct("<I")
_COUNT = struct.Struct("<II")  # live records, CLOCK hand: one per shard
# flags, length, crc of the data (and of length, version, hash), key hash, version
_REC = struct.Struct("<B3xII16sQ4x")
# A record's version: its life (random, fixed while the record exists) over its write count. A
# count that overflows moves to another life: what acquisitions took before is then worth
# nothing (refunds denied: never more admitted).
_COUNT_BITS: Final = 24
_LIFE_BITS: Final = 39
_REC_BYTES: Final = 40
_LIVE, _USED, _OVERFLOW = 1, 2, 4
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on Linux (64-bit off_t)
_GEN = struct.Struct("<QI")  # generation, length of the marshalled changes (crc follows them)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def record_size(fresh: int) -> int:
    """The slot size for a set whose fresh key encodes to ``fresh`` bytes: room for it plus a
    holder and a waiter or two, a power of two."""
    size = 256
    while size < _REC_BYTES + fresh + 96:
        size *= 2
    return size


class _Geometry:
    """Where everything is in a table file."""

    __slots__ = ("counts_at", "max_keys", "meta_len", "record", "secret", "shards", "table_at")

    def __init__(self, shards: int, record: int, max_keys: int, meta_len: int, secret: bytes):
        self.shards = shards
        self.record = record
        self.max_keys = max_keys
        self.meta_len = meta_len
        self.secret = secret
        self.counts_at = HEADER + _round_up(meta_len, _PAGE)
        self.table_at = self.counts_at + _round_up(shards * _COUNT.size, _PAGE)

    @classmethod
    def for_keys(cls, max_keys: int, record: int, meta_len: int) -> _Geometry:
        # Room for 1.5x max_keys: at the bound a shard is 2/3 full on average.
        shards = max(1, -(-(max_keys * 3 // 2 + 1) // SLOTS))
        return cls(shards, record, max_keys, meta_len, secrets.token_bytes(16))

    def head(self, file_id: int) -> bytes:
        head = _HEAD.pack(
            MAGIC,
            FORMAT,
            HEADER,
            file_id,
            self.secret,
            self.shards,
            self.record,
            self.max_keys,
            self.meta_len,
        )
        return head + _CRC.pack(zlib.crc32(head))


class _Flock:
    """The OFD byte-range locks of one open file."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def lock(self, at: int) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, 0, at, 1, 0))

    def unlock(self, at: int) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, 0, at, 1, 0))


class KeyedTable:
    """One open table file, shared by every keyed set of that name in this process."""

    __slots__ = (
        "__weakref__",
        "_changes",
        "_changes_lock",
        "_clock",
        "_flock",
        "_forks",
        "_limits",
        "_scratch",
        "_scratch_codec",
        "_scratch_lock",
        "_stripes",
        "dir",
        "fd",
        "filename",
        "fresh",
        "geo",
        "meta",
        "path",
    )

    def __init__(
        self,
        directory: peers.Directory,
        filename: str,
        name: str,
        limits: tuple[Limit, ...],
        *,
        clock: Callable[[], float],
        max_keys: int,
    ) -> None:
        self.dir = directory
        self.filename = filename
        self.path = f"{directory.path}/{filename}"
        self._forks = peers.forks
        self.meta = (boot_id(), clock_tag(clock), declaration_json(limits))
        self._limits = limits
        self._clock = clock
        now = clock()
        self._scratch = tuple(new_state(limit, now) for limit in limits)
        self._scratch_codec = StateCodec(self._scratch)
        self._scratch_lock = threading.Lock()
        #: A fresh key in stored form (its states as made at attach: full, empty, unused).
        self.fresh = marshal.dumps(self._fresh_shared(), _MARSHAL_VERSION)
        declared = tuple((state.capacity, state.window) for state in self._scratch)
        #: The limits' numbers now and the changes kept, as last read from the header page.
        self._changes = Changes(0, declared, (), self.fresh)
        self._changes_lock = threading.Lock()
        fresh = len(self.fresh)
        self.fd = self._open(record_size(fresh), max_keys)
        self._flock = _Flock(self.fd)
        try:
            self.geo = self._attach(name, limits, record_size(fresh), max_keys)
        except BaseException:
            os.close(self.fd)
            raise
        weakref.finalize(self, os.close, self.fd)
        self._stripes = [threading.Lock() for _ in range(min(self.geo.shards, 1024))]

    def _fresh_shared(self) -> tuple[Any, ...]:
        n = len(self._scratch)
        counters = (0, 0, 0, None, [0.0] * n)
        return (LAYOUT, 0, counters, self._scratch_codec.dump(), [], {}, 1)

    # -- limits that change (semantics §4) ---------------------------------------------------

    def generation(self) -> int:
        """The number of changes made to the set's limits (under a shard's lock: exact)."""
        data = os.pread(self.fd, _GEN.size, _CHANGES_AT)
        return _GEN.unpack(data)[0] if len(data) == _GEN.size else 0

    def changes(self, generation: int | None = None) -> Changes:
        """The limits' numbers now and the changes kept, from the header page (``generation``:
        the generation just read, if it was). Under a shard's lock it is exact (a change is
        written holding every shard's lock); without one, a change being written is seen whole
        or not at all (its crc), and then the last known."""
        with self._changes_lock:
            known = self._changes
        if generation is None:
            generation = self.generation()
        if generation == known.generation:
            return known
        block = os.pread(self.fd, _CHANGES_ROOM, _CHANGES_AT)
        read = _read_changes(block, len(self._scratch))
        if read is None or read[0] <= known.generation:
            return known
        generation, numbers, history = read
        changes = Changes(generation, numbers, history, self._fresh_at(generation, numbers))
        with self._changes_lock:
            if generation > self._changes.generation:
                self._changes = changes
            return self._changes

    def exact_changes(self) -> Changes:
        """Under a shard's lock: :meth:`changes`, checked.

        Raises:
            StateFileError: the header page's changes are damaged.
        """
        generation = self.generation()
        changes = self.changes(generation)
        if changes.generation != generation:
            raise StateFileError(
                f"{self.path} is damaged (the changes of its limits in its header): stop the "
                "processes using it, then remove it"
            )
        return changes

    def known_changes(self) -> Changes:
        """The changes as last read or made in this process (no I/O)."""
        with self._changes_lock:
            return self._changes

    def _fresh_at(self, generation: int, numbers: Any) -> bytes:
        """A fresh key in stored form with the limits' numbers ``numbers``."""
        now = self._clock()
        states = tuple(new_state(limit, now) for limit in self._limits)
        for state, (capacity, window) in zip(states, numbers, strict=True):
            if (state.capacity, state.window) != (capacity, window):
                state.change(capacity, window, now)  # a fresh state stays fresh
        counters = (0, 0, 0, None, [0.0] * len(states))
        shared: tuple[Any, ...] = (
            LAYOUT,
            generation,
            counters,
            StateCodec(states).dump(),
            [],
            {},
            1,
        )
        return marshal.dumps(shared, _MARSHAL_VERSION)

    def change(self, index: int, capacity: float | None, window: float | None) -> None:
        """Record that limit ``index`` has ``capacity`` and ``window`` (None: as it is now) from
        now on, for every key. Every shard is locked meanwhile (and every stripe, for this
        process's threads): so a record last written under older numbers was written before the
        change's time, and each key catches up at its next decision
        (:class:`KeyedProcessScheduler`). O(shards).

        Raises:
            ValueError: the set has too many limits for the header page (nothing changed).
        """
        stripes = self._stripes
        for stripe in stripes:
            stripe.acquire()
        locked = 0
        try:
            for shard in range(self.geo.shards):
                self.lock(shard)
                locked += 1
            known = self.exact_changes()
            numbers = list(known.numbers)
            now = numbers[index]
            numbers[index] = (
                now[0] if capacity is None else capacity,
                now[1] if window is None else window,
            )
            generation = known.generation + 1
            entry = (generation, self._clock(), index, *numbers[index])
            history = (*known.history, entry)[-HISTORY:]
            body = marshal.dumps((tuple(numbers), history), _MARSHAL_VERSION)
            head = _GEN.pack(generation, len(body)) + body
            block = head + _CRC.pack(zlib.crc32(head))
            if len(block) > _CHANGES_ROOM:
                raise ValueError(
                    f"change_limit: the limits of {self.path} do not fit its header page "
                    f"({len(self._scratch)} limits)"
                )
            os.pwrite(self.fd, block, _CHANGES_AT)  # one write within one page
            fresh = self._fresh_at(generation, numbers)
            with self._changes_lock:
                self._changes = Changes(generation, tuple(numbers), history, fresh)
        finally:
            for shard in reversed(range(locked)):
                self.unlock(shard)
            for stripe in reversed(stripes):
                stripe.release()
        # Every process with waiters here is told: its waiting keys catch up on the poke, and a
        # grown limit admits them at once (a process with no waiter of this set ignores it).
        for name in os.listdir(self.dir.fd):
            if name.startswith(".wake-"):
                self.dir.send(name.encode())

    # -- the file ----------------------------------------------------------------------------

    def _open(self, record: int, max_keys: int) -> int:
        def initialise(fd: int) -> None:
            self._initialise(fd, record, max_keys)

        return open_private(self.dir.fd, self.filename, self.path, initialise)

    def _initialise(self, fd: int, record: int, max_keys: int) -> _Geometry:
        meta = marshal.dumps(self.meta, _MARSHAL_VERSION)
        geo = _Geometry.for_keys(max_keys, record, len(meta))
        os.ftruncate(fd, 0)
        reserve(fd, 0, geo.table_at, self.path)
        os.pwrite(fd, meta, HEADER)
        os.pwrite(fd, geo.head(secrets.randbits(64)), 0)
        return geo

    def _attach(
        self, name: str, limits: tuple[Limit, ...], record: int, max_keys: int
    ) -> _Geometry:
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # attaching processes one at a time
        try:
            head = os.pread(self.fd, _HEAD.size + _CRC.size, 0)
            if len(head) < _HEAD.size + _CRC.size or head[:8] != MAGIC:
                if head.strip(b"\0"):
                    raise StateFileError(
                        f"{self.path} exists and is not an aiolimits keyed state file (or is "
                        "damaged): remove it if nothing uses it"
                    )
                return self._initialise(self.fd, record, max_keys)
            _magic, fmt, size, _file_id, secret, shards, rec, keys, meta_len = _HEAD.unpack_from(
                head
            )
            if fmt != FORMAT or size != HEADER:
                raise StateFileError(
                    f"{self.path} has keyed state file format {fmt}; this aiolimits reads format "
                    f"{FORMAT}: stop the processes using it, then remove it"
                )
            (crc,) = _CRC.unpack_from(head, _HEAD.size)
            if crc != zlib.crc32(head[: _HEAD.size]) or not (
                0 < shards < 1 << 24 and rec in (256, 512, 1024, 2048, 4096) and meta_len < 1 << 24
            ):
                raise StateFileError(
                    f"{self.path} is damaged (bad header): stop the processes using it, then "
                    "remove it"
                )
            stored = self._read_meta(meta_len)
            if stored is None or stored[0] != self.meta[0]:
                return self._initialise(self.fd, record, max_keys)  # from a previous boot
            if stored[1] != self.meta[1]:
                if stored[1].startswith("private:"):
                    pid, start, ns = (int(x) for x in stored[1].split(":")[1:4])
                    if not self.dir.alive((pid, start, ns)):
                        return self._initialise(self.fd, record, max_keys)
                raise ValueError(
                    f"the shared state {name!r} is on another clock ({stored[1]}) than this "
                    f"KeyedLimitSet ({self.meta[1]}); processes can share only time.monotonic"
                )
            if stored[2] != self.meta[2]:
                message = mismatch(name, json.loads(stored[2]), declaration(limits))
                if message is not None:
                    raise ValueError(message)
            if keys != max_keys:
                raise ValueError(
                    f"the shared state {name!r} was made with max_keys={keys}, not {max_keys}: "
                    "every process must give the same max_keys (it sizes the shared table)"
                )
            return _Geometry(shards, rec, keys, meta_len, secret)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _read_meta(self, length: int) -> tuple[str, str, str] | None:
        data = os.pread(self.fd, length, HEADER)
        try:
            meta = marshal.loads(data)
        except (EOFError, ValueError, TypeError):
            return None
        if isinstance(meta, tuple) and len(meta) == 3 and all(type(m) is str for m in meta):
            return meta
        return None

    def check_fork(self) -> None:
        if self._forks != peers.forks:
            raise RuntimeError(
                "this KeyedLimitSet was created before os.fork(); build it (or unpickle it) in "
                "the child process instead"
            )

    # -- keys --------------------------------------------------------------------------------

    def tag(self, key: str) -> bytes:
        """The 128-bit keyed hash of ``key`` (any str: lone surrogates are hashed as they are)."""
        raw = key.encode("utf-8", "surrogatepass")
        return hashlib.blake2b(raw, digest_size=16, key=self.geo.secret).digest()

    def place(self, tag: bytes) -> tuple[int, int]:
        """The shard and home slot of a key's hash."""
        value = int.from_bytes(tag[:8], "little")
        return (value >> 8) % self.geo.shards, value & (SLOTS - 1)

    def stripe(self, shard: int) -> threading.Lock:
        return self._stripes[shard % len(self._stripes)]

    def lock(self, shard: int) -> None:
        self._flock.lock(_LOCKS_AT + shard)

    def unlock(self, shard: int) -> None:
        self._flock.unlock(_LOCKS_AT + shard)

    def _slot_at(self, shard: int, slot: int) -> int:
        geo = self.geo
        at: int = geo.table_at + (shard * SLOTS + slot) * geo.record
        return at

    def read_slots(self, shard: int, start: int, count: int) -> bytes:
        """``count`` records from ``start`` (not past the shard's end); zeros where the file has
        none (a hole, or past its end)."""
        size = self.geo.record
        data = os.pread(self.fd, count * size, self._slot_at(shard, start))
        return data + bytes(count * size - len(data)) if len(data) < count * size else data

    def find(self, shard: int, home: int, tag: bytes) -> tuple[int, bytes]:
        """Under the shard's lock: ``(slot, record)`` of ``tag``, or ``(first free slot, b"")``.
        The slot is -1 when the shard is full and holds no such record."""
        size = self.geo.record
        slot = home
        seen = 0
        while seen < SLOTS:
            count = min(8, SLOTS - slot, SLOTS - seen)
            window = self.read_slots(shard, slot, count)
            for i in range(count):
                at = i * size
                flags = window[at]
                if not flags & _LIVE:
                    return slot + i, b""
                if window[at + 12 : at + 28] == tag:
                    return slot + i, window[at : at + size]
            seen += count
            slot = (slot + count) % SLOTS
        return -1, b""

    def write_record(self, shard: int, slot: int, record: bytes) -> None:
        os.pwrite(self.fd, record, self._slot_at(shard, slot))

    def set_flags(self, shard: int, slot: int, flags: int) -> None:
        os.pwrite(self.fd, bytes((flags,)), self._slot_at(shard, slot))

    def _count(self, shard: int) -> tuple[int, int]:
        at = self.geo.counts_at + shard * _COUNT.size
        data = os.pread(self.fd, _COUNT.size, at)
        if len(data) < _COUNT.size:
            return 0, 0
        count, hand = _COUNT.unpack(data)
        return min(count, SLOTS), hand % SLOTS

    def _set_count(self, shard: int, count: int, hand: int) -> None:
        at = self.geo.counts_at + shard * _COUNT.size
        os.pwrite(self.fd, _COUNT.pack(count, hand % SLOTS), at)

    def live_keys(self) -> int:
        """The live records of every shard (read without their locks: an estimate while others
        write, exact otherwise)."""
        geo = self.geo
        data = os.pread(self.fd, geo.shards * _COUNT.size, geo.counts_at)
        counts = array.array("I")
        if counts.itemsize == 4 and sys.byteorder == "little":  # Linux on x86 and arm: at C speed
            counts.frombytes(data[: len(data) // 8 * 8])
            return sum(counts[::2])
        return sum(count for count, _hand in _COUNT.iter_unpack(data[: len(data) // 8 * 8]))

    def insert(self, shard: int, home: int, tag: bytes, now: float) -> int:
        """Under the shard's lock: make room for a new key (the sweep; at ``max_keys``, one
        unused idle key removed) and return the free slot it goes to. Its pages are reserved.

        Raises:
            RuntimeError: the shard is full of keys that hold slots or have waiters.
            OSError: no space left for the slot's page.
        """
        self._sweep(shard, now)
        if self.live_keys() >= self.geo.max_keys:
            self._evict(shard, now, force=False)
        slot, _record = self.find(shard, home, tag)
        if slot < 0:
            self._evict(shard, now, force=True)
            slot, _record = self.find(shard, home, tag)
            if slot < 0:
                raise RuntimeError(
                    f"the keyed shared state {self.path} has no room for a new key: every key "
                    "sharing its part of the table holds resource slots or has waiters (raise "
                    "max_keys)"
                )
        at = self._slot_at(shard, slot)
        start = at // _PAGE * _PAGE
        reserve(self.fd, start, _round_up(at + self.geo.record, _PAGE) - start, self.path)
        count, hand = self._count(shard)
        self._set_count(shard, count + 1, hand)
        return slot

    def remove(self, shard: int, slot: int) -> None:
        """Under the shard's lock: remove the record at ``slot``, shifting back the records after
        it that it displaced from their home (so every key stays reachable from its home)."""
        size = self.geo.record
        hole = slot
        j = slot
        for _ in range(SLOTS - 1):
            j = (j + 1) % SLOTS
            record = self.read_slots(shard, j, 1)
            if not record[0] & _LIVE:
                break
            home = self.place(record[12:28])[1]
            # Move it back unless its home lies cyclically in (hole, j].
            if (j - home) % SLOTS >= (j - hole) % SLOTS:
                self.write_record(shard, hole, record)
                hole = j
        self.write_record(shard, hole, bytes(size))
        count, hand = self._count(shard)
        self._set_count(shard, max(0, count - 1), hand)

    def _judge(self, record: bytes, now: float) -> tuple[bool, bool]:
        """``(fresh, pinned)`` of a stored key: fresh, it can go with no decision changed;
        pinned (waiters, or slots held by a live process), it must stay."""
        data = self.record_data(record)
        if data is None:
            return False, False  # damaged: forgotten at the bound, like an idle key
        shared = _decode(data)
        if shared is None:
            return False, False
        _layout, _meta, counters, states, tickets, owners, _next = shared
        if tickets:
            return False, True
        holders = [o for o, entry in owners.items() if any(entry[1])]
        if any(self.dir.alive(owner[:3]) for owner in holders):
            return False, True
        if holders:
            return False, False  # its holders died: reclaimed by dropping it
        paused = counters[3]
        with self._scratch_lock:  # shards of other stripes judge at the same time
            try:
                self._scratch_codec.load(states)
            except (TypeError, ValueError, IndexError):
                return False, False
            fresh = all(s.is_fresh(now) for s in self._scratch)
        return fresh and (paused is None or paused <= now), False

    def _sweep(self, shard: int, now: float) -> None:
        count, hand = self._count(shard)
        for _ in range(_SWEEP):
            slot, record = self._next_live(shard, hand)
            if slot < 0:
                return
            fresh, pinned = self._judge(record, now)
            if fresh:
                self._drop(shard, slot, record)
                hand = slot  # the next record was shifted here, or the hand moves on
            elif record[0] & _USED or pinned:
                self.set_flags(shard, slot, record[0] & ~_USED)
                hand = slot + 1
            else:
                hand = slot
                break
        count, _hand = self._count(shard)
        self._set_count(shard, count, hand)

    def _evict(self, shard: int, now: float, *, force: bool) -> None:
        """Remove the first record from the hand not used since last looked at (any, when
        ``force``) that is not pinned."""
        count, hand = self._count(shard)
        for _ in range(2 * SLOTS):
            slot, record = self._next_live(shard, hand)
            if slot < 0:
                return
            _fresh, pinned = self._judge(record, now)
            if pinned or (record[0] & _USED and not force):
                self.set_flags(shard, slot, record[0] & ~_USED)
                hand = slot + 1
                continue
            self._drop(shard, slot, record)
            count, _hand = self._count(shard)
            self._set_count(shard, count, slot)
            return

    def _next_live(self, shard: int, hand: int) -> tuple[int, bytes]:
        """The first live record at or after ``hand`` (wrapping), read 32 slots at a time."""
        size = self.geo.record
        slot = hand % SLOTS
        seen = 0
        while seen < SLOTS:
            count = min(32, SLOTS - slot, SLOTS - seen)
            window = self.read_slots(shard, slot, count)
            for i in range(count):
                if window[i * size] & _LIVE:
                    return slot + i, window[i * size : (i + 1) * size]
            seen += count
            slot = (slot + count) % SLOTS
        return -1, b""

    def _drop(self, shard: int, slot: int, record: bytes) -> None:
        self.remove(shard, slot)
        if record[0] & _OVERFLOW:
            self.unlink_overflow(record[12:28])

    # -- record data -------------------------------------------------------------------------

    def overflow_name(self, tag: bytes) -> str:
        return f"{self.filename}.{tag.hex()}.ov"

    def unlink_overflow(self, tag: bytes) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.overflow_name(tag), dir_fd=self.dir.fd)

    def _overflow(self, tag: bytes) -> StateFile:
        return StateFile(self.dir.fd, self.overflow_name(tag), f"{self.path} (overflow)")

    def record_data(self, record: bytes) -> bytes | None:
        """The data of a live record, or None when it is damaged."""
        flags, length, crc, tag, version = _REC.unpack_from(record)
        header = zlib.crc32(_REC.pack(flags & _OVERFLOW, length, 0, tag, version))
        if flags & _OVERFLOW:
            # Opened anew each time: the file may have been replaced since (the record went
            # inline, its file removed, then overflowed again).
            try:
                file = self._overflow(tag)
            except (OSError, ValueError):
                return None
            try:
                data, _intact = file.read()
            except (OSError, ValueError):
                data = None
            finally:
                file.close()
        elif length <= len(record) - _REC_BYTES:
            data = record[_REC_BYTES : _REC_BYTES + length]
        else:
            return None
        if data is None or len(data) != length or zlib.crc32(data, header) != crc:
            return None
        return data

    def pack(self, tag: bytes, data: bytes, version: int) -> bytes:
        """A live, used record of ``data``: inline if it fits, else written to the key's
        overflow file first."""
        flags = 0
        if len(data) > self.geo.record - _REC_BYTES:
            flags = _OVERFLOW
            file = self._overflow(tag)
            try:
                file.read()  # brings its slots up to date before writing the next copy
                file.write(data)
            finally:
                file.close()
        crc = zlib.crc32(data, zlib.crc32(_REC.pack(flags, len(data), 0, tag, version)))
        record = _REC.pack(_LIVE | _USED | flags, len(data), crc, tag, version)
        if not flags:
            record += data
        return record + bytes(self.geo.record - len(record))  # as find() reads it back


class Changes(NamedTuple):
    """The changes of a keyed set's limits, as kept in its table's header page."""

    generation: int
    #: ``(capacity, window)`` of each limit now.
    numbers: tuple[tuple[float, float], ...]
    #: The last :data:`HISTORY` changes: ``(generation, time, index, capacity, window)``.
    history: tuple[tuple[int, float, int, float, float], ...]
    #: A fresh key in stored form, with these numbers.
    fresh: bytes


def _read_changes(block: bytes, limits: int) -> tuple[int, Any, Any] | None:
    """``(generation, numbers, history)`` from the header page's block, or None when it is torn
    or damaged."""
    if len(block) < _GEN.size:
        return None
    generation, length = _GEN.unpack_from(block)
    end = _GEN.size + length
    if end + _CRC.size > len(block):
        return None
    (crc,) = _CRC.unpack_from(block, end)
    if crc != zlib.crc32(block[:end]):
        return None
    try:
        numbers, history = marshal.loads(block[_GEN.size : end])
    except (EOFError, ValueError, TypeError):
        return None
    if not (
        isinstance(numbers, tuple)
        and len(numbers) == limits
        and all(isinstance(n, tuple) and len(n) == 2 and _numbers_ok(n) for n in numbers)
        and isinstance(history, tuple)
        and all(
            isinstance(h, tuple)
            and len(h) == 5
            and type(h[0]) is int
            and type(h[2]) is int
            and 0 <= h[2] < limits
            and type(h[1]) in {float, int}
            and math.isfinite(h[1])
            and _numbers_ok(h[3:])
            for h in history
        )
    ):
        return None
    return generation, numbers, history


def _decode(data: bytes) -> Any:
    try:
        shared = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return None
    if isinstance(shared, tuple) and len(shared) == 7 and shared[0] == LAYOUT:
        return shared
    return None


class _KeyRecord:
    """The storage of one key's proxy: its record in the table (see ``Storage``)."""

    __slots__ = ("_found", "_seen", "_slot", "clock", "home", "path", "shard", "table", "tag")

    def __init__(self, table: KeyedTable, key: str, clock: Callable[[], float]) -> None:
        self.table = table
        self.clock = clock
        self.tag = table.tag(key)
        self.shard, self.home = table.place(self.tag)
        shown = key if len(key) <= 40 else key[:40] + "..."
        self.path = f"{table.path} (key {shown!r})"
        self._seen = b""  # the record as last read or written (b"": none)
        self._found = b""  # the record found under the current lock
        self._slot = -1

    def lock(self) -> None:
        self.table.lock(self.shard)

    def unlock(self) -> None:
        self.table.unlock(self.shard)

    def changed(self) -> bool:
        self._slot, self._found = self.table.find(self.shard, self.home, self.tag)
        return self._found != self._seen

    def read(self) -> tuple[bytes | None, bool]:
        """``(data, intact)``: None for a key not stored (fresh); not intact when its record was
        damaged (it is then taken for a fresh key)."""
        found = self._seen = self._found
        if not found:
            return None, True
        data = self.table.record_data(found)
        return data, data is not None

    def write(self, data: bytes) -> None:
        table = self.table
        found = self._found
        # A new record starts a new life of the key: a random incarnation in the version's upper
        # bits (see ``incarnation``), its writes counted in the lower ones.
        version = (
            _REC.unpack_from(found)[4] + 1
            if found
            else (secrets.randbits(_LIFE_BITS) | 1) << _COUNT_BITS | 1
        )
        record = table.pack(self.tag, data, version)
        if not found:
            self._slot = table.insert(self.shard, self.home, self.tag, self.clock())
        elif found[0] & _OVERFLOW and not record[0] & _OVERFLOW:
            table.unlink_overflow(self.tag)
        table.write_record(self.shard, self._slot, record)
        self._found = self._seen = record

    def remove(self) -> None:
        """Remove the key's record (it is fresh)."""
        found = self._found
        if found:
            self.table.remove(self.shard, self._slot)
            if found[0] & _OVERFLOW:
                self.table.unlink_overflow(self.tag)
        self._found = self._seen = b""

    def stored(self) -> bool:
        """Whether the key has a record (as found under the current lock)."""
        return bool(self._found)

    def incarnation(self) -> int:
        """Which life of the key the record last read or written is (0: none, a fresh key).
        A key removed once fresh and made again is another life: what an acquisition took from
        an earlier one is worth nothing in it (semantics §3, as for a dropped key in memory)."""
        seen = self._seen
        return _REC.unpack_from(seen)[4] >> _COUNT_BITS if len(seen) >= _REC_BYTES else 0

    def forget(self) -> None:
        self._seen = b"\0"  # never equal to a record found: the next lock reloads

    def close(self) -> None:
        pass


class _Lived:
    """A receipt and the life of the key it was taken in (see ``KeyedProcessScheduler``)."""

    __slots__ = ("life", "receipt")

    def __init__(self, life: int, receipt: Any) -> None:
        self.life = life
        self.receipt = receipt


class KeyedProcessScheduler(ProcessScheduler, KeyProxy):
    """The proxy of one key: a process scheduler over the key's record in the table.

    Its ``_meta`` is the generation of the set's limits (``KeyedTable.changes``) its states
    follow, stored in the key's record: a key catches up with the changes made since at its
    next decision, in any process (:meth:`_catch_up`)."""

    __slots__ = ("_generation", "_incarnation", "_life", "_record")

    def __init__(
        self,
        table: KeyedTable,
        name: str,
        key: str,
        states: tuple[RateState, ...],
        *,
        clock: Callable[[], float],
    ) -> None:
        table.check_fork()
        self._setup(table.dir, name, states, clock)
        # The generation ``states`` follow, if they have the numbers last known (else the first
        # lock loads the key).
        known = table.known_changes()
        numbers = tuple((state.capacity, state.window) for state in states)
        self._meta = known.generation if numbers == known.numbers else -1  # type: ignore[assignment]
        self._generation = known.generation  # the table's, as last read under the lock
        self._record = _KeyRecord(table, key, clock)
        self._file = self._record
        self._local = table.stripe(self._record.shard)
        # The life of the key the states hold (the record's incarnation, 0 for none), and a
        # count of the lives this proxy saw: receipts are stamped with it (``_Lived``).
        self._incarnation = 0
        self._life = 0

    def __enter__(self) -> None:
        super().__enter__()
        try:
            self._catch_up()
        except BaseException:
            self._record.forget()  # what is in memory may be half changed: reload next time
            self._bytes = b""
            self._record.unlock()
            self._local.release()
            raise

    def _load_fresh(self) -> bytes:
        """Load a fresh key with the limits' numbers now; returns it in stored form."""
        changes = self._record.table.changes(self._generation)
        self._load(b"", marshal.loads(changes.fresh))
        self._meta = changes.generation  # type: ignore[assignment]
        return changes.fresh

    def _catch_up(self) -> None:
        """Under the lock: apply the changes of the set's limits made since the key's record was
        last written (semantics §4), each at its own time: the record was written before it,
        as a change is made holding every shard's lock. A record older than every change kept
        (:data:`HISTORY`) takes the numbers now in one step, at the last change's time."""
        table = self._record.table
        since: Any = self._meta
        generation = self._generation = table.generation()
        if generation == since:
            return
        changes = table.exact_changes()
        if not self._record.stored():  # a fresh key: made with the numbers now
            self._bytes = self._load_fresh()
            return
        missed = [change for change in changes.history if change[0] > since]
        touched: set[int] = set()
        if missed and missed[0][0] == since + 1:
            for _generation, at, index, capacity, window in missed:
                self.states[index].change(capacity, window, at)
                touched.add(index)
        elif changes.generation != since:
            at = changes.history[-1][1] if changes.history else self.clock()
            for index, (capacity, window) in enumerate(changes.numbers):
                state = self.states[index]
                if (state.capacity, state.window) != (capacity, window):
                    state.change(capacity, window, at)
                    touched.add(index)
        self._meta = changes.generation  # type: ignore[assignment]
        if touched:  # as LimitSet.change_limit does, once for all the changes caught up
            self.forget_forecast()
            for index in sorted(touched):
                self.refuse_above(self.states[index])
            self._poke = True
            if self.queue:
                self._dispatch(self.clock())

    def _reload(self) -> None:
        data, intact = self._record.read()
        if not intact:
            warnings.warn(
                f"the shared state at {self._record.path} was damaged; the key starts again "
                "from full limits",
                RuntimeWarning,
                stacklevel=3,
            )
        shared = None if data is None else _decode(data)
        if data is not None and shared is None and intact:
            warnings.warn(
                f"the shared state at {self._record.path} is not of this version of "
                "aiolimits; the key starts again from full limits",
                RuntimeWarning,
                stacklevel=3,
            )
        incarnation = self._record.incarnation() if data is not None and shared is not None else 0
        if incarnation != self._incarnation:  # removed meanwhile (and maybe made again)
            self._incarnation = incarnation
            self._life += 1
        if data is None or shared is None:
            self._load_fresh()
            return
        self._load(data, shared)
        generation = shared[1]
        self._meta = generation if type(generation) is int else 0  # type: ignore[assignment]

    def _write(self, data: bytes, shared: Any) -> bytes:
        _layout, _meta, counters, _states, tickets, owners, _next = shared
        now = self.clock()
        if (
            tickets
            or owners
            or (counters[3] is not None and counters[3] > now)
            or not all(state.is_fresh(now) for state in self.states)
        ):
            self._record.write(data)
            # The life the states had goes on in the record (made now if the key had none).
            self._incarnation = self._record.incarnation()
            return data
        # Fresh: removed, with no decision changed; this proxy now shows a key never seen (its
        # counters too), as every other process does: a new life.
        self._record.remove()
        self._incarnation = 0
        self._life += 1
        return self._load_fresh()

    # -- receipts, stamped with the life of the key they were taken in -----------------------

    def _stamp(self, receipts: list[Any]) -> list[Any]:
        life = self._life
        return [_Lived(life, receipt) for receipt in receipts]

    def _unstamp(self, receipt: Any) -> Any:
        """A receipt as the states know it; None (worth nothing: no refund) when it was taken
        in an earlier life of the key."""
        if isinstance(receipt, _Lived):
            return receipt.receipt if receipt.life == self._life else None
        return receipt

    def _take(self, items: Items, now: float) -> list[Any]:
        return self._stamp(super()._take(items, now))

    def try_take(self, items: Items, now: float) -> list[Any] | None:
        receipts = super().try_take(items, now)
        return None if receipts is None else self._stamp(receipts)

    def _give_back(self, items: Items, receipts: list[Any] | None, now: float) -> None:
        if receipts is not None:
            receipts = [self._unstamp(receipt) for receipt in receipts]
        super()._give_back(items, receipts, now)

    def settle(
        self, state: RateState, receipt: Any, held: float, usage: float, now: float
    ) -> tuple[Any, float]:
        receipt, held = super().settle(state, self._unstamp(receipt), held, usage, now)
        return _Lived(self._life, receipt), held

    def release(self, items: Items, receipts: list[Any] | None = None) -> None:
        if receipts is not None:
            receipts = [self._unstamp(receipt) for receipt in receipts]
        super().release(items, receipts)

    def idle(self) -> bool:
        return not self.queue

    def __repr__(self) -> str:
        return f"<KeyedProcessScheduler {self._name!r} at {self._record.path}>"


class ProcessKeys:
    """Makes the proxy of each key of one keyed set (``ProcessBackend.attach_keyed``)."""

    __slots__ = ("_clock", "_limits", "_name", "table")

    def __init__(
        self, table: KeyedTable, name: str, limits: tuple[Limit, ...], clock: Callable[[], float]
    ) -> None:
        self.table = table
        self._name = name
        self._limits = limits
        self._clock = clock

    def __call__(self, key: str, states: tuple[RateState, ...]) -> KeyProxy:
        return KeyedProcessScheduler(self.table, self._name, key, states, clock=self._clock)

    def change_limit(self, index: int, capacity: float | None, window: float | None) -> None:
        """Limit ``index`` has ``capacity`` and ``window`` (None: as it is now) from now on, for
        every key, in every process (``KeyedLimitSet.change_limit``; a write of the table's
        header page)."""
        self.table.change(index, capacity, window)

    def known_changes(self) -> tuple[int, tuple[tuple[float, float], ...]]:
        """``(generation, numbers)`` of the limits as this process last saw them (no I/O)."""
        changes = self.table.known_changes()
        return changes.generation, changes.numbers
