"""LLM-style fan-out under a requests-per-minute and a tokens-per-minute quota, with refunds.

120 concurrent "calls" share one LimitSet: at most 1,200 calls and 60,000 tokens per minute (scaled
down to 20 calls and 1,000 tokens per second so the run takes a few seconds), and at most 8 calls
in flight. Each call reserves its prompt plus the maximum completion, and reports the real count
when it is known; the unused part is refunded and lets the next caller in sooner.

Run it with ``scripts/demo`` (or ``python examples/llm_fanout.py [--calls N] [--backend trio]``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import anyio

from aiolimits import CallLimit, LimitSet, RateLimit, ResourceLimit

MAX_COMPLETION = 60


async def main(calls: int, seed: int) -> None:
    limits = LimitSet(
        [
            CallLimit(window_seconds=1, capacity=20),
            RateLimit("tokens", window_seconds=1, capacity=1_000),
            ResourceLimit("in_flight", capacity=8),
        ],
        config={"provider": "simulated"},
    )
    rng = random.Random(seed)
    waits: list[float] = []
    admitted: list[tuple[float, int]] = []  # (time, tokens really used)
    start = time.monotonic()

    async def call(prompt_tokens: int) -> None:
        reserve = prompt_tokens + MAX_COMPLETION
        async with limits.acquire(requested={"tokens": reserve}) as acq:
            waits.append(acq.waited)
            await anyio.sleep(rng.uniform(0.05, 0.2))  # the provider thinks
            used = prompt_tokens + rng.randint(5, MAX_COMPLETION)
            acq.update(usage={"tokens": used})  # refunds reserve - used
            admitted.append((time.monotonic() - start, used))

    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(call, rng.randint(10, 90))

    elapsed = time.monotonic() - start
    stats = limits.get_stats()
    tokens = sum(used for _, used in admitted)
    print(f"{calls} calls in {elapsed:.2f} s")
    print(f"  calls/s  achieved {calls / elapsed:7.2f}   limit 20 (+ burst of 20)")
    print(f"  tokens/s achieved {tokens / elapsed:7.1f}   limit 1000 (+ burst of 1000)")
    print(f"  refunded tokens   {stats['refunded']:7.0f}   (reserved but not used)")
    print(f"  wait p50 {statistics.median(waits):.3f} s, max {max(waits):.3f} s")
    print(f"  granted {stats['granted']}, timed out {stats['timed_out']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=120)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.calls, args.seed, backend=args.backend)
