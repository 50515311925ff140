"""The files of the process backend: a private directory, and one state file per shared set.

*The directory* (:func:`open_directory`) must be a directory owned by this user and writable by
nobody else; a missing one is created with mode 0700 (whatever the umask), and one that is ours
but readable by others is narrowed to 0700. It is opened once per process and used through that
descriptor (``openat``), so the directory checked is the directory used. Everything the backend
puts there (state files, wake-up sockets, liveness files) is created by this user with mode 0600
and never through a symlink: other users can neither read, write nor connect to any of it.

*A state file* (:class:`StateFile`) is created complete under a temporary name and linked into
place (``link`` fails if the name exists: two processes creating it at once agree on one file),
opened with ``O_NOFOLLOW``, and accepted only if it is a regular file owned by this user with no
permission for group or others, whose header has the right magic, format and checksum.

Layout (format 2, little-endian):

* bytes 0-31, the *head*: magic ``b"AIOLIMIT"``, format (u32, 2), header size (u32, 4096), the
  file id (u64, random: a new one whenever the file is initialised again), and a crc32 of these.
* bytes 64-2079 and 2080-4095, two *slots*, each describing one serialized copy of the state:
  ``(version, offset, capacity, length, data crc)`` (4 u64, a u32) and a crc32 of those fields,
  followed by room for 1976 bytes of data *inline* (offset = the slot's + 40): a small state
  (the usual buckets and windows) is written with its slot in one ``pwrite`` and read with the
  header page, no further system call.
* bytes 32-63: reserved (zero). The data of a slot is self-describing (it starts with its layout
  number, see ``_process_scheduler``), and a reader refuses a format it does not know instead of
  guessing. (A KeyedLimitSet keeps its keys in a table file of its own format, ``<name>.keyed``,
  see ``_process_keyed``; a key whose state outgrows its record keeps it in a state file of this
  format.)
* from 4096: data regions, each a multiple of 4096 bytes, reserved with ``posix_fallocate`` when
  made (so a full filesystem is an ``OSError`` at that moment, never a ``SIGBUS`` later).

A writer always writes the slot that is *not* the newest valid one (first the data, then the
slot's fields), so a process killed in the middle of a write leaves the previous version intact;
readers take the valid slot with the higher version. A slot whose region is too small gets a
new region at the end of the file (regions grow geometrically; the old one is abandoned).
A torn write of a slot fails its crcs, so the other slot (untouched) stays the newest copy.

Everything runs under the file lock (``flock(LOCK_EX)``), which the kernel releases when its
holder dies. The file is read and written with ``pread``/``pwrite``, never mapped: a file
truncated by someone else reads short (an error this module handles), where a mapping would
kill the process with ``SIGBUS``. Each lock starts with one ``pread`` of the header page: equal
to what this process last read or wrote means nothing changed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import struct
import zlib
from collections.abc import Callable
from typing import Final

__all__ = [
    "FORMAT",
    "HEADER",
    "StateFile",
    "StateFileError",
    "check_opened",
    "open_directory",
    "open_private",
    "reserve",
]

MAGIC: Final = b"AIOLIMIT"
FORMAT: Final = 2
HEADER: Final = 4096
_HEAD = struct.Struct("<8sIIQ")  # magic, format, header size, file id
_CRC = struct.Struct("<I")
_SLOT = struct.Struct("<QQQQI")  # version, offset, capacity, length, data crc
_SLOT_AT: Final = (64, 2080)
_INLINE: Final = 2016 - 40  # bytes of data a slot holds right after its fields
_SLOT_BYTES: Final = _SLOT.size + _CRC.size  # 40
_PEEK: Final = HEADER  # the header page, read at every lock
_MAX_DATA: Final = 1 << 30  # a slot claiming more is damaged
_OLD_MAGIC: Final = b"AIOLIMv1"
_Fields = tuple[int, int, int, int, int]


class StateFileError(ValueError):
    """The state file (or its directory) is not one this process may use."""


def _describe_mode(mode: int) -> str:
    return oct(stat.S_IMODE(mode))


def open_directory(path: str, *, create: bool = True) -> int:
    """An ``O_DIRECTORY`` descriptor of ``path`` (absolute), checked private to this user.

    Missing directories on the way are created with mode 0700. The last component may be a
    symlink only if this user (or root) owns the symlink.

    Raises:
        StateFileError: the directory is not a directory, is owned by another user, or is
            writable by group or others (a ``ValueError``, naming the path and the problem).
        OSError: it cannot be created or opened.
    """
    uid = os.geteuid()
    if create:
        missing: list[str] = []
        head = path
        while not os.path.lexists(head):
            missing.append(head)
            parent = os.path.dirname(head)
            if parent == head:
                break
            head = parent
        for made in reversed(missing):
            try:
                os.mkdir(made, 0o700)
            except FileExistsError:
                continue  # another process made it meanwhile: checked below like any other
            # mkdir applies the umask; a directory we just made gets exactly 0700.
            # Through an O_PATH descriptor (never a symlink; works whatever the mode mkdir left).
            made_fd = os.open(made, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.chmod(f"/proc/self/fd/{made_fd}", 0o700)
            finally:
                os.close(made_fd)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            link = os.lstat(path)
        except OSError:
            raise exc from None
        if not stat.S_ISLNK(link.st_mode):
            raise StateFileError(f"the ProcessBackend location {path} is not a directory") from None
        if link.st_uid not in (uid, 0):
            raise StateFileError(
                f"the ProcessBackend location {path} is a symlink owned by uid {link.st_uid}, "
                f"not by this user (uid {uid}): refusing to follow it"
            ) from None
        fd = os.open(path, flags)
    try:
        _check_directory(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_directory(fd: int, path: str) -> None:
    st = os.fstat(fd)
    uid = os.geteuid()
    if st.st_uid != uid:
        raise StateFileError(
            f"the ProcessBackend location {path} is owned by uid {st.st_uid}, not by this "
            f"user (uid {uid}): another user could read or change the limits there; use a "
            "directory of your own"
        )
    if st.st_mode & 0o022:
        who = {0o022: "group and others", 0o020: "group", 0o002: "others"}[st.st_mode & 0o022]
        raise StateFileError(
            f"the ProcessBackend location {path} is writable by {who} (mode "
            f"{_describe_mode(st.st_mode)}): another user could plant files there; make it "
            "0700 or use another directory"
        )
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o700)  # ours, but readable by others: narrow it


def check_opened(fd: int, shown: str) -> os.stat_result:
    st = os.fstat(fd)
    uid = os.geteuid()
    if not stat.S_ISREG(st.st_mode):
        raise StateFileError(f"{shown} is not a regular file")
    if st.st_uid != uid:
        raise StateFileError(
            f"{shown} is owned by uid {st.st_uid}, not by this user (uid {uid}): refusing to use it"
        )
    if st.st_mode & 0o077:
        raise StateFileError(
            f"{shown} has mode {_describe_mode(st.st_mode)}: a state file must be private to its "
            "user (0600); remove it if nothing uses it"
        )
    return st


def _head(file_id: int) -> bytes:
    head = _HEAD.pack(MAGIC, FORMAT, HEADER, file_id)
    return head + _CRC.pack(zlib.crc32(head))


def reserve(fd: int, offset: int, length: int, shown: str) -> None:
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot reserve {length} bytes for the shared state {shown}: {exc.strerror}",
        ) from exc


def open_private(directory: int, name: str, shown: str, initialise: Callable[[int], object]) -> int:
    """A read-write descriptor of the file ``name`` in the directory descriptor ``directory``,
    checked private to this user; a missing one is made complete by ``initialise(fd)`` under a
    temporary name, mode 0600, then linked into place (``link`` fails if the name exists: two
    processes creating it at once agree on one file). Never through a symlink.

    Raises:
        StateFileError: the file is a symlink, not a regular file, not this user's, or readable
            or writable by others (a ``ValueError``; ``shown`` is its path, for messages).
        OSError: it could not be created (``ENOSPC``: the filesystem is full).
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        try:
            fd = os.open(name, flags, dir_fd=directory)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StateFileError(
                    f"{shown} is a symlink: refusing to follow it (remove it)"
                ) from None
            raise
        else:
            try:
                check_opened(fd, shown)
            except BaseException:
                os.close(fd)
                raise
            return fd
        # Missing: build it complete under a private name, then link it into place.
        tmp = f".{name[:180]}.{secrets.token_hex(8)}.new"
        fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=directory)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            initialise(fd)
            os.link(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
        except FileExistsError:
            os.close(fd)  # another process made it first: use theirs
            continue
        except BaseException:
            os.close(fd)
            raise
        else:
            return fd
        finally:
            os.unlink(tmp, dir_fd=directory)


def _raw(peek: bytes, fields: list[_Fields | None], i: int) -> bytes:
    at = _SLOT_AT[i]
    return bytes(peek[at : at + _SLOT_BYTES]) if fields[i] is not None else b""


class StateFile:
    """One open state file. Not thread-safe by itself: the caller holds a thread lock too."""

    __slots__ = ("_fields", "_head", "_newest", "_page", "_peek", "_raw", "fd", "file_id", "path")

    def __init__(self, directory: int, name: str, shown: str) -> None:
        """Open (or create) ``name`` in the directory descriptor ``directory``; ``shown`` is its
        path, for messages.

        Raises:
            StateFileError: the file is not a state file this user may trust (a ``ValueError``).
            OSError: it could not be created (``ENOSPC``: the filesystem is full).
        """
        self.path = shown
        self._peek = bytearray()  # the header page as last read or written: equal, unchanged
        self._page: bytes | None = None  # the header page read by changed() under this lock
        self._head = b""  # the head as last found intact (b"": none yet)
        self._fields: list[_Fields | None] = [None, None]
        self._raw = [b"", b""]  # the bytes of each slot's fields in _fields (b"": none)
        self._newest = -1  # the slot holding the newest version (-1: none)
        self.file_id = 0
        self.fd = self._open(directory, name)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                self._validate_head(attaching=True)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, directory: int, name: str) -> int:
        def initialise(fd: int) -> None:
            reserve(fd, 0, HEADER, self.path)
            os.pwrite(fd, _head(secrets.randbits(64)), 0)

        return open_private(directory, name, self.path, initialise)

    def _validate_head(self, *, attaching: bool, page: bytes | None = None) -> bool:
        """Under the lock: check the head (in ``page``, the header page just read, if given).
        False when it is damaged (while attached) and was initialised again; raises at attach
        (the file may not be ours to repair)."""
        size = _HEAD.size + _CRC.size
        if page is not None and self._head and page.startswith(self._head):
            return True  # the head this object last checked (or wrote), byte for byte
        head = os.pread(self.fd, size, 0) if page is None else page[:size]
        if len(head) == size:
            magic, fmt, header, file_id = _HEAD.unpack_from(head)
            (crc,) = _CRC.unpack_from(head, _HEAD.size)
            good = magic == MAGIC and fmt == FORMAT and header == HEADER
            if good and crc == zlib.crc32(head[: _HEAD.size]):
                self.file_id = file_id
                self._head = head
                return True
        if attaching:
            if head[: len(_OLD_MAGIC)] == _OLD_MAGIC:
                raise StateFileError(
                    f"{self.path} was written by an older aiolimits (state file format 1, this "
                    f"one reads format {FORMAT}): stop the processes using it, then remove it"
                )
            if head[:8] == MAGIC and len(head) >= 12 and _HEAD.unpack_from(head)[1] != FORMAT:
                raise StateFileError(
                    f"{self.path} has state file format {_HEAD.unpack_from(head)[1]}; this "
                    f"aiolimits reads format {FORMAT}: stop the processes using it, then remove it"
                )
            if head.strip(b"\0"):
                raise StateFileError(
                    f"{self.path} exists and is not an aiolimits state file (or is damaged): "
                    "remove it if nothing uses it"
                )
        # Empty (created, or truncated, by someone else) or, while attached, damaged under us:
        # a fresh head with a new file id, so every attached process knows to reload.
        self.reinitialise()
        return False

    def reinitialise(self) -> None:
        """Under the lock: make the file an empty state file again (a new file id, no slots)."""
        self.file_id = secrets.randbits(64)
        self._head = b""
        os.ftruncate(self.fd, 0)
        reserve(self.fd, 0, HEADER, self.path)
        os.pwrite(self.fd, _head(self.file_id), 0)
        self._fields = [None, None]
        self._raw = [b"", b""]
        self._newest = -1
        self._peek = bytearray()
        self._page = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        self._page = None  # read under this lock only
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def forget(self) -> None:
        """Make the next :meth:`changed` say yes (what is on file is the truth)."""
        self._peek = bytearray()

    def changed(self) -> bool:
        """Under the lock: whether the file changed since this object last read or wrote it.
        One ``pread`` (the usual case: no); when it did, :meth:`read` starts from that page."""
        page = os.pread(self.fd, _PEEK, 0)
        if page == self._peek:
            return False
        self._page = page
        return True

    @staticmethod
    def _slot(peek: bytes, i: int) -> _Fields | None:
        at = _SLOT_AT[i]
        if len(peek) < at + _SLOT_BYTES:
            return None
        fields = _SLOT.unpack_from(peek, at)
        (crc,) = _CRC.unpack_from(peek, at + _SLOT.size)
        if fields[0] == 0 or crc != zlib.crc32(peek[at : at + _SLOT.size]):
            return None
        _version, offset, cap, length, _crc = fields
        if offset == at + _SLOT_BYTES:
            return fields if cap == _INLINE and length <= cap else None
        if offset < HEADER or offset % 4096 or length > cap or cap > 2 * _MAX_DATA:
            return None
        return fields

    def read(self) -> tuple[bytes | None, bool]:
        """Under the lock: ``(data, intact)``: the data of the newest intact copy (None: no
        state yet), and False when the file was found damaged (truncated or overwritten by
        something else) and initialised again, empty: whatever this process knows must then be
        written back."""
        # The page changed() just read under this lock, if it did (no second read of it).
        page, self._page = self._page, None
        intact = self._validate_head(attaching=False, page=page)
        peek = b""
        if intact:
            peek = os.pread(self.fd, _PEEK, 0) if page is None else page
        if intact and len(peek) < _PEEK:  # cut short after the head: damaged
            self.reinitialise()
            intact, peek = False, b""
        # A slot whose bytes are those this object last found valid is that slot (the other
        # process wrote the other one): not parsed and checked again.
        known = self._fields
        raw = self._raw
        at, other = _SLOT_AT
        same = raw[0] and peek[at : at + _SLOT_BYTES] == raw[0]
        first = known[0] if same else self._slot(peek, 0)
        same = raw[1] and peek[other : other + _SLOT_BYTES] == raw[1]
        second = known[1] if same else self._slot(peek, 1)
        fields = [first, second]
        # The valid slots, the newest (higher version) first.
        if first is None or second is None:
            order = [(first, 0)] if first is not None else [(second, 1)] if second else []
        else:
            order = [(first, 0), (second, 1)] if first > second else [(second, 1), (first, 0)]
        for (_version, offset, _cap, length, crc), i in order:
            if offset < HEADER:  # inline: already read
                data = bytes(peek[offset : offset + length])
            else:
                data = os.pread(self.fd, length, offset) if length <= _MAX_DATA else b""
            if len(data) == length and zlib.crc32(data) == crc:
                self._fields, self._newest, self._peek = fields, i, bytearray(peek)
                self._raw = [_raw(peek, fields, 0), _raw(peek, fields, 1)]
                return data, True
        if intact and order:
            # Slots that claim data no longer there (truncated, overwritten): damaged.
            self.reinitialise()
            intact = False
        if intact:
            self._fields, self._newest, self._peek = fields, -1, bytearray(peek)
            self._raw = [_raw(peek, fields, 0), _raw(peek, fields, 1)]
        return None, intact

    def write(self, data: bytes) -> None:
        """Under the lock, after :meth:`read` or :meth:`changed` said the file is as this object
        last saw it: store ``data`` as the next version, keeping the newest intact copy.

        Raises:
            OSError: the file could not grow (``ENOSPC``); the previous version stays intact.
        """
        fields = self._fields
        newest = self._newest
        length = len(data)
        if newest >= 0 and length <= _INLINE:
            # The usual case: a small state, written inline with its slot in one pwrite.
            target = 1 - newest
            at = _SLOT_AT[target]
            version = fields[newest][0] + 1  # type: ignore[index]  # newest: a valid slot
            new = (version, at + _SLOT_BYTES, _INLINE, length, zlib.crc32(data))
            packed = _SLOT.pack(*new)
            packed = b"".join((packed, _CRC.pack(zlib.crc32(packed)), data))
            os.pwrite(self.fd, packed, at)
            self._wrote(target, new, packed)
            return
        self._write_anew(data)

    def _write_anew(self, data: bytes) -> None:
        """:meth:`write`, the first time or for a state too large for a slot's inline room."""
        fields = self._fields
        newest = self._newest
        length = len(data)
        target = 1 - newest if newest >= 0 else 0
        old = fields[target]
        at = _SLOT_AT[target]
        if length <= _INLINE:
            offset, cap = at + _SLOT_BYTES, _INLINE
        elif old is not None and old[2] >= length and old[1] >= HEADER:
            offset, cap = old[1], old[2]
        else:
            if length > _MAX_DATA:
                raise ValueError(f"the shared state {self.path} would exceed {_MAX_DATA} bytes")
            size = os.fstat(self.fd).st_size
            offset = max(HEADER, -(-size // 4096) * 4096)
            cap = 4096
            while cap < 2 * length:
                cap *= 2
            reserve(self.fd, offset, cap, self.path)
        last = fields[newest] if newest >= 0 else None
        version = (last[0] if last is not None else 0) + 1
        new = (version, offset, cap, length, zlib.crc32(data))
        packed = _SLOT.pack(*new)
        packed += _CRC.pack(zlib.crc32(packed))
        if offset < HEADER:
            # Inline: fields and data in one write (a torn one fails its crcs: the other slot,
            # untouched, stays the newest intact copy).
            packed += data
        elif length:
            os.pwrite(self.fd, data, offset)
        os.pwrite(self.fd, packed, at)
        self._wrote(target, new, packed)

    def _wrote(self, target: int, new: _Fields, packed: bytes) -> None:
        """Slot ``target`` now holds ``new`` (written as ``packed`` at its place): the newest,
        and so in this process's view of the file."""
        self._fields[target] = new
        self._raw[target] = packed[:_SLOT_BYTES]
        self._newest = target
        peek = self._peek
        if len(peek) == _PEEK:
            at = _SLOT_AT[target]
            peek[at : at + len(packed)] = packed
        else:
            self._peek = bytearray(os.pread(self.fd, _PEEK, 0))
