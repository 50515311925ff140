"""aiolimits: exact, fair, scheduled rate and resource limits for async Python and threads.

Every limit is a value (:class:`RateLimit`, :class:`CallLimit`, :class:`ResourceLimit`); a
:class:`LimitSet` holds their state and acquires them together, all-or-nothing, in FIFO order, for
tasks on asyncio, uvloop and trio and for threads; a :class:`LimitPool` spreads callers over several
sets (API keys, regions). See ``docs/`` for the guides.

``aiolimits.COMPILED`` tells which build is running: True when the core (the scheduler, the
requests and the acquisition) was compiled with mypyc at install time, False for the same modules
as pure Python (no C compiler then, or ``AIOLIMITS_PURE=1``). Both behave the same.
"""

from __future__ import annotations

from . import _scheduler
from ._acquisition import Acquisition as Acquisition
from ._adaptive import Adaptation as Adaptation
from ._backends._base import Backend as Backend
from ._backends.memory import MemoryBackend as MemoryBackend
from ._backends.process import ProcessBackend as ProcessBackend
from ._client_limits import client_limits as client_limits
from ._errors import BackendUnavailable as BackendUnavailable
from ._keyed import KeyedLimitSet as KeyedLimitSet
from ._limits import CallLimit as CallLimit
from ._limits import RateLimit as RateLimit
from ._limits import RateLimitAlgorithm as RateLimitAlgorithm
from ._limits import ResourceLimit as ResourceLimit
from ._limitset import LimitSet as LimitSet
from ._pool import LimitPool as LimitPool
from ._pool import LoadBalancingAlgorithm as LoadBalancingAlgorithm
from ._statistics import KeyedStatistics as KeyedStatistics
from ._statistics import LimitSetStatistics as LimitSetStatistics
from ._statistics import PoolSetStatistics as PoolSetStatistics
from ._statistics import PoolStatistics as PoolStatistics
from ._statistics import RateLimitStatistics as RateLimitStatistics
from ._statistics import ResourceLimitStatistics as ResourceLimitStatistics

COMPILED: bool = not _scheduler.__file__.endswith(".py")
"""Whether the core runs compiled: True when the scheduler, the requests and the acquisition were
compiled with mypyc when aiolimits was installed, False for the same modules as pure Python (no C
compiler or Python headers then, or ``AIOLIMITS_PURE=1``). Both behave the same."""

__all__ = [
    "COMPILED",
    "Acquisition",
    "Adaptation",
    "Backend",
    "BackendUnavailable",
    "CallLimit",
    "KeyedLimitSet",
    "KeyedStatistics",
    "LimitPool",
    "LimitSet",
    "LimitSetStatistics",
    "LoadBalancingAlgorithm",
    "MemoryBackend",
    "PoolSetStatistics",
    "PoolStatistics",
    "ProcessBackend",
    "RateLimit",
    "RateLimitAlgorithm",
    "RateLimitStatistics",
    "ResourceLimit",
    "ResourceLimitStatistics",
    "client_limits",
]
