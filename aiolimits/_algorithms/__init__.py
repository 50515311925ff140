"""Pure algorithm maths, one module per algorithm. See ``_base`` for the shared interface."""

from __future__ import annotations

import attrs

from .._limits import CallLimit, Limit, RateLimit, RateLimitAlgorithm, ResourceLimit
from ._base import RateState, Receipt, first_true, too_large
from .fixed_window import FixedWindowState
from .gcra import GCRAState
from .leaky_bucket import LeakyBucketState
from .semaphore import SemaphoreState
from .sliding_window import SlidingWindowState
from .token_bucket import TokenBucketState

__all__ = [
    "FixedWindowState",
    "GCRAState",
    "LeakyBucketState",
    "RateState",
    "Receipt",
    "SemaphoreState",
    "SlidingWindowState",
    "TokenBucketState",
    "first_true",
    "limit_now",
    "new_state",
    "too_large",
]

_STATES: dict[RateLimitAlgorithm, type[RateState]] = {
    RateLimitAlgorithm.TokenBucket: TokenBucketState,
    RateLimitAlgorithm.GCRA: GCRAState,
    RateLimitAlgorithm.LeakyBucket: LeakyBucketState,
    RateLimitAlgorithm.SlidingWindow: SlidingWindowState,
    RateLimitAlgorithm.FixedWindow: FixedWindowState,
}


def new_state(limit: Limit, now: float) -> RateState:
    """A fresh state machine for ``limit`` (full bucket, empty window, free slots) at ``now``."""
    if isinstance(limit, ResourceLimit):
        return SemaphoreState(limit.key, limit.capacity, 0.0, now)
    assert isinstance(limit, (RateLimit, CallLimit))
    cls = _STATES[limit.algorithm]
    return cls(limit.key, limit.capacity, limit.window_seconds, now)


def limit_now(limit: Limit, state: RateState) -> Limit:
    """``limit`` with the numbers its ``state`` has now: a change of the limit (semantics §4),
    made here or, on a shared backend, by another process, updates the state's numbers."""
    if isinstance(limit, ResourceLimit):
        if state.capacity == limit.capacity:
            return limit
        return attrs.evolve(limit, capacity=int(state.capacity))
    if state.capacity == limit.capacity and state.window == limit.window_seconds:
        return limit
    return attrs.evolve(limit, capacity=state.capacity, window_seconds=state.window)
