"""The script's keyed-hash expiry, leases and ``batch`` operation against their Python twins.

A keyed hash expires once its state is fresh again (``lua/run.lua``, ``keyed_expire``): after
every operation its TTL is the time until the Python state's ``is_fresh`` holds, plus the margin
(one second). A ``batch`` decides a queue as the Python scheduler would, request by request, up
to the first refused, whose times (and the end of the first lease of a full resource) it gives.
"""

from __future__ import annotations

import copy
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiolimits import CallLimit, RateLimit, ResourceLimit
from aiolimits._algorithms import RateState, new_state
from aiolimits._algorithms._base import first_true
from aiolimits._limits import Limit
from aiolimits._scheduler import Scheduler

from ._redis_server import redis_server
from .test_redis_parity import LuaState, Script, capped, multi_args, scenarios, script

__all__ = ["redis_server", "script"]  # the fixtures

MARGIN_MS = 1000  # FRESH_MARGIN_MS of run.lua


def keyed_hash() -> str:
    """A keyed set's hash of one client key (it does not start with ``{``: it expires)."""
    return f"aiolimits-test:k:{{{uuid.uuid4().hex}}}"


def fresh_in_ms(py: RateState, now: float) -> int:
    """The TTL the script must give a keyed hash whose one state is ``py``: the time until the
    Python state is fresh again, rounded up to a millisecond, plus the margin."""
    # (Asked of copies: a window state asked at a later time forgets what still counts now.)
    at = first_true(lambda t: copy.deepcopy(py).is_fresh(t), now, now)
    if at <= now:
        return MARGIN_MS
    return MARGIN_MS + math.ceil((at - now) * 1000)


class KeyedLuaState(LuaState):
    """A :class:`LuaState` in a keyed hash that checks the hash's TTL after every call against
    its Python twin ``py`` (which the test has already given the same operation)."""

    __slots__ = ("py",)

    def __init__(self, script: Script, limit: Limit, py: RateState) -> None:
        super().__init__(script, limit)
        self.hash = keyed_hash()
        self.py = py

    def _call(self, op: str, now: float, *args: Any) -> Any:
        client = self.script.client
        # Below the margin: the call's own TTL replaces it (a TTL is only ever lengthened).
        client.pexpire(self.hash, MARGIN_MS - 1)
        start = time.monotonic()
        reply = super()._call(op, now, *args)
        ttl = client.pttl(self.hash)
        elapsed_ms = (time.monotonic() - start) * 1000
        where = f"{op}{args!r} at {now!r} on {self.py!r}"
        if ttl == -2:  # no hash: nothing was written, the key decides as one never seen
            assert self.py.is_fresh(now), where
            return reply
        expected = fresh_in_ms(self.py, now)
        # The script's fresh time is the Python one within float error: a millisecond either
        # way; the TTL read counts down from the call's (real time passed since).
        assert expected - 1 - elapsed_ms - 1 <= ttl <= expected + 1, (ttl, expected, where)
        return reply


@settings(
    max_examples=capped(150),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios())
def test_lua_keyed_hash_expires_once_the_python_state_is_fresh(
    script: Script, scenario: tuple[RateLimit, float, list[tuple[str, float, float, int]]]
) -> None:
    limit, now, steps = scenario
    py = new_state(limit, now)
    lua = KeyedLuaState(script, limit, py)
    receipts: list[tuple[Any, Any]] = []
    for op, gap, amount, which in steps:
        now += gap
        if op in ("ask", "ask_then_wait"):
            at = py.earliest(amount, now)
            assert lua.earliest(amount, now) == at
            if op == "ask_then_wait" and at > now:
                now = at
            if py.earliest(amount, now) == now:
                r_py = py.take(amount, now)
                receipts.append((r_py, lua.take(amount, now)))
        elif receipts and amount > 0:
            j = which % len(receipts)
            r_py, r_lua = receipts[j]
            if op == "refund":
                assert py.refund(r_py, amount, now) == lua.refund(r_lua, amount, now)
            else:
                r_py = py.charge(r_py, amount, now)
                receipts[j] = (r_py, lua.charge(r_lua, amount, now))
        py.available(now)
        lua.available(now)


# --- leases: the keyed hash is kept while one is live ---------------------------------------------


def test_lua_leases_keep_a_keyed_hash_until_they_end(script: Script) -> None:
    key = keyed_hash()
    conns = multi_args([(ResourceLimit("conns", 2), 1)])
    client = script.client

    def ttl_after(*call: Any) -> tuple[Any, int]:
        if client.exists(key):
            client.pexpire(key, MARGIN_MS - 1)
        reply = script(key, *call)
        return reply, client.pttl(key)

    reply, ttl = ttl_after("acquire", 10.0, "a", "5.0", *conns)
    assert reply[0] == 1
    assert 5900 < ttl <= 6000  # the lease runs to 15, then the margin
    reply, ttl = ttl_after("renew", 14.0, "a", "7.5", "conns")
    assert reply[1] == 1
    assert 8400 < ttl <= 8500  # renewed to 21.5
    reply, ttl = ttl_after("acquire", 14.0, "b", "1.0", *conns)
    assert 8400 < ttl <= 8500  # the last lease to end decides
    reply, ttl = ttl_after("release", 15.0, "a", "conns")
    assert reply[1] == 1
    assert 900 < ttl <= 1000  # b's lease ended at 15: nothing is held
    reply, ttl = ttl_after("renew", 15.0, "b", "5.0", "conns")
    assert reply[1] == 0  # b learns it lost its slot
    assert (
        script(key, "acquire", 15.0, "c", "5.0", *multi_args([(ResourceLimit("conns", 2), 2)]))[0]
        == 1
    )


def test_lua_release_wakes_waiters_only_when_one_was_refused_for_a_full_resource(
    script: Script,
) -> None:
    key = f"{{aiolimits-test:{uuid.uuid4().hex}}}"
    conns = multi_args([(ResourceLimit("conns", 1), 1)])
    pubsub = script.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(f"{key}:wake")
    pubsub.get_message(timeout=1.0)  # the subscription's confirmation

    def woken() -> bool:
        # A PING through the subscription: its answer comes after any wake-up sent before.
        pubsub.ping()
        while (message := pubsub.get_message(timeout=2.0)) is not None:
            if message["type"] == "message":
                pubsub.get_message(timeout=2.0)  # the pong
                return True
            if message["type"] == "pong":
                return False
        raise AssertionError("no pong")

    try:
        assert script(key, "acquire", 10.0, "a", "5.0", *conns)[0] == 1
        script(key, "release", 10.5, "a", "conns")
        assert not woken()  # nobody waited for it
        assert script(key, "acquire", 11.0, "a", "5.0", *conns)[0] == 1
        assert script(key, "acquire", 11.0, "b", "5.0", *conns)[0] == 0  # full: b waits
        script(key, "release", 12.0, "a", "conns")
        assert woken()
        assert script(key, "acquire", 12.0, "b", "5.0", *conns)[0] == 1
        script(key, "release", 13.0, "b", "conns")
        assert not woken()  # b was told already; nobody waits since
        batch = [repr(5.0), "1", "c", *conns]
        assert script(key, "acquire", 13.0, "a", "5.0", *conns)[0] == 1
        assert script(key, "batch", 13.0, *batch)[1] == 0  # a queue's head refused: full
        script(key, "release", 14.0, "a", "conns")
        assert woken()
    finally:
        pubsub.close()


# --- batch: a queue decided in order --------------------------------------------------------------

SET: tuple[Limit, ...] = (
    CallLimit(1.0, 3),
    RateLimit("tokens", 2.0, 10, "token_bucket"),
    RateLimit("bytes", 4.0, 8, "fixed_window"),
    RateLimit("cells", 1.0, 5, "leaky_bucket"),
    ResourceLimit("conns", 2),
)
LEASE = 1e6  # longer than any scenario: Python's resources have no leases


def batch_args(requests: Sequence[tuple[str, Sequence[tuple[Limit, float]]]]) -> list[str]:
    out = [repr(LEASE), str(len(requests))]
    for holder, items in requests:
        out += [holder, *multi_args(items)]
    return out


@settings(
    max_examples=capped(150),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["batch", "batch", "release", "pause"]),
            st.floats(0, 1.5, allow_nan=False),
            st.lists(
                st.tuples(
                    st.integers(0, 10), st.integers(0, 8), st.integers(0, 5), st.integers(0, 2)
                ),
                min_size=1,
                max_size=4,
            ),
        ),
        max_size=20,
    ),
    keyed=st.booleans(),
)
def test_lua_batch_decides_a_queue_like_the_scheduler(
    script: Script, steps: list[tuple[str, float, list[tuple[int, int, int, int]]]], keyed: bool
) -> None:
    now = 1000.0
    states = tuple(new_state(limit, now) for limit in SET)
    sched = Scheduler(states, lambda: now)
    hash_key = keyed_hash() if keyed else f"{{aiolimits-test:{uuid.uuid4().hex}}}"
    held: list[tuple[Any, str]] = []  # python items, lua holder
    leases: dict[str, float] = {}  # holder of a resource lease -> its end
    for i, (op, gap, requests) in enumerate(steps):
        now += gap
        where = f"step {i} ({op}) at {now!r} of {steps!r}"
        if op == "batch":
            asked = []
            for tokens, nbytes, cells, conns in requests:
                amounts = (1, tokens, nbytes, cells, conns)
                py_items = tuple((s, a) for s, a in zip(states, amounts, strict=True) if a)
                lua_items = [(limit, a) for limit, a in zip(SET, amounts, strict=True) if a]
                asked.append((py_items, f"h{uuid.uuid4().hex[:8]}", lua_items, conns))
            reply = script(
                hash_key, "batch", now, *batch_args([(h, items) for _, h, items, _ in asked])
            )
            assert float(reply[0]) == now, where
            granted, refused = int(reply[1]), reply[3]
            for k, (py_items, holder, _lua_items, conns) in enumerate(asked):
                rate_at, admit_at = sched.admit_time(py_items, now)
                if admit_at > now:
                    assert granted == k, where
                    expiry = min(leases.values(), default=math.inf)
                    if admit_at != math.inf:
                        expiry = math.inf  # only a full resource's leases are told
                    assert [float(x) for x in refused] == [rate_at, admit_at, expiry], where
                    break
                assert sched.try_take(py_items, now) is not None, where
                assert len(reply[2][k]) == len(py_items), where
                held.append((py_items, holder))
                if conns:
                    leases[holder] = now + LEASE
            else:
                assert granted == len(asked), where
                assert refused == [], where
        elif op == "release" and held:
            py_items, holder = held.pop(len(requests) % len(held))
            sched.release(py_items)
            script(hash_key, "release", now, holder, "conns")
            leases.pop(holder, None)
        elif op == "pause":
            sched.pause(now + gap, now)
            script(hash_key, "pause", now, repr(gap))
