"""The keys of a KeyedLimitSet in Redis: one hash per client key, one local proxy per key used.

Each client key's state is a hash of its own (``RedisBackend.key_hash_key``), decided by the same
script as a LimitSet's, which expires it once it is fresh again (``lua/run.lua``). In this process
a key used has a proxy: a :class:`~aiolimits.redis._scheduler.RedisScheduler` (its FIFO queue of
this process's waiters, its fallback states for ``on_unavailable="local"``) that the keyed set
keeps in its CLOCK order and may drop whenever it is idle: Redis holds the state, so dropping it
forgets nothing. The proxies of one set share one :class:`~aiolimits.redis._threads.Hub`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

from .._algorithms import RateState
from .._backends._base import KeyProxy
from ._scheduler import RedisScheduler
from ._threads import Hub

if TYPE_CHECKING:
    import redis
    from redis.cluster import RedisCluster

    from .._limits import Limit
    from ._failure import Circuit
    from ._link import Link
    from ._script import Lua

__all__ = ["KeyScheduler", "RedisKeys"]


@final
class KeyScheduler(RedisScheduler, KeyProxy):
    """The proxy of one client key: a RedisScheduler on the key's hash."""

    __slots__ = ()

    def idle(self) -> bool:
        # (Calls an event loop handed off are sent by this proxy first: it is kept until then.)
        return not (self.queue or self._leases or self._fast_busy or self._outbox.busy())


@final
class RedisKeys:
    """Makes the proxy of each key of one keyed set (``RedisBackend.attach_keyed``)."""

    __slots__ = ("_kwargs", "_model", "_stem", "clock", "hub")

    def __init__(
        self,
        stem: str,
        clock: Callable[[], float],
        *,
        client: redis.Redis | RedisCluster,
        hub: Hub,
        script: Lua,
        limits: tuple[Limit, ...],
        lease_seconds: float,
        simulated: bool,
        on_unavailable: str,
        circuit: Circuit,
        timeout: float,
        link: Link | None,
    ) -> None:
        self._stem = stem
        self.clock = clock
        self.hub = hub  # the set's threads; the proxies hold it too
        self._kwargs: dict[str, Any] = {
            "client": client,
            "hub": hub,
            "script": script,
            "limits": limits,
            "lease_seconds": lease_seconds,
            "simulated": simulated,
            "on_unavailable": on_unavailable,
            "circuit": circuit,
            "timeout": timeout,
            "link": link,
        }
        self._model: KeyScheduler | None = None

    def __call__(self, key: str, states: tuple[RateState, ...]) -> KeyScheduler:
        # The proxies share the per-set parts of the first (about 800 bytes less each).
        sched = KeyScheduler(
            states, self.clock, hash_key=f"{self._stem}{key}}}", model=self._model, **self._kwargs
        )
        if self._model is None:
            self._model = sched
        return sched
