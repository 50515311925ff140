"""``aiolimits demo``: LLM fan-out through the httpx integration against a simulated provider.

Thousands of concurrent calls with random prompt sizes go through one ``httpx.AsyncClient`` whose
transport is :class:`aiolimits.integrations.httpx.LimitedTransport`: each call acquires one request
and ``prompt + max_tokens`` tokens, the real usage is settled from the answer's
``usage.total_tokens``, and a 429 would pause every caller. The provider (``provider.py``, on
127.0.0.1) enforces its RPM and TPM with the chosen algorithm and window, and counts a request
when it *arrives*; the client runs the same algorithm.

Why the provider sees no 429 — by construction, not by luck. The client admits a request at ``t``
and the provider counts it at ``a >= t``; in between it is *in transit*. The client holds a
``ResourceLimit("in_flight", K)`` slot from admission until it has read the answer, which the
provider sends after counting, so at any moment at most ``K`` requests and ``K * m`` tokens are in
transit (``m``: the largest ``prompt + max_tokens``). Whatever arrives at the provider in an
interval was either admitted by the client in that interval (the client's own limit bounds it) or
was in transit when the interval began (at most ``K`` and ``K * m``). So the client declares the
provider's limits less that margin, at the same rate:

* token bucket and GCRA: capacity ``C - margin`` with the window shrunk to keep ``C / W``; the
  provider's bucket then always has ``margin`` more than the client needs;
* sliding and fixed window: the same window with ``C - margin`` (fixed windows are aligned on the
  same clock, ``[kW, (k+1)W)``).

Real usage settles on the provider before it answers and on the client after it reads the answer,
so the provider never counts more for a request than the client does at any later moment. One
more unit of margin absorbs float rounding where ``C / W`` is not a binary fraction. The leaky
bucket is not offered: it has no burst to take the margin from, so a request delayed in transit
would arrive closer than ``1/r`` to the next one.

The margin costs a fraction ``K * m / (C + r * T)`` of the throughput over a run of ``T``
seconds: small for a window holding many requests, and zero for the rate itself.

With ``provider_factor < 1`` the provider really allows only that share of what it publishes and
the client declares; the transport follows it (``adapt=``, ``aiolimits._adaptive``): from the
``openai`` or ``anthropic`` headers the provider may send, or by AIMD on its 429s without them.
The summary and the PNG show the limits it learned.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from typing import Any, Final, final

import anyio
import httpx

from .._adaptive import Adaptation, LimitChange, follower_for
from .._client_limits import client_limits as safe_client_limits
from .._limits import CallLimit, Limit, RateLimit, RateLimitAlgorithm, ResourceLimit
from .._limitset import LimitSet
from ..integrations.httpx import LimitedTransport
from .provider import HEADERS, Arrival, SimulatedProvider, count_tokens

__all__ = ["ALGORITHMS", "DemoConfig", "Summary", "client_limits", "run"]

ALGORITHMS: Final = ("token_bucket", "gcra", "sliding_window", "fixed_window")
_WORDS: Final = ("rate", "limits", "keep", "the", "peace", "while", "tokens", "flow", "in", "order")


@final
class DemoConfig:
    """The knobs of a run (the command line's options)."""

    __slots__ = (
        "algorithm",
        "calls",
        "concurrency",
        "latency",
        "max_prompt",
        "max_tokens",
        "min_prompt",
        "provider_factor",
        "provider_headers",
        "rpm",
        "seed",
        "tpm",
        "use_limits",
        "window",
    )

    def __init__(
        self,
        *,
        calls: int = 3000,
        rpm: int = 9000,
        tpm: int = 6_000_000,
        window: float = 10.0,
        algorithm: str = "token_bucket",
        concurrency: int = 16,
        min_prompt: int = 50,
        max_prompt: int = 1500,
        max_tokens: int = 300,
        latency: tuple[float, float] = (0.02, 0.1),
        seed: int = 1,
        use_limits: bool = True,
        provider_factor: float = 1.0,
        provider_headers: str = "none",
    ) -> None:
        if not (0 < provider_factor <= 1):
            raise ValueError(f"provider_factor must be in (0, 1], got {provider_factor!r}")
        if provider_headers not in HEADERS:
            raise ValueError(
                f"provider_headers must be one of {', '.join(HEADERS)}, got {provider_headers!r}"
            )
        if provider_headers != "none" and algorithm not in ("token_bucket", "gcra"):
            raise ValueError("provider_headers needs the token_bucket or gcra algorithm")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        for name, value in (("calls", calls), ("concurrency", concurrency), ("rpm", rpm)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if not 1 <= min_prompt <= max_prompt:
            raise ValueError(f"need 1 <= min_prompt <= max_prompt, got {min_prompt}, {max_prompt}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens!r}")
        if not (window > 0 and math.isfinite(window)):
            raise ValueError(f"window must be a positive number of seconds, got {window!r}")
        self.calls = calls
        self.rpm = rpm
        self.tpm = tpm
        self.window = window
        self.algorithm = algorithm
        self.concurrency = concurrency
        self.min_prompt = min_prompt
        self.max_prompt = max_prompt
        self.max_tokens = max_tokens
        self.latency = latency
        self.seed = seed
        self.use_limits = use_limits
        self.provider_factor = provider_factor
        self.provider_headers = provider_headers

    @property
    def provider_calls(self) -> int:
        """Requests per window at the provider."""
        return max(1, math.floor(self.rpm * self.window / 60))

    @property
    def provider_tokens(self) -> int:
        """Tokens per window at the provider."""
        return max(1, math.floor(self.tpm * self.window / 60))

    @property
    def real_calls(self) -> int:
        """Requests per window the provider really admits: ``provider_factor`` of its published."""
        return max(1, math.floor(self.provider_calls * self.provider_factor))

    @property
    def real_tokens(self) -> int:
        """Tokens per window the provider really admits."""
        return max(1, math.floor(self.provider_tokens * self.provider_factor))

    @property
    def adaptation(self) -> Adaptation:
        """How the client follows the provider: what it was told the provider allows."""
        return Adaptation(
            published={"call_count": self.provider_calls, "tokens": self.provider_tokens}
        )

    @property
    def largest_request(self) -> int:
        """The most tokens one request declares: the longest prompt plus ``max_tokens``."""
        return self.max_prompt + self.max_tokens


def client_limits(config: DemoConfig) -> list[Limit]:
    """The provider's limits less the in-transit margin, at the same rate (see the module doc).

    Raises:
        ValueError: the margin leaves nothing: a window too small for ``concurrency`` requests.
    """
    algorithm = RateLimitAlgorithm(config.algorithm)
    provider: list[RateLimit | CallLimit] = [
        CallLimit(config.window, config.provider_calls, algorithm),
        RateLimit("tokens", config.window, config.provider_tokens, algorithm),
    ]
    return safe_client_limits(
        provider, in_flight=config.concurrency, largest={"tokens": config.largest_request}
    )


@final
class Summary:
    """What a run measured."""

    __slots__ = (
        "arrivals",
        "calls",
        "calls_measured",
        "changes",
        "config",
        "elapsed",
        "rejected",
        "retried",
        "span",
        "tokens_measured",
        "used_calls",
        "used_tokens",
        "waits",
    )

    def __init__(
        self,
        config: DemoConfig,
        *,
        calls: int,
        elapsed: float,
        arrivals: list[Arrival],
        rejected: list[float],
        retried: int,
        waits: list[float],
        changes: list[LimitChange] | None = None,
    ) -> None:
        self.config = config
        self.changes = changes or []
        self.calls = calls
        self.elapsed = elapsed
        self.arrivals = sorted(arrivals, key=lambda a: a.at)
        self.rejected = rejected
        self.retried = retried
        self.waits = sorted(waits)
        self.span = self.arrivals[-1].at - self.arrivals[0].at if self.arrivals else 0.0
        self.calls_measured, self.tokens_measured = self._measure()
        self.used_calls = self.calls_measured[0] / self.calls_measured[1]
        self.used_tokens = self.tokens_measured[0] / self.tokens_measured[1]

    @property
    def tokens(self) -> int:
        return sum(a.tokens for a in self.arrivals)

    def wait(self, q: float) -> float:
        """The ``q`` quantile of the time calls waited for the limits."""
        if not self.waits:
            return 0.0
        return self.waits[min(len(self.waits) - 1, math.floor(q * len(self.waits)))]

    def rate_per_minute(self, amount: float) -> float:
        return amount / self.span * 60 if self.span > 0 else math.inf

    def _measure(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """``(admitted, allowed)`` for requests and for tokens: what the provider counted, and
        the most its limit could have admitted, over the same stretch of the run.

        Buckets: every arrival, against ``C + r * span`` (a full bucket, then the rate, from the
        first arrival to the last). Windows: the arrivals in the complete windows between the
        first and the last arrival (fixed: the aligned windows; sliding: windows laid end to end
        from the first arrival), against ``C`` per window; the last, partial window is left out,
        as the run may simply have had nothing left to send. A run shorter than a window counts
        against one window.
        """
        cfg = self.config
        caps = (cfg.real_calls, cfg.real_tokens)
        amounts: tuple[Callable[[Arrival], float], ...] = (lambda a: 1.0, lambda a: a.tokens)
        arrivals = self.arrivals
        if not arrivals:
            return (0.0, float(caps[0])), (0.0, float(caps[1]))
        measured = []
        if cfg.algorithm in ("token_bucket", "gcra"):
            for cap, amount in zip(caps, amounts, strict=True):
                measured.append((sum(map(amount, arrivals)), cap + cap / cfg.window * self.span))
            return measured[0], measured[1]
        w = cfg.window
        first, last = arrivals[0].at, arrivals[-1].at
        if cfg.algorithm == "fixed_window":
            starts = [k * w for k in range(math.ceil(first / w), math.floor(last / w))]
        else:
            starts = [first + k * w for k in range(math.floor((last - first) / w))]
        for cap, amount in zip(caps, amounts, strict=True):
            if not starts:
                measured.append((sum(map(amount, arrivals)), float(cap)))
                continue
            admitted = sum(amount(a) for a in arrivals if any(s <= a.at < s + w for s in starts))
            measured.append((admitted, float(cap * len(starts))))
        return measured[0], measured[1]

    def lines(self) -> list[str]:
        cfg = self.config
        mode = "with aiolimits" if cfg.use_limits else "WITHOUT aiolimits"
        bucket = cfg.algorithm in ("token_bucket", "gcra")
        stretch = (
            f"a full bucket, then the rate, over the {self.span:.1f} s from first to last arrival"
            if bucket
            else "the complete windows between the first and the last arrival"
        )
        (calls, calls_max), (tokens, tokens_max) = self.calls_measured, self.tokens_measured
        real = (
            f"  the provider really allows {cfg.provider_factor:g} x its published limits "
            f"({cfg.real_calls:,} requests and {cfg.real_tokens:,} tokens per {cfg.window:g} s); "
            f"rate-limit headers: {cfg.provider_headers}"
        )
        learned = [
            f"  learned: {key} {change.capacity:,.0f} at {change.at - self.arrivals[0].at:.1f} s"
            for key in ("call_count", "tokens")
            for change in [c for c in self.changes if c.key == key][-1:]
            if self.arrivals
        ]
        return [
            f"{self.calls:,} calls in {self.elapsed:.1f} s ({cfg.algorithm}, {mode})",
            *([real] if cfg.provider_factor != 1 or cfg.provider_headers != "none" else []),
            "                  admitted  the limit allowed   used",
            f"  requests  {calls:>14,.0f}  {calls_max:>17,.0f}  {self.used_calls:6.1%}",
            f"  tokens    {tokens:>14,.0f}  {tokens_max:>17,.0f}  {self.used_tokens:6.1%}",
            f"  (measured at the provider: {stretch})",
            f"  rate: {self.rate_per_minute(len(self.arrivals)):,.0f} requests/min and "
            f"{self.rate_per_minute(self.tokens):,.0f} tokens/min "
            f"(limits {cfg.rpm * cfg.provider_factor:,.0f} and {cfg.tpm * cfg.provider_factor:,.0f}"
            + (f", plus the burst of a full {cfg.window:g} s bucket)" if bucket else ")"),
            f"  provider answered 429: {len(self.rejected)} times (client retries: {self.retried})",
            f"  waited for the limits: p50 {self.wait(0.5):.3f} s, p99 {self.wait(0.99):.3f} s",
            *learned,
        ]


def _prompt(rng: random.Random, tokens: int) -> str:
    """Text that the provider's tokenizer counts as exactly ``tokens`` tokens."""
    words = " ".join(rng.choice(_WORDS) for _ in range(tokens))
    text = (words * (1 + 4 * tokens // max(1, len(words))))[: 4 * tokens]
    assert count_tokens(text) == tokens
    return text


async def run(
    config: DemoConfig,
    *,
    on_done: Callable[[int], Any] | None = None,
) -> Summary:
    """Start the provider, fan out ``config.calls`` calls through it, and measure.

    Args:
        on_done: called with the number of calls finished so far, after each one (progress).
    """
    rng = random.Random(config.seed)
    provider = SimulatedProvider(
        calls=config.real_calls,
        tokens=config.real_tokens,
        window_seconds=config.window,
        algorithm=RateLimitAlgorithm(config.algorithm),
        latency=config.latency,
        seed=config.seed,
        headers=config.provider_headers,
    )
    # Without aiolimits' rate limits the client still sends at most ``concurrency`` requests at
    # once (as its connection pool would), so the comparison is about the rates alone.
    limits = LimitSet(
        client_limits(config)
        if config.use_limits
        else [ResourceLimit("in_flight", config.concurrency)]
    )

    def cost(request: httpx.Request) -> dict[str, int]:
        # What a real client does: count the prompt with the provider's tokenizer, and
        # reserve the most the answer may use.
        body = json.loads(request.content)
        prompt = sum(count_tokens(message["content"]) for message in body["messages"])
        return {"tokens": prompt + int(body["max_tokens"])}

    def usage(request: httpx.Request, response: httpx.Response) -> dict[str, int] | None:
        if response.status_code != 200:
            return None
        total: int = response.json()["usage"]["total_tokens"]
        return {"tokens": total}

    transport = LimitedTransport(
        limits,
        transport=httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=None)
        ),
        cost=cost if config.use_limits else None,
        usage=usage if config.use_limits else None,
        retries=2 if config.use_limits else 0,
        adapt=config.adaptation if config.use_limits else False,
    )
    waits: list[float] = []
    done = 0

    async with anyio.create_task_group() as tg:
        port = await tg.start(provider.serve)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        timeout = httpx.Timeout(60.0)
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            start = time.monotonic()

            async def call(prompt_tokens: int) -> None:
                nonlocal done
                text = _prompt(rng, prompt_tokens)
                response = await client.post(
                    url,
                    json={
                        "messages": [{"role": "user", "content": text}],
                        "max_tokens": config.max_tokens,
                    },
                )
                waits.append(response.extensions.get("aiolimits_waited", 0.0))
                done += 1
                if on_done is not None:
                    on_done(done)

            async with anyio.create_task_group() as calls:
                for _ in range(config.calls):
                    calls.start_soon(call, rng.randint(config.min_prompt, config.max_prompt))
            elapsed = time.monotonic() - start
        tg.cancel_scope.cancel()
    return Summary(
        config,
        calls=config.calls,
        elapsed=elapsed,
        arrivals=provider.arrivals,
        rejected=provider.rejections,
        retried=transport.stats["retried"],
        waits=waits,
        changes=list(follower_for(limits, config.adaptation).changes) if config.use_limits else [],
    )
