"""RayBackend: where a LimitSet's state lives when a Ray cluster's tasks and actors share it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, final

import ray
import ray.exceptions

from .._algorithms import RateState
from .._backends._base import Backend, KeyFactory, KeyProxy
from .._errors import BackendUnavailable
from .._limits import Limit
from .._numbers import check_positive_seconds
from .._scheduler import Scheduler
from .._waiters import TimerClock
from ._actor import LimitsActor
from ._scheduler import UNAVAILABLE, KeyMux, RayKeyProxy, RayScheduler

__all__ = ["RayBackend"]

log = logging.getLogger("aiolimits.ray")

POLICIES: Final = ("raise", "allow")

#: The actor's options unless ``actor_options`` says otherwise: it outlives whoever made it
#: first, and takes no CPU of a task's share. The calls it runs at once are the batches on
#: their way (two per process and set at most) and one ``wait`` per process and set with
#: queued requests, however many requests wait.
DEFAULT_ACTOR_OPTIONS: Final[Mapping[str, Any]] = {
    "lifetime": "detached",
    "num_cpus": 0,
    "max_concurrency": 10_000,
}


#: How long attaching waits for the actor at least: the first user's call starts its process.
ACTOR_START_SECONDS: Final = 60.0


@final
class RayBackend(Backend):
    """State in a named Ray actor, shared by every driver, task and actor of the cluster.

    Every set of this backend lives in one async actor, named ``actor_name`` in ``namespace``
    (made on first use, found by name afterwards): its limits, its one FIFO queue, every decision.
    Waiting happens in the actor, nobody polls; the requests of one process share round trips
    to the actor (one call carries what its tasks asked meanwhile); ``update``, ``release`` and
    ``pause`` return without waiting. A LimitSet pickled into a task or actor attaches to the
    same set again. See ``docs/ray.md``.

    Args:
        actor_name: the name of the limits actor; give sets that need not share one actor
            different names to spread the load.
        namespace: the Ray namespace of the actor (None: the job's namespace; pass one so that
            several jobs share the actor).
        actor_options: more ``.options(...)`` for the actor (e.g. ``resources`` to pin it to a
            node, ``lifetime=None`` to let it die with its maker).
        on_unavailable: when the actor cannot be reached in ``timeout``: ``"raise"``
            :class:`aiolimits.BackendUnavailable` (nothing is taken) or ``"allow"`` (admit).
        timeout: seconds a call that must answer (``try_acquire``, ``retry_after``,
            ``get_stats``) waits for the actor; also how long past its own timeout a waiting
            ``acquire`` waits for an answer before giving up.
        lease_seconds: how long the resource slots of a holder that stopped renewing (its
            process died) stay taken; a live holder renews every third of that.

    Examples:
        >>> limits = LimitSet(
        ...     [CallLimit(60, 500), RateLimit("tokens", 60, 90_000)],
        ...     backend=RayBackend(), name="openai",
        ... )
    """

    __slots__ = (
        "_actor",
        "actor_name",
        "actor_options",
        "lease_seconds",
        "namespace",
        "on_unavailable",
        "timeout",
    )

    def __init__(
        self,
        actor_name: str = "aiolimits",
        *,
        namespace: str | None = None,
        actor_options: Mapping[str, Any] | None = None,
        on_unavailable: str = "raise",
        timeout: float = 10.0,
        lease_seconds: float = 30.0,
    ) -> None:
        if not isinstance(actor_name, str) or not actor_name:
            raise ValueError(f"actor_name must be a non-empty str, got {actor_name!r}")
        if namespace is not None and (not isinstance(namespace, str) or not namespace):
            raise ValueError(f"namespace must be a non-empty str or None, got {namespace!r}")
        if actor_options is not None and not isinstance(actor_options, Mapping):
            raise TypeError(f"actor_options must be a mapping or None, got {actor_options!r}")
        if on_unavailable not in POLICIES:
            raise ValueError(f"on_unavailable must be one of {POLICIES!r}, got {on_unavailable!r}")
        timeout = check_positive_seconds("timeout", timeout)
        lease_seconds = check_positive_seconds("lease_seconds", lease_seconds)
        self.actor_name = actor_name
        self.namespace = namespace
        self.actor_options = dict(actor_options or {})
        self.on_unavailable = on_unavailable
        self.timeout = float(timeout)
        self.lease_seconds = float(lease_seconds)
        self._actor: Any = None

    def actor(self) -> Any:
        """The handle of the limits actor, made if nobody has yet."""
        if self._actor is None:
            options = {**DEFAULT_ACTOR_OPTIONS, **self.actor_options}
            remote: Any = ray.remote(LimitsActor)
            self._actor = remote.options(
                name=self.actor_name, namespace=self.namespace, get_if_exists=True, **options
            ).remote()
        return self._actor

    def attach(
        self,
        limits: tuple[Limit, ...],
        states: tuple[RateState, ...],
        clock: Callable[[], float],
        name: str | None,
    ) -> Scheduler:
        """The scheduler of the set ``name`` in the limits actor; declares it there, or checks
        the limits declared there.

        Raises:
            ValueError: no ``name``; ``name`` was declared with other limits; a ``clock`` other
                than ``time.monotonic`` (the actor decides on its own clock) or a test clock
                that drives its own timers.
            BackendUnavailable: the actor could not be reached within ``timeout`` (at least
                60 s here, for Ray to start it).
        """
        if name is None:
            raise ValueError("name is required with RayBackend: it names the shared state")
        lease = self.lease_seconds
        actor = self._declare(
            clock, lambda start: self.actor().declare.remote(name, limits, start, lease)
        )
        return RayScheduler(
            states,
            clock,
            actor=actor,
            name=name,
            timeout=self.timeout,
            on_unavailable=self.on_unavailable,
            lease_seconds=self.lease_seconds,
        )

    def attach_keyed(
        self,
        limits: tuple[Limit, ...],
        clock: Callable[[], float],
        name: str | None,
        max_keys: int = 100_000,
    ) -> KeyFactory:
        """The factory of the per-key proxies of the keyed set ``name`` in the limits actor,
        which keeps each key's state and queue (made on first use, dropped once fresh,
        ``max_keys`` bounding the rest); declares it there, or checks it.

        Raises:
            ValueError: as :meth:`attach`; or ``name`` was declared with another ``max_keys``.
            BackendUnavailable: as :meth:`attach`.
        """
        if name is None:
            raise ValueError("name is required with RayBackend: it names the shared state")
        actor = self._declare(
            clock,
            lambda start: self.actor().declare_keyed.remote(
                name, limits, start, self.lease_seconds, max_keys
            ),
        )
        return RayKeys(self, actor, name, clock, limits)

    def _declare(self, clock: Callable[[], float], call: Callable[[float | None], Any]) -> Any:
        """Declare a set in the limits actor (``call(start)`` makes the call, ``start`` the
        reading of a simulated clock): its handle.

        Raises:
            ValueError: a ``clock`` other than ``time.monotonic`` (the actor decides on its own
                clock) or a test clock that drives its own timers; the actor's answer when the
                set was declared otherwise.
            BackendUnavailable: the actor could not be reached within ``timeout`` (at least
                60 s here, for Ray to start it).
        """
        simulated = isinstance(clock, TimerClock)
        if clock is not time.monotonic and not simulated:
            raise ValueError(
                f"clock must be time.monotonic with RayBackend (the actor decides on its own "
                f"clock), got {clock!r}"
            )
        actor = self.actor()
        # The first call may wait for Ray to start the actor's worker process.
        deadline = time.monotonic() + max(self.timeout, ACTOR_START_SECONDS)
        backoff = 0.05
        while True:
            start = clock() if simulated else None
            try:
                message = ray.get(call(start), timeout=max(deadline - time.monotonic(), 0.0))
                break
            except UNAVAILABLE as exc:
                # Restarting (Ray failed the call it was given meanwhile): declare again, which
                # is harmless, until it answers or the time is up.
                restarting = isinstance(exc, ray.exceptions.ActorUnavailableError)
                if not restarting or time.monotonic() + backoff >= deadline:
                    raise BackendUnavailable(
                        f"the Ray limits actor {self.actor_name!r} did not answer: {exc}"
                    ) from exc
            time.sleep(backoff)  # no event tells when a restart is over
            backoff = min(backoff * 2, 1.0)
        if message is not None:
            raise ValueError(message)
        return actor

    def __reduce__(self) -> tuple[Any, ...]:
        options = {
            "namespace": self.namespace,
            "actor_options": self.actor_options,
            "on_unavailable": self.on_unavailable,
            "timeout": self.timeout,
            "lease_seconds": self.lease_seconds,
        }
        return (_rebuild, (self.actor_name, options))

    def __repr__(self) -> str:
        return f"RayBackend({self.actor_name!r}, namespace={self.namespace!r})"


class RayKeys:
    """The factory of a keyed set's per-key proxies (the keyed set's ``KeyFactory``), and how a
    change of a limit reaches every key in the actor."""

    __slots__ = ("_actor", "_backend", "_clock", "_generation", "_mux", "_name", "_numbers")

    def __init__(
        self,
        backend: RayBackend,
        actor: Any,
        name: str,
        clock: Callable[[], float],
        limits: tuple[Limit, ...],
    ) -> None:
        self._backend = backend
        self._actor = actor
        self._name = name
        self._clock = clock
        self._mux = KeyMux(actor, name)
        #: The limits' numbers as this process changed them (the keyed set follows them for
        #: its validation and new proxies; the actor holds the numbers that decide).
        self._numbers = [
            (limit.capacity, getattr(limit, "window_seconds", 0.0)) for limit in limits
        ]
        self._generation = 0

    def __call__(self, key: str, states: tuple[RateState, ...]) -> KeyProxy:
        backend = self._backend
        return RayKeyProxy(
            states,
            self._clock,
            actor=self._actor,
            name=self._name,
            timeout=backend.timeout,
            on_unavailable=backend.on_unavailable,
            lease_seconds=backend.lease_seconds,
            key=key,
            mux=self._mux,
        )

    def change_limit(self, index: int, capacity: float | None, window: float | None) -> None:
        """Change the numbers given (None: unchanged) of the set's limit at ``index``, for
        every key held by the actor and the keys it makes later. Handed off, as a LimitSet's
        change is."""
        old_capacity, old_window = self._numbers[index]
        self._numbers[index] = (
            old_capacity if capacity is None else capacity,
            old_window if window is None else window,
        )
        self._generation += 1
        try:
            ref = self._actor.change_keyed.remote(self._name, index, capacity, window)
        except Exception as exc:  # Ray shut down, actor handle unusable
            log.warning("aiolimits: a change of a limit could not reach the Ray actor: %s", exc)
            return
        ref.future().add_done_callback(_log_failure)

    def known_changes(self) -> tuple[int, tuple[tuple[float, float], ...]]:
        """The changes this process made: their count, and each limit's numbers now."""
        return self._generation, tuple(self._numbers)


def _log_failure(future: Any) -> None:
    try:
        future.result()
    except Exception as exc:
        log.warning("aiolimits: a change of a limit on the Ray limits actor failed: %s", exc)


def _rebuild(actor_name: str, options: dict[str, Any]) -> RayBackend:
    return RayBackend(actor_name, **options)
