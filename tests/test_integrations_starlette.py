"""The Starlette middleware, served by a real uvicorn on 127.0.0.1 and called with httpx.

uvicorn runs on asyncio only, so these tests do too. Rejections and their headers are exact on a
ManualClock; the waiting mode uses real time with short windows and asserts only outcomes.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from aiolimits import CallLimit, KeyedLimitSet, LimitSet, RateLimit, ResourceLimit
from aiolimits.integrations.starlette import LimitMiddleware, client_ip, header
from aiolimits.testing import ManualClock
from tests._servers import uvicorn_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(hits: list[str], **options: Any) -> Starlette:
    async def hello(request: Request) -> PlainTextResponse:
        hits.append(request.url.path)
        if request.url.path == "/boom":
            raise RuntimeError("boom")
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello), Route("/boom", hello)])
    app.add_middleware(LimitMiddleware, **options)
    return app


async def test_over_the_limit_answers_429_with_retry_after_and_ratelimit_headers() -> None:
    limits = LimitSet([CallLimit(window_seconds=60, capacity=2)], clock=ManualClock())
    hits: list[str] = []
    async with uvicorn_server(make_app(hits, limits=limits)) as url, httpx.AsyncClient() as client:
        first = await client.get(url)
        second = await client.get(url)
        third = await client.get(url)
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
    assert hits == ["/", "/"]  # the rejected request never reached the app
    assert first.headers["RateLimit-Policy"] == '"call_count";q=2;w=60'
    assert first.headers["RateLimit"] == '"call_count";r=1;t=30'
    assert second.headers["RateLimit"] == '"call_count";r=0;t=60'
    assert third.headers["Retry-After"] == "30"  # one token back after 60 s / 2
    assert third.headers["RateLimit"] == '"call_count";r=0;t=60'
    assert third.json() == {"detail": "Too Many Requests"}


async def test_per_client_limits_keep_clients_apart_and_a_missing_key_is_not_limited() -> None:
    keyed = KeyedLimitSet(
        [CallLimit(window_seconds=60, capacity=1)], max_keys=100, clock=ManualClock()
    )
    hits: list[str] = []
    app = make_app(hits, limits=keyed, key=header("x-api-key"))
    async with uvicorn_server(app) as url, httpx.AsyncClient() as client:
        a1 = await client.get(url, headers={"x-api-key": "a"})
        a2 = await client.get(url, headers={"x-api-key": "a"})
        b1 = await client.get(url, headers={"x-api-key": "b"})
        anonymous = [await client.get(url) for _ in range(3)]
    assert [a1.status_code, a2.status_code, b1.status_code] == [200, 429, 200]
    assert a2.headers["Retry-After"] == "60"
    assert [r.status_code for r in anonymous] == [200, 200, 200]
    assert "RateLimit" not in anonymous[0].headers


async def test_client_ip_keys_by_the_peer_address() -> None:
    keyed = KeyedLimitSet(
        [CallLimit(window_seconds=60, capacity=1)], max_keys=100, clock=ManualClock()
    )
    async with (
        uvicorn_server(make_app([], limits=keyed, key=client_ip)) as url,
        httpx.AsyncClient() as client,
    ):
        statuses = [(await client.get(url)).status_code for _ in range(2)]
    assert statuses == [200, 429]
    assert keyed.get_stats("127.0.0.1")["granted"] == 1


async def test_waiting_mode_admits_a_request_when_the_limit_allows_it() -> None:
    limits = LimitSet([CallLimit(window_seconds=0.2, capacity=1)])
    hits: list[str] = []
    statuses: list[int] = []
    app = make_app(hits, limits=limits, max_wait=30)
    async with uvicorn_server(app) as url, httpx.AsyncClient() as client:

        async def get() -> None:
            statuses.append((await client.get(url)).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(get)
    assert statuses == [200, 200, 200]
    assert limits.get_stats()["granted"] == 3


async def test_waiting_mode_rejects_at_once_what_the_rate_places_after_max_wait() -> None:
    limits = LimitSet([RateLimit("tokens", window_seconds=60, capacity=10)], clock=ManualClock())

    def cost(conn: HTTPConnection) -> dict[str, int]:
        return {"tokens": int(conn.headers.get("x-tokens", "1"))}

    app = make_app([], limits=limits, cost=cost, max_wait=5)
    async with uvicorn_server(app) as url, httpx.AsyncClient() as client:
        ok = await client.get(url, headers={"x-tokens": "10"})
        late = await client.get(url, headers={"x-tokens": "6"})  # 36 s away: more than 5
    assert (ok.status_code, late.status_code) == (200, 429)
    assert late.headers["Retry-After"] == "36"
    assert late.headers["RateLimit-Policy"] == '"tokens";q=10;w=60'


async def test_resource_slots_are_held_while_the_app_runs_and_released_after_errors() -> None:
    limits = LimitSet([ResourceLimit("requests_in_progress", capacity=1)])
    seen: list[int] = []

    async def hello(request: Request) -> PlainTextResponse:
        seen.append(limits.get_stats()["limits"]["requests_in_progress"]["in_use"])
        if request.url.path == "/boom":
            raise RuntimeError("boom")
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello), Route("/boom", hello)])
    app.add_middleware(LimitMiddleware, limits=limits)
    async with uvicorn_server(app) as url, httpx.AsyncClient() as client:
        assert (await client.get(url)).status_code == 200
        assert (await client.get(url + "/boom")).status_code == 500
        assert (await client.get(url)).status_code == 200
    assert seen == [1, 1, 1]
    assert limits.get_stats()["limits"]["requests_in_progress"]["in_use"] == 0


def test_bad_arguments_are_named() -> None:
    app = Starlette()
    limits = LimitSet([CallLimit(1, 1)])
    with pytest.raises(TypeError, match="limits must be a LimitSet or a KeyedLimitSet"):
        LimitMiddleware(app, limits=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key= needs a KeyedLimitSet"):
        LimitMiddleware(app, limits=limits, key=client_ip)
    with pytest.raises(ValueError, match="pass key="):
        LimitMiddleware(app, limits=KeyedLimitSet([CallLimit(1, 1)], max_keys=100))
    with pytest.raises(ValueError, match="max_wait"):
        LimitMiddleware(app, limits=limits, max_wait=-1)
    with pytest.raises(TypeError, match="cost must be a callable"):
        LimitMiddleware(app, limits=limits, cost="tokens")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name must be a non-empty header name"):
        header("")
