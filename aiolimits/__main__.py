"""The command line: ``python -m aiolimits demo`` (also the ``aiolimits`` console script)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _latency(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    try:
        pair = (float(low) / 1000, float(high or low) / 1000)
    except ValueError:
        message = f"expected LOW,HIGH in milliseconds, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW <= HIGH, got {text!r}")
    return pair


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiolimits", description="aiolimits command line")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="LLM fan-out under RPM + TPM limits against a local simulated provider",
        description=(
            "Fan out many simulated LLM calls through aiolimits' httpx integration against an "
            "in-process provider on 127.0.0.1 that enforces RPM and TPM and answers 429 on any "
            "excess; print a summary and write a PNG timeline."
        ),
    )
    demo.add_argument("--calls", type=int, default=3000, help="number of calls (default 3000)")
    demo.add_argument("--rpm", type=int, default=9000, help="requests per minute (default 9000)")
    demo.add_argument(
        "--tpm", type=int, default=6_000_000, help="tokens per minute (default 6,000,000)"
    )
    demo.add_argument(
        "--window",
        type=float,
        default=10.0,
        help="the limits' window in seconds; RPM and TPM are scaled to it (default 10)",
    )
    demo.add_argument(
        "--algorithm",
        default="token_bucket",
        choices=["token_bucket", "gcra", "sliding_window", "fixed_window"],
        help="the algorithm of the provider and of the client (default token_bucket)",
    )
    demo.add_argument(
        "--concurrency", type=int, default=16, help="requests in flight at most (default 16)"
    )
    demo.add_argument("--min-prompt", type=int, default=50, help="shortest prompt, tokens")
    demo.add_argument("--max-prompt", type=int, default=1500, help="longest prompt, tokens")
    demo.add_argument("--max-tokens", type=int, default=300, help="max_tokens of every call")
    demo.add_argument(
        "--latency",
        type=_latency,
        default=(0.02, 0.1),
        metavar="LOW,HIGH",
        help="the provider's latency range in milliseconds (default 20,100)",
    )
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument(
        "--without-limits",
        action="store_true",
        help="send without aiolimits, to see the provider's 429s",
    )
    demo.add_argument(
        "--provider-factor",
        type=float,
        default=1.0,
        metavar="F",
        help="the provider really allows F times its published limits (0 < F <= 1; default 1): "
        "the client declares the published ones and must learn the real ones",
    )
    demo.add_argument(
        "--provider-headers",
        choices=["none", "openai", "anthropic"],
        default="none",
        help="the rate-limit headers the provider answers with (default none: only 429 and "
        "Retry-After, so the client adapts with AIMD)",
    )
    demo.add_argument(
        "--png", type=Path, default=Path("aiolimits-demo.png"), help="where to write the timeline"
    )
    demo.add_argument("--no-png", action="store_true", help="do not write the timeline")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    from ._demo.cli import demo

    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
