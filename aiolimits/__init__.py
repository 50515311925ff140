"""aiolimits: exact, fair, scheduled rate and resource limits for async Python and threads."""

from __future__ import annotations

from ._limits import CallLimit as CallLimit
from ._limits import RateLimit as RateLimit
from ._limits import RateLimitAlgorithm as RateLimitAlgorithm
from ._limits import ResourceLimit as ResourceLimit

__all__ = [
    "CallLimit",
    "RateLimit",
    "RateLimitAlgorithm",
    "ResourceLimit",
]
