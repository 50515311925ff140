"""A simulated LLM provider on 127.0.0.1: an HTTP/1.1 JSON API that enforces its own RPM and TPM.

``POST /v1/chat/completions`` with ``{"messages": [{"role": "user", "content": "..."}],
"max_tokens": n}`` answers ``{"usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
"choices": [...]}`` after a random latency. Its accounting is the one LLM providers document:

* a request is counted when it **arrives**, for one request and ``prompt + max_tokens`` tokens
  (the most it could use); if that does not fit, the answer is ``429`` with ``Retry-After``
  (whole seconds) and ``retry-after-ms``, and nothing is counted;
* when the completion is done its real usage (``prompt + completion``) is settled: the unused
  part goes back, as far as the algorithm allows — before the answer is sent.

For ``token_bucket`` and ``gcra`` (which admit the same sequences) it keeps that accounting in
token buckets of its own, a few lines below (:class:`Bucket`), not aiolimits' code: the tests that
check how a client follows a provider measure the client against an independent referee. It can
then also say where the client stands on every answer, as OpenAI (``x-ratelimit-*``) or Anthropic
(``anthropic-ratelimit-*``) do, and keep separate limits per API key (``Authorization: Bearer
<key>``), each scaled by its own factor. For the window algorithms it keeps the accounting in an
aiolimits :class:`LimitSet` (``CallLimit`` + ``RateLimit "tokens"``) on ``time.monotonic``. It
never waits, it only decides; being the same exact maths as the client's is not what makes the
demo pass: the client's own limits are what keep it under these (see ``run.py``).

The HTTP server is ``h11`` on an anyio TCP listener, so it runs on asyncio and trio alike, with
keep-alive connections. It is a test double, not a web server: no chunked uploads, no pipelining.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Final, final

import anyio
import anyio.abc
import h11

from .._limits import CallLimit, RateLimit, RateLimitAlgorithm
from .._limitset import LimitSet

__all__ = ["HEADERS", "Arrival", "Bucket", "SimulatedProvider", "count_tokens"]

#: The rate-limit headers the provider can send with its answers.
HEADERS: Final = ("none", "openai", "anthropic")

_MAX_BODY: Final = 1 << 20
# A client that went away or broke the protocol: drop the connection.
_GONE: Final = (h11.RemoteProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError)


def count_tokens(text: str) -> int:
    """The provider's tokenizer, shared with the client as a real client shares ``tiktoken``:
    one token per 4 characters, rounded up, at least 1."""
    return max(1, -(-len(text) // 4))


@final
class Arrival:
    """One request the provider accepted: when it arrived, and what it finally counted."""

    __slots__ = ("at", "declared", "key", "tokens")

    def __init__(self, at: float, declared: int, key: str = "") -> None:
        self.at = at
        self.declared = declared
        self.key = key  # the API key it came with ("" without one)
        self.tokens = declared  # settled to the real usage when the completion is done


@final
class Bucket:
    """The provider's own token bucket: ``capacity``, full at first, refilled at
    ``capacity / window`` per second; it can go into debt only through :meth:`settle`."""

    __slots__ = ("at", "capacity", "rate", "tokens")

    def __init__(self, capacity: float, window: float, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / window
        self.tokens = capacity
        self.at = now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def fits(self, amount: float, now: float) -> bool:
        self._refill(now)
        return amount <= self.tokens

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.tokens -= amount

    def settle(self, taken: float, used: float, now: float) -> None:
        """The real usage of what was taken: the unused part back (up to full), or more."""
        self._refill(now)
        self.tokens = min(self.capacity, self.tokens + taken - used)

    def wait(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` fits (``inf`` if it never can)."""
        self._refill(now)
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.tokens) / self.rate)

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, math.floor(self.tokens))

    def reset(self, now: float) -> float:
        """Seconds until full again (what OpenAI and Anthropic call the reset)."""
        self._refill(now)
        return (self.capacity - self.tokens) / self.rate


def _duration(seconds: float) -> str:
    """A duration as OpenAI writes it: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3f}s" if minutes else f"{rest:.3f}s"


@final
class SimulatedProvider:
    """An in-process LLM-like API enforcing ``calls`` requests and ``tokens`` tokens per window.

    Args:
        calls: requests admitted per ``window_seconds``.
        tokens: tokens admitted per ``window_seconds``.
        window_seconds: the window of both limits.
        algorithm: the algorithm of both limits.
        latency: ``(low, high)`` seconds a completion takes, uniformly.
        seed: the random generator's seed (completion lengths and latencies).
    """

    def __init__(
        self,
        *,
        calls: int,
        tokens: int,
        window_seconds: float,
        algorithm: RateLimitAlgorithm,
        latency: tuple[float, float],
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        headers: str = "none",
        key_factors: Mapping[str, float] | None = None,
    ) -> None:
        if headers not in HEADERS:
            raise ValueError(f"headers must be one of {', '.join(HEADERS)}, got {headers!r}")
        own = algorithm in (RateLimitAlgorithm.TokenBucket, RateLimitAlgorithm.GCRA)
        if not own and (headers != "none" or key_factors):
            raise ValueError("rate-limit headers and API keys need token_bucket or gcra")
        self.limits = LimitSet(
            [
                CallLimit(window_seconds, calls, algorithm),
                RateLimit("tokens", window_seconds, tokens, algorithm),
            ],
            config={"provider": "simulated"},
            clock=clock,
        )
        self.own = own
        self.calls = calls
        self.tokens = tokens
        self.window = window_seconds
        self.headers = headers
        self.key_factors = dict(key_factors or {})
        self._buckets: dict[str, tuple[Bucket, Bucket]] = {}
        self.latency = latency
        self.arrivals: list[Arrival] = []
        self.rejections: list[float] = []  # arrival times of the requests answered 429
        self.rejected_keys: list[str] = []  # and the API key of each
        self._clock = clock
        self._rng = random.Random(seed)
        self.port = 0

    def _pair(self, key: str) -> tuple[Bucket, Bucket]:
        """The request and token buckets of API key ``key``, made on its first request."""
        pair = self._buckets.get(key)
        if pair is None:
            factor = self.key_factors.get(key, 1.0)
            now = self._clock()
            pair = self._buckets[key] = (
                Bucket(max(1, math.floor(self.calls * factor)), self.window, now),
                Bucket(max(1, math.floor(self.tokens * factor)), self.window, now),
            )
        return pair

    def levels(self) -> dict[str, float]:
        """Tokens each API key's bucket holds now (for measuring what a run left unused)."""
        now = self._clock()
        return {key: max(0.0, pair[1].remaining(now)) for key, pair in self._buckets.items()}

    def _said(self, pair: tuple[Bucket, Bucket], now: float) -> list[tuple[str, str]]:
        """Where the client stands, in the chosen family's headers."""
        if self.headers == "none":
            return []
        out = []
        for dimension, bucket in zip(("requests", "tokens"), pair, strict=True):
            limit, remaining, reset = bucket.capacity, bucket.remaining(now), bucket.reset(now)
            if self.headers == "openai":
                out += [
                    (f"x-ratelimit-limit-{dimension}", f"{limit:.0f}"),
                    (f"x-ratelimit-remaining-{dimension}", str(remaining)),
                    (f"x-ratelimit-reset-{dimension}", _duration(reset)),
                ]
            else:
                at = datetime.fromtimestamp(time.time() + reset, timezone.utc)
                out += [
                    (f"anthropic-ratelimit-{dimension}-limit", f"{limit:.0f}"),
                    (f"anthropic-ratelimit-{dimension}-remaining", str(remaining)),
                    (f"anthropic-ratelimit-{dimension}-reset", at.isoformat()),
                ]
        return out

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on 127.0.0.1 (a free port, reported through ``task_status``) until cancelled."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(self.port)
            await listener.serve(self._connection)

    # -- HTTP --------------------------------------------------------------------------------

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                try:
                    request = await _next(conn, stream)
                    if not isinstance(request, h11.Request):
                        return
                    body = bytearray()
                    while True:
                        event = await _next(conn, stream)
                        if isinstance(event, h11.Data):
                            body += event.data
                            if len(body) > _MAX_BODY:
                                return
                        elif isinstance(event, h11.EndOfMessage):
                            break
                        else:
                            return
                    status, headers, payload = await self._respond(request, bytes(body))
                    data = json.dumps(payload).encode()
                    headers = [
                        *headers,
                        ("content-type", "application/json"),
                        ("content-length", str(len(data))),
                    ]
                    await stream.send(conn.send(h11.Response(status_code=status, headers=headers)))
                    await stream.send(conn.send(h11.Data(data=data)))
                    await stream.send(conn.send(h11.EndOfMessage()))
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
                except _GONE:
                    return

    async def _respond(
        self, request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[str, str]], dict[str, Any]]:
        if request.method != b"POST" or request.target != b"/v1/chat/completions":
            return 404, [], {"error": "not found"}
        try:
            payload = json.loads(body)
            prompt = sum(count_tokens(m["content"]) for m in payload["messages"])
            max_tokens = int(payload["max_tokens"])
        except (ValueError, KeyError, TypeError):
            return 400, [], {"error": "expected messages and max_tokens"}
        declared = prompt + max_tokens
        if self.own:
            return await self._respond_own(request, prompt, max_tokens)
        acq = self.limits.try_acquire({"tokens": declared})
        now = self._clock()
        if not acq.successful:
            return self._refused(now, "", self.limits.retry_after({"tokens": declared}), [])
        arrival = Arrival(now, declared)
        self.arrivals.append(arrival)
        completion = await self._complete(max_tokens)
        arrival.tokens = prompt + completion
        acq.update({"tokens": arrival.tokens})  # settled before the answer leaves
        acq.release()
        return 200, [], _answer(prompt, completion)

    async def _respond_own(
        self, request: h11.Request, prompt: int, max_tokens: int
    ) -> tuple[int, list[tuple[str, str]], dict[str, Any]]:
        key = _api_key(request)
        calls, tokens = pair = self._pair(key)
        declared = prompt + max_tokens
        now = self._clock()
        if not (calls.fits(1, now) and tokens.fits(declared, now)):
            wait = max(calls.wait(1, now), tokens.wait(declared, now))
            return self._refused(now, key, wait, self._said(pair, now))
        calls.take(1, now)
        tokens.take(declared, now)
        arrival = Arrival(now, declared, key)
        self.arrivals.append(arrival)
        completion = await self._complete(max_tokens)
        arrival.tokens = prompt + completion
        now = self._clock()
        tokens.settle(declared, arrival.tokens, now)  # settled before the answer leaves
        return 200, self._said(pair, now), _answer(prompt, completion)

    def _refused(
        self, now: float, key: str, wait: float, said: list[tuple[str, str]]
    ) -> tuple[int, list[tuple[str, str]], dict[str, Any]]:
        self.rejections.append(now)
        self.rejected_keys.append(key)
        headers = [*said, ("retry-after", str(max(1, math.ceil(wait))))]
        if math.isfinite(wait):
            headers.append(("retry-after-ms", str(math.ceil(wait * 1000))))
        return 429, headers, {"error": "rate limit exceeded"}

    async def _complete(self, max_tokens: int) -> int:
        """Take the time a completion takes; its length in tokens."""
        low, high = self.latency
        await anyio.sleep(self._rng.uniform(low, high))
        return self._rng.randint(min(max_tokens, 1), max_tokens)


def _api_key(request: h11.Request) -> str:
    for name, value in request.headers:
        if name == b"authorization" and value.startswith(b"Bearer "):
            return value[7:].decode("ascii", "replace")[:64]
    return ""


def _answer(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "choices": [{"message": {"role": "assistant", "content": "ok " * completion}}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


async def _next(conn: h11.Connection, stream: anyio.abc.SocketStream) -> Any:
    """The next h11 event, reading from the socket as needed (``ConnectionClosed`` at EOF)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            data = b""
        conn.receive_data(data)
