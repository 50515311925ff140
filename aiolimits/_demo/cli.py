"""``aiolimits demo`` on the terminal: a progress bar, the summary, the PNG."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import anyio

__all__ = ["demo"]

_NEEDS = "the demo needs httpx and rich: pip install 'aiolimits[demo]' (or run scripts/demo)"


def demo(args: argparse.Namespace) -> int:
    try:
        import httpx  # noqa: F401
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )
    except ModuleNotFoundError:
        print(_NEEDS, file=sys.stderr)
        return 2
    from .run import DemoConfig, client_limits, run

    try:
        config = DemoConfig(
            calls=args.calls,
            rpm=args.rpm,
            tpm=args.tpm,
            window=args.window,
            algorithm=args.algorithm,
            concurrency=args.concurrency,
            min_prompt=args.min_prompt,
            max_prompt=args.max_prompt,
            max_tokens=args.max_tokens,
            latency=args.latency,
            seed=args.seed,
            use_limits=not args.without_limits,
            provider_factor=args.provider_factor,
            provider_headers=args.provider_headers,
        )
        limits = client_limits(config)
    except ValueError as exc:
        print(f"aiolimits demo: {exc}", file=sys.stderr)
        return 2
    console = Console(highlight=False, soft_wrap=True, markup=False)
    console.print(
        f"aiolimits demo: {config.calls:,} LLM calls (prompts of {config.min_prompt}-"
        f"{config.max_prompt} tokens, max_tokens {config.max_tokens}) to a provider on "
        f"127.0.0.1 that allows {config.rpm:,} RPM and {config.tpm:,} TPM ({config.algorithm}: "
        f"{config.provider_calls:,} requests and {config.provider_tokens:,} tokens per "
        f"{config.window:g} s) and answers 429 beyond."
    )
    if config.provider_factor != 1 or config.provider_headers != "none":
        console.print(
            f"The provider really allows {config.provider_factor:g} x that "
            f"({config.real_calls:,} requests and {config.real_tokens:,} tokens per "
            f"{config.window:g} s) and sends rate-limit headers: {config.provider_headers}; "
            "the client follows what it says (AIMD on 429s without headers)."
        )
    if config.use_limits:
        calls, tokens = limits[0].capacity, limits[1].capacity
        bucket = config.algorithm in ("token_bucket", "gcra")
        console.print(
            f"Client: aiolimits with {calls:,} requests and {tokens:,} tokens per "
            f"{'bucket, at the same rate' if bucket else 'window'} (the provider's less what "
            f"{config.concurrency} requests in flight can carry), real usage settled from each "
            "answer."
        )
    else:
        console.print(
            f"Client: no rate limits, {config.concurrency} requests in flight at most, no retries."
        )
    progress = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
        transient=False,
    )
    with progress:
        task = progress.add_task("calls", total=config.calls)

        def advance(done: int) -> Any:
            progress.update(task, completed=done)

        runner = functools.partial(run, config, on_done=advance)
        summary = anyio.run(runner, backend=args.backend)
    for line in summary.lines():
        console.print(line)
    if not args.no_png:
        from .timeline import MISSING, write_png

        try:
            path = write_png(summary, args.png)
        except ModuleNotFoundError:
            console.print(f"  (no timeline: {MISSING})")
        except ValueError as exc:
            console.print(f"  (no timeline: {exc})")
        else:
            console.print(f"  timeline: {path}")
    return 0
