"""Real servers on 127.0.0.1 for the integration tests (a free port each, chosen by the kernel).

The listening socket is bound and listening before the server task starts, so a client may
connect at once: the kernel queues the connection until the server accepts it, and no test waits
for a "ready" signal.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from aiohttp import web
from starlette.types import ASGIApp


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@asynccontextmanager
async def uvicorn_server(app: ASGIApp) -> AsyncIterator[str]:
    """Serve the ASGI ``app`` with uvicorn (asyncio only); yields the base URL."""
    import uvicorn

    sock = _listening_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="off", ws="none", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()


@asynccontextmanager
async def aiohttp_server(app: web.Application) -> AsyncIterator[str]:
    """Serve the aiohttp ``app`` (asyncio only); yields the base URL."""
    sock = _listening_socket()
    port = sock.getsockname()[1]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        sock.close()
