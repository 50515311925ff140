"""The integrations' gate and ``attempt`` on Redis: one awaited round trip per decision, with the
``Retry-After`` and the headers of that same answer (issue #14)."""

from __future__ import annotations

import math
import uuid
from typing import Any

import pytest

from aiolimits import LimitSet, RateLimit
from aiolimits.integrations._common import Gate

from ._redis_server import RedisServer, redis_server, require_redis

__all__ = ["redis_server"]  # the fixture

pytestmark = pytest.mark.filterwarnings("error")


class CountingScript:
    """Counts the script calls a scheduler sends on its own connections, per operation."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.script, name)

    def __call__(self, client: Any, key: str, args: Any) -> Any:
        self.calls[args[0]] = self.calls.get(args[0], 0) + 1
        return self.script(client, key, args)

    def command(self, key: str, args: Any, *, functions: bool) -> Any:
        self.calls[args[0]] = self.calls.get(args[0], 0) + 1
        return self.script.command(key, args, functions=functions)


def no_sync_questions(limits: LimitSet, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        pytest.fail("a sync question on the event loop's thread")

    for verb in ("try_acquire", "retry_after", "get_stats"):
        monkeypatch.setattr(LimitSet, verb, refuse)


@pytest.mark.anyio
async def test_the_gate_decides_in_one_awaited_round_trip_with_its_headers(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_redis()
    from aiolimits.redis import RedisBackend

    limits = LimitSet(
        [RateLimit("tokens", 60, 2)], backend=RedisBackend(redis_server.url), name=uuid.uuid4().hex
    )
    limits.get_stats()  # the script is loaded on the server (a first call may have to)
    counting = CountingScript(limits._scheduler.calls.script)  # type: ignore[attr-defined]
    limits._scheduler.calls.script = counting  # type: ignore[attr-defined]
    gate: Gate[None] = Gate(
        limits, key=None, cost=lambda _: {"tokens": 1}, max_wait=0, headers=True, policy="api"
    )
    no_sync_questions(limits, monkeypatch)
    admitted = [await gate.enter(None) for _ in range(2)]
    assert all(v.admitted for v in admitted)
    assert admitted[1].headers["RateLimit"] == '"api.tokens";r=0;t=60'
    rejected = await gate.enter(None)
    assert not rejected.admitted
    assert rejected.retry_after is not None
    assert 29 < rejected.retry_after <= 30
    assert rejected.headers["Retry-After"] == "30"
    assert rejected.headers["RateLimit"] == '"api.tokens";r=0;t=60'
    # The refusing limit, its remaining units and its wait, read from that same answer.
    assert rejected.headers["RateLimit-Refused-By"] == '"api.tokens"'
    assert rejected.rejection is not None
    assert (rejected.rejection.limit, rejected.rejection.remaining) == ("tokens", 0)
    assert rejected.rejection.retry_after == rejected.retry_after
    # Each decision: one acquire and one stats, pipelined on one connection; nothing else.
    assert counting.calls == {"acquire": 3, "stats": 3}
    assert limits._scheduler._hub.dispatcher is None  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_attempt_answers_like_the_sync_verbs(redis_server: RedisServer) -> None:
    require_redis()
    from aiolimits.redis import RedisBackend

    limits = LimitSet(
        [RateLimit("tokens", 60, 2, "fixed_window")],
        backend=RedisBackend(redis_server.url),
        name=uuid.uuid4().hex,
    )
    first = await limits.attempt({"tokens": 2})
    assert first.acquisition.successful
    assert first.retry_after == 0.0
    assert first.stats["limits"]["tokens"]["available"] == 0
    second = await limits.attempt({"tokens": 1})
    assert not second.acquisition.successful
    assert 0 < second.retry_after <= 60
    assert math.isclose(second.retry_after, limits.retry_after({"tokens": 1}), abs_tol=1)
    assert second.stats["granted"] == limits.get_stats()["granted"] == 1
