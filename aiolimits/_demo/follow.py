"""Runs where the provider's real limits differ from what the client declares, and what they show.

Each run starts the simulated provider (``provider.py``, its own token buckets, on 127.0.0.1)
with limits ``factor`` times what the client declares, sends ``calls`` LLM-like calls through
:class:`~aiolimits.integrations.httpx.LimitedTransport` with ``adapt=`` on, and measures at the
provider: how many attempts it answered 429, and how much of its real binding limit (tokens here)
the client used, both once past the first window (the client cannot know better before its first
answer). The tests (``tests/test_adaptive_outcomes.py``) check loose bounds on these figures;
``benchmarks/adaptive.py`` prints them.

Variants: ``headers`` (``"openai"``, ``"anthropic"``, or ``"none"``: only 429 and
``Retry-After``); ``unseen`` (a second client on the same API key, sending at that share of the
real token rate without following anything); ``pool`` (two API keys, the second at ``factor``
and the first at its declared limit, behind a ``LeastWait`` :class:`~aiolimits.LimitPool`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, final

import anyio
import httpx

from .._adaptive import Adaptation, LimitChange, follower_for
from .._limits import CallLimit, RateLimit, RateLimitAlgorithm
from .._limitset import LimitSet
from .._pool import LimitPool
from ..integrations.httpx import LimitedTransport
from .provider import Arrival, SimulatedProvider, count_tokens

__all__ = ["FollowOutcome", "follow"]

WINDOW: Final = 1.0
CALLS_PER_WINDOW: Final = 100
TOKENS_PER_WINDOW: Final = 8_000
CONCURRENCY: Final = 8  # calls in flight at once, as a client's worker pool would send
MAX_TOKENS: Final = 100
PROMPTS: Final = (50, 300)


@final
class FollowOutcome:
    """What one run measured at the provider."""

    __slots__ = ("arrivals", "attempts", "changes", "levels", "start", "window")

    def __init__(
        self,
        *,
        arrivals: Sequence[Arrival],
        attempts: Sequence[tuple[float, int, str]],
        changes: Sequence[LimitChange],
        start: float,
        window: float,
        levels: Mapping[str, float],
    ) -> None:
        self.arrivals = sorted(arrivals, key=lambda a: a.at)
        self.attempts = list(attempts)  # the followed client's: (sent at, status, API key)
        self.changes = list(changes)
        self.start = start
        self.window = window
        self.levels = dict(levels)  # tokens in the provider's buckets one window after the start

    def _attempts(self, key: str | None, after: float) -> list[tuple[float, int, str]]:
        since = self.start + after * self.window
        return [a for a in self.attempts if a[0] > since and (key is None or a[2] == key)]

    def rejected_share(self, *, key: str | None = None, after: float = 1.0) -> float:
        """The followed client's attempts (on ``key``; None: all) sent later than ``after``
        windows from the start that the provider answered 429, as a share of them all."""
        attempts = self._attempts(key, after)
        return sum(1 for a in attempts if a[1] == 429) / max(1, len(attempts))

    def rejected(self, *, key: str | None = None, after: float = 0.0) -> int:
        return sum(1 for a in self._attempts(key, after) if a[1] == 429)

    def last_rejection(self, key: str) -> float:
        """Windows from the start to the last 429 on ``key`` (0 when none)."""
        times = [a[0] for a in self.attempts if a[2] == key and a[1] == 429]
        return (max(times) - self.start) / self.window if times else 0.0

    def sent_after(self, key: str, after: float) -> int:
        """The followed client's attempts on ``key`` sent later than ``after`` windows."""
        return len(self._attempts(key, after))

    def used(self, real_tokens_per_window: float, *, key: str = "") -> float:
        """Tokens the provider counted on API ``key`` past the first window, as a share of the
        most it could have admitted then: what its bucket held one window after the start, plus
        its real rate over the stretch up to the last arrival."""
        since = self.start + self.window
        stretch = [a for a in self.arrivals if a.key == key and a.at > since]
        if not stretch:
            return 0.0
        span = stretch[-1].at - since
        allowed = self.levels.get(key, 0.0) + real_tokens_per_window / self.window * span
        return sum(a.tokens for a in stretch) / allowed


def _prompt(tokens: int) -> str:
    return "abcd" * tokens  # exactly ``tokens`` tokens for the provider's tokenizer


def _cost(request: httpx.Request) -> dict[str, int]:
    body = json.loads(request.content)
    prompt = sum(count_tokens(message["content"]) for message in body["messages"])
    return {"tokens": prompt + int(body["max_tokens"])}


def _usage(request: httpx.Request, response: httpx.Response) -> dict[str, int] | None:
    if response.status_code != 200:
        return None
    total: int = response.json()["usage"]["total_tokens"]
    return {"tokens": total}


def _declared(config: dict[str, Any] | None = None) -> LimitSet:
    return LimitSet(
        [
            CallLimit(WINDOW, CALLS_PER_WINDOW),
            RateLimit("tokens", WINDOW, TOKENS_PER_WINDOW),
        ],
        config=config,
    )


class _ByChosenKey(httpx.AsyncBaseTransport):
    """Sends the API key the limits chose (``acq.config``) as the bearer token, and records
    every attempt: when it was sent, its status, its key."""

    def __init__(self, inner: httpx.AsyncBaseTransport, clock: Callable[[], float]) -> None:
        self._inner = inner
        self._clock = clock
        self.attempts: list[tuple[float, int, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        chosen = request.extensions.get("aiolimits") or {}
        key = str(chosen.get("api_key", ""))
        if key:
            request.headers["Authorization"] = f"Bearer {key}"
        sent = self._clock()
        response = await self._inner.handle_async_request(request)
        self.attempts.append((sent, response.status_code, key))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


async def follow(
    *,
    factor: float,
    headers: str,
    calls: int,
    unseen: float = 0.0,
    pool: bool = False,
    adapt: bool = True,
    latency: tuple[float, float] = (0.005, 0.02),
    seed: int = 1,
) -> FollowOutcome:
    """One run (see the module docstring); ``factor`` applies to the second key with ``pool``."""
    rng = random.Random(seed)
    provider = SimulatedProvider(
        calls=CALLS_PER_WINDOW if pool else math.floor(CALLS_PER_WINDOW * factor),
        tokens=TOKENS_PER_WINDOW if pool else math.floor(TOKENS_PER_WINDOW * factor),
        window_seconds=WINDOW,
        algorithm=RateLimitAlgorithm.TokenBucket,
        latency=latency,
        seed=seed,
        headers=headers,
        key_factors={"b": factor} if pool else None,
    )
    limits: LimitSet | LimitPool
    if pool:
        sets = [_declared({"api_key": "a"}), _declared({"api_key": "b"})]
        limits = LimitPool(sets, load_balancing="least_wait")
    else:
        sets = [_declared()]
        limits = sets[0]
    adaptation = Adaptation()
    clock = time.monotonic  # the provider's clock too
    recorder = _ByChosenKey(httpx.AsyncHTTPTransport(), clock)
    transport = LimitedTransport(
        limits,
        transport=recorder,
        cost=_cost,
        usage=_usage,
        retries=5,
        adapt=adaptation if adapt else False,
    )
    async with anyio.create_task_group() as tg:
        port = await tg.start(provider.serve)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        start = clock()

        prompts = [rng.randint(*PROMPTS) for _ in range(calls)]

        async def worker(client: httpx.AsyncClient) -> None:
            while prompts:
                prompt = prompts.pop()
                response = await client.post(
                    url,
                    json={
                        "messages": [{"role": "user", "content": _prompt(prompt)}],
                        "max_tokens": MAX_TOKENS,
                    },
                )
                if response.status_code != 429:  # a 429 after every retry is counted, not raised
                    response.raise_for_status()

        async def other(stop: anyio.Event) -> None:
            # Unseen by the first client: no aiolimits, a steady share of the real token rate.
            rate = unseen * TOKENS_PER_WINDOW * factor / WINDOW
            async with httpx.AsyncClient(timeout=30) as client:
                while not stop.is_set():
                    prompt = rng.randint(*PROMPTS)
                    await client.post(
                        url,
                        json={
                            "messages": [{"role": "user", "content": _prompt(prompt)}],
                            "max_tokens": MAX_TOKENS,
                        },
                    )
                    await anyio.sleep((prompt + MAX_TOKENS / 2) / rate)

        levels: dict[str, float] = {}

        async def snapshot() -> None:
            await anyio.sleep(start + WINDOW - clock())
            levels.update(provider.levels())

        tg.start_soon(snapshot)
        stop = anyio.Event()
        if unseen:
            tg.start_soon(other, stop)
        async with (
            httpx.AsyncClient(transport=transport, timeout=30) as client,
            anyio.create_task_group() as fan_out,
        ):
            for _ in range(CONCURRENCY):
                fan_out.start_soon(worker, client)
        stop.set()
        tg.cancel_scope.cancel()
    changes = (
        [change for limit_set in sets for change in follower_for(limit_set, adaptation).changes]
        if adapt
        else []
    )
    return FollowOutcome(
        arrivals=provider.arrivals,
        attempts=recorder.attempts,
        changes=changes,
        start=start,
        window=WINDOW,
        levels=levels,
    )
