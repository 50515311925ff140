"""The LimitSet contract: the behaviour every backend must show, written once, run against each.

This package collects no tests by itself (no module name starts with ``test_``). A backend runs
the whole contract by subclassing :class:`LimitSetContract` in a test module and providing a
``make_limitset`` fixture that returns a :class:`MakeLimitSet` factory for that backend, usually
made by :func:`limitset_factory` (the idea of trio's ``generic_lock_test``: one behaviour, many
implementations)::

    @pytest.fixture
    def make_limitset() -> MakeLimitSet:
        return limitset_factory(MyBackend(...), lambda: unique_name())

    class TestMyBackend(LimitSetContract):
        pass

``tests/conftest.py`` registers this package for pytest's assert rewriting (which covers its
modules too), so a failed assert here shows its values in every backend's test module.

The contract is split by topic: ``decisions`` (§3 algorithms, §4 requests), ``validation``,
``acquisition`` (§5, retry_after and pause, stats), ``waiting`` and ``waiting_outcomes``,
``timeouts`` (with the queue-aware ones), ``slack`` (timer_slack), ``changes`` (limits that
change at run time), ``threads`` (threads and the
real clock); ``_support`` holds the shared helpers.

Rules the factory must follow: every call returns a LimitSet with fresh state (shared backends
give each call its own ``name``), it honours ``clock`` (a :class:`ManualClock` drives every
decision and every wake-up), and it passes errors from the constructor through unchanged.

Time-dependent behaviour is checked on a :class:`ManualClock`; only the tests in
:class:`RealClockContract` wait for real, briefly, and they never assert an upper bound tighter
than seconds. Async tests run on every anyio backend the ``anyio_backend`` fixture offers.
"""

from __future__ import annotations

from ._support import (
    AnyLimit,
    Attempt,
    Crowd,
    MakeLimitSet,
    WorkerThreads,
    crowd,
    limitset_factory,
    settle,
    worker_threads,
)
from .acquisition import AcquisitionContract, PauseAndRetryAfterContract, StatsContract
from .changes import ChangeLimitContract
from .decisions import AlgorithmContract, RequestContract
from .slack import TimerSlackContract
from .threads import RealClockContract, ThreadContract
from .timeouts import QueueTimeoutContract, TimeoutContract
from .validation import ValidationContract
from .waiting import WaitingContract

__all__ = [
    "AcquisitionContract",
    "AlgorithmContract",
    "AnyLimit",
    "Attempt",
    "ChangeLimitContract",
    "Crowd",
    "LimitSetContract",
    "MakeLimitSet",
    "PauseAndRetryAfterContract",
    "QueueTimeoutContract",
    "RealClockContract",
    "RequestContract",
    "StatsContract",
    "ThreadContract",
    "TimeoutContract",
    "TimerSlackContract",
    "ValidationContract",
    "WaitingContract",
    "WorkerThreads",
    "crowd",
    "limitset_factory",
    "settle",
    "worker_threads",
]


class LimitSetContract(
    AlgorithmContract,
    RequestContract,
    ValidationContract,
    AcquisitionContract,
    PauseAndRetryAfterContract,
    StatsContract,
    WaitingContract,
    TimeoutContract,
    QueueTimeoutContract,
    TimerSlackContract,
    ChangeLimitContract,
    ThreadContract,
    RealClockContract,
):
    """The whole contract. Subclass it as ``Test<Backend>`` next to a ``make_limitset`` fixture.

    The anyio mark of the async parts reaches the synchronous tests too; anyio ignores it there.
    """
