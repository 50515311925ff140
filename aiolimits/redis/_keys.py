"""The keys of a KeyedLimitSet in Redis: one hash per client key, one local proxy per key used.

Each client key's state is a hash of its own (``RedisBackend.key_hash_key``), decided by the same
script as a LimitSet's, which expires it once it is fresh again (``lua/run.lua``). In this process
a key used has a proxy: a :class:`~aiolimits.redis._scheduler.RedisScheduler` (its FIFO queue of
this process's waiters, its fallback states for ``on_unavailable="local"``) that the keyed set
keeps in its CLOCK order and may drop whenever it is idle: Redis holds the state, so dropping it
forgets nothing. The proxies of one set share one :class:`~aiolimits.redis._threads.Hub`.

*Limits that change* (``KeyedLimitSet.change_limit``, semantics §4). The numbers of the set's
limits now are kept in the set's own hash (``"!n"``, as a plain set's) with their digest
(``"!k"``; absent: the numbers declared), written by a compare-and-set on the digest (two
processes changing at once: the second reads the first's numbers and changes only what it was
asked to), which also keeps the numbers of the last :data:`HISTORY` digests (``"!y:<digest>"``)
and publishes a notice. Each client key's hash holds the digest of the numbers its states follow
(``"!h"``, absent for the numbers declared; a hash made by a call takes the digest it was sent
with), and every call on it is sent with the digest this process knows: a key refuses a call
sent with other numbers (``lua/run.lua``). Then this process reads the set's numbers (a stale
process learns the change here), and a key behind them is brought up to them by the script's
``change`` for each limit that differs, from its own numbers (``"!n"`` in its hash, or the set's
history), under the same compare-and-set, so that a key is carried over once: what is in use
stays in use, a shrink never admits more than the stricter of the two. A key is carried over at
its first call after the change, in any process, as a process keyed set's is. Each process also
hears the notice (the set's subscription) and reads the numbers at once: its waiters are asked
again, so a limit that grew admits them. Until a process hears of a change, its calls on keys
not yet carried over are decided with the numbers it knew, as if made before the change (the
change reaches each key when it is carried over); a key carried over refuses them.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, final

import redis

from .._algorithms import RateState
from .._backends._base import KeyProxy
from .._errors import BackendUnavailable
from .._limits import Limit, ResourceLimit
from ._base import on_loop
from ._calls import UNDECLARED, Numbers, read_numbers
from ._failure import UNAVAILABLE
from ._scheduler import RedisScheduler
from ._script import num
from ._threads import Hub, log

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

    from ._failure import Circuit
    from ._link import Link
    from ._script import Lua

__all__ = ["HISTORY", "KeyScheduler", "RedisKeys"]

#: How many of the latest numbers of a keyed set its hash keeps by digest, for the keys made
#: with them (a key last used before them is carried over from the oldest kept, logged).
HISTORY: Final = 64

#: The compare-and-set of a keyed set's numbers. KEYS[1]: the set's hash. ARGV: the digest the
#: caller read ('' for the numbers declared), the numbers now (JSON), their digest, the channel.
_CHANGE: Final = """
if (redis.call('HGET', KEYS[1], '!k') or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], '!n', ARGV[2], '!k', ARGV[3], '!y:' .. ARGV[3], ARGV[2])
local kept = {}
for d in string.gmatch(redis.call('HGET', KEYS[1], '!y') or '', '%S+') do
  kept[#kept + 1] = d
end
kept[#kept + 1] = ARGV[3]
while #kept > tonumber(ARGV[5]) do
  redis.call('HDEL', KEYS[1], '!y:' .. table.remove(kept, 1))
end
redis.call('HSET', KEYS[1], '!y', table.concat(kept, ' '))
redis.call('PUBLISH', ARGV[4], '')
return 1
"""


@final
class KeyScheduler(RedisScheduler, KeyProxy):
    """The proxy of one client key: a RedisScheduler on the key's hash."""

    __slots__ = ()

    def idle(self) -> bool:
        # (Calls an event loop handed off are sent by this proxy first: it is kept until then.)
        return not (self.queue or self._leases or self._fast_busy or self._outbox.busy())


@final
class _Notices:
    """Hears the notices of a keyed set's changes on the set's subscription (routed as a
    scheduler's wake-ups are) and has its :class:`RedisKeys` read the numbers."""

    __slots__ = ("__weakref__", "_channel", "_hash", "_keys")

    def __init__(self, keys: RedisKeys, channel: str, root: str) -> None:
        self._keys = weakref.ref(keys)
        self._channel = channel
        self._hash = root

    def wake(self) -> None:
        """A notice came, or the subscription began again (notices may have been missed)."""
        keys = self._keys()
        if keys is None:
            return
        try:
            keys.refresh()
        except (BackendUnavailable, *UNAVAILABLE) as exc:
            log.warning("could not read the changed limits of %s: %s", self._hash, exc)


@final
class RedisKeys:
    """Makes the proxy of each key of one keyed set (``RedisBackend.attach_keyed``), and
    changes the set's limits (see the module)."""

    __slots__ = (
        "__weakref__",
        "_change",
        "_declared",
        "_digest",
        "_generation",
        "_kwargs",
        "_lock",
        "_model",
        "_notices",
        "_numbers",
        "_proxies",
        "_root",
        "_stem",
        "clock",
        "hub",
    )

    def __init__(
        self,
        stem: str,
        clock: Callable[[], float],
        *,
        root: str,
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
        self._root = root
        self._declared = limits
        self._lock = threading.Lock()
        # The numbers of the limits as this process last read or made them, their digest ('':
        # as declared) and how many times they changed here (``known_changes``).
        self._numbers: tuple[tuple[float, float], ...] = tuple(_numbers_of(lim) for lim in limits)
        self._digest = ""
        self._generation = 0
        self._proxies: weakref.WeakSet[KeyScheduler] = weakref.WeakSet()
        self._change = client.register_script(_CHANGE)
        # Every call on a key names the numbers it was sent with, whatever the clock; the
        # proxies' calls use them from the first (a key refuses other numbers: see the module).
        self._kwargs["declared"] = ""
        self._kwargs["redeclare"] = self._redeclare
        # A channel the set's subscription hears (its pattern is every key's wake-up channel,
        # "<stem><key>}:wake"), named with a NUL so that no client key in use shares it.
        self._notices = _Notices(self, f"{stem}\x00changes}}:wake", root)
        self.refresh()
        # The set's subscription (which matches the notices' channel) runs from now on.
        hub.listen(self._notices)  # type: ignore[arg-type]

    def __call__(self, key: str, states: tuple[RateState, ...]) -> KeyScheduler:
        # The proxies share the per-set parts of the first (about 800 bytes less each).
        with self._lock:
            sched = KeyScheduler(
                states,
                self.clock,
                hash_key=f"{self._stem}{key}}}",
                model=self._model,
                **self._kwargs,
            )
            if self._model is None:
                self._model = sched
                sched.calls.tag = f"d{self._digest}"
                sched.calls.catch_up = self._catch_up
                self._adopt_locked(self._numbers)  # read before there were arguments
            # Every proxy shares the set's script arguments: the set adopts changes.
            sched.calls.adopt = self._adopt
            self._proxies.add(sched)
        return sched

    # -- limits that change (semantics §4) -----------------------------------------------------

    def known_changes(self) -> tuple[int, tuple[tuple[float, float], ...]]:
        """``(generation, numbers)`` of the limits as this process last read or made them (no
        I/O); the generation counts the changes this process took up."""
        with self._lock:
            return self._generation, self._numbers

    def change_limit(self, index: int, capacity: float | None, window: float | None) -> None:
        """Limit ``index`` has ``capacity`` and ``window`` (None: as it is now) from now on, for
        every key, in every process (see the module). From an event loop's thread the round
        trips are made on the set's dispatcher thread: the change is in force within them.

        Raises:
            BackendUnavailable: Redis could not be reached (nothing changed).
        """
        if on_loop():
            model = self._model

            def later() -> None:
                try:
                    self._change_now(index, capacity, window)
                except (BackendUnavailable, *UNAVAILABLE) as exc:
                    log.warning("could not change a limit of %s in Redis: %s", self._root, exc)

            if model is not None:
                self.hub.signal(model, later)
            else:
                threading.Thread(target=later, name="aiolimits-change", daemon=True).start()
            return
        self._change_now(index, capacity, window)

    def _change_now(self, index: int, capacity: float | None, window: float | None) -> None:
        limit = self._declared[index]
        for _ in range(100):  # each retry follows another process's change: it ends
            digest, numbers = self._read_root()
            old_capacity, old_window = numbers[index]
            new = list(numbers)
            new[index] = (
                old_capacity if capacity is None else capacity,
                0.0
                if isinstance(limit, ResourceLimit)
                else (old_window if window is None else window),
            )
            text = _numbers_text(self._declared, new)
            made = hashlib.sha1(f"{digest}|{text}".encode(), usedforsecurity=False)
            new_digest = made.hexdigest()[:16]
            try:
                done = self._change(
                    keys=[self._root],
                    args=[digest, text, new_digest, self._notices._channel, HISTORY],
                )
            except UNAVAILABLE as exc:
                raise BackendUnavailable(
                    f"Redis did not answer for the limits {self._root!r}: {exc}"
                ) from exc
            if int(done) == 1:
                self._take(new_digest, tuple(new))
                return
        raise RuntimeError(f"could not change the limits of {self._root!r}: too many races")

    def refresh(self) -> None:
        """Read the set's numbers now and take them up (a notice, or a subscription begun)."""
        digest, numbers = self._read_root()
        self._take(digest, numbers)

    def _read_root(self) -> tuple[str, tuple[tuple[float, float], ...]]:
        """The digest and numbers of the set's limits in Redis now."""
        try:
            digest, text = self._kwargs["client"].hmget(self._root, ["!k", "!n"])
        except UNAVAILABLE as exc:
            raise BackendUnavailable(
                f"Redis did not answer for the limits {self._root!r}: {exc}"
            ) from exc
        return _text(digest), self._numbers_from(text)

    def _numbers_from(self, text: Any) -> tuple[tuple[float, float], ...]:
        found = read_numbers(text, self._declared)
        return tuple(found.get(lim.key, _numbers_of(lim)) for lim in self._declared)

    def _take(self, digest: str, numbers: tuple[tuple[float, float], ...]) -> None:
        """This process's numbers are ``numbers`` (digest ``digest``) from now on: the calls'
        arguments and digest, the proxies' own states; queued waiters are asked again (those
        above a lowered capacity sent away)."""
        with self._lock:
            if digest == self._digest:
                return
            self._adopt_locked(numbers)
            self._digest = digest
            model = self._model
            if model is not None:
                model.calls.tag = f"d{digest}"
            proxies = list(self._proxies)
        for sched in proxies:
            if sched.queue:
                with sched.lock:
                    for state in sched.states:
                        sched.refuse_above(state)
                sched.wake()

    def _adopt_locked(
        self, numbers: Sequence[tuple[float, float]]
    ) -> list[tuple[list[str], list[str]]]:
        changed = []
        if tuple(numbers) != self._numbers:
            self._numbers = tuple(numbers)
            self._generation += 1
        args = self._model._args if self._model is not None else None
        now = self.clock()
        for limit, (capacity, window) in zip(self._declared, numbers, strict=True):
            if args is not None:
                old = args[limit.key]
                new = [
                    old[0],
                    old[1],
                    num(capacity),
                    old[3] if isinstance(limit, ResourceLimit) else num(window),
                ]
                if new != old:
                    args[limit.key] = new
                    changed.append((old, new))
            for sched in list(self._proxies):
                for state in sched.states:
                    if state.key == limit.key and (state.capacity, state.window) != (
                        capacity,
                        state.window if isinstance(limit, ResourceLimit) else window,
                    ):
                        state.change(
                            capacity,
                            state.window if isinstance(limit, ResourceLimit) else window,
                            now,
                        )
        return changed

    def _redeclare(self) -> tuple[str, Numbers]:
        """For the calls: a key refused the numbers a call was sent with. Read the set's (the
        calls take the digest, :meth:`_adopt` the numbers; the waiters of other keys are asked
        again by the notice, which comes too: no other proxy's lock is taken here, under the
        lock of the one calling)."""
        digest, numbers = self._read_root()
        return digest, {lim.key: pair for lim, pair in zip(self._declared, numbers, strict=True)}

    def _adopt(self, numbers: Numbers) -> list[tuple[list[str], list[str]]]:
        with self._lock:
            pairs = tuple(numbers.get(lim.key, _numbers_of(lim)) for lim in self._declared)
            return self._adopt_locked(pairs)

    def _catch_up(self, hash_key: str) -> None:
        """The key ``hash_key`` refused a call: if its states follow older numbers than this
        process's (just read), carry them over, one ``change`` of the script per limit that
        differs, each sent with the digest the key holds (so the key is carried over once)."""
        model = self._model
        assert model is not None
        calls = model.calls
        with self._lock:
            digest, numbers = calls.tag[1:], self._numbers  # as just read
        held, text = calls.client.hmget(hash_key, ["!h", "!n"])
        held = _text(held)
        if held == digest:
            return  # another call carried it over meanwhile, or the caller was behind
        if text is not None:
            old = self._numbers_from(text)
        elif held == "":
            old = tuple(_numbers_of(lim) for lim in self._declared)
        else:
            kept = calls.client.hget(self._root, f"!y:{held}")
            if kept is None:
                log.warning(
                    "the limits %s last followed are no longer kept: carried over as they are",
                    hash_key,
                )
                old = numbers
            else:
                old = self._numbers_from(kept)
        steps = [i for i in range(len(numbers)) if old[i] != numbers[i]] or [0]
        now_numbers = list(old)
        tag = held
        for n, i in enumerate(steps):
            limit = self._declared[i]
            now_numbers[i] = numbers[i]
            last = n == len(steps) - 1
            step_digest = digest if last else f"{digest}.{n}"
            before = _limit_words(limit, old[i])
            words = [
                "change",
                calls.word(self.clock(), f"d{tag}"),
                *before,
                num(numbers[i][0]),
                before[3] if isinstance(limit, ResourceLimit) else num(numbers[i][1]),
                _numbers_text(self._declared, now_numbers),
                step_digest,
            ]
            try:
                calls.script(calls.client, hash_key, words)
            except redis.exceptions.ResponseError as exc:
                if str(exc).startswith(UNDECLARED):
                    return  # another process carried it over meanwhile
                raise
            except UNAVAILABLE as exc:
                raise BackendUnavailable(
                    f"Redis did not answer for the limits {hash_key!r}: {exc}"
                ) from exc
            tag = step_digest


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _numbers_of(limit: Limit) -> tuple[float, float]:
    if isinstance(limit, ResourceLimit):
        return (limit.capacity, 0.0)
    return (limit.capacity, limit.window_seconds)


def _limit_words(limit: Limit, numbers: tuple[float, float]) -> list[str]:
    """The script's four words for ``limit`` with ``numbers`` (as ``limit_args``)."""
    if isinstance(limit, ResourceLimit):
        return [limit.key, "resource", num(numbers[0]), "0.0"]
    return [limit.key, limit.algorithm.value, num(numbers[0]), num(numbers[1])]


def _numbers_text(limits: Sequence[Limit], numbers: Sequence[tuple[float, float]]) -> str:
    """The numbers as stored (``"!n"``: JSON, as a plain set's)."""
    return json.dumps(
        {lim.key: [cap, window] for lim, (cap, window) in zip(limits, numbers, strict=True)},
        sort_keys=True,
    )
