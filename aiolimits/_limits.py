"""Limit values: what a limit *is*, never what it currently holds.

A limit is an immutable, validated, hashable and picklable value (an attrs frozen class). It carries
no state: the state of a limit (tokens left, entries in a window, slots in use) lives in the
LimitSet's backend, so one value can be shared by many sets, sent to another process, compared and
used as a dict key.

Validation happens in the constructor and the messages name the argument and the bad value, so a
configuration mistake is reported where it is made rather than at the first acquisition.
"""

from __future__ import annotations

import enum
from typing import Any, Final, TypeAlias, TypeVar

import attrs

from ._numbers import check_capacity, check_resource_capacity, check_window

__all__ = [
    "CALL_COUNT_KEY",
    "CallLimit",
    "Limit",
    "RateLimit",
    "RateLimitAlgorithm",
    "ResourceLimit",
]

#: The key every CallLimit is known by in ``requested``, ``usage`` and statistics.
CALL_COUNT_KEY: Final = "call_count"


class RateLimitAlgorithm(str, enum.Enum):
    """How a RateLimit spreads ``capacity`` units over ``window_seconds``.

    The string values are accepted wherever the enum is (``algorithm="gcra"``). See
    ``docs/algorithms.md`` for what each one guarantees and when to choose it.
    """

    TokenBucket = "token_bucket"
    LeakyBucket = "leaky_bucket"
    SlidingWindow = "sliding_window"
    FixedWindow = "fixed_window"
    GCRA = "gcra"

    def __str__(self) -> str:
        return self.value

    @property
    def integral(self) -> bool:
        """Whether amounts must be whole numbers (the window algorithms count units)."""
        return self in (RateLimitAlgorithm.SlidingWindow, RateLimitAlgorithm.FixedWindow)


E = TypeVar("E", bound=enum.Enum)


def enum_member(cls: type[E], argument: str, value: object) -> E:
    """``value`` as a member of the string enum ``cls``, or the error naming ``argument``."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(
                f"{argument} must be a {cls.__name__} or one of {choices}, got {value!r}"
            ) from None
    raise TypeError(
        f"{argument} must be a {cls.__name__} or its string value, got {type(value).__name__} "
        f"{value!r}"
    )


def _convert_algorithm(value: object) -> RateLimitAlgorithm:
    return enum_member(RateLimitAlgorithm, "algorithm", value)


def check_key(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _check_key(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_key(attribute.name, value)


def _check_window(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_window(attribute.name, value)


def _check_window_capacity(
    instance: RateLimit | CallLimit, attribute: attrs.Attribute[Any], value: Any
) -> None:
    # Amounts are whole units for the window algorithms, so a capacity below one unit could never
    # admit anything: refuse it here instead of rejecting every acquisition later.
    algorithm = instance.algorithm
    check_capacity(
        attribute.name, value, whole_units_of=repr(algorithm.value) if algorithm.integral else None
    )


@attrs.frozen(repr=False)
class RateLimit:
    """At most ``capacity`` units per ``window_seconds``, as defined by ``algorithm``.

    A RateLimit is taken only when ``requested`` names its key (tokens, bytes, cost units).
    It is a value: it holds no state and can be shared by several LimitSets.

    Args:
        key: the name used in ``requested`` and ``usage``; a non-empty string.
        window_seconds: the length of the window in seconds, from 1e-3 to 1e9.
        capacity: units per window, from 1e-9 to 1e12 (from 1 for the window algorithms).
        algorithm: a :class:`RateLimitAlgorithm` or its string value.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an empty key, a window or capacity outside its range (``docs/numbers.md``),
            NaN or infinite, an unknown algorithm.

    Examples:
        >>> RateLimit("tokens", window_seconds=60, capacity=90_000)
        RateLimit('tokens', window_seconds=60, capacity=90000, algorithm='token_bucket')
    """

    key: str = attrs.field(validator=_check_key)
    window_seconds: float = attrs.field(validator=_check_window)
    capacity: float = attrs.field(validator=_check_window_capacity)
    algorithm: RateLimitAlgorithm = attrs.field(
        default=RateLimitAlgorithm.TokenBucket, converter=_convert_algorithm
    )

    # attrs runs validators after every field is set, so the capacity check can see the algorithm.

    @property
    def rate(self) -> float:
        """Units per second, ``capacity / window_seconds``."""
        return self.capacity / self.window_seconds

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.key!r}, window_seconds={self.window_seconds!r}, "
            f"capacity={self.capacity!r}, algorithm={self.algorithm.value!r})"
        )


def _check_call_key(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if value != CALL_COUNT_KEY:
        raise ValueError(f"key of a CallLimit is always {CALL_COUNT_KEY!r}, got {value!r}")


@attrs.frozen(repr=False)
class CallLimit:
    """At most ``capacity`` calls per ``window_seconds``: a RateLimit on the key ``"call_count"``.

    Every acquisition takes exactly one call, whether or not ``requested`` names it.

    Examples:
        >>> CallLimit(window_seconds=60, capacity=500)
        CallLimit(window_seconds=60, capacity=500, algorithm='token_bucket')
    """

    window_seconds: float = attrs.field(validator=_check_window)
    capacity: float = attrs.field(validator=_check_window_capacity)
    algorithm: RateLimitAlgorithm = attrs.field(
        default=RateLimitAlgorithm.TokenBucket, converter=_convert_algorithm
    )
    key: str = attrs.field(default=CALL_COUNT_KEY, validator=_check_call_key, kw_only=True)

    @property
    def rate(self) -> float:
        """Calls per second, ``capacity / window_seconds``."""
        return self.capacity / self.window_seconds

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(window_seconds={self.window_seconds!r}, "
            f"capacity={self.capacity!r}, algorithm={self.algorithm.value!r})"
        )


def _check_slots(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_resource_capacity(attribute.name, value)


@attrs.frozen(repr=False)
class ResourceLimit:
    """A semaphore of ``capacity`` slots with no time component (connections, GPUs, workers).

    Every acquisition takes one slot unless ``requested`` asks for more (or 0 to skip it); the
    slots come back when the acquisition is released. Usage updates do not apply to it.

    Examples:
        >>> ResourceLimit("connections", capacity=10)
        ResourceLimit('connections', capacity=10)
    """

    key: str = attrs.field(validator=_check_key)
    capacity: int = attrs.field(validator=_check_slots)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r}, capacity={self.capacity!r})"


#: Any limit a LimitSet accepts.
Limit: TypeAlias = RateLimit | CallLimit | ResourceLimit
