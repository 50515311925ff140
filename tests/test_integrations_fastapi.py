"""The FastAPI dependency, served by a real uvicorn on 127.0.0.1 and called with httpx.

No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at run time,
and the routes below are local functions whose ``Depends(...)`` names local variables.
"""

from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.requests import HTTPConnection

from aiolimits import Acquisition, CallLimit, KeyedLimitSet, LimitSet, RateLimit, ResourceLimit
from aiolimits.integrations.fastapi import LimitDependency, header
from aiolimits.testing import ManualClock
from tests._servers import uvicorn_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_route_gets_the_acquisition_and_the_headers_or_a_429() -> None:
    clock = ManualClock()
    limits = LimitSet([CallLimit(60, 100), RateLimit("tokens", 60, 1000)], clock=clock)

    def cost(conn: HTTPConnection) -> dict[str, int]:
        return {"tokens": int(conn.query_params.get("tokens", "1"))}

    limited = LimitDependency(limits, cost=cost)
    app = FastAPI()

    @app.get("/summarize")
    async def summarize(acq: Annotated[Acquisition | None, Depends(limited)]) -> dict[str, Any]:
        assert acq is not None
        acq.update({"tokens": 100})  # the real usage, known after the work
        return {"requested": dict(acq.requested)}

    async with uvicorn_server(app) as url, httpx.AsyncClient() as client:
        ok = await client.get(url + "/summarize", params={"tokens": 600})
        refused = await client.get(url + "/summarize", params={"tokens": 901})
    assert ok.status_code == 200
    assert ok.json() == {"requested": {"call_count": 1, "tokens": 600}}
    assert ok.headers["RateLimit-Policy"] == '"call_count";q=100;w=60, "tokens";q=1000;w=60'
    assert ok.headers["RateLimit"] == '"call_count";r=99;t=1, "tokens";r=400;t=36'
    assert refused.status_code == 429
    assert refused.json() == {"detail": "Too Many Requests"}
    assert refused.headers["Retry-After"] == "1"  # 900 left after the refund: 1 token, 0.06 s
    assert limits.get_stats()["granted"] == 1


async def test_per_user_dependency_on_a_route_list_and_release_after_the_request() -> None:
    keyed = KeyedLimitSet(
        [CallLimit(60, 2), ResourceLimit("in_progress", 1)], max_keys=100, clock=ManualClock()
    )
    per_user = LimitDependency(keyed, key=header("x-user"))
    app = FastAPI()

    @app.get("/search", dependencies=[Depends(per_user)])
    async def search() -> dict[str, int]:
        return {"in_progress": keyed.get_stats("ann")["limits"]["in_progress"]["in_use"]}

    async with uvicorn_server(app) as url, httpx.AsyncClient() as client:
        ann = [await client.get(url + "/search", headers={"x-user": "ann"}) for _ in range(3)]
        bob = await client.get(url + "/search", headers={"x-user": "bob"})
    assert [r.status_code for r in ann] == [200, 200, 429]
    assert ann[0].json() == {"in_progress": 1}
    assert ann[2].headers["Retry-After"] == "30"
    assert bob.status_code == 200
    assert keyed.get_stats("ann")["limits"]["in_progress"]["in_use"] == 0


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="pass key="):
        LimitDependency(KeyedLimitSet([CallLimit(1, 1)], max_keys=100))
    with pytest.raises(TypeError, match="max_wait must be an int or float"):
        LimitDependency(LimitSet([CallLimit(1, 1)]), max_wait="1")  # type: ignore[arg-type]
