"""Helpers shared by the benchmarks: summaries of repeated measurements, order and burst checks."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import attrs

from aiolimits import CallLimit, LimitSet, RateLimit, ResourceLimit

BIG = 1e12  # capacity large enough never to wait (the largest in the number range)


def one_rate() -> tuple[LimitSet, dict[str, float]]:
    """A LimitSet of one RateLimit that never waits, and the request that takes from it."""
    return LimitSet([RateLimit("tokens", 1, BIG)]), {"tokens": 1}


def three() -> tuple[LimitSet, dict[str, float]]:
    """A CallLimit + RateLimit + ResourceLimit set that never waits, and its request."""
    limits = LimitSet([CallLimit(1, BIG), RateLimit("tokens", 1, BIG), ResourceLimit("r", 10)])
    return limits, {"tokens": 1}


@attrs.frozen
class Summary:
    """Median, min and max of repeated measurements of one figure."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def fmt(self, spec: str = ".2f", unit: str = "") -> str:
        """``median unit (min-max)``, e.g. ``1.23x (1.10-1.40)``."""
        return (
            f"{self.median:{spec}}{unit} ({self.low:{spec}}-{self.high:{spec}})"
            if self.n > 1
            else f"{self.median:{spec}}{unit}"
        )


def kendall_tau(order: list[int]) -> float:
    """Kendall's tau between ``order`` and its sorted self (O(n log n) by merge sort)."""

    def count_inversions(xs: list[int]) -> tuple[list[int], int]:
        if len(xs) <= 1:
            return xs, 0
        mid = len(xs) // 2
        left, a = count_inversions(xs[:mid])
        right, b = count_inversions(xs[mid:])
        merged: list[int] = []
        inversions = a + b
        i = j = 0
        while i < len(left) and j < len(right):
            if left[i] <= right[j]:
                merged.append(left[i])
                i += 1
            else:
                merged.append(right[j])
                inversions += len(left) - i
                j += 1
        merged += left[i:] + right[j:]
        return merged, inversions

    n = len(order)
    _, inv = count_inversions(order)
    pairs = n * (n - 1) // 2
    return 1.0 - 2.0 * inv / pairs if pairs else 1.0


def most_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most events in any half-open interval ``[t, t + window)``, sliding over ``times``."""
    ordered = sorted(times)
    best = 0
    start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window:
            start += 1
        if end - start + 1 > best:
            best = end - start + 1
    return best
