"""Hostile numbers (issue #13): every number has one range, checked before anything changes.

Before the number range, ``update(usage={"tokens": 1e308})`` was accepted: the memory and process
backends then raised ``OverflowError`` on every later call of that key (``release`` of another
holder too) and kept ``-inf`` in their state, and Redis span forever inside its script, answering
``BUSY`` to every client. ``RateLimit("x", 1e200, 1e200)`` did the same at its first call, and
``update({"a": 10, "b": 10**400})`` refunded ``a`` before failing on ``b``. Here every backend
refuses those numbers with a ``ValueError`` naming them, changes nothing, and at the edges of the
range keeps working: finite state, no spin, Redis answering ``PING`` within 1 s throughout (a stall
lasts seconds)
(a generous hang detector, not a measure of speed).
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aiolimits import (
    CallLimit,
    LimitSet,
    MemoryBackend,
    ProcessBackend,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)
from aiolimits._numbers import (
    MAX_AMOUNT,
    MAX_CAPACITY,
    MAX_SECONDS,
    MAX_WINDOW,
    MIN_AMOUNT,
    MIN_CAPACITY,
    MIN_WINDOW,
)
from aiolimits.testing import ManualClock
from tests._redis_server import RedisServer, own_server

__all__ = ["own_server"]

SUBNORMAL = 5e-324
HUGE_INT = 10**400
ALGORITHMS = list(RateLimitAlgorithm)

# Outside the range, each one: NaN and infinities, too big for a float, just past either end.
BAD_WINDOWS = [
    math.nan,
    math.inf,
    -math.inf,
    0,
    -1,
    SUBNORMAL,
    1e-300,
    math.nextafter(MIN_WINDOW, 0),
    math.nextafter(MAX_WINDOW, math.inf),
    1e200,
    1e308,
    HUGE_INT,
]
BAD_CAPACITIES = [
    math.nan,
    math.inf,
    0,
    -1,
    SUBNORMAL,
    1e-300,
    math.nextafter(MIN_CAPACITY, 0),
    math.nextafter(MAX_CAPACITY, math.inf),
    10**12 + 1,
    1e200,
    HUGE_INT,
]
BAD_AMOUNTS = [
    math.nan,
    math.inf,
    -math.inf,
    -1,
    -SUBNORMAL,
    SUBNORMAL,
    1e-300,
    math.nextafter(MIN_AMOUNT, 0),
    math.nextafter(MAX_AMOUNT, math.inf),
    1e200,
    1e308,
    HUGE_INT,
]
BAD_SECONDS = [math.nan, -math.inf, -1, -SUBNORMAL, math.nextafter(MAX_SECONDS, math.inf), 1e300]


def short(x: Any) -> str:
    return "10**400" if x is HUGE_INT else repr(x)


# --- the values: limits --------------------------------------------------------------------------


@pytest.mark.parametrize("window", BAD_WINDOWS, ids=short)
def test_a_window_outside_the_range_is_a_value_error(window: Any) -> None:
    for make in (lambda: RateLimit("x", window, 10), lambda: CallLimit(window, 10)):
        with pytest.raises(ValueError, match="window_seconds") as info:
            make()
        assert info.type is ValueError


@pytest.mark.parametrize("capacity", BAD_CAPACITIES, ids=short)
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=str)
def test_a_capacity_outside_the_range_is_a_value_error(capacity: Any, algorithm: Any) -> None:
    with pytest.raises(ValueError, match="capacity") as info:
        RateLimit("x", 60, capacity, algorithm)
    assert info.type is ValueError


@pytest.mark.parametrize("capacity", [0, -1, 10**12 + 1, HUGE_INT], ids=short)
def test_a_resource_capacity_outside_the_range_is_a_value_error(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity") as info:
        ResourceLimit("x", capacity)
    assert info.type is ValueError


def test_the_ends_of_the_range_are_accepted() -> None:
    for algorithm in ALGORITHMS:
        low = 1 if algorithm.integral else MIN_CAPACITY
        RateLimit("x", MIN_WINDOW, low, algorithm)
        RateLimit("x", MAX_WINDOW, MAX_CAPACITY, algorithm)
        RateLimit("x", MAX_WINDOW, 10**12, algorithm)
    ResourceLimit("x", 10**12)


# --- every backend: refused, nothing changes; at the edges, no overflow and no spin --------------


class Pinger:
    """A second Redis client that PINGs in a loop and records the slowest answer: a script
    that spins makes Redis answer BUSY (an error) or nothing."""

    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=5)
        self.worst = 0.0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            start = time.perf_counter()
            try:
                self._client.ping()
            except Exception as e:  # BUSY, a timeout: recorded, the test fails on them
                self.errors.append(e)
            self.worst = max(self.worst, time.perf_counter() - start)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()


@pytest.fixture(params=["memory", "process", "redis"])
def make(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[list[Any], ManualClock], LimitSet]]:
    pinger = None
    if request.param == "memory":
        backend: Any = MemoryBackend()
    elif request.param == "process":
        backend = ProcessBackend(tmp_path)
    else:
        from aiolimits.redis import RedisBackend

        server: RedisServer = request.getfixturevalue("own_server")
        backend = RedisBackend(server.url, prefix="numbers")
        pinger = Pinger(server.url)

    def make(limits: list[Any], clock: ManualClock) -> LimitSet:
        return LimitSet(limits, backend=backend, name=uuid.uuid4().hex, clock=clock)

    yield make
    if pinger is not None:
        pinger.stop()
        assert not pinger.errors, pinger.errors[:3]
        # A stalled script holds Redis for seconds (BUSY until lua-time-limit, 5 s): 1 s tells
        # that apart from a loaded 2-core machine, where a healthy PING has taken 0.24 s.
        assert pinger.worst < 1.0, f"Redis took {pinger.worst:.3f} s to answer PING"


def available(limits: LimitSet) -> dict[str, float]:
    return {key: s["available"] for key, s in limits.get_stats()["limits"].items()}


@pytest.mark.parametrize("algorithm", ["token_bucket", "gcra", "leaky_bucket"])
def test_a_hostile_usage_is_refused_and_changes_nothing(make: Any, algorithm: str) -> None:
    clock = ManualClock(100.0)
    limits = make(
        [RateLimit("a", 60, 90_000, algorithm), RateLimit("b", 60, 90_000, algorithm)], clock
    )
    acq = limits.try_acquire({"a": 10, "b": 10})
    assert acq.successful
    before = available(limits)
    for bad in BAD_AMOUNTS:
        with pytest.raises(ValueError, match=r"usage\['b'\]") as info:
            acq.update({"a": 1, "b": bad})  # `a` alone would be a refund: not even that
        assert info.type is ValueError
        assert available(limits) == before
    acq.release()


@pytest.mark.parametrize("bad", BAD_AMOUNTS, ids=short)
def test_a_hostile_request_is_refused_and_takes_nothing(make: Any, bad: Any) -> None:
    clock = ManualClock(100.0)
    limits = make([RateLimit("a", 60, 10), ResourceLimit("r", 2)], clock)
    before = limits.get_stats()
    for call in (limits.try_acquire, limits.retry_after, limits.acquire_sync):
        with pytest.raises(ValueError, match=r"requested\['a'\]") as info:
            call({"a": bad})
        assert info.type is ValueError
    assert limits.get_stats() == before


@pytest.mark.parametrize("bad", BAD_SECONDS, ids=short)
def test_a_hostile_timeout_or_pause_is_refused(make: Any, bad: Any) -> None:
    clock = ManualClock(100.0)
    limits = make([RateLimit("a", 60, 10)], clock)
    with pytest.raises(ValueError, match="timeout"):
        limits.acquire_sync({"a": 1}, timeout=bad)
    with pytest.raises(ValueError, match="seconds"):
        limits.pause(bad)
    assert limits.get_stats()["paused_for"] == 0
    assert limits.try_acquire({"a": 10}).successful


def test_an_infinite_timeout_means_no_deadline(make: Any) -> None:
    limits = make([RateLimit("a", 60, 10)], ManualClock(100.0))
    with limits.acquire_sync({"a": 1}, timeout=math.inf) as acq:
        assert acq.successful


EDGES = [
    pytest.param(MAX_WINDOW, MAX_CAPACITY, id="longest-window-largest-capacity"),
    pytest.param(MIN_WINDOW, MAX_CAPACITY, id="shortest-window-largest-capacity"),
    pytest.param(MAX_WINDOW, 1, id="longest-window-one-unit"),
    pytest.param(MIN_WINDOW, 1, id="shortest-window-one-unit"),
    pytest.param(MAX_WINDOW, MIN_CAPACITY, id="longest-window-smallest-capacity"),
    pytest.param(MIN_WINDOW, MIN_CAPACITY, id="shortest-window-smallest-capacity"),
]


@pytest.mark.parametrize(("window", "capacity"), EDGES)
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=str)
def test_the_edges_of_the_range_keep_every_number_finite_and_every_call_prompt(
    make: Any, algorithm: RateLimitAlgorithm, window: float, capacity: float
) -> None:
    if algorithm.integral and capacity < 1:
        pytest.skip("the window algorithms count whole units")
    clock = ManualClock(1e6)
    limits = make([RateLimit("a", window, capacity, algorithm), ResourceLimit("r", 2)], clock)
    held = limits.try_acquire({"a": capacity, "r": 1})
    assert held.successful
    # The largest debt a caller can run up: the largest usage, reported again and again.
    for step in range(20):
        acq = limits.try_acquire({"r": 1})
        assert acq.successful
        acq.update({"a": MAX_AMOUNT if step % 2 else math.floor(MAX_AMOUNT)})
        acq.release()
        clock.advance(window / 3)
    for _ in range(3):
        wait = limits.retry_after({"a": MIN_AMOUNT if not algorithm.integral else 1})
        assert 0 <= wait < math.inf
        stats = limits.get_stats()
        assert all(math.isfinite(s["available"]) for s in stats["limits"].values()), stats
        probe = limits.try_acquire({"a": capacity, "r": 0})
        assert probe.successful == (wait == 0)
        probe.release()
        held.release()  # never raises, even with the other holder deep in debt
        clock.advance(window * 1e3)
    # A refund back to nothing of a debt: still finite, still prompt.
    acq = limits.try_acquire({"r": 1})
    acq.update({"a": 0})
    acq.release()
    assert math.isfinite(limits.retry_after({"a": 1 if algorithm.integral else MIN_AMOUNT}))


@pytest.mark.parametrize("header", ["1e300", "1e10", "1000000000.5", "inf", "nan", "-5"])
def test_a_retry_after_header_out_of_range_is_ignored_never_raised(header: str) -> None:
    # A provider (or a hostile upstream) asking for more than the longest delay the headers
    # reader keeps is ignored: the 429 goes back to the caller, nobody is paused for decades.
    from aiolimits.integrations.headers import read_limits

    assert read_limits({"Retry-After": header}, now=0.0).retry_after is None


@pytest.mark.parametrize("bad", [*BAD_SECONDS, 0, math.inf], ids=short)
@pytest.mark.parametrize("what", ["timeout", "lease_seconds"])
def test_a_hostile_backend_time_is_refused(bad: Any, what: str) -> None:
    """A backend's own call timeout or lease beyond the range would overflow a thread's wait or
    a store's expiry later, far from the caller: refused when the backend is made."""
    from aiolimits.redis import RedisBackend

    with pytest.raises(ValueError, match=what):
        RedisBackend("redis://127.0.0.1:1/0", **{what: bad})
    if importlib.util.find_spec("ray") is not None:
        from aiolimits.ray import RayBackend

        with pytest.raises(ValueError, match=what):
            RayBackend(**{what: bad})
