"""Requests: turning ``requested`` and ``usage`` mappings into validated ``(state, amount)`` items.

Everything a caller can get wrong is checked here, before the scheduler's lock is taken, so a
rejected call takes nothing (semantics §11). The common case (known keys, positive numbers within
capacity) costs one dict lookup and a few comparisons per key; anything else takes the slow path,
which says exactly what is wrong, naming the argument and the value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, cast

from ._algorithms import RateState
from ._limits import CallLimit, Limit, RateLimit, ResourceLimit
from ._numbers import MIN_AMOUNT, check_amount, describe
from ._scheduler import Items

__all__ = ["Requests"]

_INF: Final = math.inf
_MIN_AMOUNT: Final = MIN_AMOUNT


class Requests:
    """The validation plan of one LimitSet, computed once from its limits."""

    __slots__ = ("_default_error", "_default_items", "_fast", "_implicit", "index")

    def __init__(self, limits: Sequence[Limit], states: Sequence[RateState]) -> None:
        self.index: dict[str, tuple[Limit, RateState]] = {
            limit.key: (limit, state) for limit, state in zip(limits, states, strict=True)
        }
        plain = [limit.key for limit in limits if isinstance(limit, RateLimit)]
        self._default_error = (
            f"requested=None, but the RateLimit(s) {', '.join(map(repr, plain))} are taken only "
            "when requested names them: pass requested={...}"
            if plain
            else None
        )
        self._default_items: Items = tuple(
            (state, 1)
            for limit, state in zip(limits, states, strict=True)
            if not isinstance(limit, RateLimit)
        )
        # Taken with 1 unless ``requested`` names them.
        self._implicit = tuple((state.key, (state, 1)) for state, _ in self._default_items)
        # Keys whose amounts may be taken without further questions when they are a positive
        # int, or a float that is whole or allowed to be fractional, up to the capacity: (state,
        # fractions allowed). A CallLimit is left out: only 0 or 1 are valid, the slow path checks
        # it. The capacity is the state's, which a change of the limit updates (semantics §4).
        self._fast: dict[object, tuple[RateState, bool]] = {
            limit.key: (state, isinstance(limit, RateLimit) and not limit.algorithm.integral)
            for limit, state in zip(limits, states, strict=True)
            if not isinstance(limit, CallLimit)
        }

    def items(self, requested: Mapping[str, int | float] | None) -> Items:
        """Validate ``requested`` and turn it into ``(state, amount)`` items, zero amounts left
        out. Raises before anything is taken.

        On the hot path: one dict lookup and a few comparisons per named key; anything unusual
        goes to :meth:`_check_requested`, which explains what is wrong."""
        if requested is None:
            if self._default_error is not None:
                raise ValueError(self._default_error)
            return self._default_items
        if type(requested) is not dict and not isinstance(requested, Mapping):
            raise TypeError(
                f"requested must be a mapping of key to amount or None, got {describe(requested)}"
            )
        fast = self._fast
        items: list[tuple[RateState, int | float]] = []
        # Typed as what a caller may really pass (compiled code checks the declared types).
        given: Iterable[tuple[object, object]] = requested.items()
        for key, amount in given:
            spec = fast.get(key)
            if spec is not None:
                state, fractional = spec
                kind = type(amount)
                # The capacity is within the number range, so this is too (``_numbers``).
                if kind is int or kind is float:
                    number = cast("int | float", amount)
                    if (kind is int or fractional or number % 1 == 0) and (
                        _MIN_AMOUNT <= number <= state.capacity
                    ):
                        items.append((state, number))
                        continue
            checked = self._check_requested(key, amount)
            if checked:
                items.append(checked)
        for key, item in self._implicit:
            if key not in requested:
                items.append(item)
        return tuple(items)

    def _lookup(self, argument: str, key: object) -> tuple[Limit, RateState]:
        entry = self.index.get(key) if isinstance(key, str) else None
        if entry is None:
            raise ValueError(
                f"{argument} names {key!r}, which is not a limit of this set "
                f"(keys: {', '.join(map(repr, self.index))})"
            )
        return entry

    def _check_requested(self, key: object, value: object) -> tuple[RateState, int | float] | None:
        """The slow, explaining path of :meth:`items` for one key: the item, None to skip it, or
        the error naming the argument and the value."""
        limit, state = self._lookup("requested", key)
        what = f"requested[{key!r}]"
        amount = check_amount(what, value)
        if isinstance(limit, CallLimit):
            if amount not in (0, 1):
                raise ValueError(f"{what} must be 1 (or 0 to skip it), got {amount!r}")
        elif (isinstance(limit, ResourceLimit) or limit.algorithm.integral) and amount != int(
            amount
        ):
            raise ValueError(f"{what} must be a whole number, got {amount!r}")
        state.check(amount)
        return (state, amount) if amount else None

    def usage(self, usage: Mapping[str, int | float]) -> list[tuple[RateState, float]]:
        if not isinstance(usage, Mapping):
            raise TypeError(f"usage must be a mapping of key to amount, got {describe(usage)}")
        checked = []
        given: Iterable[tuple[object, object]] = usage.items()  # see items()
        for key, value in given:
            limit, state = self._lookup("usage", key)
            what = f"usage[{key!r}]"
            if isinstance(limit, ResourceLimit):
                # A ValueError by the spec (§5): the key is known, the operation is not for it.
                raise ValueError(  # noqa: TRY004
                    f"{what}: resource limits cannot be updated; release the acquisition instead"
                )
            amount = check_amount(what, value)
            if isinstance(limit, CallLimit) and amount != 1:
                raise ValueError(f"{what} must be 1 (one call), got {amount!r}")
            if limit.algorithm.integral and amount != int(amount):
                raise ValueError(f"{what} must be a whole number, got {amount!r}")
            checked.append((state, amount))
        return checked
