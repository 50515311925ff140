"""Integrations with web frameworks and HTTP clients; each module needs its optional extra.

* :mod:`aiolimits.integrations.starlette`: an ASGI middleware for Starlette and FastAPI apps, and
  a FastAPI dependency (extra ``starlette`` or ``fastapi``).
* :mod:`aiolimits.integrations.aiohttp`: an aiohttp server middleware (extra ``aiohttp``).
* :mod:`aiolimits.integrations.httpx`: an httpx transport for client-side fan-out that acquires
  before each request, settles real usage from the response and backs every caller off together
  when the server answers 429 (extra ``httpx``).
* :mod:`aiolimits.integrations.aiohttp_client`: the same for ``aiohttp.ClientSession``, as a
  client middleware (extra ``aiohttp``, aiohttp 3.12 or later).
* :mod:`aiolimits.integrations.headers`: reads a provider's rate-limit headers (no framework).

Importing this package imports no framework; each module imports only its own.
"""
