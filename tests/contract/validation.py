"""Bad input: exact error type, the argument named, nothing taken."""

from __future__ import annotations

from typing import Any

import pytest

from aiolimits import CallLimit, RateLimit, ResourceLimit
from aiolimits.testing import ManualClock

from ._support import FIXED, INF, NAN, SLIDING, AnyLimit, MakeLimitSet, stats_of


def validation_limits() -> list[AnyLimit]:
    return [
        CallLimit(10, 100),
        RateLimit("tokens", 10, 100),
        RateLimit("sw", 10, 100, SLIDING),
        RateLimit("fw", 10, 100, FIXED),
        ResourceLimit("conn", 3),
    ]


BAD_REQUESTS = [
    pytest.param(None, ValueError, r"requested", id="none-with-plain-rate-limit"),
    pytest.param({"nope": 1}, ValueError, r"requested.*'nope'", id="unknown-key"),
    pytest.param({"tokens": 1, "nope": 1}, ValueError, r"requested.*'nope'", id="valid+unknown"),
    pytest.param({"tokens": -1}, ValueError, r"requested\['tokens'\]", id="negative"),
    pytest.param({"tokens": NAN}, ValueError, r"requested\['tokens'\]", id="nan"),
    pytest.param({"tokens": INF}, ValueError, r"requested\['tokens'\]", id="inf"),
    pytest.param({"tokens": -INF}, ValueError, r"requested\['tokens'\]", id="-inf"),
    pytest.param({"tokens": "5"}, TypeError, r"requested\['tokens'\]", id="str"),
    pytest.param({"tokens": None}, TypeError, r"requested\['tokens'\]", id="none-amount"),
    pytest.param({"tokens": True}, TypeError, r"requested\['tokens'\]", id="bool"),
    pytest.param({"tokens": 5, "conn": -1}, ValueError, r"requested\['conn'\]", id="valid+bad"),
    pytest.param({"sw": 1.5}, ValueError, r"requested\['sw'\]", id="fraction-sliding"),
    pytest.param({"fw": 0.5}, ValueError, r"requested\['fw'\]", id="fraction-fixed"),
    pytest.param({"conn": 1.5}, ValueError, r"requested\['conn'\]", id="fraction-resource"),
    pytest.param({"call_count": 2}, ValueError, r"requested\['call_count'\]", id="calls-2"),
    pytest.param({"call_count": 0.5}, ValueError, r"requested\['call_count'\]", id="calls-half"),
    pytest.param({"tokens": 101}, ValueError, r"requested\['tokens'\]", id="over-capacity"),
    pytest.param({"sw": 101}, ValueError, r"requested\['sw'\]", id="over-capacity-sliding"),
    pytest.param({"conn": 4}, ValueError, r"requested\['conn'\]", id="over-capacity-resource"),
    pytest.param([("tokens", 1)], TypeError, r"requested", id="not-a-mapping"),
]

BAD_TIMEOUTS = [
    pytest.param(-1, ValueError, id="negative"),
    pytest.param(NAN, ValueError, id="nan"),
    pytest.param("1", TypeError, id="str"),
    pytest.param(True, TypeError, id="bool"),
]

BAD_USAGE = [
    pytest.param({"nope": 1}, ValueError, r"usage.*'nope'", id="unknown-key"),
    pytest.param({"tokens": 1, "nope": 1}, ValueError, r"usage.*'nope'", id="valid+unknown"),
    pytest.param({"conn": 1}, ValueError, r"usage\['conn'\]", id="resource"),
    pytest.param({"tokens": -1}, ValueError, r"usage\['tokens'\]", id="negative"),
    pytest.param({"tokens": NAN}, ValueError, r"usage\['tokens'\]", id="nan"),
    pytest.param({"tokens": INF}, ValueError, r"usage\['tokens'\]", id="inf"),
    pytest.param({"tokens": "1"}, TypeError, r"usage\['tokens'\]", id="str"),
    pytest.param({"tokens": True}, TypeError, r"usage\['tokens'\]", id="bool"),
    pytest.param({"call_count": 2}, ValueError, r"usage\['call_count'\]", id="calls-2"),
    pytest.param({"call_count": 0}, ValueError, r"usage\['call_count'\]", id="calls-0"),
    pytest.param({"sw": 2.5}, ValueError, r"usage\['sw'\]", id="fraction-sliding"),
    pytest.param(["tokens"], TypeError, r"usage", id="not-a-mapping"),
]


class ValidationContract:
    """§2/§4/§11: bad input raises the exact error type naming the argument, and takes nothing."""

    @pytest.mark.parametrize(("requested", "error", "match"), BAD_REQUESTS)
    def test_try_acquire_rejects_bad_request_and_takes_nothing(
        self, make_limitset: MakeLimitSet, requested: Any, error: type[Exception], match: str
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        before = limits.get_stats()
        with pytest.raises(error, match=match) as info:
            limits.try_acquire(requested)
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before

    @pytest.mark.parametrize(("requested", "error", "match"), BAD_REQUESTS)
    def test_retry_after_rejects_bad_request(
        self, make_limitset: MakeLimitSet, requested: Any, error: type[Exception], match: str
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        with pytest.raises(error, match=match) as info:
            limits.retry_after(requested)
        assert info.type is error  # exactly, not a subclass

    @pytest.mark.parametrize(("requested", "error", "match"), BAD_REQUESTS)
    def test_acquire_sync_rejects_bad_request_and_takes_nothing(
        self, make_limitset: MakeLimitSet, requested: Any, error: type[Exception], match: str
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        before = limits.get_stats()
        with pytest.raises(error, match=match) as info:
            limits.acquire_sync(requested, timeout=0)
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before

    @pytest.mark.parametrize(("bad_timeout", "error"), BAD_TIMEOUTS)
    def test_acquire_sync_rejects_bad_timeout_and_takes_nothing(
        self, make_limitset: MakeLimitSet, bad_timeout: Any, error: type[Exception]
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        before = limits.get_stats()
        with pytest.raises(error, match="timeout") as info:
            limits.acquire_sync({"tokens": 1}, timeout=bad_timeout)
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before

    @pytest.mark.parametrize(("usage", "error", "match"), BAD_USAGE)
    def test_update_rejects_bad_usage_and_changes_nothing(
        self, make_limitset: MakeLimitSet, usage: Any, error: type[Exception], match: str
    ) -> None:
        limits = make_limitset(validation_limits(), clock=ManualClock())
        acq = limits.try_acquire({"tokens": 50, "sw": 50})
        assert acq.successful
        before = limits.get_stats()
        with pytest.raises(error, match=match) as info:
            acq.update(usage)
        assert info.type is error  # exactly, not a subclass
        assert limits.get_stats() == before
        acq.update({"tokens": 10})  # still usable afterwards
        assert stats_of(limits, "tokens")["available"] == 90

    @pytest.mark.parametrize(
        "limits",
        [
            pytest.param([RateLimit("x", 1, 1), RateLimit("x", 2, 2)], id="two-rate-limits"),
            pytest.param([RateLimit("x", 1, 1), ResourceLimit("x", 1)], id="rate-and-resource"),
            pytest.param([CallLimit(1, 1), CallLimit(2, 2)], id="two-call-limits"),
            pytest.param([CallLimit(1, 1), RateLimit("call_count", 1, 1)], id="call-and-rate"),
        ],
    )
    def test_duplicate_keys_raise_value_error_naming_the_key(
        self, make_limitset: MakeLimitSet, limits: list[AnyLimit]
    ) -> None:
        with pytest.raises(ValueError, match=repr(limits[1].key)):
            make_limitset(limits, clock=ManualClock())

    @pytest.mark.parametrize(
        ("seconds", "error"),
        [
            pytest.param(-1, ValueError, id="negative"),
            pytest.param(NAN, ValueError, id="nan"),
            pytest.param("1", TypeError, id="str"),
        ],
    )
    def test_pause_rejects_bad_seconds_and_pauses_nothing(
        self, make_limitset: MakeLimitSet, seconds: Any, error: type[Exception]
    ) -> None:
        limits = make_limitset([RateLimit("tokens", 10, 10)], clock=ManualClock())
        with pytest.raises(error, match="seconds") as info:
            limits.pause(seconds)
        assert info.type is error  # exactly, not a subclass
        assert limits.retry_after({"tokens": 1}) == 0.0
        assert limits.try_acquire({"tokens": 1}).successful
