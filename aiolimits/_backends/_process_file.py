"""The state file of the process backend: one file per shared LimitSet, locked with ``flock``.

Layout: a 4 KiB header, then data regions. The header holds a magic string and two *slots*, each
describing one serialized copy of the state: ``(version, offset, capacity, length, data crc)``
plus a crc of those fields. A writer always writes the slot that is *not* the newest valid one
(first the data, then the slot's fields), so a process killed in the middle of a write leaves
the previous version intact and valid; readers take the valid slot with the higher version.
A slot whose region is too small gets a new region at the end of the file (regions grow
geometrically; the old one is simply abandoned).

Everything here runs under the file lock (``flock(LOCK_EX)``): the kernel releases it when its
holder dies, so a process killed while holding it cannot block the others. The file is mapped
(``mmap``): the version check on every lock is a memory read, and reading or writing the state
is a memory copy (the mapping is renewed when the file grows).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import zlib
from typing import Final

__all__ = ["StateFile"]

MAGIC: Final = b"AIOLIMv1"
HEADER: Final = 4096
_SLOT = struct.Struct("<QQQQI")  # version, offset, capacity, length, data crc
_SLOT_CRC = struct.Struct("<I")
_SLOT_AT: Final = (64, 128)
_VERSIONS = struct.Struct("<Q56xQ")  # the version fields of both slots, read at once
_Fields = tuple[int, int, int, int, int]


class StateFile:
    """One open state file. Not thread-safe by itself: the caller holds a thread lock too."""

    __slots__ = ("_data", "_header", "_known", "fd", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        # (version, its slot, both slots' fields) as this object last read or wrote them.
        self._known: tuple[int, int, list[_Fields | None]] | None = None
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                if os.fstat(self.fd).st_size < HEADER:
                    os.ftruncate(self.fd, HEADER)
                    os.pwrite(self.fd, MAGIC, 0)
                elif os.pread(self.fd, len(MAGIC), 0) != MAGIC:
                    raise ValueError(f"{path!r} exists and is not an aiolimits state file")
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            self._header = mmap.mmap(self.fd, HEADER)
            self._data = self._header  # the whole file, mapped again when it grows
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            if self._data is not self._header:
                self._data.close()
            self._header.close()
            os.close(self.fd)
            self.fd = -1

    def lock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def version(self) -> int:
        """The highest version either slot claims (unchecked: a torn slot only makes the caller
        read, and :meth:`read` validates)."""
        a, b = _VERSIONS.unpack_from(self._header, _SLOT_AT[0])
        return int(a if a > b else b)

    def _slot(self, i: int) -> _Fields | None:
        at = _SLOT_AT[i]
        fields = _SLOT.unpack_from(self._header, at)
        (crc,) = _SLOT_CRC.unpack_from(self._header, at + _SLOT.size)
        if fields[0] == 0 or crc != zlib.crc32(self._header[at : at + _SLOT.size]):
            return None
        return fields

    def _mapped(self, end: int) -> mmap.mmap:
        """The file mapped at least up to ``end`` (as far as it exists)."""
        if len(self._data) < end:
            size = os.fstat(self.fd).st_size
            if size > len(self._data):
                if self._data is not self._header:
                    self._data.close()
                self._data = mmap.mmap(self.fd, size)
        return self._data

    def read(self) -> tuple[int, bytes] | None:
        """Under the lock: ``(version, data)`` of the newest intact copy, or None (no state)."""
        fields = [self._slot(0), self._slot(1)]
        order = sorted(((f, i) for i, f in enumerate(fields) if f is not None), reverse=True)
        for (version, offset, _cap, length, crc), i in order:
            data = self._mapped(offset + length)[offset : offset + length]
            if len(data) == length and zlib.crc32(data) == crc:
                self._known = (version, i, fields)
                return version, data
        self._known = None
        return None

    def write(self, version: int, data: bytes, *, current: bool = False) -> None:
        """Under the lock: store ``data`` as ``version``, keeping the newest intact copy.
        ``current``: the caller knows that nobody wrote since this object last read or wrote."""
        known = self._known
        if known is not None and (current or self.version() == known[0]):
            # The usual case: nobody wrote since this object last read or wrote.
            fields, target = known[2], 1 - known[1]
        else:
            fields = [self._slot(0), self._slot(1)]
            newest = max((0, 1), key=lambda i: f[0] if (f := fields[i]) is not None else -1)
            target = 1 - newest if fields[newest] is not None else 0
        old = fields[target]
        length = len(data)
        if old is not None and old[2] >= length:
            offset, cap = old[1], old[2]
        else:
            size = os.fstat(self.fd).st_size
            offset = max(HEADER, -(-size // 4096) * 4096)
            cap = 4096
            while cap < 2 * length:
                cap *= 2
            os.ftruncate(self.fd, offset + cap)
        self._mapped(offset + length)[offset : offset + length] = data
        new = (version, offset, cap, length, zlib.crc32(data))
        at = _SLOT_AT[target]
        packed = _SLOT.pack(*new)
        self._header[at : at + _SLOT.size + 4] = packed + _SLOT_CRC.pack(zlib.crc32(packed))
        fields = list(fields)
        fields[target] = new
        self._known = (version, target, fields)
