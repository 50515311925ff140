"""Declarations of shared sets: equal limits compare equal; a mismatch says what differs."""

from __future__ import annotations

import json

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


def test_numbers_have_one_spelling() -> None:
    ints = declaration([CallLimit(60, 10), RateLimit("t", 0.5, 1000)])
    floats = declaration([CallLimit(60.0, 10.0), RateLimit("t", 0.5, 1000.0)])
    assert ints == floats
    assert declaration_json([CallLimit(60, 10)]) == declaration_json([CallLimit(60.0, 10.0)])
    assert mismatch("n", ints, floats) is None


def test_a_declaration_stored_with_other_spellings_still_matches() -> None:
    # As an older version stored it: floats where this one writes ints.
    stored = json.loads(
        '[{"algorithm":"token_bucket","capacity":10.0,"key":"call_count","kind":"call",'
        '"window_seconds":60.0}]'
    )
    assert mismatch("n", stored, declaration([CallLimit(60, 10)])) is None
    message = mismatch("n", stored, declaration([CallLimit(60, 11)]))
    assert message is not None
    assert "capacity=11, algorithm='token_bucket') where it has" in message


def test_a_damaged_stored_declaration_still_gives_a_message() -> None:
    for stored in ([{"nonsense": 1}], [{"key": "x"}], "garbage", []):
        message = mismatch("n", stored, declaration([CallLimit(60, 10)]))  # type: ignore[arg-type]
        assert message
        assert message.startswith("the shared state 'n' was created with other limits: ")
