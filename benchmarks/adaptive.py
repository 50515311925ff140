"""Following a provider whose real limits are not the declared ones: the figures behind
docs/httpx.md ("Following the provider").

``python -m benchmarks.adaptive [--repeats N]`` runs each scenario of
``aiolimits/_demo/follow.py`` on asyncio and trio, with ``adapt`` on and, as the baseline measured
in the same run (each adapting run followed by the same run without), off, and prints per
scenario the range over the repeats of: the share of the client's attempts answered 429 once past
the first window, and the share of the provider's real token limit used then (its bucket one
window in, plus its rate up to the last arrival), and the ratio of that share to the baseline's
(which, overshooting, uses all of the real limit when the machine lets the client keep up). The test
suite checks looser bounds on the same runs (``tests/test_adaptive_outcomes.py``).
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import anyio

from aiolimits._demo.follow import TOKENS_PER_WINDOW, FollowOutcome, follow

SCENARIOS: dict[str, dict[str, Any]] = {
    "(a) real = 1/2 declared, OpenAI headers": {"factor": 0.5, "headers": "openai", "calls": 100},
    "(a') real = 1/2 declared, Anthropic headers": {
        "factor": 0.5,
        "headers": "anthropic",
        "calls": 100,
    },
    "(b) real = 1/2 declared, 429 + Retry-After only": {
        "factor": 0.5,
        "headers": "none",
        "calls": 100,
    },
    "(c) unseen 2nd client at 40 % of the key": {
        "factor": 1.0,
        "headers": "openai",
        "calls": 100,
        "unseen": 0.4,
    },
    "(d) pool of 2 keys, key b at 1/4, OpenAI headers": {
        "factor": 0.25,
        "headers": "openai",
        "calls": 200,
        "pool": True,
    },
    "(d') pool of 2 keys, key b at 1/4, 429 only": {
        "factor": 0.25,
        "headers": "none",
        "calls": 200,
        "pool": True,
    },
}


def figures(options: dict[str, Any], outcome: FollowOutcome) -> dict[str, float]:
    if options.get("pool"):
        return {
            "429 past 1st window": outcome.rejected_share(after=1),
            "b: last 429 (windows)": outcome.last_rejection("b"),
            "sent a:b after 2 windows": outcome.sent_after("a", 2)
            / max(1, outcome.sent_after("b", 2)),
        }
    return {
        "429 past 1st window": outcome.rejected_share(after=1),
        "real limit used": outcome.used(TOKENS_PER_WINDOW * options["factor"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptive")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for name, options in SCENARIOS.items():
        print(name, flush=True)
        runs: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
        ratios: list[float] = []
        for backend in ("asyncio", "trio"):
            for repeat in range(args.repeats):
                used = {}
                for adapt in (True, False):  # the baseline right after, on the same seed
                    run = functools.partial(follow, adapt=adapt, seed=repeat + 1, **options)
                    got = figures(options, anyio.run(run, backend=backend))
                    for what, value in got.items():
                        runs[adapt].setdefault(what, []).append(value)
                    used[adapt] = got.get("real limit used", 0.0)
                if used[False] > 0:
                    ratios.append(used[True] / used[False])
        for adapt in (True, False):
            shown = ", ".join(
                f"{what} {min(values):.3f}-{max(values):.3f}"
                for what, values in runs[adapt].items()
            )
            print(f"  {'adapt   ' if adapt else 'no adapt'}: {shown}")
        if any(ratios):
            print(
                f"  used, adapt / no adapt (same seed, one after the other): "
                f"{min(ratios):.2f}-{max(ratios):.2f}"
            )


if __name__ == "__main__":
    main()
