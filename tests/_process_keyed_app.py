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


# -- children of the multi-process tests ---------------------------------------------------------


def queue_then_report(keyed: KeyedLimitSet, key: str, events: Any, release: Any) -> None:
    """Wait for ``key``'s slot, report the grant, hold it until told."""
    with keyed.acquire_sync(key, {"conn": 1}, timeout=60):
        events.put("child")
        release.wait(60)


def wait_for_tokens(keyed: KeyedLimitSet, key: str, events: Any) -> None:
    """Wait (no timeout) for 1 token of ``key``'s bucket, which refills in an hour."""
    with keyed.acquire_sync(key, {"r": 1}):
        events.put("granted")


def ping_pong(keyed: KeyedLimitSet, key: str, rounds: int, out: Any) -> None:
    """Take ``key``'s only slot ``rounds`` times, from a thread and from asyncio in turn."""
    import asyncio

    async def take() -> None:
        async with keyed.acquire(key, {"conn": 1}, timeout=60):
            await asyncio.sleep(0.0002)

    for i in range(rounds):
        if i % 2:
            asyncio.run(take())
        else:
            with keyed.acquire_sync(key, {"conn": 1}, timeout=60):
                pass
    out.put(rounds)


def hold_lock_forever(keyed: KeyedLimitSet, key: str, ready: Any) -> None:
    """Enter ``key``'s lock (its shard's lock) and never leave (the parent kills us)."""
    import time

    proxy = keyed._checkout(key)
    with proxy.sched.lock:
        ready.set()
        time.sleep(3600)
