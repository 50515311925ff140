"""The Lua script that keeps a LimitSet's state in Redis, and how Python talks to it.

The script (``lua/*.lua`` beside this file: one file per algorithm, loaded together as one text)
mirrors ``aiolimits/_algorithms`` float operation by float operation; this module only encodes
its arguments and decodes its replies. Numbers cross the wire as text that each side reads back
exactly: Python's ``repr`` of a float going in (Lua's ``tonumber`` is ``strtod``), ``%.17g``
coming out (Redis would truncate a Lua number in a reply to an integer, so the script never
returns one for a float).

Receipts (what an acquisition keeps to settle its usage later) travel as lists of parts, each a
list of floats: ``[operation number, units]`` for the buckets, ``[slot id]`` or ``[entry id]``
for LeakyBucket and SlidingWindow (their slots live in Redis), ``[window index, units]`` for
FixedWindow, nothing for a ResourceLimit (its lease is named by the holder id).

How the script runs (:class:`Lua`): as the function of a library (``FUNCTION LOAD`` once per
server, then ``FCALL``), so that its top level — every helper and algorithm it defines — runs
once at load rather than on every call as under ``EVAL``; on a server without functions
(Redis < 7) as an ``EVALSHA`` script. The library and its function are named after a hash of
the text (``aiolimits_<hash>``), so processes of two aiolimits versions can share a server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis
import redis.exceptions

from .._limits import CallLimit, Limit, RateLimit

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

__all__ = [
    "FILES",
    "FUNCTION",
    "LIBRARY",
    "SOURCE",
    "Lua",
    "acquire_reply",
    "decode_receipt",
    "encode_receipt",
    "limit_args",
    "num",
    "server_time",
]

#: The library's files (``lua/`` beside this module), in the order they are loaded: one text.
FILES: tuple[str, ...] = (
    "base.lua",
    "token_bucket.lua",
    "leaky_bucket.lua",
    "sliding_window.lua",
    "fixed_window.lua",
    "resource.lua",
    "run.lua",
)

_LUA = resources.files(__package__).joinpath("lua")
SOURCE: str = "".join(_LUA.joinpath(name).read_text(encoding="utf-8") for name in FILES)

# The library's name, and its one function's (function names are global on a server).
FUNCTION: str = "aiolimits_" + hashlib.sha256(SOURCE.encode()).hexdigest()[:16]

# The library: the shebang that names it, then the text, whose first line is given the function's
# name (on that line, so that the line numbers in an error are the file's, plus the shebang).
LIBRARY: str = f"#!lua name={FUNCTION}\nlocal FUNCTION_NAME = '{FUNCTION}' {SOURCE}"

# The SHA1 by which EVALSHA names the script (what SCRIPT LOAD answers).
SHA: str = hashlib.sha1(SOURCE.encode()).hexdigest()


def _no_functions(exc: redis.exceptions.ResponseError) -> bool:
    """The server does not know FCALL or FUNCTION (Redis < 7, or renamed away), or refuses them
    to this user (an ACL that allows scripts but not functions): the command did not run."""
    message = str(exc).lower()
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return "'fcall'" in message or "'function" in message
    return message.startswith("unknown command")


class Lua:
    """The script on the servers of one backend: how a call is sent, and what is done when the
    server does not have it.

    As a function (``FCALL``) unless the server does not know functions: the first ``unknown
    command`` reply (or an ACL's refusal of ``FCALL`` or ``FUNCTION LOAD``) switches this
    backend to ``EVALSHA`` for good. A server that does not have
    the library (``Function not found``: a restart without persistence, a ``FUNCTION FLUSH``, a
    Cluster node that never saw the load) or the script (``NOSCRIPT``) did not run the call:
    it is loaded there (``FUNCTION LOAD REPLACE``, to every master of a Cluster) and the call is
    sent once more. Nothing else is retried: a timeout may still run the call when the server
    resumes.

    Args:
        functions: False to use ``EVALSHA`` from the start (the tests of the fallback).
    """

    __slots__ = ("functions",)

    def __init__(self, *, functions: bool = True) -> None:
        self.functions = functions

    def __call__(self, client: redis.Redis | RedisCluster, key: str, args: Sequence[str]) -> Any:
        """The reply of one call of the script on the set ``key``."""
        loaded = False
        while True:
            functions = self.functions
            try:
                if not functions:
                    return client.evalsha(SHA, 1, key, *args)
                if isinstance(client, redis.Redis):
                    return client.fcall(FUNCTION, 1, key, *args)
                # Sent to the key's node: RedisCluster would first ask a node which arguments of
                # FCALL are keys (COMMAND GETKEYS), on every call.
                node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
                return client.execute_command(  # type: ignore[no-untyped-call]
                    "FCALL", FUNCTION, 1, key, *args, target_nodes=node
                )
            except redis.exceptions.ResponseError as exc:
                if not self.recover(client, exc, functions, loaded):
                    raise
                loaded = loaded or functions == self.functions

    def command(self, key: str, args: Sequence[str], *, functions: bool) -> list[str]:
        """One call as the words of a command, as a function or a script (``_scheduler``'s
        direct path sends them)."""
        if functions:
            return ["FCALL", FUNCTION, "1", key, *args]
        return ["EVALSHA", SHA, "1", key, *args]

    def recover(
        self,
        client: redis.Redis | RedisCluster,
        exc: redis.exceptions.ResponseError,
        functions: bool,
        loaded: bool,
    ) -> bool:
        """After the error reply ``exc`` to a call sent as a function (``functions``) or a script:
        True when the call was not run and may be sent again — the server lacked the library or
        the script and has it now (unless it was loaded already for this call: ``loaded``), or it
        has no functions and this backend uses ``EVALSHA`` from now on."""
        if functions and _no_functions(exc):
            self.functions = False
            return True
        if loaded:
            return False
        if functions and str(exc).startswith("Function not found"):
            self.load(client)
            return True
        if not functions and isinstance(exc, redis.exceptions.NoScriptError):
            self.load(client)
            return True
        return False

    def load(self, client: redis.Redis | RedisCluster) -> None:
        """Load the library (or the script) on the server, or on every master of a Cluster."""
        if self.functions:
            try:
                client.function_load(LIBRARY, replace=True)
            except redis.exceptions.ResponseError as exc:
                if not _no_functions(exc):
                    raise
                self.functions = False
            else:
                return
        client.script_load(SOURCE)


Receipt = list[list[float]]


def num(x: float) -> str:
    """``x`` as text the script reads back as the same double."""
    return repr(float(x))


def limit_args(limit: Limit) -> list[str]:
    """The four arguments that describe a limit to the script: key, algorithm, capacity, window."""
    if isinstance(limit, (RateLimit, CallLimit)):
        return [limit.key, limit.algorithm.value, num(limit.capacity), num(limit.window_seconds)]
    return [limit.key, "resource", num(limit.capacity), "0.0"]


def encode_receipt(parts: Sequence[Sequence[float]] | None) -> str:
    """A receipt as one argument: parts separated by ``;``, numbers by ``,``."""
    return ";".join(",".join(num(x) for x in part) for part in parts or ())


def decode_receipt(reply: Any) -> Receipt:
    """A receipt from a script reply (a list of lists of ``%.17g`` byte strings)."""
    return [[float(x) for x in part] for part in reply]


def server_time(text: str) -> float:
    """The time in an ``acquire`` reply: ``%.17g``, or Redis ``TIME``'s seconds and
    microseconds as ``"s:us"``, read as the float the script computed from them (``s + us /
    1000000``, the same two roundings)."""
    seconds, colon, micros = text.partition(":")
    if not colon:
        return float(text)
    return int(seconds) + int(micros) / 1_000_000


def acquire_reply(reply: bytes | str) -> list[Any]:
    """The reply of the ``acquire`` operation, one line of text (``"1 now receipt..."`` or
    ``"0 now rate_at admit_at expiry"``), as the list the other replies are: ``[1, now,
    receipt...]`` (each receipt decoded, ``[]`` for a resource) or ``[0, now, rate_at,
    admit_at, expiry]`` (``now`` a float, the other numbers as ``%.17g`` text)."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    fields = text.split(" ")
    if fields[0] != "1":
        return [0, server_time(fields[1]), *fields[2:]]
    receipts: list[Any] = [
        [[float(x) for x in part.split(",")] for part in receipt.split(";")] if receipt else []
        for receipt in fields[2:]
    ]
    return [1, server_time(fields[1]), *receipts]
