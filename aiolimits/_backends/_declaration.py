"""Declarations: what a shared LimitSet is, in a form every process (and Redis) can compare.

Processes attaching to the same shared state must declare the same limits (SPEC §7). The
declaration is a canonical JSON-able list, one entry per limit in key order, and
:func:`mismatch` says in words what differs, for the ``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .._limits import CallLimit, Limit, RateLimit

__all__ = ["declaration", "declaration_json", "mismatch"]

Declaration = list[dict[str, Any]]


def declaration(limits: Sequence[Limit]) -> Declaration:
    """The canonical description of ``limits``: sorted by key, plain JSON types only."""
    out: Declaration = []
    for limit in sorted(limits, key=lambda limit: limit.key):
        entry: dict[str, Any] = {"key": limit.key, "capacity": limit.capacity}
        if isinstance(limit, (RateLimit, CallLimit)):
            entry["kind"] = "call" if isinstance(limit, CallLimit) else "rate"
            entry["window_seconds"] = limit.window_seconds
            entry["algorithm"] = limit.algorithm.value
        else:
            entry["kind"] = "resource"
        out.append(entry)
    return out


def declaration_json(limits: Sequence[Limit]) -> str:
    """:func:`declaration` as compact JSON with sorted keys: equal limits, equal strings."""
    return json.dumps(declaration(limits), sort_keys=True, separators=(",", ":"))


def _show(entry: dict[str, Any]) -> str:
    if entry["kind"] == "resource":
        return f"ResourceLimit({entry['key']!r}, capacity={entry['capacity']!r})"
    head = "CallLimit(" if entry["kind"] == "call" else f"RateLimit({entry['key']!r}, "
    return (
        f"{head}window_seconds={entry['window_seconds']!r}, capacity={entry['capacity']!r}, "
        f"algorithm={entry['algorithm']!r})"
    )


def mismatch(name: str, stored: Declaration, declared: Declaration) -> str | None:
    """None when ``declared`` matches ``stored``; otherwise a message saying what differs."""
    if stored == declared:
        return None
    old = {entry["key"]: entry for entry in stored}
    new = {entry["key"]: entry for entry in declared}
    parts = [f"missing {_show(old[key])}" for key in sorted(old.keys() - new.keys())]
    parts += [f"extra {_show(new[key])}" for key in sorted(new.keys() - old.keys())]
    parts += [
        f"{_show(new[key])} where it has {_show(old[key])}"
        for key in sorted(old.keys() & new.keys())
        if old[key] != new[key]
    ]
    return (
        f"the shared state {name!r} was created with other limits: "
        + "; ".join(parts)
        + " (every process must declare the same limits under one name)"
    )
