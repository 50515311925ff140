"""Integrations with web frameworks and HTTP clients; each module needs its optional extra.

* :mod:`aiolimits.integrations.starlette`: an ASGI middleware for Starlette and FastAPI apps, and
  a FastAPI dependency (extra ``starlette`` or ``fastapi``).
* :mod:`aiolimits.integrations.aiohttp`: an aiohttp server middleware (extra ``aiohttp``).
* :mod:`aiolimits.integrations.httpx`: an httpx transport for client-side fan-out that acquires
  before each request, settles real usage from the response and backs every caller off together
  when the server answers 429 (extra ``httpx``).

Importing this package imports no framework; each module imports only its own.
"""
