"""The Redis backend: limits shared by processes on many machines through Redis.

Its state lives in one Redis hash per LimitSet, decided by a server-side Lua script
(``lua/*.lua``, one file per algorithm) that mirrors the Python algorithms exactly. Needs redis-py
(``pip install aiolimits[redis]``); ``import aiolimits`` does not import this package.
"""

from __future__ import annotations

from ._backend import RedisBackend as RedisBackend

__all__ = ["RedisBackend"]
