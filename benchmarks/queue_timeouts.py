"""Queue-aware timeouts: what a refused arrival costs behind a queue of L waiters.

Each arrival is decided by the scheduler itself (``enqueue`` under the lock, as the doors call
it), behind L queued requests on a token bucket (1000 units a second, empty), and is refused at
once: its deadline (0.5 ms) is before its own unit, and long before the queue clears. The figure
is the time per arrival as a ratio to the same arrivals without a deadline (which only join the
queue), measured in the same repeat. Three cases:

* ``forecast``: the forecast, made once before the timed arrivals, is up to date (O(1) per
  arrival, whatever L);
* ``forecast, refund before each``: a refund (or a waiter leaving, or a pause) between arrivals
  drops it every time; rebuilding it runs the L queued requests again, as far as the credit the
  arrivals earn covers (``Scheduler.forecast_budget``), and the others are checked on their own
  amounts. Measured in a steady stream: the credit saved by the arrivals that built the queue
  is set aside first (with it, the first rebuilds after a quiet spell are all made);
* ``own amounts only``: the behaviour before queue-aware timeouts (and of the Redis backend).

Run: ``python -m benchmarks.queue_timeouts [--arrivals 2000] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from aiolimits import RateLimit
from aiolimits._algorithms import RateState, new_state
from aiolimits._scheduler import Scheduler
from aiolimits._waiters import Waiter

from ._common import Summary


class _Parked(Waiter):
    __slots__ = ()

    def notify(self) -> bool:
        return True


class _OwnAmountsOnly(Scheduler):
    __slots__ = ()
    forecasts_queue = False


def _scheduler(
    queued: int, make: Callable[..., Scheduler]
) -> tuple[Scheduler, tuple[RateState, ...], list[float]]:
    clock = [0.0]
    state = new_state(RateLimit("tokens", 1, 1000), 0.0)  # 1000 per second
    sched = make((state,), lambda: clock[0])
    items = ((state, 1000.0),)
    assert sched.try_take(items, 0.0) is not None  # empty: every request below waits
    for _ in range(queued):
        assert sched.enqueue(_Parked(((state, 1.0),), float("inf")), 0.0)
    return sched, (state,), clock


def _time_arrivals(
    queued: int, arrivals: int, make: Callable[..., Scheduler], deadline: float, refund: bool
) -> float:
    sched, (state,), _clock = _scheduler(queued, make)
    items = ((state, 1.0),)
    sched.enqueue(_Parked(items, deadline), 0.0)  # makes the forecast (refused: not queued)
    if refund:
        sched._credit = 0  # a steady stream: see the module's docstring
    waiters = [_Parked(items, deadline) for _ in range(arrivals)]
    t = time.perf_counter()
    for waiter in waiters:
        if refund:
            # What a refund (a usage update below the amount taken), a waiter leaving or a
            # pause does: the next arrival rebuilds the forecast.
            sched.forget_forecast()
        sched.enqueue(waiter, 0.0)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrivals", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.arrivals
    soon = 0.0005  # before the arrival's own unit (1 ms): refused at once in every case
    print(f"{n} arrivals refused at once behind L queued requests; time per arrival as a ratio")
    print("to the same arrivals without a timeout; median (min-max) of the repeats")
    for queued in (10, 1_000, 10_000):
        cases: dict[str, list[float]] = {"forecast": [], "forecast, refund before each": []}
        cases["own amounts only"] = []
        base: list[float] = []
        for _ in range(args.repeats):
            b = _time_arrivals(queued, n, Scheduler, float("inf"), refund=False)
            base.append(b / n)
            cases["forecast"].append(_time_arrivals(queued, n, Scheduler, soon, False) / b)
            rebuilt = _time_arrivals(queued, n, Scheduler, soon, True)
            cases["forecast, refund before each"].append(rebuilt / b)
            own = _time_arrivals(queued, n, _OwnAmountsOnly, soon, False)
            cases["own amounts only"].append(own / b)
        print(f"L={queued:>6}: without a timeout {Summary.of(base).median * 1e9:8.0f} ns")
        for name, ratios in cases.items():
            print(f"          {name:30} {Summary.of(ratios).fmt(unit='x')}")


if __name__ == "__main__":
    main()
