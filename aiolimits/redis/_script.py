"""The Lua script that keeps a LimitSet's state in Redis, and how Python talks to it.

The script (``limits.lua`` beside this file) mirrors ``aiolimits/_algorithms`` float operation by
float operation; this module only encodes its arguments and decodes its replies. Numbers cross
the wire as text that each side reads back exactly: Python's ``repr`` of a float going in (Lua's
``tonumber`` is ``strtod``), ``%.17g`` coming out (Redis would truncate a Lua number in a reply to
an integer, so the script never returns one for a float).

Receipts (what an acquisition keeps to settle its usage later) travel as lists of parts, each a
list of floats: ``[operation number, units]`` for the buckets, ``[slot id]`` or ``[entry id]``
for LeakyBucket and SlidingWindow (their slots live in Redis), ``[window index, units]`` for
FixedWindow, nothing for a ResourceLimit (its lease is named by the holder id).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from .._limits import CallLimit, Limit, RateLimit

__all__ = [
    "SOURCE",
    "acquire_reply",
    "decode_receipt",
    "encode_receipt",
    "limit_args",
    "num",
]

SOURCE: str = resources.files(__package__).joinpath("limits.lua").read_text(encoding="utf-8")

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


def acquire_reply(reply: bytes | str) -> list[Any]:
    """The reply of the ``acquire`` operation, one line of text (``"1 now receipt..."`` or
    ``"0 now rate_at admit_at expiry"``), as the list the other replies are: ``[1, now,
    receipt...]`` (each receipt decoded, ``[]`` for a resource) or ``[0, now, rate_at,
    admit_at, expiry]`` (numbers as ``%.17g`` text)."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    fields = text.split(" ")
    if fields[0] != "1":
        return [0, *fields[1:]]
    receipts: list[Any] = [
        [[float(x) for x in part.split(",")] for part in receipt.split(";")] if receipt else []
        for receipt in fields[2:]
    ]
    return [1, fields[1], *receipts]
