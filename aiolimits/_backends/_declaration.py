"""Declarations: what a shared LimitSet is, in a form every process (and Redis) can compare.

Processes attaching to the same shared state must declare the same limits (semantics §7). The
declaration is a canonical JSON-able list, one entry per limit in key order, with every number
spelled one way (a whole number as an int: ``60`` and ``60.0`` are one declaration) and the
algorithm by its string value; :func:`mismatch` compares two declarations by value (so one
stored by an older version, spelled otherwise, still matches) and says in words what differs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .._limits import CallLimit, Limit, RateLimit

__all__ = ["declaration", "declaration_json", "mismatch"]

Declaration = list[dict[str, Any]]


def _number(value: Any) -> Any:
    """One spelling per number: a whole float as the int it equals (``60.0`` -> ``60``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def declaration(limits: Sequence[Limit]) -> Declaration:
    """The canonical description of ``limits``: sorted by key, plain JSON types only."""
    out: Declaration = []
    for limit in sorted(limits, key=lambda limit: limit.key):
        entry: dict[str, Any] = {"key": limit.key, "capacity": _number(limit.capacity)}
        if isinstance(limit, (RateLimit, CallLimit)):
            entry["kind"] = "call" if isinstance(limit, CallLimit) else "rate"
            entry["window_seconds"] = _number(limit.window_seconds)
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


def _canonical(entries: Any) -> dict[Any, dict[str, Any]]:
    """A stored or declared declaration by key, numbers in one spelling. Anything that is not a
    list of entries (damaged) gives no entries, hence a message listing every declared limit."""
    out: dict[Any, dict[str, Any]] = {}
    if isinstance(entries, list):
        for entry in entries:
            if isinstance(entry, dict) and "key" in entry:
                out[entry["key"]] = {k: _number(v) for k, v in entry.items()}
    return out


def _show_any(entry: dict[str, Any]) -> str:
    try:
        return _show(entry)
    except (KeyError, TypeError):
        return repr(entry)


def mismatch(name: str, stored: Declaration, declared: Declaration) -> str | None:
    """None when ``declared`` matches ``stored`` (whatever the spelling of their numbers);
    otherwise a message saying what differs, never empty."""
    old = _canonical(stored)
    new = _canonical(declared)
    if old == new and (old or stored == declared):
        return None
    _show = _show_any  # a stored entry may be damaged
    parts = [f"missing {_show(old[key])}" for key in sorted(old.keys() - new.keys())]
    parts += [f"extra {_show(new[key])}" for key in sorted(new.keys() - old.keys())]
    parts += [
        f"{_show(new[key])} where it has {_show(old[key])}"
        for key in sorted(old.keys() & new.keys())
        if old[key] != new[key]
    ]
    if not parts:  # pragma: no cover - equal by key means equal (handled above)
        parts = [f"{declared!r} where it has {stored!r}"]
    return (
        f"the shared state {name!r} was created with other limits: "
        + "; ".join(parts)
        + " (every process must declare the same limits under one name)"
    )
