"""The demo's picture: what the provider admitted over time, against what its limits allow.

Two panels, requests and tokens. Each shows the cumulative amount the provider counted (real
tokens, after settlement) as a step line, and the most its limit could have admitted by then from
the first arrival: ``C + r * t`` for the buckets, ``C`` more at each window for the windows. The
admitted line hugs the limit line and never crosses it; any 429 is marked in red.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from .run import Summary, client_limits

__all__ = ["MISSING", "write_png"]

MISSING = (
    "the PNG timeline needs matplotlib: pip install 'aiolimits[demo]' "
    "(or run scripts/demo, which installs it)"
)


def _envelope(summary: Summary, capacity: int, times: list[float]) -> list[float]:
    cfg = summary.config
    first = summary.arrivals[0].at
    if cfg.algorithm in ("token_bucket", "gcra"):
        return [capacity + capacity / cfg.window * (t - first) for t in times]
    w = cfg.window
    if cfg.algorithm == "fixed_window":
        return [capacity * (math.floor(t / w) - math.floor(first / w) + 1) for t in times]
    return [capacity * (math.floor((t - first) / w) + 1) for t in times]


def _learned(ax: Any, summary: Summary, first: float, end: float) -> None:
    """The client's limits over time, as a share of what it declared, against the provider's."""
    cfg = summary.config
    declared = {limit.key: float(getattr(limit, "capacity", 1)) for limit in client_limits(cfg)}
    for key, label, color in (
        ("call_count", "requests", "#1f77b4"),
        ("tokens", "tokens", "#2ca02c"),
    ):
        xs, ys = [0.0], [1.0]
        for change in summary.changes:
            if change.key == key:
                xs.append(max(0.0, change.at - first))
                ys.append(change.capacity / declared[key])
        xs.append(max(end, xs[-1]))
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", color=color, label=f"client's {label} limit (learned)")
    ax.axhline(
        cfg.provider_factor, color="#d62728", linestyle="--", label="the provider's real share"
    )
    ax.set_ylabel("share of the declared limit")
    ax.set_ylim(0, 1.1)
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(alpha=0.3)


def write_png(summary: Summary, path: Path) -> Path:
    """Draw the timeline of ``summary`` into ``path`` (PNG).

    Raises:
        ModuleNotFoundError: matplotlib is not installed (:data:`MISSING` says what to do).
        ValueError: nothing was admitted, so there is nothing to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary.arrivals:
        raise ValueError("nothing was admitted: no timeline to draw")
    cfg = summary.config
    first = summary.arrivals[0].at
    times = [a.at - first for a in summary.arrivals]
    end = times[-1]
    grid = [end * i / 400 for i in range(401)]
    learning = bool(summary.changes) or cfg.provider_factor != 1
    fig, all_axes = plt.subplots(
        3 if learning else 2, 1, figsize=(9, 9 if learning else 6.5), sharex=True
    )
    axes = all_axes[:2]
    rpm, tpm = cfg.rpm * cfg.provider_factor, cfg.tpm * cfg.provider_factor
    panels = (
        ("requests", [1] * len(times), cfg.real_calls, f"{rpm:,.0f} RPM"),
        ("tokens", [a.tokens for a in summary.arrivals], cfg.real_tokens, f"{tpm:,.0f} TPM"),
    )
    for ax, (what, amounts, capacity, rate) in zip(axes, panels, strict=True):
        cumulative = list(itertools.accumulate(amounts))
        ax.step(times, cumulative, where="post", color="#1f77b4", label=f"{what} admitted")
        limit = _envelope(summary, capacity, [first + t for t in grid])
        ax.plot(
            grid, limit, color="#d62728", linestyle="--", label=f"most the limit allows ({rate})"
        )
        for rejected in summary.rejected:
            ax.axvline(rejected - first, color="#d62728", alpha=0.2, linewidth=0.5)
        ax.set_ylabel(f"{what}, cumulative")
        ax.legend(loc="upper left", fontsize=9)
        ax.grid(alpha=0.3)
    if learning:
        _learned(all_axes[2], summary, first, end)
    all_axes[-1].set_xlabel("seconds since the first request reached the provider")
    fig.suptitle(
        f"{'with' if cfg.use_limits else 'WITHOUT'} aiolimits: {summary.calls:,} LLM calls, "
        f"{cfg.algorithm}, "
        f"{len(summary.rejected)} answers 429, {summary.used_tokens:.1%} of the token limit used",
        fontsize=11,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
