"""A stand-in for ``aiolimits.KeyedLimitSet`` until it lands in this branch.

The integration tests import ``KeyedLimitSet`` from here and nowhere else, so switching them to
the real class is one edit: replace this module's body with
``from aiolimits import KeyedLimitSet as KeyedLimitSet``.

It implements exactly the verbs of the planned API, as a dict of LimitSets created on first use
(no eviction: the tests use a handful of keys, and ``max_keys`` is only checked).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, final

from aiolimits import Acquisition, LimitSet
from aiolimits._limits import Limit

__all__ = ["KeyedLimitSet"]

Requested = Mapping[str, int | float]


@final
class KeyedLimitSet:
    def __init__(
        self,
        limits: Iterable[Limit],
        *,
        max_keys: int = 10_000,
        config: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = tuple(limits)
        self._max_keys = max_keys
        self._config = config
        self._clock = clock
        self._sets: dict[str, LimitSet] = {}
        self._paused_until = -float("inf")

    @property
    def limits(self) -> tuple[Limit, ...]:
        return self._limits

    def _set(self, key: str) -> LimitSet:
        if not isinstance(key, str) or not key:
            raise TypeError(f"key must be a non-empty str, got {key!r}")
        limit_set = self._sets.get(key)
        if limit_set is None:
            if len(self._sets) >= self._max_keys:
                raise RuntimeError(f"more than max_keys={self._max_keys} keys")
            limit_set = self._sets[key] = LimitSet(
                self._limits, config=self._config, clock=self._clock
            )
            left = self._paused_until - self._clock()
            if left > 0:
                limit_set.pause(left)
        return limit_set

    def acquire(
        self, key: str, requested: Requested | None = None, *, timeout: float | None = None
    ) -> Acquisition:
        return self._set(key).acquire(requested, timeout=timeout)

    def try_acquire(self, key: str, requested: Requested | None = None) -> Acquisition:
        return self._set(key).try_acquire(requested)

    def acquire_sync(
        self, key: str, requested: Requested | None = None, *, timeout: float | None = None
    ) -> Acquisition:
        return self._set(key).acquire_sync(requested, timeout=timeout)

    def retry_after(self, key: str, requested: Requested | None = None) -> float:
        return self._set(key).retry_after(requested)

    def get_stats(self, key: str) -> dict[str, Any]:
        return self._set(key).get_stats()

    def pause(self, seconds: float, *, key: str | None = None) -> None:
        if key is not None:
            self._set(key).pause(seconds)
            return
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        for limit_set in self._sets.values():
            limit_set.pause(seconds)
