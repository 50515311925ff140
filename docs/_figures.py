"""Draw the algorithm chooser's pictures from the library itself (run by ``scripts/docs``).

Every curve is what a :class:`aiolimits.LimitSet` admits on a
:class:`aiolimits.testing.ManualClock`:
a greedy client asks for one request after another, in order, and jumps the clock to the time
``retry_after`` names whenever it is refused. Nothing here models an algorithm: the pictures are the
library's own decisions, so they cannot drift from the code. The files go to ``docs/figures/``
(not committed; the site build makes them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from aiolimits import LimitSet, RateLimit, RateLimitAlgorithm
from aiolimits.testing import ManualClock

OUT = Path(__file__).resolve().parent / "figures"
WINDOW = 1.0
CAPACITY = 10
HORIZON = 3.0


def admissions(
    algorithm: RateLimitAlgorithm,
    *,
    amount: float = 1,
    used: float | None = None,
    pause_at: float | None = None,
    pause_for: float = 0.0,
) -> list[tuple[float, float]]:
    """(time, units) of every admission of a greedy client within HORIZON seconds."""
    clock = ManualClock()
    limits = LimitSet(
        [RateLimit("units", window_seconds=WINDOW, capacity=CAPACITY, algorithm=algorithm)],
        clock=clock,
    )
    taken: list[tuple[float, float]] = []
    paused = False
    while True:
        now = clock.now()
        if pause_at is not None and not paused and now >= pause_at:
            limits.pause(pause_for)  # a provider answered 429 with Retry-After
            paused = True
        acq = limits.try_acquire({"units": amount})
        if acq.successful:
            if used is not None:
                acq.update(usage={"units": used})  # the real usage, known after the call
            taken.append((now, amount if used is None else used))
            acq.release()
            continue
        wait = limits.retry_after({"units": amount})
        if now + wait > HORIZON:
            return taken
        clock.set(now + wait)


def cumulative(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    times: list[float] = [0.0]
    totals: list[float] = [0.0]
    total = 0.0
    for when, units in points:
        times += [when, when]
        totals += [total, total + units]
        total += units
    times.append(HORIZON)
    totals.append(total)
    return times, totals


def figure(name: str, title: str, draw: Callable[[plt.Axes], None]) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=110)
    draw(ax)
    ax.set_title(title)
    ax.set_xlabel("seconds")
    if not ax.get_ylabel():
        ax.set_ylabel("units admitted (cumulative)")
    ax.set_xlim(0, HORIZON)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / name)
    plt.close(fig)


def algorithms() -> None:
    """One panel per algorithm (several admit the very same sequence, which one plot would hide)."""
    members = list(RateLimitAlgorithm)
    fig, axes = plt.subplots(1, len(members), figsize=(11, 3.0), dpi=110, sharey=True)
    for ax, algorithm in zip(axes, members, strict=True):
        ax.plot(*cumulative(admissions(algorithm)), linewidth=1.4, color="tab:blue")
        ax.plot(
            [0, HORIZON],
            [CAPACITY, CAPACITY + CAPACITY / WINDOW * HORIZON],
            "--",
            color="grey",
            linewidth=0.8,
        )
        ax.set_title(algorithm.value, fontsize=10)
        ax.set_xlim(0, HORIZON)
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("units admitted")
    fig.suptitle(
        f"A greedy client, {CAPACITY} units per {WINDOW:g} s (dashed: C + r·t)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(OUT / "algorithms.png")
    plt.close(fig)


def refund(ax: plt.Axes) -> None:
    for used, label in ((None, "reserve 5, use 5"), (2.0, "reserve 5, use 2 (update refunds 3)")):
        points = admissions(RateLimitAlgorithm.TokenBucket, amount=5, used=used)
        calls = [(when, 1.0) for when, _ in points]
        ax.plot(*cumulative(calls), label=label, linewidth=1.4)
    ax.set_ylabel("calls admitted (cumulative)")


def pause(ax: plt.Axes) -> None:
    ax.plot(*cumulative(admissions(RateLimitAlgorithm.TokenBucket)), label="no pause")
    points = admissions(RateLimitAlgorithm.TokenBucket, pause_at=1.0, pause_for=0.8)
    ax.plot(*cumulative(points), label="pause(0.8) at t = 1 s (a 429's Retry-After)")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    limit = f"{CAPACITY} units per {WINDOW:g} s"
    algorithms()
    figure("refund.png", f"Refunds: token_bucket, {limit}", refund)
    figure("pause.png", f"A pause holds everyone, then the rate resumes: {limit}", pause)


if __name__ == "__main__":
    main()
