"""A Starlette app limiting each client IP through a KeyedLimitSet on ProcessBackend, served by
real uvicorn worker processes (spawned by ``test_process_keyed.py``).

``/`` answers 200 within the per-IP limit (5 calls an hour) and 429 beyond it. ``/hold`` takes
the only slot of the ``X-Client`` key's resource limit and keeps it; ``/try`` says whether that
slot could be taken now (and gives it back).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from aiolimits import CallLimit, KeyedLimitSet, ProcessBackend, ResourceLimit
from aiolimits.integrations.starlette import LimitMiddleware, client_ip

PER_IP = 5
_held: list[Any] = []


def build(location: str) -> Starlette:
    backend = ProcessBackend(location)
    per_ip = KeyedLimitSet(
        [CallLimit(window_seconds=3600, capacity=PER_IP)], backend=backend, name="per-ip"
    )
    slots = KeyedLimitSet([ResourceLimit("conn", capacity=1)], backend=backend, name="slots")

    async def index(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(os.getpid()))

    async def hold(request: Request) -> PlainTextResponse:
        acq = slots.try_acquire(request.headers["x-client"], {"conn": 1})
        _held.append(acq)  # never released: the test kills this worker
        return PlainTextResponse(str(acq.successful), status_code=200 if acq.successful else 409)

    async def attempt(request: Request) -> PlainTextResponse:
        acq = slots.try_acquire(request.headers["x-client"], {"conn": 1})
        acq.release()
        return PlainTextResponse(str(acq.successful), status_code=200 if acq.successful else 409)

    app = Starlette(
        routes=[Route("/", index), Route("/hold", hold), Route("/try", attempt)],
    )
    limited = LimitMiddleware(app, per_ip, key=client_ip)

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/":
            await app(scope, receive, send)
        else:
            await limited(scope, receive, send)

    return asgi  # type: ignore[return-value]


def serve(sock: socket.socket, location: str) -> None:
    """One uvicorn worker process serving ``build(location)`` on the listening ``sock``."""
    import uvicorn

    config = uvicorn.Config(
        build(location), lifespan="off", ws="none", log_level="warning", access_log=False
    )
    uvicorn.Server(config).run(sockets=[sock])
