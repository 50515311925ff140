"""Declarations of shared sets: equal limits compare equal; a mismatch says what differs."""

from __future__ import annotations

from aiolimits import CallLimit, RateLimit, ResourceLimit
from aiolimits._backends._declaration import declaration, declaration_json, mismatch
from aiolimits._limits import Limit


def test_order_does_not_matter() -> None:
    a: list[Limit] = [RateLimit("tokens", 60, 1000), CallLimit(60, 10), ResourceLimit("conn", 3)]
    assert declaration_json(a) == declaration_json(list(reversed(a)))
    assert mismatch("n", declaration(a), declaration(a[::-1])) is None


def test_mismatch_names_every_difference() -> None:
    stored = declaration([RateLimit("tokens", 60, 1000), ResourceLimit("conn", 3)])
    declared = declaration([RateLimit("tokens", 60, 2000, algorithm="gcra"), CallLimit(1, 5)])
    message = mismatch("svc", stored, declared)
    assert message == (
        "the shared state 'svc' was created with other limits: "
        "missing ResourceLimit('conn', capacity=3); "
        "extra CallLimit(window_seconds=1, capacity=5, algorithm='token_bucket'); "
        "RateLimit('tokens', window_seconds=60, capacity=2000, algorithm='gcra') where it has "
        "RateLimit('tokens', window_seconds=60, capacity=1000, algorithm='token_bucket') "
        "(every process must declare the same limits under one name)"
    )
