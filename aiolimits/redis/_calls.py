"""The protocol of one Redis-backed set: calls of the script, bounded, from a thread or a task.

A :class:`ScriptCalls` belongs to one set (a keyed set's proxies share it) and knows how to reach
the script: the client, the script's calling convention (a function, or EVALSHA), the set's
declaration tag, the backend's circuit and timeout, and the link of connected connections
(``_link.py``). It decides nothing; the scheduler (``_scheduler.py``) calls it and reads the
answers.

* **From a thread** (:meth:`ScriptCalls.call`): one round trip on a connection of the link (or
  through a Cluster's client), bounded by the caller (:class:`NoAnswer` when its own time runs
  out first) and by the backend's ``timeout`` (the circuit opens then).
* **From a task** (:meth:`ScriptCalls.exchange`): one or several calls sent at once on a connected
  connection, their answers awaited on the task's own event loop, shielded (an answer Redis gives
  is never lost to a cancellation) and bounded as above.
* **Time**: the script reads Redis server time, or takes the caller's clock reading when the
  set's clock drives its own timers (a simulated clock: the time is injected, beside the tag in
  the same word, so that every other step is the same); :meth:`local` turns a script time into
  one of this process's clock.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import redis
import redis.exceptions

from .._errors import BackendUnavailable
from .._limits import Limit, ResourceLimit
from .._numbers import check_capacity, check_resource_capacity, check_window
from ._failure import UNAVAILABLE, Circuit, NotSent, log
from ._link import Link, socket_of
from ._script import Lua, num

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

__all__ = [
    "UNDECLARED",
    "Adopt",
    "NoAnswer",
    "Numbers",
    "ScriptCalls",
    "StaleNumbers",
    "read_numbers",
]

# anyio >= 4.7 names it wait_readable; before, wait_socket_readable (deprecated since).
_wait_readable: Any = getattr(anyio, "wait_readable", None) or anyio.wait_socket_readable


def _answered(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _readable(sock: socket.socket, loop: asyncio.AbstractEventLoop | None) -> None:
    """Until ``sock`` is readable, on this task's event loop (``loop``: asyncio's, None:
    trio's, through anyio). PERF (benchmarks/redis.py, one task): on asyncio the loop's reader
    itself, without anyio's look-up of the running library on each call."""
    if loop is None:
        await _wait_readable(sock)
        return
    fut = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _answered, fut)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


#: The most calls a set keeps packed (see ScriptCalls._packed): a keyed set's calls differ by key,
#: so as many as the keys it keeps proxies of (``_keyed._PROXY_CACHE``), a few hundred bytes each.
_PACKS = 4096
#: ... and at most this many bytes of them: a client key comes from outside (an IP, an API key, a
#: header) and may be long, so the count alone would not bound what the cache holds.
_PACK_BYTES = 1 << 20

#: The error reply of a call on a plain set's hash that has no declaration (Redis lost its data):
#: the call did nothing; the declaration is written (and checked) again and the call sent again.
UNDECLARED = "aiolimits-undeclared"

#: The numbers ``(capacity, window)`` of the limits changed at run time, by key (semantics §4).
Numbers = dict[str, tuple[float, float]]

#: Adopts the numbers read from Redis; returns the script arguments of each limit that changed,
#: before and after.
Adopt = Callable[[Numbers], list[tuple[list[str], list[str]]]]


def read_numbers(raw: Any, limits: Sequence[Limit]) -> Numbers:
    """The numbers a change of a limit stored in the set's hash (``"!n"``, JSON), for the keys
    of ``limits``; anything malformed or out of a limit's range is ignored (logged)."""
    if raw is None:
        return {}
    try:
        found = json.loads(raw)
        numbers: Numbers = {}
        for limit in limits:
            entry = found.get(limit.key) if isinstance(found, dict) else None
            if entry is None:
                continue
            capacity, window = entry
            if isinstance(limit, ResourceLimit):
                check_resource_capacity("capacity", capacity)
                window = 0.0
            else:
                whole = limit.algorithm.value if limit.algorithm.integral else None
                check_capacity("capacity", capacity, whole_units_of=whole)
                check_window("window_seconds", window)
            numbers[limit.key] = (capacity, window)
    except (ValueError, TypeError) as exc:
        log.warning("ignoring the changed limits stored in Redis (%r): %s", raw, exc)
        return {}
    return numbers


class StaleNumbers(ValueError):
    """A batch was asked with the numbers of a limit another client has changed since."""


class NoAnswer(BackendUnavailable):
    """Redis did not answer within the caller's own time (shorter than the backend's
    ``timeout``): the call may still run; the circuit stays as it was."""


def _refused(exc: BaseException) -> bool:
    """Whether ``exc`` comes of a connection refused while connecting (so nothing was sent on
    it): a ConnectionRefusedError among its causes."""
    seen: BaseException | None = exc
    for _ in range(8):  # the chains redis-py makes are short
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ScriptCalls:
    """How the schedulers of one set call the script (see the module's docstring).

    Args:
        client: the backend's client (a single server or a Cluster).
        script: the script and how it is called.
        circuit: the backend's circuit, shared by all its sets.
        timeout: the backend's bound on any call, in seconds.
        link: the connections for the calls a caller makes itself (a single server; None: a
            Cluster, whose calls go through its client).
        injected_time: the script's time is the caller's clock reading (a simulated clock),
            not Redis server time; it goes with the tag, in the same word (:meth:`word`).
        declared: the digest of a plain set's declaration, which every call asks the script
            to check ("d<digest>"), whatever the clock.
        redeclare: declares a plain set again when Redis lost it or another client changed a
            limit (None: a keyed set's key hashes hold no declaration); returns the new digest
            and the numbers of the limits now.

    Attributes:
        adopt: set by the scheduler: takes the numbers :attr:`redeclare` read (see
            :data:`Adopt`).
        catch_up: a keyed set's: brings a client key's hash up to the set's numbers when it
            refused a call sent with the numbers the set has now (``_keys.py``).
    """

    __slots__ = (
        "_circuit",
        "_pack_bytes",
        "_packs",
        "_redeclare",
        "adopt",
        "catch_up",
        "client",
        "exchanges",
        "injected_time",
        "link",
        "script",
        "tag",
        "timeout",
    )

    def __init__(
        self,
        *,
        client: redis.Redis | RedisCluster,
        script: Lua,
        circuit: Circuit,
        timeout: float,
        link: Link | None,
        injected_time: bool,
        declared: str = "",
        redeclare: Callable[[], tuple[str, Numbers]] | None = None,
    ) -> None:
        self.client = client
        self.script = script
        self._circuit = circuit
        self.timeout = timeout
        self.link = link
        self.injected_time = injected_time
        self._redeclare = redeclare
        self.adopt: Adopt | None = None
        self.exchanges = 0  # tasks' round trips under way (see RedisBase.quiet)
        self._packs: dict[tuple[str, ...], Any] = {}  # see _packed
        self._pack_bytes = 0  # the bytes of the calls in _packs
        self.catch_up: Callable[[str], None] | None = None
        self.tag = f"d{declared}" if redeclare is not None else ""

    def word(self, now: float, tag: str | None = None) -> str:
        """Word 1 of a call: the tag (:attr:`tag`, or ``tag``), then "@" and the time when it
        is injected (``now``); a call under Redis time sends the tag alone (see ``run`` in
        lua/run.lua)."""
        if tag is None:
            tag = self.tag
        if not self.injected_time:
            return tag
        return f"{tag}@{num(now)}" if tag else num(now)

    def local(self, now: float, server_now: float, t: float) -> float:
        """A script time ``t``, read when the server's clock said ``server_now`` and ours
        ``now``, as a time of this process's clock."""
        if self.injected_time or math.isinf(t):
            return t
        return now + (t - server_now)

    def command(self, hash_key: str, op: str, now: float, args: Sequence[str]) -> list[str]:
        """The words of the call ``op`` on ``hash_key`` (for a pipeline of many)."""
        words = [op, self.word(now), *args]
        return self.script.command(hash_key, words, functions=self.script.functions)

    # -- from a thread ---------------------------------------------------------------------

    def call(
        self, hash_key: str, op: str, now: float, args: Sequence[str], bound: float | None
    ) -> Any:
        """One script call from a thread; the time is the server's, or ``now`` when injected.

        At once :class:`NotSent` while the circuit is open. Otherwise at most the backend's
        ``timeout``, or ``bound`` seconds when that is shorter (:class:`NoAnswer` then). A
        plain set whose declaration Redis lost, or whose limits another client changed
        (semantics §4), is declared again (and checked: ValueError when another declaration
        took the name meanwhile) and the numbers now adopted; the call is then sent once more
        with them, except a batch, asked with the old numbers (:class:`StaleNumbers`: the
        dispatcher asks again)."""
        self._circuit.check()
        words = [op, self.word(now), *args]
        try:
            return self._send(hash_key, words, bound)
        except redis.exceptions.ResponseError as exc:
            if self._redeclare is None or not str(exc).startswith(UNDECLARED):
                raise
        changed = self._declare_again(hash_key)
        if self.catch_up is not None:
            self.catch_up(hash_key)  # a keyed hash behind the set's numbers now: brought up
        if changed and op == "batch":
            # A batch's waiters were asked with the old numbers: the dispatcher asks again.
            raise StaleNumbers(f"a limit of {hash_key} changed in another client")
        for old, new in changed:
            # A limit another client changed: the call goes with its numbers now.
            for i in range(2, len(words) - 3):
                if words[i : i + 4] == old:
                    words[i : i + 4] = new
        words[1] = self.word(now)  # the digest read
        try:
            return self._send(hash_key, words, bound)
        except redis.exceptions.ResponseError as exc:
            if "exceeds the capacity" in str(exc):
                # Validated against a capacity another client lowered since: nothing was done.
                raise ValueError(f"{exc} (changed at run time)") from None
            raise

    def _declare_again(self, hash_key: str) -> list[tuple[list[str], list[str]]]:
        """The declaration again: Redis lost it, or another client changed a limit (semantics
        §4). The numbers now are adopted (:attr:`adopt`); returns the script arguments of each
        limit that changed, before and after."""
        assert self._redeclare is not None
        log.info("the declaration of %s changed or was lost in Redis: reading it", hash_key)
        try:
            digest, numbers = self._redeclare()
        except BackendUnavailable:
            raise
        except UNAVAILABLE as exc:
            raise BackendUnavailable(
                f"Redis did not answer for the limits {hash_key!r} in time: {exc}"
            ) from exc
        self.tag = f"d{digest}"
        return [] if self.adopt is None else self.adopt(numbers)

    def _send(self, hash_key: str, words: list[str], bound: float | None) -> Any:
        if self.link is not None:
            return self._round_trip(self.link, hash_key, words, bound)
        # A Cluster, through its client (bounded by the backend's timeout). A call is never
        # sent twice, with one exception that cannot apply it twice: a node that refused the
        # connection was sent nothing. After a failover, the first call of a process goes to the
        # old master (its map of the Cluster changes only when a call fails); the refusal makes
        # the client read the map again, and the call goes to the new master.
        for attempt in (1, 2):
            try:
                return self.script(self.client, hash_key, words)
            except UNAVAILABLE as exc:  # noqa: PERF203 (two attempts at most; try is free)
                if attempt == 1 and _refused(exc):
                    continue
                self._circuit.trip(exc)
                raise BackendUnavailable(
                    f"Redis did not answer for the limits {hash_key!r} in time: {exc}"
                ) from exc
        raise AssertionError("unreachable")

    def _round_trip(self, link: Link, hash_key: str, words: list[str], bound: float | None) -> Any:
        """One call on a single server, on a connection of the link, from a thread: at most
        ``bound`` (or the backend's timeout). Without a bound the thread may connect itself;
        with one, a short-lived thread connects while it waits at most that long."""
        full = bound is None or bound >= self.timeout
        timeout = self.timeout if bound is None else min(bound, self.timeout)
        conn = link.take()
        try:
            if conn is None:
                conn = link.connect() if bound is None else link.wait(timeout)
        except UNAVAILABLE as exc:  # the link tripped the circuit
            raise NotSent(f"Redis cannot be reached for the limits {hash_key!r}: {exc}") from exc
        if conn is None:
            self._circuit.check()
            raise NoAnswer(f"no connection to Redis for the limits {hash_key!r} in {timeout}s")
        script = self.script
        loaded = False
        try:
            while True:
                functions = script.functions
                conn.send_command(  # type: ignore[no-untyped-call]
                    *script.command(hash_key, words, functions=functions)
                )
                try:
                    reply = conn.read_response(timeout=timeout)
                except redis.exceptions.ResponseError as exc:
                    # Not run (no library or script there): loaded, and sent once more.
                    if not script.recover(self.client, exc, functions, loaded):
                        raise
                    loaded = loaded or functions == script.functions
                    continue
                return reply
        except redis.exceptions.ResponseError:
            raise  # an error reply: the connection is in step
        except UNAVAILABLE as exc:
            conn.disconnect()  # type: ignore[no-untyped-call]  # an answer may be on its way
            conn = None
            if not full and isinstance(exc, redis.exceptions.TimeoutError):
                raise NoAnswer(
                    f"Redis did not answer for the limits {hash_key!r} within {timeout}s"
                ) from exc
            self._circuit.trip(exc)
            raise BackendUnavailable(
                f"Redis did not answer for the limits {hash_key!r} in time: {exc}"
            ) from exc
        except BaseException:
            conn.disconnect()  # type: ignore[no-untyped-call]
            conn = None
            raise
        finally:
            if conn is not None:
                link.give(conn)

    # -- from a task -----------------------------------------------------------------------

    def _packed(self, conn: redis.Connection, words: list[str]) -> Any:
        """``words`` in the protocol, as ``conn`` packs them. PERF (benchmarks/redis.py, one
        task): the calls a task repeats are the same words (a set without resource limits
        names no holder, and the time is Redis's), packed once: redis-py encodes each word on
        every call otherwise, a noticeable share of an acquisition."""
        key = tuple(words)
        packed = self._packs.get(key)
        if packed is None:
            packed = conn.pack_command(*words)  # type: ignore[no-untyped-call]
            size = sum(map(len, packed))
            if size > _PACK_BYTES // 16:
                return packed  # a call this large (a long client key) is packed each time
            if len(self._packs) >= _PACKS or self._pack_bytes + size > _PACK_BYTES:
                self._packs.clear()
                self._pack_bytes = 0
            self._packs[key] = packed
            self._pack_bytes += size
        return packed

    async def exchange(
        self,
        conn: redis.Connection,
        hash_key: str,
        calls: Sequence[Sequence[str]],
        bound: float,
        now: float,
    ) -> list[Any]:
        """Script calls (``[op, *args]`` each, at ``now`` when the time is injected) from a
        task, sent at once on ``conn``, a connected connection of the link; their answers are
        awaited on the task's own event loop, for at most ``bound`` seconds or the backend's
        timeout, shielded (an answer Redis gives is never lost to a cancellation). ``conn``
        goes back to the link when every answer was read, else it is closed (answers may be on
        their way). An error reply (the script or the declaration missing) is raised: the
        dispatcher deals with it, off the event loop.

        Raises:
            NoAnswer: no answer within ``bound`` (shorter than the backend's timeout).
            BackendUnavailable: no answer within the backend's timeout (the circuit opens).
        """
        link = self.link
        assert link is not None
        full = bound >= self.timeout
        timeout = self.timeout if full else bound
        functions = self.script.functions
        time = self.word(now)
        commands = [
            self.script.command(hash_key, [op, time, *args], functions=functions)
            for op, *args in calls
        ]
        replies: list[Any] = []
        in_step = False
        self.exchanges += 1
        try:
            # One scope, shielded and with the deadline (fail_after would nest a second one:
            # each costs a noticeable share of a loopback round trip).
            loop = asyncio._get_running_loop()
            start = anyio.current_time() if loop is None else loop.time()
            with anyio.CancelScope(shield=True, deadline=start + timeout):
                if len(commands) == 1:
                    packed = self._packed(conn, commands[0])
                    conn.send_packed_command(packed)  # type: ignore[no-untyped-call]
                else:
                    packed = conn.pack_commands(commands)  # type: ignore[no-untyped-call]
                    conn.send_packed_command(packed)  # type: ignore[no-untyped-call]
                while len(replies) < len(commands):
                    if not replies or not conn.can_read(timeout=0):  # nothing buffered
                        # PERF: a task waits for its socket on its own loop, no thread hop
                        # (see benchmarks/redis.py, and socketed in _link.py).
                        await _readable(socket_of(conn), loop)
                    try:
                        replies.append(conn.read_response())
                    except redis.exceptions.ResponseError:
                        in_step = len(replies) + 1 == len(commands)  # the last answer was read
                        raise
                in_step = True
        except UNAVAILABLE as exc:
            self._circuit.trip(exc)
            raise BackendUnavailable(
                f"Redis did not answer for the limits {hash_key!r} in time: {exc!r}"
            ) from exc
        finally:
            self.exchanges -= 1
            if in_step:
                link.give(conn)
            else:
                conn.disconnect()  # type: ignore[no-untyped-call]
        if in_step:
            return replies
        # The deadline passed: the scope swallowed its own cancellation.
        if not full:
            raise NoAnswer(f"Redis did not answer for the limits {hash_key!r} within {timeout}s")
        stalled = redis.exceptions.TimeoutError(f"no answer in {timeout}s")
        self._circuit.trip(stalled)
        raise BackendUnavailable(
            f"Redis did not answer for the limits {hash_key!r} in time: {stalled!r}"
        )
