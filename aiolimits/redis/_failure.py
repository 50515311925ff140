"""What a Redis backend does when Redis does not answer: the circuit and the failure policy.

* **The circuit** (:class:`Circuit`): once a call has found Redis unreachable, every call fails
  at once, without I/O (:class:`NotSent`), so that the policy applies in microseconds rather
  than after one backend timeout per call. A probe thread sends ``PING`` with a backoff (50 ms
  doubling to 500 ms) and closes the circuit when the server answers; the calls that could not
  be sent and must not be lost (ending leases, refunds) are sent then.
* **The policy** (``on_unavailable``): ``"raise"`` raises :class:`BackendUnavailable`;
  ``"allow"`` admits without Redis (its receipts are :data:`ALLOWED`: nothing to settle);
  ``"local"`` decides on the set's in-process limits (its receipts are :class:`Local`). A call
  never returns later than its caller's timeout plus :data:`GRACE`, whatever Redis does.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

import redis
import redis.exceptions

from .._errors import BackendUnavailable

__all__ = [
    "ALLOWED",
    "GRACE",
    "UNAVAILABLE",
    "Circuit",
    "Local",
    "NotSent",
    "background_thread",
    "log",
    "on_background_thread",
]

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

# Marks the backend's own threads (see background_thread).
_threads = threading.local()


def background_thread() -> None:
    """Mark this thread as one of the backend's own (dispatcher, renewer, listener, probe):
    the only threads that make script calls without holding their scheduler's lock."""
    _threads.background = True


def on_background_thread() -> bool:
    """Whether this thread is one of the backend's own (see :func:`background_thread`): a
    script call from any other thread is made holding its scheduler's lock."""
    return getattr(_threads, "background", False)


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
    background_thread()
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


class Local:
    """The receipt of a limit taken from the in-process fallback (``on_unavailable="local"``)."""

    __slots__ = ("receipt",)

    def __init__(self, receipt: Any) -> None:
        self.receipt = receipt


#: The receipt of a limit admitted without Redis under on_unavailable="allow": nothing to settle.
ALLOWED: Any = object()
