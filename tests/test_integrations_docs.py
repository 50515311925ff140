"""The complete example of each integration page runs as written, against real servers.

The first ``python`` block of each page is the copy-paste example: it is executed, its app is
served on 127.0.0.1 (or, for httpx, its client is pointed at the demo's simulated provider), and
a request or two checks that the limits are in front.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from aiolimits._demo.provider import SimulatedProvider
from aiolimits._limits import RateLimitAlgorithm
from tests._servers import aiohttp_server, uvicorn_server

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn and aiohttp run on asyncio; httpx's page runs on trio too


def example(page: str, blocks: int = 1) -> dict[str, Any]:
    """Run the first ``blocks`` python blocks of ``page``, in order, in one namespace (later
    blocks add to the first one's app)."""
    found = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)
    namespace: dict[str, Any] = {"__name__": "example"}
    for block in found[:blocks]:
        exec(compile(block, str(DOCS / page), "exec"), namespace)
    return namespace


async def test_starlette_page_example_serves_with_ratelimit_headers() -> None:
    namespace = example("starlette.md")
    async with uvicorn_server(namespace["app"]) as url, httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.json() == {"hello": "world"}
    assert response.headers["RateLimit-Policy"] == '"call_count";q=50;w=1'
    assert namespace["limits"].get_stats()["granted"] == 1


async def test_starlette_page_hook_answers_problem_details_and_exempts_the_probe() -> None:
    namespace = example("starlette.md", blocks=2)
    limits = namespace["api_limits"]
    async with uvicorn_server(namespace["api"]) as url, httpx.AsyncClient() as client:
        probes = [await client.get(url + "/health") for _ in range(3)]
        exports = [await client.get(url + "/export") for _ in range(11)]
    assert [r.status_code for r in probes] == [200] * 3
    assert "RateLimit" not in probes[0].headers
    assert [r.status_code for r in exports] == [200] * 10 + [429]
    refused = exports[-1]
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["RateLimit-Refused-By"] == '"api.exports"'
    body = refused.json()
    assert (body["status"], body["limit"], body["remaining"]) == (429, "exports", 0)
    assert 0 < body["retry_after"] <= 360
    assert refused.headers["Retry-After"] == str(math.ceil(body["retry_after"]))
    assert limits.get_stats()["granted"] == 10


async def test_fastapi_page_examples_run_and_spare_the_health_check() -> None:
    namespace = example("fastapi.md", blocks=2)  # the app, and the per-key /search added to it
    limits = namespace["limits"]
    async with uvicorn_server(namespace["app"]) as url, httpx.AsyncClient() as client:
        done = await client.get(url + "/complete", params={"prompt": "hi " * 40, "max_tokens": 900})
        label = await client.get(url + "/classify", params={"text": "a good day"})
        granted = limits.get_stats()["granted"]
        health = await client.get(url + "/health")
        assert limits.get_stats()["granted"] == granted  # a health check takes nothing
        searches = [
            await client.get(url + "/search", params={"q": "cats"}, headers={"x-api-key": "k1"})
            for _ in range(31)
        ]
        other = await client.get(url + "/search", params={"q": "dogs"}, headers={"x-api-key": "k2"})
        anonymous = await client.get(url + "/search", params={"q": "fish"})
    assert done.status_code == 200
    assert done.json()["tokens"] == 30 + 42
    assert label.json() == {"label": "positive"}
    assert health.json() == {"status": "ok"}
    stats = limits.get_stats()
    assert stats["granted"] == 2  # /complete and /classify
    assert stats["refunded"] == 900 - 72
    # /search returns a body, 30 a minute per API key; another key, or none, is not held back.
    assert searches[0].json() == {
        "query": "cats",
        "results": ["cats: first hit", "cats: second hit"],
    }
    assert [r.status_code for r in searches] == [200] * 30 + [429]
    assert (other.status_code, anonymous.status_code) == (200, 200)


async def test_fastapi_page_hook_raises_its_own_exception_and_exempts_internal_calls() -> None:
    namespace = example("fastapi.md", blocks=3)
    async with uvicorn_server(namespace["app"]) as url, httpx.AsyncClient() as client:
        internal = [
            await client.get(
                url + "/suggest", params={"q": "cat"}, headers={"x-api-key": "internal"}
            )
            for _ in range(3)
        ]
        calls = [
            await client.get(url + "/suggest", params={"q": "cat"}, headers={"x-api-key": "k"})
            for _ in range(3)
        ]
    assert [r.status_code for r in internal] == [200] * 3
    assert [r.status_code for r in calls] == [200, 200, 503]
    assert calls[0].json() == {"suggestions": ["cats"]}
    detail = calls[2].json()["detail"]
    assert (detail["message"], detail["limit"]) == ("slow down", "call_count")
    assert 0 < detail["retry_after"] <= 30  # the real clock: one call back after 60 s / 2
    assert calls[2].headers["RateLimit-Refused-By"] == '"call_count"'


async def test_aiohttp_page_example_serves_with_ratelimit_headers() -> None:
    namespace = example("aiohttp.md")
    async with aiohttp_server(namespace["app"]) as url, httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.json() == {"hello": "world"}
    assert response.headers["RateLimit"] == '"call_count";r=19;t=1'


async def test_aiohttp_page_hook_answers_text_and_exempts_reads() -> None:
    namespace = example("aiohttp.md", blocks=2)
    async with aiohttp_server(namespace["upload_app"]) as url, httpx.AsyncClient() as client:
        reads = [await client.get(url) for _ in range(2)]
        posts = [await client.post(url) for _ in range(2)]
    assert [r.status_code for r in reads + posts] == [200, 200, 200, 429]
    assert posts[1].text.startswith("Over the limit call_count; retry in ")
    assert posts[1].headers["RateLimit-Refused-By"] == '"uploads.call_count"'


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_httpx_page_example_fans_out_and_settles_real_usage(anyio_backend: str) -> None:
    namespace = example("httpx.md")
    provider = SimulatedProvider(  # exactly the limits the example declares to client_limits
        calls=500,
        tokens=200_000,
        window_seconds=60,
        algorithm=RateLimitAlgorithm.TokenBucket,
        latency=(0.001, 0.005),
    )
    async with anyio.create_task_group() as tg:
        port = await tg.start(provider.serve)
        namespace["BASE_URL"] = f"http://127.0.0.1:{port}/v1"
        answers = await namespace["main"]([f"Summarize chapter {i}" for i in range(20)])
        tg.cancel_scope.cancel()
    assert len(answers) == 20
    stats = namespace["limits"].get_stats()
    assert stats["granted"] == 20
    assert stats["refunded"] > 0  # each reservation of prompt + 300 came back down to the usage
    assert provider.rejections == []
