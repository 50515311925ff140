"""A simulated LLM provider on 127.0.0.1: an HTTP/1.1 JSON API that enforces its own RPM and TPM.

``POST /v1/chat/completions`` with ``{"messages": [{"role": "user", "content": "..."}],
"max_tokens": n}`` answers ``{"usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
"choices": [...]}`` after a random latency. Its accounting is the one LLM providers document:

* a request is counted when it **arrives**, for one request and ``prompt + max_tokens`` tokens
  (the most it could use); if that does not fit, the answer is ``429`` with ``Retry-After``
  (whole seconds) and ``retry-after-ms``, and nothing is counted;
* when the completion is done its real usage (``prompt + completion``) is settled: the unused
  part goes back, as far as the algorithm allows — before the answer is sent.

It keeps that accounting in an aiolimits :class:`LimitSet` (``CallLimit`` + ``RateLimit
"tokens"``) with the declared algorithm and windows on ``time.monotonic``; it never waits, it only
decides (``try_acquire``). Being the same exact maths as the client's is not what makes the demo
pass: the client's own limits are what keep it under these (see ``run.py``).

The HTTP server is ``h11`` on an anyio TCP listener, so it runs on asyncio and trio alike, with
keep-alive connections. It is a test double, not a web server: no chunked uploads, no pipelining.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from typing import Any, Final, final

import anyio
import anyio.abc
import h11

from .._limits import CallLimit, RateLimit, RateLimitAlgorithm
from .._limitset import LimitSet

__all__ = ["Arrival", "SimulatedProvider", "count_tokens"]

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

    __slots__ = ("at", "declared", "tokens")

    def __init__(self, at: float, declared: int) -> None:
        self.at = at
        self.declared = declared
        self.tokens = declared  # settled to the real usage when the completion is done


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
    ) -> None:
        self.limits = LimitSet(
            [
                CallLimit(window_seconds, calls, algorithm),
                RateLimit("tokens", window_seconds, tokens, algorithm),
            ],
            config={"provider": "simulated"},
            clock=clock,
        )
        self.latency = latency
        self.arrivals: list[Arrival] = []
        self.rejections: list[float] = []  # arrival times of the requests answered 429
        self._clock = clock
        self._rng = random.Random(seed)
        self.port = 0

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
        acq = self.limits.try_acquire({"tokens": declared})
        now = self._clock()
        if not acq.successful:
            self.rejections.append(now)
            wait = self.limits.retry_after({"tokens": declared})
            headers = [("retry-after", str(max(1, math.ceil(wait))))]
            if math.isfinite(wait):
                headers.append(("retry-after-ms", str(math.ceil(wait * 1000))))
            return 429, headers, {"error": "rate limit exceeded"}
        arrival = Arrival(now, declared)
        self.arrivals.append(arrival)
        low, high = self.latency
        await anyio.sleep(self._rng.uniform(low, high))
        completion = self._rng.randint(min(max_tokens, 1), max_tokens)
        arrival.tokens = prompt + completion
        acq.update({"tokens": arrival.tokens})  # settled before the answer leaves
        acq.release()
        return (
            200,
            [],
            {
                "choices": [{"message": {"role": "assistant", "content": "ok " * completion}}],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        )


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
