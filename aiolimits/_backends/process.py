"""The process backend: independent processes on one machine share one set of limits exactly.

``LimitSet(limits, backend=ProcessBackend("myapp"), name="openai")`` in every uvicorn/gunicorn
worker, spawned pool process or cron job attaches them all to one shared state: a small file
(``<directory>/<name>.limits``, on tmpfs by default) guarded by ``flock``. There is no server
process. How the state is shared, waited on and recovered after crashes is described in
``_process_scheduler.py``; how the directory and files are kept private to the user in
``_process_file.py``; the guide, guarantees and measurements are in ``docs/process-backend.md``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, final
from urllib.parse import quote

from .._algorithms import RateState
from .._limits import Limit
from .._scheduler import Scheduler
from . import _process_peers as peers
from ._base import Backend, KeyFactory
from ._process_file import open_directory
from ._process_keyed import KeyedTable, ProcessKeys
from ._process_scheduler import ProcessScheduler

__all__ = ["ProcessBackend", "runtime_directory"]


def runtime_directory() -> Path:
    """Where a bare ``ProcessBackend`` name lives: a per-user directory in memory if possible.

    ``/dev/shm/aiolimits-<uid>`` (tmpfs, emptied at reboot), else ``$XDG_RUNTIME_DIR/aiolimits``,
    else ``<tempdir>/aiolimits-<uid>``. ``/dev/shm`` comes first because every process of the
    user sees the same one, whereas ``XDG_RUNTIME_DIR`` is set in login sessions but often not
    for cron jobs or services, which would then pick another directory and share nothing."""
    if os.path.isdir("/dev/shm"):
        return Path(f"/dev/shm/aiolimits-{os.getuid()}")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "aiolimits"
    return Path(tempfile.gettempdir()) / f"aiolimits-{os.getuid()}"


def _state_file_name(name: str, suffix: str = ".limits") -> str:
    quoted = quote(name, safe="")
    if len(quoted) > 200:
        quoted = "sha256-" + hashlib.sha256(name.encode()).hexdigest()
    return quoted + suffix


@final
class ProcessBackend(Backend):
    """State shared by independent processes on this machine, through a file in ``location``.

    Every process that builds ``LimitSet(limits, backend=ProcessBackend(location), name=name)``
    with the same location and name shares one set of limits: exact, FIFO across processes, with
    no server to run. The first process creates the state; the others must declare the same
    limits. A process that dies holding resource slots does not leak them.

    The directory must belong to the user and be writable by nobody else (it is created 0700;
    its files are 0600): other users can neither read, change nor wake anything there.

    A ``KeyedLimitSet(limits, backend=ProcessBackend(location), name=name)`` shares each key's
    limits the same way (its keys live in one table file, ``<name>.keyed``; every process must
    give the same ``max_keys``, which sizes it).

    It is not a network backend (see the Redis backend) and it needs Linux (``flock``, pidfds,
    unix sockets).

    Examples:
        >>> backend = ProcessBackend("myapp")  # or a directory: ProcessBackend("/run/myapp")
        >>> limits = LimitSet([CallLimit(60, 500)], backend=backend, name="openai")

    Args:
        location: a directory (any path with a ``/``, or a ``PathLike``), created if missing; or
            a bare name, a directory of that name under :func:`runtime_directory`. A relative
            path is resolved against the working directory now, when the backend is made.

    Raises:
        TypeError: ``location`` is not a str or path.
        ValueError: ``location`` is empty.
        RuntimeError: the platform is not Linux.
    """

    __slots__ = ("_location", "_under_runtime", "directory")

    def __init__(self, location: str | os.PathLike[str]) -> None:
        if isinstance(location, os.PathLike):
            location = os.fspath(location)
            is_path = True
        else:
            is_path = False
        if not isinstance(location, str):
            raise TypeError(f"location must be a directory path or a name, got {location!r}")
        if not location:
            raise ValueError("location must be a directory path or a name, got ''")
        if not sys.platform.startswith("linux"):
            raise RuntimeError("ProcessBackend needs Linux (flock, pidfds, unix sockets)")
        self._location = location
        if is_path or "/" in location or location in (".", "..") or location.startswith("~"):
            # Absolute now: a process with another working directory (a pickled copy, a worker
            # that changes directory) must find the same place.
            self.directory = Path(os.path.abspath(os.path.expanduser(location)))
            self._under_runtime = False
        else:
            self.directory = runtime_directory() / location
            self._under_runtime = True

    @property
    def location(self) -> str:
        return self._location

    def attach(
        self,
        limits: tuple[Limit, ...],
        states: tuple[RateState, ...],
        clock: Callable[[], float],
        name: str | None,
    ) -> Scheduler:
        """Attach to (or create) the shared state called ``name``.

        Raises:
            ValueError: ``name`` is missing or empty, or the state was declared with other limits
                (or on another clock), or the directory or the file is not private to this user
                (owned by another, writable by others, a symlink to another's file), or the file
                is not a state file of this version.
            OSError: the directory or the file cannot be created (``ENOSPC``: no space).
        """
        directory = self._directory(name, "LimitSet")
        assert name is not None
        return ProcessScheduler(directory, _state_file_name(name), name, limits, states, clock)

    def _directory(self, name: str | None, kind: str) -> peers.Directory:
        """The checked directory, once ``name`` is checked."""
        if name is None:
            raise ValueError(
                "name is required with ProcessBackend: it identifies the shared state, e.g. "
                f"{kind}(limits, backend=ProcessBackend(...), name='openai')"
            )
        if not name:
            raise ValueError("name must be a non-empty string with ProcessBackend, got ''")
        if self._under_runtime:
            # The per-user directory itself must be ours and private too: another user could
            # have made it first (its name is predictable).
            os.close(open_directory(str(self.directory.parent)))
        return peers.directory(str(self.directory), open_directory)

    def attach_keyed(
        self,
        limits: tuple[Limit, ...],
        clock: Callable[[], float],
        name: str | None,
        max_keys: int = 100_000,
    ) -> KeyFactory | None:
        """The factory of the per-key proxies of the keyed set ``name``, whose keys live in
        ``<directory>/<name>.keyed``, a table sized for ``max_keys`` (see ``_process_keyed``).

        Raises:
            ValueError: ``name`` is missing or empty, or the table was made with other limits,
                another clock or another ``max_keys``, or the directory or file is not private
                to this user.
            OSError: the directory or the file cannot be created (``ENOSPC``: no space).
        """
        directory = self._directory(name, "KeyedLimitSet")
        assert name is not None
        filename = _state_file_name(name, ".keyed")
        table = KeyedTable(directory, filename, name, limits, clock=clock, max_keys=max_keys)
        return ProcessKeys(table, name, limits, clock)

    def __reduce__(self) -> tuple[Any, ...]:
        # The resolved directory: a process with another environment unpickles the same place.
        return (ProcessBackend, (self.directory,))

    def __repr__(self) -> str:
        return f"ProcessBackend({self._location!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProcessBackend) and other.directory == self.directory

    def __hash__(self) -> int:
        return hash((ProcessBackend, self.directory))
