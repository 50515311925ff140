"""Limits that follow the provider: what its answers say, and AIMD when they say nothing.

A client declares the limits it was told (500 requests and 200,000 tokens a minute). The provider's
real limits may be lower (a new account tier, a quota shared with another process or machine, an
incident), and many providers say so on every answer. One :class:`Follower` per LimitSet (shared by
every transport and hook using that set in this process; the limit changes themselves go through
the set's backend, so every process sharing it sees them) brings the set in line after each answer:

* **What remains.** An answer saying ``remaining = R`` for a dimension (requests, tokens) means the
  provider admits at most ``R`` more, less whatever this client already sent that the provider had
  not counted when it answered. The provider counts a request when it arrives, and a request sent
  at least one round trip before the answer came back had arrived, so the follower subtracts the
  unanswered requests sent within the shortest round trip seen. When the set would admit more
  than that now, the answer's own acquisition is settled at the usage that leaves exactly that
  much (semantics §3: usage above the amount requested is charged, a bucket goes into debt, a
  window counts it), so the difference is held back as the provider holds it: a bucket earns it
  back at its rate, a window when it ends. The set is brought down to what the provider says;
  up only right after a change of its limit (a shrinking bucket keeps what is in use in use,
  which may leave it below what the provider says), or by what earlier answers held back: the
  requests they counted as not yet seen had often been seen (a request sent at the same moment
  as the answered one is usually counted with it), and without this the set stays that much
  below the provider for as long as it is busy (measured: 5-25 % of the real limit unused, set
  by how many requests were in flight at the first answers). A refund never goes above what the
  provider says remains, less what may be uncounted. The ``call_count`` of a
  :class:`CallLimit` cannot be charged more than 1, so when no request remains the follower
  pauses the set until the provider has one again instead.
* **A lower limit.** An answer saying ``limit = L`` below what the provider was declared to allow
  (``published``, default the set's own capacity) scales the set's limit by ``L / published``:
  capacity times that factor over the same window, so the rate scales with it (a window shrunk by
  :func:`~aiolimits.client_limits` keeps its rate at ``L`` per the provider's window). It is
  logged once per new value, and never raised above what was declared.
* **429s (AIMD).** A 429 lowers each rate limit of the set to ``decrease`` times the capacity
  that was in force when the refused request was sent, unless it is already lower, and never
  below ``floor`` of what was declared (without headers it is the only signal; with them, the
  sign that someone unseen takes from the same quota between answers). A burst refused together
  is one signal, as in TCP: each of its 429s names the same capacity at sending, so the first
  lowers the limit and the rest find it lowered already; a refusal of what was sent at the
  lowered rate is a new one. Each ``interval`` answered without a 429 adds ``increase`` of what
  was declared back, to the capacity this follower found in force at its previous step, up to
  what was declared (and never lowers anything).

  Both rules are *idempotent per episode*, so that the followers of several processes sharing
  one set (a process or Redis backend: each process has its own follower, and the limits they
  change are the same) land on one value: N processes refused in one episode lower the shared
  limit once, not N times (each computes ``decrease`` times the same capacity at sending), and
  N processes stepping up within one interval raise it by ``increase`` once (each adds it to the
  same earlier capacity; the highest wins). Before each decision a follower takes up the
  capacities in force in the set (another process's changes, as this process last saw them:
  ``LimitSet.limits``, no I/O). With a :class:`~aiolimits.LimitPool` only the refused set
  adapts, so ``LeastWait`` sends the traffic to the others.

Limits change through ``LimitSet.change_limit`` (semantics §4 "limits can change at run time"):
what is in use stays in use, a growing limit wakes waiters, a shrinking one never admits more than
the stricter of the two. A capacity is never set below the largest amount a request has asked of
it (that request could then never be admitted), nor below one whole unit for window algorithms.

Headers come from outside: :func:`~aiolimits.integrations.headers.read_limits` ignores anything
malformed (a debug log), and a header can only make the set stricter than what was declared.

Reading the set's figures is the one step that may touch a shared store: tasks read them with an
attempt of nothing (one awaited round trip, :func:`available_async`), threads with
``statistics()``; :func:`follow_answer` and :func:`follow_answer_sync` do the whole step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from typing import Any, Final, final

import attrs

from ._acquisition import Acquisition
from ._backends.memory import MemoryBackend
from ._errors import BackendUnavailable
from ._limits import CallLimit, RateLimit
from ._limitset import LimitSet
from ._numbers import describe
from ._pool import LimitPool
from .integrations.headers import ProviderLimits, Quota, read_limits

__all__ = [
    "DIMENSIONS",
    "KEPT_CHANGES",
    "Adaptation",
    "Follower",
    "LimitChange",
    "Reading",
    "adaptation_of",
    "available",
    "available_async",
    "follow_answer",
    "follow_answer_sync",
    "follower_for",
    "set_of",
    "settle_with",
]

logger = logging.getLogger("aiolimits")

#: How many of its latest changes a follower keeps for introspection (the demo's timeline).
KEPT_CHANGES: Final = 10_000

#: Which local key a provider's dimension maps to, by default (when the set has that key).
DIMENSIONS: Final[Mapping[str, str]] = {
    "requests": "call_count",
    "tokens": "tokens",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
}


def _fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return number


def _check_mapping(name: str, value: object, *, numbers: bool) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping, got {type(value).__name__}")
    checked: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {key!r}")
        if numbers:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise TypeError(f"{name}[{key!r}] must be a number, got {item!r}")
            if not (0 < item < math.inf):
                raise ValueError(f"{name}[{key!r}] must be > 0 and finite, got {item!r}")
            checked[key] = float(item)
        else:
            if not isinstance(item, str):
                raise TypeError(f"{name}[{key!r}] must be a str, got {item!r}")
            checked[key] = item
    return checked


@attrs.frozen
class Adaptation:
    """How a set follows its provider: header handling and the AIMD parameters.

    Pass ``adapt=Adaptation(...)`` (or ``adapt=True`` for these defaults) to
    :class:`~aiolimits.integrations.httpx.LimitedTransport`, its sync twin, or the aiohttp
    client middleware. Every caller of one LimitSet must use equal parameters: the set has one
    follower.

    Attributes:
        decrease: on a 429, each rate limit of the set comes down to this times its capacity
            when the refused request was sent, unless it is lower already (0 < decrease < 1;
            default 0.7). The followers of several processes sharing the set, refused in one
            episode, so lower it once.
        increase: after each ``interval`` without a 429, this fraction of the declared limit is
            added to the capacity in force at the previous step (0 < increase <= 1; default
            0.05), up to the declared limit; several processes stepping in one interval add it
            once.
        floor: the lowest fraction of the declared limit AIMD goes down to (default 0.05).
        interval: seconds between two AIMD steps; None (default): the set's shortest rate
            window.
        dimensions: provider dimension (``"requests"``, ``"tokens"``, an IETF policy name) to
            local key; default :data:`DIMENSIONS`, each used when the set has that key.
        published: per local key, the provider's published capacity for that limit, when the
            set's own capacity is not it (e.g. limits made by
            :func:`~aiolimits.client_limits`, which leave a margin); default the set's capacity.
    """

    decrease: float = attrs.field(default=0.7)
    increase: float = attrs.field(default=0.05)
    floor: float = attrs.field(default=0.05)
    interval: float | None = attrs.field(default=None)
    dimensions: Mapping[str, str] = attrs.field(factory=lambda: dict(DIMENSIONS))
    published: Mapping[str, float] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        decrease = _fraction("decrease", self.decrease)
        if decrease == 1:
            raise ValueError("decrease must be below 1, got 1")
        _fraction("increase", self.increase)
        _fraction("floor", self.floor)
        if self.interval is not None:
            interval = self.interval
            if isinstance(interval, bool) or not isinstance(interval, (int, float)):
                raise TypeError(f"interval must be a number or None, got {interval!r}")
            if not (0 < interval <= 1e6):
                raise ValueError(f"interval must be in (0, 1e6] seconds, got {interval!r}")
        object.__setattr__(
            self, "dimensions", _check_mapping("dimensions", self.dimensions, numbers=False)
        )
        object.__setattr__(
            self, "published", _check_mapping("published", self.published, numbers=True)
        )


@attrs.frozen
class Reading:
    """What one answer says remains: per key, the most the set may admit now and the seconds
    until the provider has one more unit; the keys whose limit the answer changed; and per key
    what was subtracted from the provider's figure as perhaps not yet counted by it."""

    targets: Mapping[str, tuple[float, float]]
    changed: frozenset[str]
    uncounted: Mapping[str, float] = attrs.field(factory=dict)


def available(limit_set: LimitSet) -> dict[str, float]:
    """Per key, what ``limit_set`` admits now (for a thread: may make a round trip)."""
    return {key: stats.available for key, stats in limit_set.statistics().limits.items()}


async def available_async(limit_set: LimitSet) -> dict[str, float]:
    """The same for a task: one awaited round trip on a shared backend, taking nothing."""
    nothing = {limit.key: 0 for limit in limit_set.limits}
    attempt = await limit_set.attempt(nothing)
    with attempt.acquisition:  # holds nothing; releasing a failed one releases nothing
        pass
    return {key: float(stats["available"]) for key, stats in attempt.stats["limits"].items()}


async def follow_answer(
    follower: Follower, acq: Acquisition, status: int, headers: Any
) -> dict[str, float]:
    """For a task: :meth:`Follower.answered`, then :meth:`Follower.in_line` with the set's
    figures read without I/O on the loop; the usage to settle ``acq`` with (may be empty).
    Before an AIMD step on a shared backend, one round trip more brings this process's view of
    the limits up to date (another process may have changed them since its last call)."""
    if follower.steps(status):
        await available_async(follower.limit_set)
    reading = follower.answered(acq, status, headers, time.time())
    if reading is None:
        return {}
    return follower.in_line(acq, reading, await available_async(follower.limit_set))


def follow_answer_sync(
    follower: Follower, acq: Acquisition, status: int, headers: Any
) -> dict[str, float]:
    """:func:`follow_answer` for a thread."""
    if follower.steps(status):
        available(follower.limit_set)
    reading = follower.answered(acq, status, headers, time.time())
    if reading is None:
        return {}
    return follower.in_line(acq, reading, available(follower.limit_set))


@attrs.frozen
class LimitChange:
    """One change the follower made, for the timeline: the key and its capacity from ``at``."""

    at: float
    key: str
    capacity: float


@final
class Follower:
    """The one follower of a LimitSet: in transit, factors, and the changes made (see module).

    Thread-safe: its state is under one lock. The set's own lock may be taken under it (to
    change a limit), never the other way round: the set never calls its follower.
    """

    def __init__(self, limit_set: LimitSet, adaptation: Adaptation) -> None:
        self.limit_set = limit_set
        self.adaptation = adaptation
        self._clock = limit_set._clock
        rates = [limit for limit in limit_set.limits if isinstance(limit, (RateLimit, CallLimit))]
        self._declared = {limit.key: limit for limit in rates}
        self._published = {
            key: adaptation.published.get(key, float(limit.capacity))
            for key, limit in self._declared.items()
        }
        unknown = set(adaptation.published) - set(self._declared)
        if unknown:
            raise ValueError(f"published names keys that are not rate limits: {sorted(unknown)}")
        self._dimensions = {
            dimension: key
            for dimension, key in adaptation.dimensions.items()
            if key in self._declared
        }
        windows = [float(limit.window_seconds) for limit in rates]
        self.interval = adaptation.interval or (min(windows) if windows else 1.0)
        self._lock = threading.Lock()
        # Requests sent and not yet answered: id(acq) -> (when it was sent, on the set's clock;
        # the capacity in force per key then; its amounts of the rate limits).
        self._in_transit: dict[int, tuple[float, dict[str, float], dict[str, float]]] = {}
        self._shortest = math.inf  # the shortest round trip seen, sent to answered
        self._largest: dict[str, float] = dict.fromkeys(self._declared, 0.0)
        self._told: dict[str, float] = dict.fromkeys(self._declared, 1.0)  # by the headers
        declared = {key: float(limit.capacity) for key, limit in self._declared.items()}
        # AIMD's capacity per key, not rounded (a whole-unit limit applies its floor): the
        # limit in force is the lower of it and what the headers told.
        self._aimd = dict(declared)
        # The capacity in force at this follower's last AIMD step: the next increase adds to it.
        self._base = dict(declared)
        self._last_step = -math.inf
        self._refused_since_step = False
        # What the set's limit was when this follower last looked or changed it (NaN: a change
        # the store could not take, made again).
        self._applied = dict(declared)
        self._logged: set[tuple[str, float]] = set()
        # Per key, what settling answers held back below what the set would have admitted (at
        # most its capacity): later answers may give it back (``in_line``).
        self._held: dict[str, float] = dict.fromkeys(self._declared, 0.0)
        # Another process may change the set's limits (a process, Redis or Ray backend).
        self._shared = not isinstance(limit_set._backend, MemoryBackend)
        #: The latest changes made (at most :data:`KEPT_CHANGES`), oldest first.
        self.changes: deque[LimitChange] = deque(maxlen=KEPT_CHANGES)

    # -- what the transports call -------------------------------------------------------------

    def steps(self, status: int) -> bool:
        """Whether an answer with ``status`` may take an AIMD step (a 429, or a success once an
        ``interval`` has passed) on a shared backend, whose limits another process may have
        changed since this one last called it: the caller reads the set first (see
        :func:`follow_answer`), so that the step starts from the limits in force."""
        if not self._shared:
            return False
        if status == 429:
            return True
        with self._lock:
            return status < 400 and self._clock() - self._last_step >= self.interval

    def sent(self, acq: Acquisition) -> None:
        """``acq`` was admitted and its request is on its way: count it in transit, with the
        capacities in force, as of the last answer (a 429 for it lowers them from there; the
        set's lock is not taken here, on the caller's way to the network)."""
        now = self._clock()
        with self._lock:
            amounts = {
                key: amount for key, amount in acq.requested.items() if key in self._declared
            }
            for key, amount in amounts.items():
                self._largest[key] = max(self._largest[key], amount)
            self._in_transit[id(acq)] = (now, self._in_force(), amounts)

    def abandoned(self, acq: Acquisition) -> None:
        """``acq``'s request got no answer (an error): it is no longer in transit."""
        with self._lock:
            self._in_transit.pop(id(acq), None)

    def _untransit(self, acq: Acquisition, now: float) -> tuple[dict[str, float], dict[str, float]]:
        """Take ``acq`` out of transit: the capacities in force when it was sent, and per key
        what the provider may not have counted yet when it answered.

        The provider counted every request that reached it before it answered. A request sent
        at least one round trip before the answer came back has (a round trip is never shorter
        than the shortest seen: there and back), so what may be uncounted is what was sent
        within the shortest round trip seen before now, which is always after ``acq`` itself
        was sent. Before any answer, everything still unanswered counts.
        """
        sent, in_force, _ = self._in_transit.pop(id(acq), (now, self._in_force(), {}))
        self._shortest = min(self._shortest, now - sent)
        since = now - self._shortest
        later = dict.fromkeys(self._declared, 0.0)
        for at, _, amounts in self._in_transit.values():
            if at > since:
                for key, amount in amounts.items():
                    later[key] += amount
        return in_force, later

    def answered(
        self, acq: Acquisition, status: int, headers: Any, wall_now: float
    ) -> Reading | None:
        """The answer to ``acq`` came back: adopt what it announces, or take the AIMD step.

        Never waits and does no I/O on the caller's thread (``change_limit`` hands a shared
        backend's off). What remains is applied by :meth:`in_line`, given the set's
        ``available`` figures, which the caller reads as suits it (:func:`available` in a
        thread, :func:`available_async` in a task).

        Args:
            acq: the acquisition the request was sent under (still held).
            status: the answer's HTTP status.
            headers: its headers (any mapping, or name/value pairs).
            wall_now: ``time.time()`` when it arrived.

        Returns:
            What the answer says remains, to pass to :meth:`in_line`; None when it says nothing.
        """
        said = read_limits(headers, now=wall_now)
        now = self._clock()
        with self._lock:
            self._follow_set()
            in_force, later = self._untransit(acq, now)
            quotas = self._quotas(said)
            if quotas:
                self._adopt(quotas, now)
            if status == 429:
                # Without headers, the only signal; with them, the sign that someone unseen
                # (another process, a dashboard) takes from the same quota between answers: in
                # both cases the rate comes down, and comes back while answers succeed.
                self._refused(now, in_force)
            elif status < 400:
                self._calm(now)
            targets = {
                key: (
                    quota.remaining - later[key],
                    _until_one(quota, 1 + later[key] - quota.remaining, said.families),
                )
                for key, quota in quotas.items()
                if quota.remaining is not None
            }
            wanted = self._capacities()
            # Under this lock, so that two answers' changes reach the set in the order they
            # were decided (the set's own lock is taken inside; never the other way round).
            self._apply(wanted, now)
        if not targets:
            return None
        return Reading(targets, frozenset(wanted), {key: later[key] for key in targets})

    def in_line(
        self, acq: Acquisition, reading: Reading, available: Mapping[str, float]
    ) -> dict[str, float]:
        """Bring the set in line with what ``reading`` says remains.

        Args:
            acq: the acquisition the request was sent under (still held).
            reading: what :meth:`answered` returned.
            available: the set's ``available`` figure per key, read after :meth:`answered`.

        Returns:
            Per key, the usage to settle ``acq`` with so that the set admits what the provider
            says remains (see :func:`settle_with`); may be empty. With no request remaining,
            the set is paused until the provider has one again.
        """
        settle: dict[str, float] = {}
        pause = 0.0
        for key, (target, wait) in reading.targets.items():
            limit = self._declared[key]
            if isinstance(limit, CallLimit):
                if available[key] > target and target < 1:
                    pause = max(pause, wait)
                continue
            requested = acq.requested.get(key, 0)
            if requested <= 0:
                continue
            # With the reservation held the set admits ``available``; settled at ``u`` it
            # admits ``available + requested - u``, which must be ``target``.
            usage = max(0.0, available[key] + requested - target)
            with self._lock:
                held = self._held[key]
                if available[key] > target or key in reading.changed:
                    # Down; or both ways right after a change of the limit (whose debt, what is
                    # in use staying in use, may leave the set below what the provider says).
                    pass
                elif held > 0 and usage < requested:
                    # Up, by no more than earlier answers held back: what they counted as not
                    # yet seen by the provider had been seen (see the module).
                    usage = max(usage, requested - held)
                else:
                    continue
                if limit.algorithm.integral:
                    usage = math.ceil(usage)
                # Held back: only what was subtracted as perhaps uncounted (the rest the
                # provider really did not have).
                kept = min(usage - requested, reading.uncounted.get(key, 0.0))
                self._held[key] = min(float(limit.capacity), max(0.0, held + kept))
            settle[key] = usage
        if pause > 0:
            self.limit_set.pause(pause)
        return settle

    # -- the decisions, under the lock ---------------------------------------------------------

    def _quotas(self, said: ProviderLimits) -> dict[str, Quota]:
        quotas = {}
        for dimension, quota in said.quotas.items():
            key = self._dimensions.get(dimension)
            if key is not None and (quota.limit is not None or quota.remaining is not None):
                quotas[key] = quota
        return quotas

    def _adopt(self, quotas: Mapping[str, Quota], now: float) -> None:
        for key, quota in quotas.items():
            if quota.limit is None or quota.limit <= 0:
                continue
            factor = min(1.0, quota.limit / self._published[key])
            if factor < self._told[key] and (key, quota.limit) not in self._logged:
                self._logged.add((key, quota.limit))
                logger.info(
                    "aiolimits: the provider announces %g for %r where %g was declared; "
                    "following it",
                    quota.limit,
                    key,
                    self._published[key],
                )
            self._told[key] = factor

    def _in_force(self) -> dict[str, float]:
        """Per key, the capacity in force now, not rounded: AIMD's, or the headers' if lower."""
        return {
            key: min(self._aimd[key], float(limit.capacity) * self._told[key])
            for key, limit in self._declared.items()
        }

    def _follow_set(self) -> None:
        """Take up the capacities another follower (another process sharing the set's backend)
        gave the set since this one last looked, as this process last saw them (no I/O): AIMD
        goes on from there, and the next increase adds to no more than them."""
        for limit in self.limit_set.limits:
            key = limit.key
            if key not in self._declared:
                continue
            capacity = float(limit.capacity)
            applied = self._applied[key]
            if capacity == applied or math.isnan(applied):
                continue
            self._applied[key] = capacity
            if _rounded(self._declared[key], self._aimd[key]) != capacity:
                self._aimd[key] = capacity
            self._base[key] = min(self._base[key], capacity)

    def _refused(self, now: float, in_force: Mapping[str, float]) -> None:
        """A 429 that says nothing usable: each rate limit down to ``decrease`` times its
        capacity when the request was sent, unless it is lower already (TCP's rule: a burst
        refused together is one signal, but a refusal of what was sent at the lowered rate is
        a new one; and the followers of several processes refused in one episode agree)."""
        self._refused_since_step = True
        adaptation = self.adaptation
        now_in_force = self._in_force()
        lowered = False
        for key, limit in self._declared.items():
            # From the rate in force: a limit the headers already lowered is lowered further.
            lower = max(
                adaptation.floor * float(limit.capacity), adaptation.decrease * in_force[key]
            )
            if lower < now_in_force[key]:
                self._aimd[key] = self._base[key] = lower
                lowered = True
        if not lowered:
            return
        self._last_step = now
        self._refused_since_step = False
        logger.debug("aiolimits: 429 without rate-limit headers; AIMD capacities %r", self._aimd)

    def _calm(self, now: float) -> None:
        """An answer without a 429: one additive step per interval free of 429s, added to the
        capacity in force at the previous step (so that the followers of several processes
        stepping in one interval add it once)."""
        if now - self._last_step < self.interval:
            return
        if not self._refused_since_step:
            for key, limit in self._declared.items():
                declared = float(limit.capacity)
                if self._aimd[key] >= declared:
                    continue
                raised = min(declared, self._base[key] + self.adaptation.increase * declared)
                self._aimd[key] = max(self._aimd[key], raised)
            self._base = self._in_force()
        self._last_step = now
        self._refused_since_step = False

    def _capacities(self) -> dict[str, float]:
        """The capacity each key should have now; only those that differ from the applied."""
        wanted = {}
        in_force = self._in_force()
        for key, limit in self._declared.items():
            capacity = max(_rounded(limit, in_force[key]), self._largest[key], 1.0)
            capacity = float(min(limit.capacity, capacity))
            if capacity != self._applied[key]:
                wanted[key] = capacity
                self._applied[key] = capacity
        return wanted

    def _apply(self, wanted: Mapping[str, float], now: float) -> None:
        for key, capacity in wanted.items():
            limit = self._declared[key]
            whole: float | int = int(capacity) if capacity.is_integer() else capacity
            try:
                self.limit_set.change_limit(key, capacity=whole)
            except BackendUnavailable as exc:
                # The answer stands; the change is made again with the next answer.
                self._applied[key] = math.nan
                logger.warning("aiolimits: could not follow the provider on %r: %s", key, exc)
                continue
            self.changes.append(LimitChange(now, key, capacity))
            logger.debug(
                "aiolimits: %r capacity now %g (declared %g)", key, capacity, limit.capacity
            )

    # -- introspection ---------------------------------------------------------------------

    @property
    def factors(self) -> dict[str, float]:
        """Per key, the fraction of the declared capacity now in force."""
        with self._lock:
            return {
                key: self._applied[key] / float(limit.capacity)
                for key, limit in self._declared.items()
            }

    def __repr__(self) -> str:
        return f"<Follower factors={self.factors!r}>"


def _rounded(limit: RateLimit | CallLimit, capacity: float) -> float:
    """``capacity`` as the limit can take it: whole units for a whole-unit algorithm."""
    if limit.algorithm.integral or isinstance(limit, CallLimit):
        return float(math.floor(capacity))
    return capacity


def _until_one(quota: Quota, need: float, families: tuple[str, ...]) -> float:
    """Seconds until the provider has ``need`` more of ``quota`` (at most its reset).

    IETF fields reset a window at ``reset_after``; OpenAI and Anthropic replenish continuously,
    ``reset_after`` being the time until full, so ``need`` comes back in its share of it."""
    reset = quota.reset_after
    if reset is None or need <= 0:
        return 0.0
    if "ietf" in families or quota.limit is None or quota.remaining is None:
        return reset
    missing = quota.limit - quota.remaining
    return reset if missing <= need else reset * (need / missing)


def adaptation_of(adapt: object, *, keyed: bool) -> Adaptation | None:
    """``adapt=`` checked: None (off), or the parameters to follow the provider with."""
    if adapt is False:
        return None
    if keyed:
        raise ValueError("adapt= needs a LimitSet or a LimitPool; a KeyedLimitSet only pauses")
    if adapt is True:
        return Adaptation()
    if not isinstance(adapt, Adaptation):
        raise TypeError(f"adapt must be a bool or an Adaptation, got {describe(adapt)}")
    return adapt


def set_of(limits: object, acq: Acquisition) -> LimitSet:
    """The LimitSet ``acq`` was taken from: ``limits``, or the pool's set with its config."""
    if isinstance(limits, LimitPool):
        for limit_set in limits.limit_sets:
            if limit_set.config is acq.config:
                return limit_set
        raise AssertionError("an acquisition of a pool comes from one of its sets")
    assert isinstance(limits, LimitSet)
    return limits


def settle_with(
    acq: Acquisition, used: Mapping[str, int | float] | None, settle: Mapping[str, float]
) -> None:
    """One ``acq.update``: ``used`` (None: what was requested), except for the keys of
    ``settle``, whose usage is set so that the set admits what the provider says remains (the
    provider's figure already counts this request's real usage)."""
    if not settle:
        if used is not None:
            acq.update(used)
        return
    acq.update({**(used or {}), **settle})


_FOLLOWERS: weakref.WeakKeyDictionary[LimitSet, Follower] = weakref.WeakKeyDictionary()
_FOLLOWERS_LOCK = threading.Lock()


def follower_for(limit_set: LimitSet, adaptation: Adaptation) -> Follower:
    """The one follower of ``limit_set`` in this process, made on first use.

    Raises:
        ValueError: the set already has a follower with other parameters.
    """
    with _FOLLOWERS_LOCK:
        follower = _FOLLOWERS.get(limit_set)
        if follower is None:
            follower = _FOLLOWERS[limit_set] = Follower(limit_set, adaptation)
        elif follower.adaptation != adaptation:
            raise ValueError(
                "this LimitSet already follows its provider with other parameters "
                f"({follower.adaptation!r}); every caller of one set must pass equal ones"
            )
        return follower
