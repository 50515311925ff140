"""The script's ``change`` operation gives exactly the answers of the Python algorithms'
``change`` (semantics §4): the tables of ``test_algorithms_changes`` run against Lua."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiolimits import RateLimit
from aiolimits._algorithms import new_state

from ._redis_server import redis_server
from .test_algorithms_changes import (
    BUCKET_CASES,
    FIXED_CASES,
    LEAKY_CASES,
    SLIDING_CASES,
    Step,
    run,
)
from .test_algorithms_tables import UPTIME
from .test_redis_parity import LuaState, Script, capped, fresh_hash, script

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


# --- acquire's fast path after a change: the new numbers, never stale ones -------------------

Bucket = tuple[str, float, float]  # algorithm, capacity, window


@st.composite
def changing_buckets(draw: st.DrawFn) -> tuple[Bucket, float, list[tuple[str, float, float, int]]]:
    algorithm = draw(st.sampled_from(["token_bucket", "gcra"]))
    capacity = draw(st.sampled_from([1, 3, 4, 7.5]))
    window = draw(st.sampled_from([0.1, 0.3, 1.0, 60.0]))
    base = draw(st.sampled_from([0.0, UPTIME, 1.7e9 + 0.123456]))
    gap = st.one_of(st.just(0.0), st.floats(0, 2.0, allow_nan=False), st.just(window * 2000))
    step = st.tuples(
        st.sampled_from(["take", "take", "take", "charge", "refund", "change"]),
        gap,
        st.floats(0, 1, allow_nan=False),  # of the capacity now; for a change, the new one
        st.integers(0, 3),  # a change's new window
    )
    return (algorithm, capacity, window), base, draw(st.lists(step, max_size=20))


@settings(
    max_examples=capped(200),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenario=changing_buckets())
def test_lua_bucket_fast_path_follows_a_change(
    script: Script, scenario: tuple[Bucket, float, list[tuple[str, float, float, int]]]
) -> None:
    """Changes that raise and lower the capacity and window (a level above the new capacity,
    debts) between takes: ``acquire`` (the fast path on the field's bytes, parsing the numbers
    of the call) and ``batch`` (the general path) store the same bytes, and both decide as
    Python's state changed the same way."""
    from aiolimits.redis._script import decode_receipt, encode_receipt, num

    (algorithm, capacity, window), now, steps = scenario
    py = new_state(RateLimit("k", window, capacity, algorithm), now)
    args = ["k", algorithm, num(capacity), num(window)]
    fast, general = fresh_hash(), fresh_hash()
    receipts: list[tuple[Any, Any, Any, float]] = []  # python, fast, general receipts; held
    for i, (op, gap, share, which) in enumerate(steps):
        now += gap
        where = f"step {i} ({op} {share!r} at {now!r}) of {steps!r}"
        amount = share * py.capacity
        if op == "change":
            new_capacity = [0.5, 1, 2, 4, 9.5][int(share * 4.999)]
            new_window = [0.1, 0.25, 1.0, 60.0][which]
            new = [num(new_capacity), num(new_window)]
            for h in (fast, general):
                script(h, "change", now, *args, *new, "{}", "x")
            py.change(new_capacity, new_window, now)
            args = [*args[:2], *new]
        elif op == "take":
            one = [*args, num(amount)]
            admits = py.earliest(amount, now) <= now
            reply = script(fast, "acquire", now, "h", "inf", 1, *one)
            batch = script(general, "batch", now, "inf", 1, "h", 1, *one)
            assert reply[0] == int(batch[1]) == int(admits), where
            if admits:
                receipt = decode_receipt(batch[2][0][0])
                assert reply[2] == receipt, where
                receipts.append((py.take(amount, now), reply[2], receipt, amount))
        elif receipts:
            r_py, r_fast, r_general, held = receipts[-1]
            usage = held + amount if op == "charge" else held - min(held, amount)
            settle = [1, *args, num(held), num(usage)]
            a = script(fast, "settle", now, *settle, encode_receipt(r_fast))
            b = script(general, "settle", now, *settle, encode_receipt(r_general))
            assert a[2:] == b[2:], where
            if usage < held:
                assert py.refund(r_py, held - usage, now) == float(a[2][2]), where
            elif usage > held:
                r_py = py.charge(r_py, usage - held, now)
            receipts[-1] = (r_py, decode_receipt(a[2][0]), decode_receipt(b[2][0]), float(a[2][1]))
        field = f"b:{args[0]}"
        assert script.client.hget(fast, field) == script.client.hget(general, field), where
        stats = script(fast, "stats", now, 1, *args)
        assert float(stats[3][0]) == py.available(now), where
