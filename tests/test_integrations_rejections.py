"""Rejections as the three server integrations answer them, through real servers and httpx:
the same default answer, the ``on_reject`` hook, ``exempt``, distinct policy names, the refusing
limit named in the headers, and configuration errors raised when an integration is built.

No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at run time.
Each test runs against the Starlette middleware (served by uvicorn), the FastAPI dependency
(uvicorn) and the aiohttp middleware; uvicorn and aiohttp run on asyncio only.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from aiohttp import web
from fastapi import Depends, FastAPI
from fastapi.exceptions import HTTPException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from aiolimits import CallLimit, KeyedLimitSet, LimitSet, RateLimit, ResourceLimit
from aiolimits.integrations import aiohttp as aiohttp_integration
from aiolimits.integrations import fastapi as fastapi_integration
from aiolimits.integrations import starlette as starlette_integration
from aiolimits.integrations._common import Rejection
from aiolimits.testing import ManualClock
from tests._servers import aiohttp_server, uvicorn_server

pytestmark = pytest.mark.anyio

FRAMEWORKS = ["starlette", "fastapi", "aiohttp"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def path_of(request: Any) -> str:
    return str(request.url.path) if hasattr(request, "url") else str(request.path)


@asynccontextmanager
async def serve(
    framework: str,
    limits: Any,
    on_reject: Callable[..., Any] | None = None,
    handler: Callable[[], Any] | None = None,
    **options: Any,
) -> AsyncIterator[str]:
    """One app with one route, ``/``, limited by ``framework``'s integration; yields its URL.

    ``on_reject`` receives the request and the Rejection; it returns what the framework's hook
    returns (a response, or for the FastAPI dependency an exception)."""

    async def work() -> None:
        if handler is not None:
            await handler()

    if framework == "aiohttp":

        async def hello_aiohttp(request: web.Request) -> web.Response:
            await work()
            return web.Response(text="hello")

        app = web.Application(
            middlewares=[
                aiohttp_integration.limit_middleware(limits, on_reject=on_reject, **options)
            ]
        )
        app.router.add_get("/", hello_aiohttp)
        async with aiohttp_server(app) as url:
            yield url
        return
    if framework == "starlette":

        async def hello(request: Request) -> PlainTextResponse:
            await work()
            return PlainTextResponse("hello")

        starlette_app = Starlette(routes=[Route("/", hello)])
        starlette_app.add_middleware(
            starlette_integration.LimitMiddleware, limits=limits, on_reject=on_reject, **options
        )
        async with uvicorn_server(starlette_app) as url:
            yield url
        return
    dependency = fastapi_integration.LimitDependency(limits, on_reject=on_reject, **options)
    fastapi_app = FastAPI()

    @fastapi_app.get("/", dependencies=[Depends(dependency)])
    async def hello_fastapi() -> dict[str, str]:
        # A route returning a Response of its own gets none of the dependency's headers
        # (FastAPI merges them only into what it renders): return the content.
        await work()
        return {"hello": "world"}

    async with uvicorn_server(fastapi_app) as url:
        yield url


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_every_integration_rejects_with_the_same_json_body_and_names_the_limit(
    framework: str,
) -> None:
    limits = LimitSet(
        [CallLimit(60, 100), RateLimit("tokens", 60, 10)], clock=ManualClock(), name="api"
    )
    options: dict[str, Any] = {"cost": lambda request: {"tokens": 6}}
    async with serve(framework, limits, **options) as url, httpx.AsyncClient() as client:
        ok = await client.get(url)
        refused = await client.get(url)
    assert (ok.status_code, refused.status_code) == (200, 429)
    assert refused.content == b'{"detail":"Too Many Requests"}'
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["RateLimit-Refused-By"] == '"api.tokens"'
    # The refusing limit's items come first; the set's name keeps the policies apart.
    assert (
        refused.headers["RateLimit-Policy"] == '"api.tokens";q=10;w=60, "api.call_count";q=100;w=60'
    )
    assert refused.headers["RateLimit"] == '"api.tokens";r=4;t=36, "api.call_count";r=99;t=1'
    assert refused.headers["Retry-After"] == "12"  # 2 tokens short at 1 token per 6 s
    assert ok.headers["RateLimit-Policy"] == '"api.call_count";q=100;w=60, "api.tokens";q=10;w=60'
    assert "RateLimit-Refused-By" not in ok.headers


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_on_reject_builds_the_answer_from_the_rejection(framework: str) -> None:
    keyed = KeyedLimitSet([CallLimit(60, 1)], max_keys=100, clock=ManualClock())
    seen: list[tuple[str, Rejection]] = []

    async def on_reject(request: Any, rejection: Rejection) -> Any:
        seen.append((path_of(request), rejection))
        headers = {"Retry-After": rejection.headers["Retry-After"], "X-Limit": str(rejection.limit)}
        body = {"error": "slow down", "retry_after": rejection.retry_after}
        if framework == "aiohttp":
            return web.json_response(body, status=503, headers=headers)
        if framework == "starlette":
            return JSONResponse(body, status_code=503, headers=headers)
        return HTTPException(503, detail=body, headers=headers)

    key = (
        aiohttp_integration.header("x-user")
        if framework == "aiohttp"
        else starlette_integration.header("x-user")
    )
    async with (
        serve(framework, keyed, on_reject=on_reject, key=key) as url,
        httpx.AsyncClient() as client,
    ):
        ok = await client.get(url, headers={"x-user": "ann"})
        refused = await client.get(url, headers={"x-user": "ann"})
    assert ok.status_code == 200
    assert refused.status_code == 503
    assert refused.headers["X-Limit"] == "call_count"
    assert refused.headers["Retry-After"] == "60"
    body = refused.json()
    if framework == "fastapi":
        body = body["detail"]  # FastAPI renders an HTTPException as {"detail": ...}
    assert body == {"error": "slow down", "retry_after": 60.0}
    ((where, rejection),) = seen
    assert where == "/"
    assert rejection.limit == "call_count"
    assert rejection.policy == '"call_count"'
    assert rejection.retry_after == 60.0
    assert rejection.remaining == 0
    assert rejection.client == "ann"
    assert rejection.stats["granted"] == 1


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_exempt_requests_are_not_counted_and_carry_no_headers(framework: str) -> None:
    limits = LimitSet([CallLimit(60, 1)], clock=ManualClock())

    def exempt(request: Any) -> bool:
        return bool(request.headers.get("x-internal") == "yes")

    async with serve(framework, limits, exempt=exempt) as url, httpx.AsyncClient() as client:
        internal = [await client.get(url, headers={"x-internal": "yes"}) for _ in range(3)]
        public = [await client.get(url) for _ in range(2)]
    assert [r.status_code for r in internal] == [200, 200, 200]
    assert "RateLimit" not in internal[0].headers
    assert [r.status_code for r in public] == [200, 429]
    assert limits.get_stats()["granted"] == 1


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_full_resource_limit_names_itself_and_gives_no_retry_after(
    framework: str,
) -> None:
    limits = LimitSet([CallLimit(60, 100), ResourceLimit("in_progress", 1)], clock=ManualClock())
    entered = anyio.Event()
    leave = anyio.Event()

    async def handler() -> None:
        entered.set()
        await leave.wait()

    answers: list[httpx.Response] = []
    async with serve(framework, limits, handler=handler) as url, httpx.AsyncClient() as client:

        async def first() -> None:
            answers.append(await client.get(url))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            with anyio.fail_after(30):  # a hang guard only
                await entered.wait()
            refused = await client.get(url)
            leave.set()
    assert answers[0].status_code == 200
    assert refused.status_code == 429
    assert refused.headers["RateLimit-Refused-By"] == '"in_progress"'
    assert refused.headers["RateLimit-Policy"] == '"in_progress";q=1, "call_count";q=100;w=60'
    assert refused.headers["RateLimit"].startswith('"in_progress";r=0, ')
    assert "Retry-After" not in refused.headers  # only a release admits it


async def test_two_sets_stacked_in_one_app_have_distinct_policy_names() -> None:
    clock = ManualClock()
    everyone = LimitSet([CallLimit(60, 100)], clock=clock, name="global")
    per_client = KeyedLimitSet([CallLimit(60, 10)], max_keys=100, clock=clock, name="per_ip")
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hello"))])
    app.add_middleware(
        starlette_integration.LimitMiddleware,
        limits=per_client,
        key=starlette_integration.client_ip,
    )
    app.add_middleware(starlette_integration.LimitMiddleware, limits=everyone)
    async with uvicorn_server(app) as url, httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.headers.get_list("RateLimit-Policy") == [
        '"per_ip.call_count";q=10;w=60',
        '"global.call_count";q=100;w=60',
    ]


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_hostile_key_cannot_break_or_inject_headers(framework: str) -> None:
    limits = LimitSet([RateLimit('a"b\\c\r\nX-Evil: 1 é%', 60, 1)], clock=ManualClock())
    options: dict[str, Any] = {"cost": lambda request: {'a"b\\c\r\nX-Evil: 1 é%': 1}}
    async with serve(framework, limits, **options) as url, httpx.AsyncClient() as client:
        responses = [await client.get(url) for _ in range(2)]
    assert [r.status_code for r in responses] == [200, 429]
    assert "X-Evil" not in responses[1].headers
    name = '"a\\"b\\\\c%0D%0AX-Evil: 1 %C3%A9%25"'
    assert responses[1].headers["RateLimit-Refused-By"] == name
    assert responses[1].headers["RateLimit-Policy"] == f"{name};q=1;w=60"


def build(framework: str, limits: Any, **options: Any) -> object:
    if framework == "aiohttp":
        return aiohttp_integration.limit_middleware(limits, **options)
    if framework == "fastapi":
        return fastapi_integration.LimitDependency(limits, **options)
    app = Starlette()
    app.add_middleware(starlette_integration.LimitMiddleware, limits=limits, **options)
    return app.build_middleware_stack()  # what Starlette does at start-up


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_configuration_errors_are_raised_when_built_with_the_fix_named(framework: str) -> None:
    tokens = LimitSet([CallLimit(60, 10), RateLimit("tokens", 60, 1000)])
    with pytest.raises(ValueError, match=r"RateLimit\(s\) 'tokens'.*pass cost=") as caught:
        build(framework, tokens)
    assert "requested=" not in str(caught.value)
    keyed = KeyedLimitSet([RateLimit("tokens", 60, 1000)], max_keys=10)
    with pytest.raises(ValueError, match="pass key="):
        build(framework, keyed, cost=lambda request: {"tokens": 1})
    plain = LimitSet([CallLimit(60, 10)])
    with pytest.raises(TypeError, match="on_reject must be a callable"):
        build(framework, plain, on_reject=429)
    with pytest.raises(TypeError, match="exempt must be a callable"):
        build(framework, plain, exempt="/health")
    with pytest.raises(TypeError, match="policy must be a non-empty str"):
        build(framework, plain, policy="")


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_cost_returning_none_for_plain_rate_limits_says_what_to_return(
    framework: str,
) -> None:
    limits = LimitSet([RateLimit("tokens", 60, 1000)])
    errors: list[BaseException] = []

    def on_error(request: Any) -> None:
        return None

    if framework == "aiohttp":
        middleware = aiohttp_integration.limit_middleware(limits, cost=on_error)

        async def handler(request: web.Request) -> web.Response:
            return web.Response(text="hello")

        try:
            await middleware(object(), handler)  # type: ignore[arg-type]
        except ValueError as exc:
            errors.append(exc)
    else:
        gate = (
            fastapi_integration.LimitDependency(limits, cost=on_error).gate
            if framework == "fastapi"
            else starlette_integration.LimitMiddleware(Starlette(), limits, cost=on_error).gate
        )
        try:
            await gate.enter(object())  # type: ignore[arg-type]
        except ValueError as exc:
            errors.append(exc)
    (error,) = errors
    assert "make cost return a mapping naming them" in str(error)


@pytest.mark.parametrize("framework", ["starlette", "aiohttp"])
async def test_a_hook_returning_no_response_is_named(framework: str) -> None:
    limits = LimitSet([CallLimit(60, 1)], clock=ManualClock())

    def on_reject(request: Any, rejection: Rejection) -> Any:
        return {"detail": "no"}

    limits.try_acquire()
    if framework == "starlette":
        middleware = starlette_integration.LimitMiddleware(Starlette(), limits, on_reject=on_reject)
        with pytest.raises(TypeError, match="on_reject must return a starlette Response"):
            await middleware({"type": "http", "headers": []}, None, None)  # type: ignore[arg-type]
        return
    aiohttp_middleware = aiohttp_integration.limit_middleware(limits, on_reject=on_reject)
    with pytest.raises(TypeError, match=r"on_reject must return an aiohttp web\.StreamResponse"):
        await aiohttp_middleware(object(), None)  # type: ignore[arg-type]


def test_default_rejections_are_one_body() -> None:
    rejection = Rejection(
        limit="call_count",
        policy='"call_count"',
        retry_after=3.0,
        remaining=0,
        client=None,
        headers={"Retry-After": "3"},
        stats={},
    )
    starlette_answer = starlette_integration.default_rejection(None, rejection)  # type: ignore[arg-type]
    aiohttp_answer = aiohttp_integration.default_rejection(None, rejection)  # type: ignore[arg-type]
    fastapi_answer = fastapi_integration.default_rejection(None, rejection)  # type: ignore[arg-type]
    assert (
        starlette_answer.body
        == aiohttp_answer.body
        == JSONResponse({"detail": fastapi_answer.detail}).body
    )
    assert isinstance(starlette_answer, Response)
    assert (
        starlette_answer.status_code == aiohttp_answer.status == fastapi_answer.status_code == 429
    )
