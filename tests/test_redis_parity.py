"""The Lua script gives exactly the answers of the Python algorithms (semantics §3, issue #7).

The Redis backend decides inside Redis with ``aiolimits/redis/lua/*.lua`` (one file per
algorithm), a step-by-step mirror of ``aiolimits/_algorithms``. Here the decision tables of
``test_algorithms_tables`` run against the script through :class:`LuaState`, a ``RateState``
whose every verb is a script call with the time passed in (the script's test hook; in production
it reads Redis server time), and a property drives random sequences through both and compares
every answer with ``==``. Acquire's fast path for buckets is checked against the general path,
byte for byte.
"""

from __future__ import annotations

import itertools
import struct
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiolimits import CallLimit, RateLimit, RateLimitAlgorithm, ResourceLimit
from aiolimits._algorithms import RateState, new_state
from aiolimits._algorithms._base import too_large
from aiolimits._limits import Limit
from aiolimits._scheduler import Scheduler
from aiolimits.redis._script import server_time

from ._redis_server import RedisServer, redis_server
from .test_algorithms_tables import (
    BUCKET_CASES,
    FIXED_CASES,
    LEAKY_CASES,
    SLIDING_CASES,
    UPTIME,
    Ask,
    Refund,
    Step,
    run,
)

__all__ = ["redis_server"]  # the session fixture, used by the tests below

_holders = itertools.count()


class Script:
    """The Lua script on one server, called with an explicit time: as a function (FCALL, one
    library whose calls must not leak state into each other) or as an EVAL script."""

    def __init__(self, server: RedisServer, *, functions: bool) -> None:
        import redis

        from aiolimits.redis._script import Lua

        self.client = redis.Redis.from_url(server.url)
        self.lua = Lua(functions=functions)

    def raw(self, hash_key: str, *args: Any) -> Any:
        return self.lua(self.client, hash_key, [str(arg) for arg in args])

    def __call__(self, hash_key: str, op: str, now: float, *args: Any) -> Any:
        """The reply, acquire's (one line of text) decoded as the scheduler decodes it."""
        from aiolimits.redis._script import acquire_reply, num

        reply = self.raw(hash_key, op, num(now), *args)
        return acquire_reply(reply) if op == "acquire" else reply


@pytest.fixture(scope="module", params=[True, False], ids=["fcall", "eval"])
def script(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[Script]:
    s = Script(redis_server, functions=request.param)
    yield s
    s.client.close()


def fresh_hash() -> str:
    return f"{{aiolimits-test:{uuid.uuid4().hex}}}"


class LuaState(RateState):
    """One limit's state in Redis, behind the ``RateState`` verbs the tables use."""

    __slots__ = ("hash", "limit", "script")

    def __init__(self, script: Script, limit: Limit) -> None:
        from aiolimits.redis._script import limit_args

        window = getattr(limit, "window_seconds", 0.0)
        super().__init__(limit.key, limit.capacity, window, 0.0)
        self.script = script
        self.hash = fresh_hash()
        self.limit = limit_args(limit)

    def _call(self, op: str, now: float, *args: Any) -> Any:
        return self.script(self.hash, op, now, *args)

    def earliest(self, amount: float, now: float) -> float:
        from aiolimits.redis._script import num

        if amount > self.capacity:
            raise too_large(self.key, amount, self.capacity)
        reply = self._call("earliest", now, 1, *self.limit, num(amount))
        return float(reply[2])

    def take(self, amount: float, now: float) -> Any:
        from aiolimits.redis._script import decode_receipt, num

        holder = f"h{next(_holders)}"
        reply = self._call("acquire", now, holder, "inf", 1, *self.limit, num(amount))
        assert reply[0] == 1, f"take of {amount} at {now} on a state that does not admit it"
        return decode_receipt(reply[2])

    def _settle(self, receipt: Any, held: float, usage: float, now: float) -> tuple[Any, float]:
        from aiolimits.redis._script import decode_receipt, encode_receipt, num

        reply = self._call(
            "settle", now, 1, *self.limit, num(held), num(usage), encode_receipt(receipt)
        )
        new_receipt, _held, given = reply[2]
        return decode_receipt(new_receipt), float(given)

    def refund(self, receipt: Any, amount: float, now: float) -> float:
        new_receipt, given = self._settle(receipt, amount, 0.0, now)
        receipt[:] = new_receipt  # receipts are owned and changed in place, as in Python
        return given

    def charge(self, receipt: Any, amount: float, now: float) -> Any:
        new_receipt, _given = self._settle(receipt, 0.0, amount, now)
        return new_receipt

    def available(self, now: float) -> float:
        reply = self._call("stats", now, 1, *self.limit)
        return float(reply[3][0])

    def __repr__(self) -> str:
        return f"<LuaState {self.limit!r} in {self.hash}>"


def rate(algorithm: str, capacity: float, window: float) -> RateLimit:
    return RateLimit("tokens", window, capacity, algorithm)


# --- the decision tables, against the script ----------------------------------------------------


@pytest.mark.parametrize("algorithm", ["token_bucket", "gcra"])
@pytest.mark.parametrize("steps", BUCKET_CASES.values(), ids=BUCKET_CASES.keys())
def test_lua_bucket_table(script: Script, algorithm: str, steps: list[Step]) -> None:
    run(LuaState(script, rate(algorithm, 4, 2)), steps)


@pytest.mark.parametrize("steps", LEAKY_CASES.values(), ids=LEAKY_CASES.keys())
def test_lua_leaky_bucket_table(script: Script, steps: list[Step]) -> None:
    run(LuaState(script, rate("leaky_bucket", 4, 2)), steps)


@pytest.mark.parametrize("steps", SLIDING_CASES.values(), ids=SLIDING_CASES.keys())
def test_lua_sliding_window_table(script: Script, steps: list[Step]) -> None:
    run(LuaState(script, RateLimit("requests", 10, 3, "sliding_window")), steps)


@pytest.mark.parametrize("steps", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_lua_fixed_window_table(script: Script, steps: list[Step]) -> None:
    run(LuaState(script, RateLimit("requests", 10, 3, "fixed_window")), steps)


@pytest.mark.parametrize("algorithm", ["token_bucket", "gcra"])
def test_lua_bucket_refund_gives_back_only_what_the_cap_has_not_absorbed(
    script: Script, algorithm: str
) -> None:
    run(
        LuaState(script, rate(algorithm, 100, 100)),
        [
            Ask(0, 60, True, 0),
            Ask(55, 90, True, 55),
            Refund(55, 60, of=0, given=5),
            Ask(55, 10, True, 55),
            Ask(55, 1, False, 56),
        ],
    )


# --- random sequences: every answer of the script equals Python's --------------------------------


def capped(n: int) -> int:
    """The profile's example count, at most ``n``: every example is a few dozen round trips."""
    profile = settings.default
    return n if profile is None else min(profile.max_examples, n)


ALGORITHMS = [a.value for a in RateLimitAlgorithm]
WINDOW_ALGORITHMS = {"sliding_window", "fixed_window"}  # whole units only


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[RateLimit, float, list[tuple[str, float, float, int]]]:
    algorithm = draw(st.sampled_from(ALGORITHMS))
    whole = algorithm in WINDOW_ALGORITHMS
    capacity = draw(st.integers(1, 50)) if whole else draw(st.sampled_from([1, 3, 4, 7.5, 1e9]))
    # Binary and decimal windows: the exact decisions must agree on both (issue #13).
    window = draw(st.sampled_from([1e-3, 0.1, 0.3, 1.0, 2.0, 60.0, 30 * 86_400.0]))
    # Times near 0, at four months of a monotonic clock, and at today's Unix time (Redis TIME).
    base = draw(st.sampled_from([0.0, UPTIME, 1.7e9 + 0.123456]))
    gap = st.one_of(
        st.just(0.0),
        st.floats(0, window * 2, allow_nan=False),
        st.floats(0, 1e-6, allow_nan=False),
    )
    units = st.integers(0, int(capacity)) if whole else st.floats(0, capacity, allow_nan=False)
    step = st.tuples(
        st.sampled_from(["ask", "ask", "ask_then_wait", "refund", "charge"]),
        gap,
        units,
        st.integers(0, 10),
    )
    return RateLimit("k", window, capacity, algorithm), base, draw(st.lists(step, max_size=25))


@settings(
    max_examples=capped(300),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios())
def test_lua_agrees_with_python_on_random_sequences(
    script: Script, scenario: tuple[RateLimit, float, list[tuple[str, float, float, int]]]
) -> None:
    limit, now, steps = scenario
    py = new_state(limit, now)
    lua = LuaState(script, limit)
    receipts: list[tuple[Any, Any, float]] = []  # python receipt, lua receipt, units taken
    for i, (op, gap, amount, which) in enumerate(steps):
        now += gap
        where = f"step {i} ({op} {amount!r} at {now!r}) of {steps!r} on {limit!r}"
        if op in ("ask", "ask_then_wait"):
            e_py, e_lua = py.earliest(amount, now), lua.earliest(amount, now)
            assert e_py == e_lua, where
            if op == "ask_then_wait" and e_py > now:
                now = e_py  # exactly when it said: both must admit there
                assert py.earliest(amount, now) == lua.earliest(amount, now) == now, where
            if e_py == now:
                receipts.append((py.take(amount, now), lua.take(amount, now), amount))
        elif receipts:
            r_py, r_lua, _taken = receipts[which % len(receipts)]
            if amount <= 0:
                continue
            if op == "refund":
                assert py.refund(r_py, amount, now) == lua.refund(r_lua, amount, now), where
            else:
                j = which % len(receipts)
                receipts[j] = (
                    py.charge(r_py, amount, now),
                    lua.charge(r_lua, amount, now),
                    receipts[j][2],
                )
        assert py.available(now) == lua.available(now), where


# --- acquire's fast path for buckets: the same bytes as the general path ----------------------


@st.composite
def bucket_scenarios(draw: st.DrawFn) -> tuple[RateLimit, float, list[tuple[str, float, float]]]:
    algorithm = draw(st.sampled_from(["token_bucket", "gcra"]))
    capacity = draw(st.sampled_from([1, 3, 4, 7.5, 1e9]))
    window = draw(st.sampled_from([1e-3, 0.1, 0.3, 1.0, 60.0]))
    base = draw(st.sampled_from([0.0, UPTIME, 1.7e9 + 0.123456]))
    gap = st.one_of(
        st.just(0.0),
        st.floats(0, window * 2, allow_nan=False),
        st.just(window * 2000),  # past the fold: the fast path hands over
    )
    step = st.tuples(
        st.sampled_from(["take", "take", "take", "charge", "refund"]),
        gap,
        st.floats(0, capacity, allow_nan=False),
    )
    return RateLimit("k", window, capacity, algorithm), base, draw(st.lists(step, max_size=20))


@settings(
    max_examples=capped(200),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenario=bucket_scenarios())
def test_lua_bucket_fast_path_writes_what_the_general_path_writes(
    script: Script, scenario: tuple[RateLimit, float, list[tuple[str, float, float]]]
) -> None:
    """``acquire`` decides and takes a bucket in its common form on the bytes of its field
    (``bucket_has``, ``bucket_take``); ``batch`` always builds the state's tables (the general
    path). The same steps on two hashes, one through each, answer and store the same bytes:
    every branch of the fast path (full, refilling, a second peak, the fold it hands over,
    refusals, debts from charges and refunds that leave longer logs)."""
    from aiolimits.redis._script import decode_receipt, encode_receipt, limit_args, num

    limit, now, steps = scenario
    args = limit_args(limit)
    fast, general = fresh_hash(), fresh_hash()
    receipts: list[tuple[Any, Any, float]] = []
    for i, (op, gap, amount) in enumerate(steps):
        now += gap
        where = f"step {i} ({op} {amount!r} at {now!r}) of {steps!r} on {limit!r}"
        if op == "take":
            one = [*args, num(amount)]
            reply = script(fast, "acquire", now, "h", "inf", 1, *one)
            batch = script(general, "batch", now, "inf", 1, "h", 1, *one)
            assert (reply[0] == 1) == (int(batch[1]) == 1), where
            if reply[0] == 1:
                receipt = decode_receipt(batch[2][0][0])
                assert reply[2] == receipt, where
                receipts.append((reply[2], receipt, amount))
            else:
                assert [float(x) for x in reply[2:4]] == [float(x) for x in batch[3][:2]], where
        elif receipts:
            r_fast, r_general, held = receipts[-1]
            usage = held + amount if op == "charge" else held - min(held, amount)
            settle = [1, *args, num(held), num(usage)]
            a = script(fast, "settle", now, *settle, encode_receipt(r_fast))
            b = script(general, "settle", now, *settle, encode_receipt(r_general))
            assert a[2:] == b[2:], where
            receipts[-1] = (decode_receipt(a[2][0]), decode_receipt(b[2][0]), float(a[2][1]))
        field = f"b:{limit.key}"
        assert script.client.hget(fast, field) == script.client.hget(general, field), where


# --- a set's limits together: the script's atomic acquisition is Scheduler.admit_time + take ----


def multi_args(items: Sequence[tuple[Limit, float]]) -> list[str]:
    from aiolimits.redis._script import limit_args, num

    out = [str(len(items))]
    for limit, amount in items:
        out += [*limit_args(limit), num(amount)]
    return out


SET: tuple[Limit, ...] = (
    CallLimit(1.0, 3),
    RateLimit("tokens", 2.0, 10, "gcra"),
    RateLimit("bytes", 4.0, 8, "sliding_window"),
    ResourceLimit("conns", 2),
)


@settings(
    max_examples=capped(200),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["acquire", "acquire", "release", "pause"]),
            st.floats(0, 1.5, allow_nan=False),
            st.integers(0, 10),
            st.integers(0, 8),
            st.integers(0, 2),
        ),
        max_size=30,
    )
)
def test_lua_acquires_a_set_like_the_scheduler(
    script: Script, steps: list[tuple[str, float, int, int, int]]
) -> None:
    now = 1000.0
    states = tuple(new_state(limit, now) for limit in SET)
    sched = Scheduler(states, lambda: now)
    hash_key = fresh_hash()
    held: list[tuple[Any, str]] = []  # python items, lua holder
    for i, (op, gap, tokens, nbytes, conns) in enumerate(steps):
        now += gap
        where = f"step {i} ({op}) at {now!r} of {steps!r}"
        if op == "acquire":
            amounts = (1, tokens, nbytes, conns)
            py_items = tuple((s, a) for s, a in zip(states, amounts, strict=True) if a)
            lua_items = [(limit, a) for limit, a in zip(SET, amounts, strict=True) if a]
            holder = f"h{next(_holders)}"
            rate_at, admit_at = sched.admit_time(py_items, now)
            taken = sched.try_take(py_items, now)
            reply = script(hash_key, "acquire", now, holder, "inf", *multi_args(lua_items))
            assert (reply[0] == 1) == (taken is not None), where
            if taken is None:
                assert (float(reply[2]), float(reply[3])) == (rate_at, admit_at), where
            else:
                held.append((py_items, holder))
        elif op == "release" and held:
            py_items, holder = held.pop(conns % len(held))
            sched.release(py_items)
            script(hash_key, "release", now, holder, "conns")
        elif op == "pause":
            sched.pause(now + gap, now)
            script(hash_key, "pause", now, repr(gap))
        stats = script(
            hash_key,
            "stats",
            now,
            len(SET),
            *[arg for limit in SET for arg in limit_args_of(limit)],
        )
        for state, entry in zip(states, stats[3:], strict=True):
            assert state.available(now) == float(entry[0]), where


def limit_args_of(limit: Limit) -> list[str]:
    from aiolimits.redis._script import limit_args

    return limit_args(limit)


# --- leases: a holder that stops renewing loses its slots ---------------------------------------


def test_lua_resource_lease_expires_unless_renewed(script: Script) -> None:
    key = fresh_hash()
    conns = multi_args([(ResourceLimit("conns", 1), 1)])
    assert script(key, "acquire", 10.0, "a", "5.0", *conns)[0] == 1
    assert script(key, "acquire", 12.0, "b", "5.0", *conns)[0] == 0
    assert script(key, "renew", 14.0, "a", "5.0", "conns")[1] == 1  # now until 19
    assert script(key, "acquire", 18.0, "b", "5.0", *conns)[0] == 0
    reply = script(key, "acquire", 19.0, "b", "5.0", *conns)  # a's lease ended at 19
    assert reply[0] == 1
    assert script(key, "renew", 20.0, "a", "5.0", "conns")[1] == 0  # a learns it lost the slot
    assert script(key, "release", 20.0, "b", "conns")[1] == 1
    assert script(key, "acquire", 20.0, "c", "5.0", *conns)[0] == 1


def test_lua_refuses_an_amount_above_capacity(script: Script) -> None:
    import redis

    with pytest.raises(redis.ResponseError, match="exceeds the capacity of tokens"):
        script(fresh_hash(), "acquire", 0.0, "h", "inf", *multi_args([(rate("gcra", 4, 2), 5)]))


def clock_field(script: Script, key: str) -> tuple[float, float]:
    """The hash's "!c": the highest server time seen and the grant count (two doubles)."""
    raw = script.client.hget(key, "!c")
    assert isinstance(raw, bytes)
    time, grants = struct.unpack("<dd", raw)
    return time, grants


def test_lua_server_time_never_runs_backwards(script: Script) -> None:
    key = fresh_hash()
    future = 4e9  # a high-water mark left by a server whose clock was ahead
    script.client.hset(key, "!c", struct.pack("<dd", future, 0.0))
    reply = script.raw(key, "earliest", "", 0)
    assert float(reply[0]) == future
    conns = multi_args([(ResourceLimit("conns", 1), 1)])
    assert script.raw(key, "acquire", "", "h", "5.0", *conns) == b"1 4000000000 "
    reply = script.raw(key, "acquire", "", "h2", "5.0", *conns)  # refused
    assert reply.split(b" ")[:2] == [b"0", b"4000000000"]
    assert clock_field(script, key) == (future, 1.0)  # not lowered


def test_lua_acquire_records_the_clock_and_counts_its_grants(script: Script) -> None:
    key = fresh_hash()
    calls = multi_args([(CallLimit(60.0, 2), 1)])
    for grants in (1.0, 2.0, 2.0):  # two grants, then a refusal
        reply = script.raw(key, "acquire", "", "h", "5.0", *calls)
        # The time it answered at, and the count.
        assert clock_field(script, key) == (server_time(reply.split(b" ")[1].decode()), grants)
    assert reply.startswith(b"0 ")
    assert script(key, "stats", 0.0, 0)[2] == b"2"


# --- states written before the buckets kept their level in tokens ---------------------------------


@pytest.mark.parametrize(
    ("algorithm", "old"),
    [
        # TokenBucket kept its level in unit-seconds: 4 unit-seconds of a 2 s window = 2 tokens.
        ("token_bucket", "{level = 4, stamp = 10, peaks = {seq = 0, seqs = {}, levels = {}}}"),
        # GCRA kept one TAT: 1 s ahead of now, at 2 units per second, is 2 units owed.
        ("gcra", "{tat = 11, peaks = {seq = 0, seqs = {}, levels = {}}}"),
    ],
)
def test_lua_reads_bucket_states_written_in_the_old_forms(
    script: Script, algorithm: str, old: str
) -> None:
    state = LuaState(script, rate(algorithm, 4, 2))
    field = f"s:{state.limit[0]}"
    script.client.eval(
        f"redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack({old}))", 1, state.hash, field
    )
    assert state.available(10.0) == 2.0
    assert state.earliest(2, 10.0) == 10.0
    assert state.earliest(3, 10.0) == 10.5


def test_lua_takes_the_time_injected_after_the_digest(script: Script) -> None:
    """A time after the digest, "d<digest>@<seconds>": the digest checked, and the call made at
    that time (a simulated clock goes through the same checks as Redis time)."""
    from aiolimits.redis._script import acquire_reply

    key = fresh_hash()
    limit = multi_args([(RateLimit("r", 3600, 4), 4)])  # nothing refills in between
    script.client.hset(key, "!h", "abc")
    granted = acquire_reply(script.raw(key, "acquire", "dabc@123.5", "h", "inf", *limit))
    assert granted[:2] == [1, 123.5]
    refused = acquire_reply(script.raw(key, "acquire", "dabc@124.25", "h", "inf", *limit))
    assert refused[:2] == [0, 124.25]


@pytest.mark.parametrize("op", ["acquire", "release", "earliest"])
def test_lua_checks_the_declaration_digest_before_anything(script: Script, op: str) -> None:
    """``acquire`` and ``release`` read the digest ("!h") with their fields, the other
    operations on its own: another digest, or none, and nothing is read or written."""
    import redis

    key = fresh_hash()
    conns = multi_args([(ResourceLimit("conns", 1), 1)])
    args = {
        "acquire": ["h", "5.0", *conns],
        "release": ["h", "conns"],
        "earliest": conns,
    }[op]
    script.client.hset(key, "!h", "abc")
    assert script.raw(key, "acquire", "dabc", "h", "5.0", *conns).startswith(b"1 ")
    before = script.client.hgetall(key)
    for tag in ("dabd", "d", "dabd@7.0", "d@7.0"):  # under Redis time, or a time injected
        with pytest.raises(redis.ResponseError, match="aiolimits-undeclared"):
            script.raw(key, op, tag, *args)
    assert script.client.hgetall(key) == before
    script.raw(key, op, "dabc", *args)  # the right digest: run
    script.raw(key, op, "dabc@7.0", *args)  # and with a time injected
    if op == "release":
        assert script.raw(key, "acquire", "dabc", "h2", "5.0", *conns).startswith(b"1 ")
