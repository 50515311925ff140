"""The aiohttp client middleware: acquire, settle the real usage, follow the provider's headers,
pause and retry on 429. A small aiohttp server on 127.0.0.1 answers what each test says; the
limits run on a ManualClock (asyncio only, as aiohttp is)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from aiolimits import CallLimit, LimitPool, LimitSet, RateLimit
from aiolimits.integrations.aiohttp_client import LimitedClientMiddleware
from aiolimits.testing import ManualClock


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Reply = Callable[[web.Request], web.Response]


@asynccontextmanager
async def server(reply: Reply) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.Response:
        return reply(request)

    app = web.Application()
    app.router.add_post("/v1/chat", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1/chat"
    finally:
        await runner.cleanup()


def cost(request: aiohttp.ClientRequest) -> dict[str, int]:
    return {"tokens": 100}


def usage(
    request: aiohttp.ClientRequest, response: aiohttp.ClientResponse, body: bytes
) -> dict[str, int] | None:
    if response.status != 200:
        return None
    return {"tokens": int(json.loads(body)["usage"]["total_tokens"])}


def declared(clock: ManualClock, config: dict[str, str] | None = None) -> LimitSet:
    return LimitSet(
        [CallLimit(60, 100), RateLimit("tokens", window_seconds=60, capacity=10_000)],
        clock=clock,
        config=config,
    )


def tokens(limits: LimitSet) -> tuple[float, float]:
    limit = limits.statistics().limits["tokens"]
    return float(limit.capacity), float(limit.available)


@pytest.mark.anyio
async def test_settles_usage_and_follows_the_headers() -> None:
    clock = ManualClock()
    limits = declared(clock)

    def reply(request: web.Request) -> web.Response:
        return web.json_response(
            {"usage": {"total_tokens": 30}},
            headers={"x-ratelimit-limit-tokens": "5000", "x-ratelimit-remaining-tokens": "1000"},
        )

    middleware = LimitedClientMiddleware(limits, cost=cost, usage=usage, adapt=True)
    async with (
        server(reply) as url,
        aiohttp.ClientSession(middlewares=(middleware,)) as session,
        session.post(url, json={}) as response,
    ):
        assert response.status == 200
        assert (await response.json())["usage"]["total_tokens"] == 30  # still readable
    assert tokens(limits) == (5000, 1000)


@pytest.mark.anyio
async def test_without_headers_settles_only_the_usage() -> None:
    clock = ManualClock()
    limits = declared(clock)

    def reply(request: web.Request) -> web.Response:
        return web.json_response({"usage": {"total_tokens": 30}})

    middleware = LimitedClientMiddleware(limits, cost=cost, usage=usage, adapt=True)
    async with (
        server(reply) as url,
        aiohttp.ClientSession(middlewares=(middleware,)) as session,
        session.post(url, json={}) as response,
    ):
        assert response.status == 200
    assert tokens(limits) == (10_000, 9970)


@pytest.mark.anyio
async def test_a_429_pauses_the_refused_set_of_a_pool_adapts_it_and_is_sent_again() -> None:
    sets = [declared(ManualClock(), {"api_key": "a"}), declared(ManualClock(), {"api_key": "b"})]
    pool = LimitPool(sets)
    refused: list[int] = []

    def reply(request: web.Request) -> web.Response:
        if not refused:
            refused.append(1)
            return web.json_response({}, status=429, headers={"retry-after-ms": "0"})
        return web.json_response({"usage": {"total_tokens": 30}})

    middleware = LimitedClientMiddleware(pool, cost=cost, usage=usage, adapt=True)
    async with (
        server(reply) as url,
        aiohttp.ClientSession(middlewares=(middleware,)) as session,
        session.post(url, json={}) as response,
    ):
        assert response.status == 200
    assert middleware.retried == 1
    assert tokens(sets[0])[0] == 7000  # the refused set, once, by the default decrease
    assert tokens(sets[1])[0] == 10_000


def test_bad_arguments_are_named() -> None:
    limits = declared(ManualClock())
    with pytest.raises(TypeError, match="limits"):
        LimitedClientMiddleware(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cost"):
        LimitedClientMiddleware(limits, cost=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retries"):
        LimitedClientMiddleware(limits, retries=-1)
    with pytest.raises(TypeError, match="adapt"):
        LimitedClientMiddleware(limits, adapt="on")  # type: ignore[arg-type]
