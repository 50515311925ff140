"""The range of every number the library accepts, and the one place that checks it (semantics §11).

Every number a caller gives (a limit's window and capacity, an amount requested or reported as
usage, a timeout, a pause) is checked here against a stated range before anything changes, and
anything outside it is a ``ValueError`` naming the argument and the value (a ``TypeError`` for a
non-number, and for ``bool``, which is an ``int`` by accident). The ranges are chosen so that
every product and sum the algorithms form, in Python and in the Redis backend's Lua (IEEE
doubles alike), stays finite, far from the subnormal floats, and exact enough to decide on:

============================  =================================  ==============================
number                        accepted                           why the bounds
============================  =================================  ==============================
``window_seconds``            ``1e-3 <= W <= 1e9`` (1 ms to      a window spans thousands of float
                              about 31.7 years)                  steps even of an epoch-seconds
                                                                 clock (one step of 1.8e9 s is
                                                                 2.4e-7 s); ``C·W <= 1e21``
``capacity`` (rate limits)    ``1e-9 <= C <= 1e12`` (``>= 1``    whole counts below 2**53 stay
                              for the window algorithms)         exact; ``W/C <= 1e18`` s
``capacity`` (resources)      an ``int``, ``1 <= C <= 1e12``     counted exactly in doubles
an amount (``requested``,     ``0``, or ``1e-9 <= n <= 1e12``    (and ``n <= C`` when requested)
``usage``)                                                       a product of two accepted
                                                                 numbers is never below 1e-21:
                                                                 no subnormal, so the error-free
                                                                 products and sums the exact
                                                                 comparisons use are exact; one
                                                                 usage costs at most 1e30 s of
                                                                 debt, so debts stay finite
``timeout``                   ``None`` or ``math.inf`` (no       ``now + timeout`` keeps micro-
                              deadline), or ``0 <= s <= 1e9``    second resolution on any clock
``seconds`` (``pause``)       ``0 <= s <= 1e9``                  a pause ends within 31.7 years
============================  =================================  ==============================

A positive amount below ``1e-9`` (a tiny fraction, a subnormal float) is refused rather than
silently rounded: it is far below anything a caller means (scale the unit instead) and it is
where float products stop being exact. Python ints of any size are compared exactly, so
``10**400`` is a ``ValueError``, never an ``OverflowError``.

What these bounds buy: a debt is at most (number of acquisitions) * 1e12 units, a theoretical
arrival time at most ``now + (acquisitions) * 1e30`` s: finite for any realistic number of
operations (2**53 of them stay below 1e46), so no state ever holds ``inf`` or ``nan`` and no loop
(the float-step searches of ``_algorithms._base``) runs more than a fixed number of times.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = [
    "MAX_AMOUNT",
    "MAX_CAPACITY",
    "MAX_SECONDS",
    "MAX_TIMER_SLACK",
    "MAX_WINDOW",
    "MIN_AMOUNT",
    "MIN_CAPACITY",
    "MIN_WINDOW",
    "check_amount",
    "check_capacity",
    "check_real",
    "check_resource_capacity",
    "check_seconds",
    "check_timeout",
    "check_timer_slack",
    "check_window",
    "describe",
]

MIN_WINDOW: Final = 1e-3
MAX_WINDOW: Final = 1e9
MIN_CAPACITY: Final = 1e-9
MAX_CAPACITY: Final = 1e12
MIN_AMOUNT: Final = 1e-9
MAX_AMOUNT: Final = 1e12
MAX_SECONDS: Final = 1e9
# A timer slack is a latency traded for fewer wake-ups: beyond a second it is a pause, not a slack.
MAX_TIMER_SLACK: Final = 1.0


def describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def check_real(what: str, value: object) -> int | float:
    """``value`` if it is an int or a float (not a bool), else the ``TypeError`` naming ``what``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int or float, got {describe(value)}")
    return value


def _shown(value: int | float) -> str:
    # A huge int's repr runs to hundreds of digits: say how big it is instead.
    if isinstance(value, int) and abs(value) > 10**30:
        return f"an int of {len(str(abs(value)))} digits"
    return repr(value)


def check_window(what: str, value: object) -> int | float:
    """A window in seconds, ``MIN_WINDOW <= value <= MAX_WINDOW``."""
    w = check_real(what, value)
    if not MIN_WINDOW <= w <= MAX_WINDOW:  # also false for NaN; exact for ints of any size
        raise ValueError(
            f"{what} must be between {MIN_WINDOW:g} and {MAX_WINDOW:g} seconds, got {_shown(w)}"
        )
    return w


def check_capacity(what: str, value: object, *, whole_units_of: str | None = None) -> int | float:
    """A rate limit's capacity: ``MIN_CAPACITY <= value <= MAX_CAPACITY``, and ``>= 1`` for an
    algorithm that counts whole units (named by ``whole_units_of``)."""
    c = check_real(what, value)
    low = MIN_CAPACITY if whole_units_of is None else 1
    if not low <= c <= MAX_CAPACITY:
        why = "" if whole_units_of is None else f" for {whole_units_of} (it counts whole units)"
        raise ValueError(
            f"{what} must be between {low:g} and {MAX_CAPACITY:g}{why}, got {_shown(c)}"
        )
    return c


def check_resource_capacity(what: str, value: object) -> int:
    """A ResourceLimit's number of slots: an int, ``1 <= value <= MAX_CAPACITY``."""
    if isinstance(value, float) and value.is_integer():
        raise TypeError(f"{what} must be an int, got float {value!r} (use {int(value)})")
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {describe(value)}")
    if not 1 <= value <= MAX_CAPACITY:
        raise ValueError(f"{what} must be between 1 and {MAX_CAPACITY:g}, got {_shown(value)}")
    return value


def check_amount(what: str, value: object) -> int | float:
    """An amount of units: 0, or ``MIN_AMOUNT <= value <= MAX_AMOUNT``."""
    n = check_real(what, value)
    if not (MIN_AMOUNT <= n <= MAX_AMOUNT or n == 0):  # also false for NaN
        raise ValueError(
            f"{what} must be 0 or a number between {MIN_AMOUNT:g} and {MAX_AMOUNT:g}, "
            f"got {_shown(n)}"
        )
    return n


def check_seconds(what: str, value: object) -> float:
    """A length of time such as a pause: ``0 <= value <= MAX_SECONDS``, as a float."""
    s = check_real(what, value)
    if not 0 <= s <= MAX_SECONDS:
        raise ValueError(
            f"{what} must be a number of seconds between 0 and {MAX_SECONDS:g}, got {_shown(s)}"
        )
    return float(s)


def check_positive_seconds(what: str, value: object) -> float:
    """A backend's own time (a call's timeout, a lease): ``0 < value <= MAX_SECONDS``, as a
    float. Larger ones would overflow a thread's wait, or a store's expiry, far from the caller."""
    s = check_real(what, value)
    if not 0 < s <= MAX_SECONDS:
        raise ValueError(
            f"{what} must be a number of seconds above 0 and at most {MAX_SECONDS:g}, "
            f"got {_shown(s)}"
        )
    return float(s)


def check_timeout(timeout: object, what: str = "timeout") -> float:
    """A timeout: ``None`` or ``math.inf`` for none (returned as ``inf``), else seconds in
    ``[0, MAX_SECONDS]``, as a float."""
    if timeout is None:
        return math.inf
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise TypeError(f"{what} must be a number of seconds or None, got {describe(timeout)}")
    if timeout == math.inf:
        return math.inf
    if not 0 <= timeout <= MAX_SECONDS:
        raise ValueError(
            f"{what} must be None or a number of seconds between 0 and {MAX_SECONDS:g}, "
            f"got {_shown(timeout)}"
        )
    return float(timeout)


def check_timer_slack(value: object) -> float:
    """``timer_slack``: seconds a wake-up may come late, ``0 <= value <= MAX_TIMER_SLACK``."""
    s = check_real("timer_slack", value)
    if not 0 <= s <= MAX_TIMER_SLACK:
        raise ValueError(
            f"timer_slack must be a number of seconds between 0 and {MAX_TIMER_SLACK:g}, "
            f"got {_shown(s)}"
        )
    return float(s)
