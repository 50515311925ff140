"""The Markdown report and the PNG chart of a benchmark run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import Summary
from .keyed import table as keyed_table

if TYPE_CHECKING:
    from .__main__ import Results

PACKAGES = (
    "aiolimits",
    "anyio",
    "trio",
    "uvloop",
    "aiolimiter",
    "limits",
    "pyrate-limiter",
    "throttled-py",
    "concurry",
)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def tables(r: Results) -> str:
    s = r.settings
    out: list[str] = []
    out.append("## Uncontended acquire + release\n")
    out.append(
        f"Time for {s.n:,} acquire+release (or hit) in one task, as a ratio to the first row "
        f"measured in the same repeat; median (min-max) of {s.repeats} interleaved repeats.\n"
    )
    for runtime, ratios in r.uncontended.items():
        base = Summary.of(ratios["_baseline_ns"])
        out.append(f"\n**{runtime}** (baseline: {base.fmt('.0f', ' ns')} per operation)\n")
        out.append("| library | ratio to baseline |\n|---|---|")
        out.extend(
            f"| {name} | {Summary.of(v).fmt(unit='x')} |"
            for name, v in ratios.items()
            if not name.startswith("_")
        )
        out.append("")
    out.append("\n## Contended: many tasks sharing one limit\n")
    out.append(
        f"{s.tasks} tasks x {s.per_task} acquisitions of 1 unit at {s.rate:.0f}/s, burst used up "
        "first so every grant is scheduled. wall/ideal: wall time ÷ (grants ÷ rate). CPU: process "
        "CPU per grant. Max/1 s: most grants in any 1-second window (the limit allows "
        f"{s.rate:.0f}). tau: Kendall's tau of grant order against queue order (1 = FIFO). "
        f"Median (min-max) of {s.contended_repeats} interleaved repeats.\n"
    )
    for loop, results in r.contended.items():
        floor = Summary.of(r.floors[loop])
        out.append(
            f"\n**{loop}**: CPU floor (`await asyncio.sleep(0.001)` in a loop) "
            f"{floor.fmt('.1f', ' µs')} per iteration\n"
        )
        out.append(
            "| library | wall/ideal | CPU µs/grant | CPU ÷ floor | max/1 s | tau | finished |\n"
            "|---|---|---|---|---|---|---|"
        )
        for name, runs in results.items():
            if not runs:
                continue
            cpu = Summary.of([c.cpu_us for c in runs])
            out.append(
                f"| {name} | {Summary.of([c.wall_ratio for c in runs]).fmt('.3f')} "
                f"| {cpu.fmt('.1f')} | {cpu.median / floor.median:.2f} "
                f"| {Summary.of([float(c.most_per_second) for c in runs]).fmt('.0f')} "
                f"| {Summary.of([c.tau for c in runs]).fmt('.3f')} "
                f"| {sum(c.finished for c in runs)}/{len(runs)} |"
            )
        out.append("")
    out.append("\n## Scale: aiolimits CPU per grant against the number of waiters\n")
    first = s.scale_waiters[0]
    out.append(
        f"N tasks each acquiring 1 unit in a loop from one limit of {s.scale_rate:.0f}/s on "
        f"asyncio, so N waiters are always queued; {s.scale_grants:,} grants measured in steady "
        "state, once every task has joined the queue (`benchmarks.contended.scale_run`). "
        f"÷ {first:,}: CPU per grant as a ratio to the median with {first:,} waiters (target: "
        f"at most 1.1 with 100,000). Median (min-max) of {s.scale_repeats} interleaved repeats.\n"
    )
    out.append(
        f"| waiters | wall/ideal | CPU µs/grant | ÷ {first:,} | tau |\n|---|---|---|---|---|"
    )
    base = Summary.of([c.cpu_us for c in r.scale[first]]).median
    for waiters, runs in r.scale.items():
        cpu = Summary.of([c.cpu_us for c in runs])
        out.append(
            f"| {waiters:,} | {Summary.of([c.wall_ratio for c in runs]).fmt('.3f')} "
            f"| {cpu.fmt('.1f')} | {cpu.median / base:.2f} "
            f"| {Summary.of([c.tau for c in runs]).fmt('.3f')} |"
        )
    out.append("\n## Cancellation: aiolimits with half the waiters cancelled\n")
    out.append(
        f"{s.cancel_waiters} waiters of 1 unit at {s.rate:.0f}/s (burst used up); a seeded random "
        "half are cancelled at uniformly random moments in the first quarter of the ideal run. "
        "Rate after: grants per second after the last possible cancellation ÷ configured rate. "
        "Three seeds.\n"
    )
    out.append(
        "| runtime | rate after ÷ rate | cancelled | granted | left waiting |\n"
        "|---|---|---|---|---|"
    )
    for backend, cruns in r.cancellation.items():
        out.append(
            f"| {backend} | {Summary.of([c.rate_ratio for c in cruns]).fmt('.3f')} "
            f"| {', '.join(str(c.cancelled) for c in cruns)} "
            f"| {', '.join(str(c.granted) for c in cruns)} "
            f"| {', '.join(str(c.waiting_after) for c in cruns)} |"
        )
    if r.keyed:
        out.append("\n" + keyed_table(r.keyed))
    return "\n".join(out) + "\n"


#: Sections measured by hand go after this line of docs/benchmarks.md; a run keeps them.
HAND_WRITTEN = "<!-- Hand-written sections below: `python -m benchmarks` keeps them. -->"


def write_markdown(r: Results, path: Path, command: str, started: datetime, chart: str) -> str:
    """Write the report to ``path``, keeping what follows :data:`HAND_WRITTEN` there."""
    kept = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        at = old.find(HAND_WRITTEN)
        if at >= 0:
            kept = "\n" + old[at:]
    versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    text = (
        "# Benchmarks: aiolimits and its peers\n\n"
        f"Produced by `{command}` (from the repository root, in `.venv`) on "
        f"{started:%Y-%m-%d %H:%M} UTC in {r.wall_seconds:.0f} s. Machine: {os.cpu_count()} CPUs "
        f"(`nproc`), {platform.platform()}, Python {sys.version.split()[0]}. Packages: "
        f"{versions}.\n\n"
        "This machine is shared and noisy: absolute times drift by tens of percent, so every "
        "figure is a ratio to a baseline measured in the same run, or read beside one (the CPU "
        "floor). What each scenario measures, and what was left out, is in "
        "`benchmarks/README.md` in the repository.\n\n"
        f"![uncontended ratios and contended CPU per grant]({chart})\n\n" + tables(r) + kept
    )
    path.write_text(text, encoding="utf-8")
    return text


def write_chart(r: Results, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6.5), width_ratios=(1.2, 1))
    labels: list[str] = []
    med: list[float] = []
    err: list[tuple[float, float]] = []
    for runtime, ratios in r.uncontended.items():
        for name, values in ratios.items():
            if name.startswith("_"):
                continue
            s = Summary.of(values)
            labels.append(f"{runtime}: {name}")
            med.append(s.median)
            err.append((s.median - s.low, s.high - s.median))
    y = list(range(len(labels)))[::-1]
    colors = ["tab:green" if "aiolimits" in lab else "tab:gray" for lab in labels]
    ax1.barh(y, med, xerr=list(zip(*err, strict=True)), color=colors, capsize=3)
    ax1.set_yticks(y, labels, fontsize=9)
    ax1.set_xscale("log")
    ax1.axvline(1.0, color="black", linewidth=0.8)
    ax1.set_xlabel("time ÷ runtime's semaphore (log scale; bars: median, whiskers: min-max)")
    ax1.set_title("Uncontended acquire + release")
    for yi, m in zip(y, med, strict=True):
        ax1.text(m * 1.05, yi, f"{m:.2f}x", va="center", fontsize=8)

    loops = list(r.contended)
    names = list(next(iter(r.contended.values())))
    width = 0.8 / len(loops)
    for k, loop in enumerate(loops):
        xs = [i + (k - (len(loops) - 1) / 2) * width for i in range(len(names))]
        vals = [Summary.of([c.cpu_us for c in r.contended[loop][n]]) for n in names]
        ax2.bar(
            xs,
            [v.median for v in vals],
            width,
            yerr=[[v.median - v.low for v in vals], [v.high - v.median for v in vals]],
            capsize=3,
            label=loop,
        )
        ax2.axhline(
            Summary.of(r.floors[loop]).median,
            color=f"C{k}",
            linestyle="--",
            linewidth=1,
            label=f"{loop} CPU floor (sleep 1 ms)",
        )
    ax2.set_xticks(range(len(names)), names, rotation=20)
    ax2.set_yscale("log")
    ax2.set_ylabel("CPU µs per grant (log scale)")
    s = r.settings
    ax2.set_title(f"Contended: {s.tasks} tasks x {s.per_task} at {s.rate:.0f}/s")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
