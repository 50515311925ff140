"""The aiohttp middleware, on a real aiohttp server on 127.0.0.1, called with httpx.

aiohttp runs on asyncio only, so these tests do too.
"""

from __future__ import annotations

import anyio
import httpx
import pytest
from aiohttp import web
from aiohttp.typedefs import Middleware

from aiolimits import CallLimit, KeyedLimitSet, LimitSet, RateLimit, ResourceLimit
from aiolimits.integrations.aiohttp import client_ip, header, limit_middleware
from aiolimits.testing import ManualClock
from tests._servers import aiohttp_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(hits: list[str], middleware: Middleware) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/missing":
            raise web.HTTPNotFound
        if request.path == "/boom":
            raise RuntimeError("boom")
        return web.Response(text="hello")

    app = web.Application(middlewares=[middleware])
    app.router.add_get("/", hello)
    app.router.add_get("/missing", hello)
    app.router.add_get("/boom", hello)
    return app


async def test_over_the_limit_answers_429_with_retry_after_and_ratelimit_headers() -> None:
    limits = LimitSet([CallLimit(window_seconds=60, capacity=2)], clock=ManualClock())
    hits: list[str] = []
    app = make_app(hits, limit_middleware(limits))
    async with aiohttp_server(app) as url, httpx.AsyncClient() as client:
        responses = [await client.get(url) for _ in range(3)]
        missing = await client.get(url + "/missing")
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert hits == ["/", "/"]
    assert responses[0].headers["RateLimit-Policy"] == '"call_count";q=2;w=60'
    assert responses[0].headers["RateLimit"] == '"call_count";r=1;t=30'
    assert responses[2].headers["Retry-After"] == "30"
    assert responses[2].json() == {"detail": "Too Many Requests"}
    assert missing.status_code == 429  # still over the limit: the handler is not asked


async def test_raised_http_answers_carry_the_headers() -> None:
    limits = LimitSet([CallLimit(window_seconds=60, capacity=5)], clock=ManualClock())
    app = make_app([], limit_middleware(limits))
    async with aiohttp_server(app) as url, httpx.AsyncClient() as client:
        missing = await client.get(url + "/missing")
    assert missing.status_code == 404
    assert missing.headers["RateLimit"] == '"call_count";r=4;t=12'


async def test_per_client_limits_by_header_and_by_ip() -> None:
    clock = ManualClock()
    by_key = KeyedLimitSet([CallLimit(60, 1)], max_keys=100, clock=clock)
    by_ip = KeyedLimitSet([CallLimit(60, 3)], max_keys=100, clock=clock)
    app = make_app([], limit_middleware(by_key, key=header("x-api-key")))
    app_ip = make_app([], limit_middleware(by_ip, key=client_ip))
    async with (
        aiohttp_server(app) as url,
        aiohttp_server(app_ip) as url_ip,
        httpx.AsyncClient() as client,
    ):
        a = [await client.get(url, headers={"x-api-key": "a"}) for _ in range(2)]
        b = await client.get(url, headers={"x-api-key": "b"})
        anonymous = [await client.get(url) for _ in range(2)]
        ip = [await client.get(url_ip) for _ in range(4)]
    assert [r.status_code for r in a] == [200, 429]
    assert b.status_code == 200
    assert [r.status_code for r in anonymous] == [200, 200]
    assert [r.status_code for r in ip] == [200, 200, 200, 429]
    assert by_ip.get_stats("127.0.0.1")["granted"] == 3


async def test_waiting_mode_admits_when_the_limit_allows_and_rejects_beyond_max_wait() -> None:
    waits = LimitSet([CallLimit(window_seconds=0.2, capacity=1)])
    statuses: list[int] = []
    tokens = LimitSet([RateLimit("tokens", 60, 10)], clock=ManualClock())
    app = make_app([], limit_middleware(waits, max_wait=30))
    app_tokens = make_app(
        [],
        limit_middleware(
            tokens, cost=lambda request: {"tokens": int(request.query["n"])}, max_wait=5
        ),
    )
    async with (
        aiohttp_server(app) as url,
        aiohttp_server(app_tokens) as url_tokens,
        httpx.AsyncClient() as client,
    ):

        async def get() -> None:
            statuses.append((await client.get(url)).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(get)
        ok = await client.get(url_tokens, params={"n": 10})
        late = await client.get(url_tokens, params={"n": 6})
    assert statuses == [200, 200, 200]
    assert (ok.status_code, late.status_code) == (200, 429)
    assert late.headers["Retry-After"] == "36"


async def test_resource_slots_are_released_after_errors() -> None:
    limits = LimitSet([ResourceLimit("in_progress", 1)])
    app = make_app([], limit_middleware(limits))
    async with aiohttp_server(app) as url, httpx.AsyncClient() as client:
        assert (await client.get(url + "/boom")).status_code == 500
        assert (await client.get(url)).status_code == 200
    assert limits.get_stats()["limits"]["in_progress"]["in_use"] == 0


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="key= needs a KeyedLimitSet"):
        limit_middleware(LimitSet([CallLimit(1, 1)]), key=client_ip)
    with pytest.raises(TypeError, match="limits must be a LimitSet or a KeyedLimitSet"):
        limit_middleware(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="headers must be a bool"):
        limit_middleware(LimitSet(), headers="yes")  # type: ignore[arg-type]
