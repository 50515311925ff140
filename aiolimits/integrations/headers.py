"""What a provider says about its rate limits, read from the headers of one answer.

LLM providers and many APIs tell the client where it stands on every answer. This module reads
those headers into one typed value, :class:`ProviderLimits`, without any framework: pass any
mapping of header names to values (httpx's ``response.headers``, aiohttp's
``response.headers``, a plain dict; names are matched case-insensitively).

Families, each read by a small parser of its own (:data:`PARSERS`; pass your own list to
:func:`read_limits` to add one):

* **OpenAI / Azure OpenAI**: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
  ``x-ratelimit-reset-requests`` (a duration such as ``1s``, ``6m0s``, ``20ms``) and the same
  for ``tokens``.
* **Anthropic**: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,
  remaining,reset}``, the reset an RFC 3339 time.
* **IETF draft** (``draft-ietf-httpapi-ratelimit-headers``): the structured ``RateLimit-Policy``
  (``"name";q=100;w=60``) and ``RateLimit`` (``"name";r=42;t=30``) fields, and the earlier
  drafts' ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset``.
* **Retry-After**: ``Retry-After`` (delta-seconds or an HTTP date) and ``retry-after-ms``.

Headers come from outside, from a server that may be buggy or hostile. A value that is missing,
malformed, negative, not finite or beyond :data:`MAX_COUNT` / :data:`MAX_SECONDS` is ignored
(logged at debug level on the ``aiolimits`` logger), never raised: one bad header never costs the
caller its answer, and what is kept is always a finite number in range.

This module only reads. What a LimitSet does with what it reads is the business of the
integrations that use it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Final

import attrs

__all__ = [
    "MAX_COUNT",
    "MAX_SECONDS",
    "PARSERS",
    "Parser",
    "ProviderLimits",
    "Quota",
    "read_anthropic",
    "read_ietf",
    "read_limits",
    "read_openai",
    "read_retry_after",
]

logger = logging.getLogger("aiolimits")

#: The largest limit or remaining count kept; a larger value is ignored as malformed.
MAX_COUNT: Final = 1e12
#: The longest reset or retry delay kept, in seconds (about 11.6 days); a longer one is ignored.
MAX_SECONDS: Final = 1e6


@attrs.frozen
class Quota:
    """What a provider says about one of its limits (requests, tokens, ...), at one answer.

    Attributes:
        limit: the provider's limit for its window, or None when it did not say.
        remaining: what is left of it now, or None when it did not say.
        reset_after: seconds from the answer until ``remaining`` is back to ``limit`` (or, for
            the IETF fields, until the window resets), or None when it did not say.
        window: the window's length in seconds, when the provider states it (IETF ``w``).
    """

    limit: float | None = None
    remaining: float | None = None
    reset_after: float | None = None
    window: float | None = None

    def merged(self, other: Quota) -> Quota:
        """This quota with the fields ``other`` knows and this one does not."""
        return Quota(
            self.limit if self.limit is not None else other.limit,
            self.remaining if self.remaining is not None else other.remaining,
            self.reset_after if self.reset_after is not None else other.reset_after,
            self.window if self.window is not None else other.window,
        )


@attrs.frozen
class ProviderLimits:
    """Everything one answer's headers say about the provider's limits.

    Attributes:
        quotas: per dimension (``"requests"``, ``"tokens"``, ``"input_tokens"``,
            ``"output_tokens"``, or an IETF policy's own name), what the provider says of it.
        retry_after: seconds the provider asks the client to wait (``Retry-After``,
            ``retry-after-ms``), or None.
        families: which parsers found something, in :data:`PARSERS` order (for logs).
    """

    quotas: Mapping[str, Quota] = attrs.field(factory=dict)
    retry_after: float | None = None
    families: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.quotas) or self.retry_after is not None


#: A parser reads the headers (lower-cased names) at the answer's wall-clock time ``now`` (Unix
#: seconds, for resets given as dates) into what it found, or None when its family is absent.
Parser = Callable[[Mapping[str, str], float], "ProviderLimits | None"]


def _ignored(name: str, value: str, why: str) -> None:
    logger.debug("aiolimits: ignoring header %s=%r: %s", name, value[:100], why)


def _number(name: str, value: str, high: float) -> float | None:
    """``value`` as a number in ``[0, high]``, or None (ignored, with the reason logged)."""
    try:
        number = float(value.strip())
    except ValueError:
        _ignored(name, value, "not a number")
        return None
    if not 0 <= number <= high:  # also false for NaN
        _ignored(name, value, f"not in [0, {high:g}]")
        return None
    return number


def _count(headers: Mapping[str, str], name: str) -> float | None:
    """A count header (a limit, what remains) in range, or None when absent or ignored."""
    value = headers.get(name)
    return None if value is None else _number(name, value, MAX_COUNT)


def _seconds(name: str, value: str, seconds: float) -> float | None:
    """``seconds`` worked out from header ``name``, when in range, else None (ignored)."""
    if not 0 <= seconds <= MAX_SECONDS:  # also false for NaN
        _ignored(name, value, f"not a delay in [0, {MAX_SECONDS:g}] s")
        return None
    return seconds


# Go's time.Duration.String() form, which OpenAI uses: "1s", "6m0s", "20ms", "1h2m3.5s".
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS: Final = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}


def _duration(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    text = value.strip()
    if len(text) > 64:  # a duration is short; a long value is not one, and costs no regex time
        _ignored(name, value, "too long for a duration")
        return None
    position, total = 0, 0.0
    for part in _DURATION_PART.finditer(text):
        if part.start() != position:
            break
        total += float(part.group(1)) * _UNIT_SECONDS[part.group(2)]
        position = part.end()
    if position == 0 or position != len(text):
        try:  # some gateways send plain seconds
            total = float(text)
        except ValueError:
            _ignored(name, value, "not a duration such as 6m0s")
            return None
    return _seconds(name, value, total)


def _until(headers: Mapping[str, str], name: str, now: float) -> float | None:
    """Seconds from ``now`` to the RFC 3339 time in header ``name`` (0 when already past)."""
    value = headers.get(name)
    if value is None:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):  # fromisoformat accepts "Z" only from Python 3.11
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        _ignored(name, value, "not an RFC 3339 time")
        return None
    if when.tzinfo is None:
        _ignored(name, value, "an RFC 3339 time needs its offset")
        return None
    return _seconds(name, value, max(0.0, when.timestamp() - now))


def _found(family: str, quotas: dict[str, Quota]) -> ProviderLimits | None:
    kept = {dimension: quota for dimension, quota in quotas.items() if quota != Quota()}
    return ProviderLimits(kept, None, (family,)) if kept else None


def read_openai(headers: Mapping[str, str], now: float) -> ProviderLimits | None:
    """OpenAI and Azure OpenAI: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``."""
    del now  # the resets are durations
    quotas = {
        dimension: Quota(
            _count(headers, f"x-ratelimit-limit-{dimension}"),
            _count(headers, f"x-ratelimit-remaining-{dimension}"),
            _duration(headers, f"x-ratelimit-reset-{dimension}"),
        )
        for dimension in ("requests", "tokens")
    }
    return _found("openai", quotas)


def read_anthropic(headers: Mapping[str, str], now: float) -> ProviderLimits | None:
    """Anthropic: ``anthropic-ratelimit-<dimension>-{limit,remaining,reset}`` (RFC 3339 resets)."""
    quotas = {}
    for dimension in ("requests", "tokens", "input-tokens", "output-tokens"):
        prefix = f"anthropic-ratelimit-{dimension}"
        quotas[dimension.replace("-", "_")] = Quota(
            _count(headers, f"{prefix}-limit"),
            _count(headers, f"{prefix}-remaining"),
            _until(headers, f"{prefix}-reset", now),
        )
    return _found("anthropic", quotas)


# One member of a structured-field list: a quoted or bare name, then ;key=value parameters.
_MEMBER = re.compile(
    r'\s*(?:"([^"\\]{1,64})"|([A-Za-z*][A-Za-z0-9_.*:/%-]{0,63}))((?:\s*;[^,;]*)*)'
)
_PARAM = re.compile(r"\s*;\s*([a-z][a-z0-9_.*-]{0,31})\s*=\s*([^;,\s]{1,32})")


def _members(name: str, value: str) -> dict[str, dict[str, str]]:
    """The members of a structured-field list: name -> its parameters (bounded in size)."""
    members: dict[str, dict[str, str]] = {}
    if len(value) > 4096:
        _ignored(name, value, "too long")
        return members
    for item in value.split(",")[:16]:
        match = _MEMBER.fullmatch(item)
        if match is None:
            _ignored(name, item, "not a structured-field list member")
            continue
        member = match.group(1) or match.group(2)
        members[member] = dict(_PARAM.findall(match.group(3)))
    return members


def _parameter(name: str, params: Mapping[str, str], key: str, high: float) -> float | None:
    value = params.get(key)
    return None if value is None else _number(f"{name};{key}", value, high)


def read_ietf(headers: Mapping[str, str], now: float) -> ProviderLimits | None:
    """The IETF draft's ``RateLimit-Policy`` / ``RateLimit`` fields, or the earlier drafts'
    ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset`` (as ``"default"``)."""
    del now  # the resets are delta-seconds
    quotas: dict[str, Quota] = {}
    policy = headers.get("ratelimit-policy")
    if policy is not None:
        for member, params in _members("RateLimit-Policy", policy).items():
            quotas[member] = Quota(
                limit=_parameter("RateLimit-Policy", params, "q", MAX_COUNT),
                window=_parameter("RateLimit-Policy", params, "w", MAX_SECONDS),
            )
    current = headers.get("ratelimit")
    if current is not None and "=" in current:
        for member, params in _members("RateLimit", current).items():
            stated = Quota(
                remaining=_parameter("RateLimit", params, "r", MAX_COUNT),
                reset_after=_parameter("RateLimit", params, "t", MAX_SECONDS),
            )
            quotas[member] = stated.merged(quotas.get(member, Quota()))
    if not quotas:
        older = Quota(
            _count(headers, "ratelimit-limit"),
            _count(headers, "ratelimit-remaining"),
            _duration(headers, "ratelimit-reset"),
        )
        quotas["default"] = older
    return _found("ietf", quotas)


def read_retry_after(headers: Mapping[str, str], now: float) -> ProviderLimits | None:
    """``retry-after-ms`` (milliseconds), else ``Retry-After`` (delta-seconds or an HTTP date)."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        delay = _number("retry-after-ms", milliseconds, MAX_SECONDS * 1000)
        if delay is not None:
            return ProviderLimits({}, delay / 1000, ("retry-after",))
    value = headers.get("retry-after")
    if value is None:
        return None
    text = value.strip()
    seconds: float | None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _http_date_delay(text, now)
    if seconds is None:
        _ignored("retry-after", value, "neither delta-seconds nor an HTTP date")
        return None
    kept = _seconds("retry-after", value, seconds)
    return None if kept is None else ProviderLimits({}, kept, ("retry-after",))


def _http_date_delay(text: str, now: float) -> float | None:
    if len(text) > 64:
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        when = when.replace(tzinfo=timezone.utc)
    delay = when.timestamp() - now
    return max(0.0, delay) if math.isfinite(delay) else None


#: The parsers :func:`read_limits` runs by default, in order; a dimension named by several is
#: taken from the first that states each field.
PARSERS: Final[tuple[Parser, ...]] = (read_openai, read_anthropic, read_ietf, read_retry_after)


def read_limits(
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    now: float,
    parsers: Sequence[Parser] = PARSERS,
) -> ProviderLimits:
    """Read what ``headers`` say about the provider's limits; never raises on their values.

    Args:
        headers: the answer's headers: a mapping (any case) or ``(name, value)`` pairs; with
            repeated names, the first is used.
        now: the answer's wall-clock time in Unix seconds (``time.time()`` when it arrived), for
            resets given as dates.
        parsers: the families to read, in order of preference (default :data:`PARSERS`).

    Returns:
        What was found; falsy when nothing was.

    Examples:
        >>> said = read_limits(
        ...     {"x-ratelimit-remaining-tokens": "8000", "x-ratelimit-reset-tokens": "6m0s"},
        ...     now=time.time(),
        ... )
        >>> said.quotas["tokens"].remaining, said.quotas["tokens"].reset_after
        (8000.0, 360.0)
    """
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite wall-clock time, got {now!r}")
    items = headers.items() if isinstance(headers, Mapping) else headers
    lowered: dict[str, str] = {}
    for name, value in items:
        if isinstance(name, str) and isinstance(value, str):
            lowered.setdefault(name.lower(), value)
    quotas: dict[str, Quota] = {}
    retry_after: float | None = None
    families: list[str] = []
    for parser in parsers:
        found = parser(lowered, now)
        if not found:
            continue
        families.extend(found.families)
        for dimension, quota in found.quotas.items():
            quotas[dimension] = quotas.get(dimension, Quota()).merged(quota)
        if retry_after is None:
            retry_after = found.retry_after
    return ProviderLimits(quotas, retry_after, tuple(families))
