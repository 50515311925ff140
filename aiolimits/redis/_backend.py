"""RedisBackend: where a LimitSet's state lives when it is shared through Redis."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import weakref
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import Any, Final, final

import redis
import redis.asyncio
import redis.client
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from .._algorithms import RateState, limit_now
from .._backends._base import Backend, KeyFactory
from .._backends._declaration import declaration, declaration_json, mismatch
from .._errors import BackendUnavailable
from .._limits import Limit
from .._numbers import check_positive_seconds
from .._scheduler import Scheduler
from .._waiters import TimerClock
from ._calls import Numbers, read_numbers
from ._failure import UNAVAILABLE, Circuit
from ._keys import RedisKeys
from ._link import Link, ping
from ._scheduler import RedisScheduler
from ._script import Lua
from ._threads import Hub, stoppable

__all__ = ["RedisBackend"]

POLICIES: Final = ("raise", "allow", "local")


@final
class RedisBackend(Backend):
    """State in Redis, shared by every process that attaches to the same ``name`` there.

    Each LimitSet is one Redis hash, ``{prefix:name}`` (a hash tag: one Cluster slot), decided
    by a server-side Lua script: one round trip per uncontended acquisition, every limit of the
    set taken atomically, on Redis server time. A KeyedLimitSet keeps each client key in a hash
    of its own that expires once the key is fresh again. See ``docs/redis.md``.

    Args:
        url_or_client: a ``redis://`` URL (of a single server or of any node of a Cluster: which
            one is asked on first use), a ``redis.Redis`` or ``RedisCluster`` client (used with
            its own connection settings: give it a ``socket_timeout`` and no retries, or a call
            may hang or be applied twice), or a ``redis.asyncio.Redis`` client (its server,
            database and credentials are used, with this backend's ``timeout``).
        prefix: the first part of every key.
        on_unavailable: what a decision does when Redis cannot be reached in time: ``"raise"``
            :class:`aiolimits.BackendUnavailable` (nothing is taken); ``"allow"`` admits (fail
            open); ``"local"`` decides with limits in this process's memory instead (so per
            process, not shared) until Redis answers again.
        timeout: seconds any Redis call may take (connecting, or waiting for an answer).
        lease_seconds: how long a resource slot stays held by a process that stopped renewing it
            (it renews every third of that while alive).

    Once a call finds Redis unreachable (no answer within ``timeout``, or no connection), the
    backend knows it: later calls apply ``on_unavailable`` at once, without I/O, until a
    background probe (``PING``) finds Redis back. No call ever waits for Redis on an event loop's
    thread, and none takes longer than its own timeout plus a round trip's grace (50 ms).

    :meth:`close` (or ``with`` / ``async with`` the backend) ends every thread and connection
    the backend and its sets opened; they also end when all of them are garbage.

    Examples:
        >>> limits = LimitSet(
        ...     [CallLimit(60, 500), RateLimit("tokens", 60, 90_000)],
        ...     backend=RedisBackend("redis://redis.internal:6379/0"),
        ...     name="openai-org-1",
        ... )
    """

    __slots__ = (
        "__weakref__",
        "_checked",
        "_circuit",
        "_client",
        "_hubs",
        "_link",
        "_lua",
        "_url",
        "lease_seconds",
        "on_unavailable",
        "prefix",
        "timeout",
    )

    def __init__(
        self,
        url_or_client: str | redis.Redis | RedisCluster | redis.asyncio.Redis,
        *,
        prefix: str = "aiolimits",
        on_unavailable: str = "raise",
        timeout: float = 1.0,
        lease_seconds: float = 30.0,
    ) -> None:
        if not isinstance(url_or_client, (str, redis.Redis, RedisCluster, redis.asyncio.Redis)):
            raise TypeError(
                f"url_or_client must be a redis:// URL, or a redis.Redis, RedisCluster or "
                f"redis.asyncio.Redis client, got {url_or_client!r}"
            )
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty str without braces, got {prefix!r}")
        if on_unavailable not in POLICIES:
            raise ValueError(f"on_unavailable must be one of {POLICIES!r}, got {on_unavailable!r}")
        timeout = check_positive_seconds("timeout", timeout)
        lease_seconds = check_positive_seconds("lease_seconds", lease_seconds)
        self._url = url_or_client if isinstance(url_or_client, str) else None
        self._client: redis.Redis | RedisCluster
        # From a URL: whether it is a Cluster is asked on first use (``_connect``).
        self._checked = not isinstance(url_or_client, str)
        self.prefix = prefix
        self.on_unavailable = on_unavailable
        self.timeout = float(timeout)
        self.lease_seconds = float(lease_seconds)
        # How the script is sent (shared by this backend's sets: functions are detected once).
        self._lua = Lua()
        if isinstance(url_or_client, str):
            self._client = redis.Redis.from_url(url_or_client, **self._settings())
        elif isinstance(url_or_client, redis.asyncio.Redis):
            self._client = self._sync_twin(url_or_client)
        else:
            self._client = url_or_client
        # The probe holds the backend weakly: a backend dropped while Redis is down is garbage.
        self._circuit = Circuit(
            partial(_probe_of, weakref.ref(self)), f"{prefix} at {self._where()}"
        )
        # The callers' own connections, for a single server (known once connected, from a URL).
        self._link: Link | None = None
        if isinstance(self._client, redis.Redis):
            self._link = self._new_link(self._client)
        # The threads of this backend's sets, to end on close().
        self._hubs: weakref.WeakSet[Hub] = weakref.WeakSet()
        weakref.finalize(self, self._circuit.close)  # garbage: no probe any more

    def _where(self) -> str:
        if self._url is not None:
            return re.sub(r"//[^@/]*@", "//", self._url)  # no credentials in thread names
        return type(self._client).__name__

    def _new_link(self, client: redis.Redis) -> Link:
        return Link(client.connection_pool, self._circuit, self.timeout)

    def _probe(self) -> None:
        """One attempt to reach Redis, on the probe's thread (see ``_link.Circuit``)."""
        client = self._client
        if isinstance(client, RedisCluster):
            client.nodes_manager.initialize()
            client.execute_command(  # type: ignore[no-untyped-call]
                "PING", target_nodes=RedisCluster.PRIMARIES
            )
            return
        link = self._link
        if link is None:
            client.ping()
            return
        ping(link.new, self.timeout)

    def close(self) -> None:
        """End every thread and connection of this backend and of its sets (idempotent).

        A set used afterwards finds Redis unreachable: its ``on_unavailable`` policy applies.
        A client passed in is closed too; close the backend only once its sets are done."""
        self._circuit.close()
        for hub in list(self._hubs):
            hub.close()
        if self._link is not None:
            self._link.close()
        with contextlib.suppress(Exception):
            self._client.close()

    async def aclose(self) -> None:
        """:meth:`close`, for ``async with`` (it waits for no I/O: sockets are only closed)."""
        self.close()

    def __enter__(self) -> RedisBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> RedisBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _settings(self) -> dict[str, Any]:
        # Bounded calls, never retried: a script that timed out may still run when the server
        # resumes, and sending it again would take its units twice. (A connection the server
        # closed is replaced when it is next taken from the pool.)
        return {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),
        }

    def _sync_twin(self, client: redis.asyncio.Redis) -> redis.Redis:
        """A blocking client for the server, database and credentials of an asyncio client
        (the backend's calls are made from its dispatcher thread and the answering verbs),
        with this backend's timeouts."""
        pool = client.connection_pool
        kinds: dict[str, Any] = {
            "Connection": redis.Connection,
            "UnixDomainSocketConnection": redis.UnixDomainSocketConnection,
        }
        kind = kinds.get(pool.connection_class.__name__)
        if kind is None:
            raise TypeError(
                f"url_or_client: a redis.asyncio client over {pool.connection_class.__name__} "
                "is not supported; pass its URL"
            )
        given = pool.connection_kwargs
        keep = ("host", "port", "path", "db", "username", "password", "client_name")
        kwargs = {k: given[k] for k in keep if given.get(k) is not None}
        return redis.Redis(
            connection_pool=redis.ConnectionPool(
                connection_class=kind, **kwargs, **self._settings()
            )
        )

    def _connect(self) -> redis.Redis | RedisCluster:
        """The client; from a URL, a Cluster client once the server says it is a Cluster node."""
        if not self._checked:
            assert self._url is not None
            info: Any = self._client.info("cluster")
            if info.get("cluster_enabled"):
                self._client.close()
                self._client = RedisCluster.from_url(self._url, **self._settings())
                if self._link is not None:
                    self._link.close()
                self._link = None  # a Cluster's calls go through its client
            self._checked = True
        return self._client

    def _subscriber(self, key: str) -> Callable[[], redis.client.PubSub]:
        """How to open a subscription for the set ``key``: a connection without a read timeout
        (a subscriber waits as long as it takes), to the server or the Cluster node of ``key``
        (Cluster forwards every publication to every node)."""
        client = self._client
        connect = self.timeout
        again = False

        def subscribe() -> redis.client.PubSub:
            nonlocal again
            if isinstance(client, RedisCluster):
                if again:
                    # A subscription that ended (its node failed over, say) re-reads the topology
                    # first: the client's map changes only when its own calls fail, and a process
                    # that only waits makes none.
                    with contextlib.suppress(*UNAVAILABLE):
                        client.nodes_manager.initialize()
                again = True
                node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
                plain = redis.ConnectionPool(
                    connection_class=stoppable(redis.Connection),
                    host=node.host,
                    port=node.port,
                    socket_connect_timeout=connect,
                    retry=Retry(NoBackoff(), 0),
                )
                return redis.client.PubSub(plain, ignore_subscribe_messages=True)
            pool = client.connection_pool
            kwargs = dict(pool.connection_kwargs)
            kwargs["socket_timeout"] = None
            # Never reconnected by redis-py: a subscription that ends (or that close() ends by
            # closing its socket) ends its read, and the listener decides what to do.
            kwargs["retry"] = Retry(NoBackoff(), 0)
            own = redis.ConnectionPool(connection_class=stoppable(pool.connection_class), **kwargs)
            return redis.client.PubSub(own, ignore_subscribe_messages=True)

        return subscribe

    def hash_key(self, name: str) -> str:
        """The Redis key of the set ``name``: its hash tag keeps it in one Cluster slot. A keyed
        set keeps only its declaration there. The prefix is escaped (:func:`escape_prefix`), so
        that no two (prefix, name) pairs share a key."""
        return f"{{{escape_prefix(self.prefix)}:{name}}}"

    def key_hash_key(self, name: str, key: str) -> str:
        """The Redis key of the client ``key`` of the keyed set ``name``: a hash tag of its own
        (so the keys of a set spread over a Cluster), made of the name's length, the name and the
        key, so that no two (name, key) pairs share it; it does not start with ``{`` as every
        plain set's does."""
        return f"{self._key_stem(name)}{key}}}"

    def _key_stem(self, name: str) -> str:
        return f"{escape_prefix(self.prefix)}:k:{{{len(name)}:{name}:"

    def _declare(self, name: str, key: str, limits: tuple[Limit, ...], keyed: bool) -> Any:
        """Record the declaration of the set ``name`` in its hash ``key``, or check it against
        the one recorded; returns the client."""
        return self._declared(name, key, limits, keyed)[0]

    def _declared(
        self, name: str, key: str, limits: tuple[Limit, ...], keyed: bool
    ) -> tuple[Any, str, Numbers]:
        """:meth:`_declare`, the digest recorded (``"!h"``: a plain set's calls name it, so that
        the script notices when Redis lost it, or a limit changed) and the numbers of the limits
        changed at run time (``"!n"``, semantics §4; the declaration ``"!d"`` never changes)."""
        declared = declaration_json(limits)
        if keyed:
            declared = f'{{"keyed":{declared}}}'
        self._circuit.check()
        try:
            client = self._connect()
            client.hsetnx(key, "!d", declared)
            stored: Any = client.hget(key, "!d")
            text = declared
            if stored is not None:
                text = stored.decode() if isinstance(stored, bytes) else str(stored)
            # Every process writes the digest of the declaration that won, so all agree.
            digest = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]
            client.hsetnx(key, "!h", digest)
            # A change of a limit wrote a digest of its own, with the numbers: use those.
            changed, stored_digest = client.hmget(key, ["!n", "!h"])
            if isinstance(stored_digest, bytes):
                digest = stored_digest.decode()
            elif stored_digest is not None:
                digest = str(stored_digest)
            link = self._link
            if link is not None and not link.ready():
                # Attaching does I/O on its thread anyway: a connection for the sets' own calls
                # too, so that the first async acquisition is asked without a thread hop.
                link.give(link.connect())
        except UNAVAILABLE as exc:
            self._circuit.trip(exc)
            raise BackendUnavailable(f"Redis did not answer for the limits {key!r}: {exc}") from exc
        if stored is not None:
            found = json.loads(text)
            was_keyed = isinstance(found, dict)
            if was_keyed != keyed:
                kinds = ("a LimitSet", "a KeyedLimitSet (limits per client key)")
                raise ValueError(
                    f"the shared state {name!r} belongs to {kinds[was_keyed]}, not to "
                    f"{kinds[keyed]}: a LimitSet and a KeyedLimitSet cannot share a name"
                )
            message = mismatch(name, found["keyed"] if was_keyed else found, declaration(limits))
            if message is not None:
                raise ValueError(message)
        return client, digest, read_numbers(changed, limits)

    def _redeclare(self, name: str, key: str, limits: tuple[Limit, ...]) -> tuple[str, Numbers]:
        """The declaration of the plain set ``name`` again, after Redis lost it or another
        client changed a limit: its digest, and the numbers of the limits now."""
        _client, digest, numbers = self._declared(name, key, limits, keyed=False)
        return digest, numbers

    def attach(
        self,
        limits: tuple[Limit, ...],
        states: tuple[RateState, ...],
        clock: Callable[[], float],
        name: str | None,
    ) -> Scheduler:
        """The scheduler of the set ``name`` in Redis; checks (or records) its declaration.

        Raises:
            ValueError: no ``name``, or ``name`` was declared with other limits.
            BackendUnavailable: Redis could not be reached within ``timeout``.
        """
        if name is None:
            raise ValueError("name is required with RedisBackend: it names the shared state")
        key = self.hash_key(name)
        client, digest, numbers = self._declared(name, key, limits, keyed=False)
        # Limits another client changed at run time: this set starts from their numbers now.
        now = clock()
        for state in states:
            capacity, window = numbers.get(state.key, (state.capacity, state.window))
            if (capacity, window) != (state.capacity, state.window):
                state.change(capacity, window, now)
        current = tuple(limit_now(lim, st) for lim, st in zip(limits, states, strict=True))
        hub = Hub(
            key,
            self._subscriber(key),
            f"{key}:wake",
            pattern=False,
            lease_seconds=self.lease_seconds,
        )
        self._hubs.add(hub)
        return RedisScheduler(
            states,
            clock,
            client=client,
            hub=hub,
            script=self._lua,
            hash_key=key,
            limits=current,
            lease_seconds=self.lease_seconds,
            simulated=isinstance(clock, TimerClock),
            on_unavailable=self.on_unavailable,
            circuit=self._circuit,
            timeout=self.timeout,
            link=self._link,
            declared=digest,
            redeclare=partial(self._redeclare, name, key, limits),
        )

    def attach_keyed(
        self,
        limits: tuple[Limit, ...],
        clock: Callable[[], float],
        name: str | None,
        max_keys: int = 100_000,
    ) -> KeyFactory | None:
        """The factory of the per-key proxies of the keyed set ``name``; checks (or records)
        its declaration, marked keyed, in the hash of ``name``.

        The proxies of one keyed set share one :class:`Hub`: one dispatcher thread, one
        subscription to the wake-up channels of all its keys (a pattern), one lease renewer.

        Raises:
            ValueError: no ``name``, or ``name`` was declared otherwise (other limits, or a
                plain LimitSet).
            BackendUnavailable: Redis could not be reached within ``timeout``.
        """
        if name is None:
            raise ValueError("name is required with RedisBackend: it names the shared state")
        root = self.hash_key(name)
        client = self._declare(name, root, limits, keyed=True)
        stem = self._key_stem(name)
        # The wake-up channels of the keys, "<stem><key>}:wake": the stem's glob characters
        # escaped, any key.
        pattern = re.sub(r"([*?\[\]\\^])", r"\\\1", stem) + "*}:wake"
        hub = Hub(
            f"{root} keys",
            self._subscriber(root),  # any node: a Cluster sends every publication to all
            pattern,
            pattern=True,
            lease_seconds=self.lease_seconds,
        )
        self._hubs.add(hub)
        return RedisKeys(
            stem,
            clock,
            root=root,
            client=client,
            hub=hub,
            script=self._lua,
            limits=limits,
            lease_seconds=self.lease_seconds,
            simulated=isinstance(clock, TimerClock),
            on_unavailable=self.on_unavailable,
            circuit=self._circuit,
            timeout=self.timeout,
            link=self._link,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        if self._url is None:
            raise TypeError(
                "a RedisBackend made from a client cannot be pickled; make it from a URL"
            )
        return (
            _rebuild,
            (self._url, self.prefix, self.on_unavailable, self.timeout, self.lease_seconds),
        )

    def __repr__(self) -> str:
        where = self._url if self._url is not None else repr(self._client)
        return f"RedisBackend({where!r}, prefix={self.prefix!r})"


def _probe_of(ref: weakref.ref[RedisBackend]) -> None:
    backend = ref()
    if backend is None:
        raise RuntimeError("the backend is gone")  # the probe thread ends with its circuit
    backend._probe()


def escape_prefix(prefix: str) -> str:
    """``prefix`` without a ``:`` (written ``%3A``, and ``%`` itself ``%25``), so that the first
    ``:`` of a key ends the prefix: ``prefix="app", name="x:y"`` and ``prefix="app:x",
    name="y"`` are two sets. A prefix with neither character (the default) is unchanged."""
    return prefix.replace("%", "%25").replace(":", "%3A")


def _rebuild(
    url: str, prefix: str, on_unavailable: str, timeout: float, lease_seconds: float
) -> RedisBackend:
    return RedisBackend(
        url,
        prefix=prefix,
        on_unavailable=on_unavailable,
        timeout=timeout,
        lease_seconds=lease_seconds,
    )
