"""The script's ``change`` operation gives exactly the answers of the Python algorithms'
``change`` (semantics §4): the tables of ``test_algorithms_changes`` run against Lua."""

from __future__ import annotations

from typing import Any

import pytest

from aiolimits import RateLimit

from ._redis_server import redis_server
from .test_algorithms_changes import (
    BUCKET_CASES,
    FIXED_CASES,
    LEAKY_CASES,
    SLIDING_CASES,
    Step,
    run,
)
from .test_redis_parity import LuaState, Script, script

__all__ = ["redis_server", "script"]  # the fixtures


class ChangingLuaState(LuaState):
    """A :class:`LuaState` whose limit can change: the script's ``change`` operation."""

    __slots__ = ()

    def change(self, capacity: float, window: float, now: float) -> None:
        from aiolimits.redis._script import num

        reply: Any = self._call("change", now, *self.limit, num(capacity), num(window), "{}", "x")
        assert float(reply[0]) == now
        self.limit = [self.limit[0], self.limit[1], num(capacity), num(window)]
        self.capacity, self.window = capacity, window


@pytest.mark.parametrize("algorithm", ["token_bucket", "gcra"])
@pytest.mark.parametrize("steps", BUCKET_CASES.values(), ids=BUCKET_CASES.keys())
def test_lua_bucket_change_table(script: Script, algorithm: str, steps: list[Step]) -> None:
    run(ChangingLuaState(script, RateLimit("tokens", 2, 4, algorithm)), steps)


@pytest.mark.parametrize("steps", LEAKY_CASES.values(), ids=LEAKY_CASES.keys())
def test_lua_leaky_bucket_change_table(script: Script, steps: list[Step]) -> None:
    run(ChangingLuaState(script, RateLimit("tokens", 2, 4, "leaky_bucket")), steps)


@pytest.mark.parametrize("steps", SLIDING_CASES.values(), ids=SLIDING_CASES.keys())
def test_lua_sliding_window_change_table(script: Script, steps: list[Step]) -> None:
    run(ChangingLuaState(script, RateLimit("tokens", 2, 4, "sliding_window")), steps)


@pytest.mark.parametrize("steps", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_lua_fixed_window_change_table(script: Script, steps: list[Step]) -> None:
    run(ChangingLuaState(script, RateLimit("requests", 10, 3, "fixed_window")), steps)
