"""KeyedLimitSet: one independent set of limits per client key, created on first use (semantics §8).

A web service limits each client (IP address, API key, user) separately, and there may be millions
of them. A key costs only its algorithm states and a small scheduler; everything else is shared
by all keys: the validation plan (``Requests``, built once over template states, whose items are
mapped onto a key's own states), the lock, the doors (``_door.py``), and the empty queue a
scheduler has until its first waiter.

Memory stays bounded two ways:

* A key that is back to *fresh* (every bucket full, every window empty, no slot held, no waiter,
  no pause of its own) behaves exactly like a key never seen, so it is
  dropped without changing any decision. Keys are kept in an approximate least-recently-used
  order (CLOCK, "second chance": a use only sets a flag on the key, because moving it in the
  order on every use costs several cache misses once there are millions of keys). Each new key
  first looks at a few keys at the old end of the order: a fresh one is dropped, one used since
  it was last looked at goes to the new end with its flag cleared (amortised O(1), no timer, no
  background task). Keys leave only from the old end, so the order is a deque of the keys'
  schedulers beside a plain dict (about half the memory per key of an ``OrderedDict``).
* ``max_keys`` bounds the rest: at the bound, a new key drops the first key at the old end that
  was not used since last looked at and has no waiter and no resource slot held, fresh or not.
  That key's client then starts again from full limits (its recent usage is forgotten: the policy
  errs on the side of admitting). Keys with waiters or slots held are never dropped, so the count
  can exceed ``max_keys`` by at most the number of such keys.

An acquisition outstanding on a dropped key (rate limits only: a key holding resource slots is
never fresh) keeps working. Its receipts are worth nothing any more (the key was fresh, so every
bucket had absorbed, and every window forgotten, what it took: a refund could give back nothing),
and a later ``update`` that charges overage moves it to the key's live state (made again if need
be), where the charge lands exactly as it would have on a key never dropped. So releasing needs no
lock and no count, as for a LimitSet, and an acquisition never released pins nothing.

With a shared backend (``Backend.attach_keyed`` returns a factory: Redis, process), each key's state
lives in the backend, which expires it once fresh, and a key used here has only a local *proxy*: a
scheduler of the backend's, with its own lock, over the key's shared state. The doors are the same
(``_door.py``); the set's lock guards only the proxies' dict and CLOCK order. A proxy is a cache:
up to ``_PROXY_CACHE`` of them (or ``max_keys``, if fewer) are kept, idle or not; beyond that a
proxy is dropped when idle (nothing queued, no door working on it, no slot held), in the same CLOCK
order; dropping it forgets nothing, so it is never "forgotten", and an acquisition held through a
dropped proxy keeps using it (it settles in the backend's state of the key).
"""

from __future__ import annotations

import math
import threading
import time
from asyncio import _get_running_loop
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Final, final

import attrs

from ._acquisition import (
    ACQUIRING,
    FAILED,
    HELD,
    PENDING,
    RELEASED,
    Acquisition,
    DeferredAcquire,
)
from ._algorithms import RateState, SemaphoreState, new_state
from ._backends._base import Backend, KeyFactory, KeyProxy
from ._backends.memory import MemoryBackend
from ._door import (
    Attempt,
    Door,
    attempt_locked,
    check_common,
    check_picklable_clock,
    retry_after_locked,
)
from ._limits import Limit, ResourceLimit
from ._limitset import changed_limit, check_limits, limit_changes
from ._numbers import check_seconds, check_timeout, check_timer_slack, describe
from ._requests import Requests
from ._scheduler import Items, Scheduler
from ._statistics import KeyedStatistics, LimitSetStatistics, limitset_statistics, seconds_up
from ._waiters import ThreadWaiter, async_waiter, refuse_on_event_loop, trio_lowlevel

__all__ = ["KeyedLimitSet"]

_INF: Final = math.inf
#: How many least recently used keys a new key looks at for dropping.
_SWEEP: Final = 3
#: How many proxies of a shared backend's keys are kept, idle or not, before idle ones are
#: dropped (fewer if ``max_keys`` is smaller): a proxy is only a local cache of a key whose state
#: the backend holds, and making it again costs more than the decision it serves.
_PROXY_CACHE: Final = 4096


class _KeyScheduler(Scheduler):
    """The scheduler of one key: knows its key, whether it was dropped, and whether it was used
    since the sweep last looked at it."""

    __slots__ = ("key", "used")

    def __init__(
        self,
        key: str,
        states: tuple[RateState, ...],
        clock: Callable[[], float],
        lock: threading.Lock,
        paused_until: float,
    ) -> None:
        super().__init__(states, clock, lock)
        self.key = key
        self.paused_until = paused_until
        self.used = False
        self.dropped = False

    def holds_slots(self, now: float) -> bool:
        """A resource slot of this key is held (dropping the key would leak it)."""
        return any(
            isinstance(state, SemaphoreState) and not state.is_fresh(now) for state in self.states
        )

    def fresh(self, now: float, paused_until: float) -> bool:
        """Indistinguishable from a key made now, while every key is paused until
        ``paused_until``."""
        if self.queue or self.paused_until > max(now, paused_until):
            return False
        return all(state.is_fresh(now) for state in self.states)


class _Proxy:
    """A key's proxy in a shared backend, with the keyed set's bookkeeping of it."""

    __slots__ = ("inflight", "key", "sched", "used")

    def __init__(self, key: str, sched: KeyProxy) -> None:
        self.key = key
        self.sched = sched
        self.used = False
        self.inflight = 0  # door operations under way on it: not dropped meanwhile

    def idle(self) -> bool:
        return not self.inflight and self.sched.idle()


def _check_client_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (a client IP, API key, user id), got {describe(key)}")
    return key


@final
class KeyedLimitSet(Door):
    """The same limits, kept separately for every key (client IP, API key, user id).

    Each key behaves as its own :class:`LimitSet`: its own buckets and windows, its own FIFO
    queue, so one client's exhaustion never delays another. Keys are created on first use and
    dropped again once fresh; ``max_keys`` bounds the rest (see ``docs/keyed.md``).

    Args:
        limits: the limits every key gets; keys of limits must be unique.
        max_keys: the most keys kept (a soft bound: keys with waiters or resource slots held
            are never dropped). At the bound, a new key drops an idle key not used
            recently (approximately the least recently used), whose client then starts again
            from full limits.
        config: read-only data exposed as ``acquisition.config``.
        backend: where the keys' state lives: :class:`MemoryBackend` (the default: this
            process), :class:`ProcessBackend` (the processes of this machine) or
            :class:`aiolimits.redis.RedisBackend`: every process that builds a KeyedLimitSet
            with the same backend location and ``name`` shares each key's limits (see
            ``docs/keyed.md``).
        name: identifies the state in a shared backend (required there); a label otherwise.
        clock: monotonic seconds; ``aiolimits.testing.ManualClock`` for deterministic tests.
        timer_slack: as :class:`LimitSet`'s, for every key's queue.

    Examples:
        >>> per_client = KeyedLimitSet([RateLimit("requests", window_seconds=60, capacity=100)])
        >>> async def handle(request):
        ...     async with per_client.acquire(request.client.host, {"requests": 1}, timeout=2):
        ...         return await serve(request)
    """

    __slots__ = (
        "__weakref__",
        "_backend",
        "_current",
        "_dropped",
        "_entries",
        "_forgotten",
        "_generation",
        "_items",
        "_lock",
        "_max_keys",
        "_name",
        "_order",
        "_paused_until",
        "_position",
        "_proxies",
        "_requests",
        "_shared",
    )

    def __init__(
        self,
        limits: Iterable[Limit] = (),
        *,
        max_keys: int = 100_000,
        config: Mapping[str, Any] | None = None,
        backend: Backend | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        timer_slack: float = 0.0,
    ) -> None:
        limits = check_limits(limits)
        frozen_config = check_common(config, clock, name)
        slack = check_timer_slack(timer_slack)
        if not isinstance(max_keys, int) or isinstance(max_keys, bool):
            raise TypeError(f"max_keys must be an int, got {describe(max_keys)}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        if backend is None:
            backend = MemoryBackend()
        elif not isinstance(backend, Backend):
            raise TypeError(f"backend must be a backend such as MemoryBackend(), got {backend!r}")
        # None: the keys live here; else the factory of a shared backend's per-key proxies.
        self._shared: KeyFactory | None = backend.attach_keyed(limits, clock, name, max_keys)
        self._backend = backend
        self._proxies: OrderedDict[str, _Proxy] = OrderedDict()
        self._init_door(limits, frozen_config, clock, slack)
        #: The limits with their numbers now (``change_limit``); ``_limits`` as declared.
        self._current = limits
        self._generation = 0  # of the changes made in a shared backend that _current follows
        self._name = name
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # The keys held, and the same schedulers in CLOCK order, oldest first: a dict and a
        # deque cost about half an OrderedDict per key, and keys leave only from the old end.
        self._entries: dict[str, _KeyScheduler] = {}
        self._order: deque[_KeyScheduler] = deque()
        self._paused_until = -_INF
        self._dropped = 0  # fresh keys dropped (no decision changed)
        self._forgotten = 0  # keys dropped at max_keys before they were fresh
        # One validation plan for all keys, over template states that are never used to decide;
        # a key's items are the template's mapped by position onto its own states.
        template = tuple(new_state(limit, clock()) for limit in limits)
        self._requests = Requests(limits, template)
        self._items = self._requests.items
        self._position = {state: i for i, state in enumerate(template)}

    # -- what it is --------------------------------------------------------------------------

    @property
    def max_keys(self) -> int:
        return self._max_keys

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The limits with their numbers now: as declared, until :meth:`change_limit` (on a
        shared backend: as this process last saw them, at its last decision)."""
        if self._shared is not None:
            with self._lock:
                self._follow_shared()
        return self._current

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def backend(self) -> Backend:
        return self._backend

    def __len__(self) -> int:
        """The number of keys holding state in this process now (with a shared backend: the
        keys that have a local proxy)."""
        return len(self._entries) + len(self._proxies)

    def __contains__(self, key: object) -> bool:
        return key in self._entries or key in self._proxies

    # -- keys --------------------------------------------------------------------------------

    def _fresh_scheduler(self, key: str, now: float) -> _KeyScheduler:
        states = tuple(new_state(limit, now) for limit in self._current)
        sched = _KeyScheduler(key, states, self._clock, self._lock, self._paused_until)
        sched.timer_slack = self._timer_slack
        return sched

    def _scheduler_locked(self, key: str, now: float) -> _KeyScheduler:
        """Under the lock: the scheduler of ``key``, made (and room made for it) if new."""
        entries = self._entries
        sched = entries.get(key)
        if sched is not None:
            sched.used = True
            return sched
        self._make_room(now)
        sched = entries[key] = self._fresh_scheduler(key, now)
        self._order.append(sched)
        return sched

    def _make_room(self, now: float) -> None:
        order = self._order
        paused_until = self._paused_until
        for _ in range(_SWEEP):
            if not order:
                return
            sched = order[0]
            if sched.fresh(now, paused_until):
                self._drop_oldest()
                self._dropped += 1
            elif sched.used or sched.queue or sched.holds_slots(now):
                sched.used = False  # a second chance, or in use
                order.rotate(-1)  # to the new end
            else:
                break  # the oldest unused key is still recovering; so, likely, are the rest
        if len(order) < self._max_keys:
            return
        # Each key is looked at most twice: once to clear its flag, once more to drop it.
        for _ in range(2 * len(order)):
            sched = order[0]
            if sched.used or sched.queue or sched.holds_slots(now):
                sched.used = False
                order.rotate(-1)
                continue
            self._drop_oldest()
            self._forgotten += 1
            return

    def _drop_oldest(self) -> None:
        sched = self._order.popleft()
        del self._entries[sched.key]
        sched.dropped = True

    # -- keys in a shared backend: local proxies ---------------------------------------------

    def _checkout(self, key: str) -> _Proxy:
        """The proxy of ``key`` (made, and room made for it, if new), counted in flight until
        :meth:`_checkin`, so that it is not dropped while a door works on it."""
        assert self._shared is not None
        with self._lock:
            self._follow_shared()
            proxy = self._proxies.get(key)
            if proxy is not None:
                proxy.used = True
                proxy.inflight += 1
                return proxy
            self._make_room_shared()
            now = self._clock()
            states = tuple(new_state(limit, now) for limit in self._current)
            proxy = self._proxies[key] = _Proxy(key, self._new_proxy(key, states))
            proxy.inflight += 1
            paused_until = self._paused_until
        if paused_until > now:  # first used during a pause of every key
            sched = proxy.sched
            try:
                with sched.lock:
                    sched.pause(paused_until, now)
            except BaseException:
                self._checkin(proxy)
                raise
        return proxy

    def _checkin(self, proxy: _Proxy) -> None:
        with self._lock:
            proxy.inflight -= 1

    def _peek(self, key: str) -> KeyProxy:
        """The proxy of ``key``, or a proxy not kept (asking creates no key)."""
        assert self._shared is not None
        with self._lock:
            self._follow_shared()
            proxy = self._proxies.get(key)
            now = self._clock()
            paused = self._paused_until > now
        if proxy is not None:
            return proxy.sched
        if paused:  # a key first used during a pause of every key is paused: use it
            proxy = self._checkout(key)
            self._checkin(proxy)
            return proxy.sched
        return self._new_proxy(key, tuple(new_state(limit, now) for limit in self._current))

    def _new_proxy(self, key: str, states: tuple[RateState, ...]) -> KeyProxy:
        assert self._shared is not None
        sched = self._shared(key, states)
        sched.timer_slack = self._timer_slack
        return sched

    def _make_room_shared(self) -> None:
        """Under the lock: drop idle proxies in CLOCK order (those used since last looked at
        get a second chance), a few per new key once :data:`_PROXY_CACHE` (or ``max_keys``) are
        kept, and one more at ``max_keys``. The backend holds the state, so dropping a proxy
        changes no decision, and keeping an idle one only saves making it again."""
        proxies = self._proxies
        if len(proxies) < self._max_keys and len(proxies) < _PROXY_CACHE:
            return
        for _ in range(_SWEEP):
            if not proxies:
                return
            proxy = next(iter(proxies.values()))
            if proxy.used or not proxy.idle():
                proxy.used = False
                proxies.move_to_end(proxy.key)
            else:
                del proxies[proxy.key]
                self._dropped += 1
        if len(proxies) < self._max_keys:
            return
        for _ in range(2 * len(proxies)):
            proxy = next(iter(proxies.values()))
            if proxy.used or not proxy.idle():
                proxy.used = False
                proxies.move_to_end(proxy.key)
                continue
            del proxies[proxy.key]
            self._dropped += 1
            return

    async def _enter_shared(self, cm: KeyedAcquire) -> Acquisition:
        proxy = self._checkout(cm._key)
        try:
            sched = proxy.sched
            items = self._localise(cm._items, sched)
            acq = Acquisition(self, sched, items, PENDING, timeout=cm._timeout)
            return await acq.__aenter__()
        finally:
            self._checkin(proxy)

    def _relocate(
        self, acq: Acquisition, checked: Sequence[tuple[RateState, float]]
    ) -> tuple[Scheduler, Sequence[tuple[RateState, float]]]:
        """Under the lock, when ``acq``'s key was dropped while it was held: move it to the key's
        live state (made if need be). Its receipts are worth nothing there, nor were they any
        more where they were: what it took was absorbed or forgotten before the key was dropped.
        Returns the live scheduler and ``checked`` as items of it."""
        old = acq._sched
        assert isinstance(old, _KeyScheduler)
        live = self._scheduler_locked(old.key, old.clock())
        position = {state: i for i, state in enumerate(old.states)}
        states = live.states

        def moved(items: Iterable[tuple[RateState, float]]) -> list[tuple[RateState, float]]:
            return [(states[position[state]], amount) for state, amount in items]

        acq._sched = live
        acq._items = tuple(moved(acq._items))
        held = (
            {state.key: amount for state, amount in acq._items}
            if acq._settled is None
            else {key: entry[2] for key, entry in acq._settled.items()}
        )
        acq._settled = {state.key: [state, None, held.get(state.key, 0.0)] for state in live.states}
        return live, moved(checked)

    def _localise(self, items: Items, sched: Scheduler) -> Items:
        """The template ``items`` as items of ``sched``'s states."""
        states = sched.states
        position = self._position
        if len(items) == 1:  # the common case, at half the cost
            ((state, amount),) = items
            return ((states[position[state]], amount),)
        return tuple([(states[position[state]], amount) for state, amount in items])

    def _usage(
        self, usage: Mapping[str, int | float], sched: Scheduler
    ) -> Sequence[tuple[RateState, float]]:
        return self._localise(tuple(self._requests.usage(usage)), sched)

    # -- acquiring ---------------------------------------------------------------------------

    def acquire(
        self,
        key: str,
        requested: Mapping[str, int | float] | None = None,
        *,
        timeout: float | None = None,
    ) -> KeyedAcquire:
        """Wait, in FIFO order among the callers of ``key``, until every limit of ``key`` admits
        its amount; take them all at once. Use as ``async with keyed.acquire(key, ...) as acq``.

        Raises:
            TimeoutError: not admitted within ``timeout``; nothing is held.
            ValueError, TypeError: a bad ``key``, ``requested`` or ``timeout``; nothing is taken.
        """
        _check_client_key(key)
        return KeyedAcquire(self, key, self._items(requested), check_timeout(timeout))

    def try_acquire(
        self, key: str, requested: Mapping[str, int | float] | None = None
    ) -> Acquisition:
        """Take everything for ``key`` now, or nothing: never waits, and fails while anyone is
        queued for that key."""
        _check_client_key(key)
        template = self._items(requested)
        if self._shared is not None:
            proxy = self._checkout(key)
            try:
                return self._try(proxy.sched, self._localise(template, proxy.sched))
            finally:
                self._checkin(proxy)
        with self._lock:
            now = self._clock()
            sched = self._scheduler_locked(key, now)
            items = self._localise(template, sched)
            receipts = sched.try_take(items, now)
        if receipts is None:
            return Acquisition(self, sched, items, FAILED)
        return Acquisition(self, sched, items, HELD, receipts)

    def acquire_sync(
        self,
        key: str,
        requested: Mapping[str, int | float] | None = None,
        *,
        timeout: float | None = None,
    ) -> Acquisition:
        """The blocking form of :meth:`acquire`, for threads; use as ``with ... as acq``.

        Raises:
            RuntimeError: called on a thread that runs an event loop.
            TimeoutError: not admitted within ``timeout``; nothing is held.
        """
        refuse_on_event_loop("keyed")
        _check_client_key(key)
        template = self._items(requested)
        timeout_s = check_timeout(timeout)
        if self._shared is not None:
            proxy = self._checkout(key)
            try:
                shared = proxy.sched
                items = self._localise(template, shared)
                with shared.lock:
                    taken = self._take_or_queue_locked(shared, items, timeout_s, ThreadWaiter)
                return self._wait_sync(shared, items, timeout_s, taken)
            finally:
                self._checkin(proxy)
        with self._lock:
            sched = self._scheduler_locked(key, self._clock())
            items = self._localise(template, sched)
            taken = self._take_or_queue_locked(sched, items, timeout_s, ThreadWaiter)
        return self._wait_sync(sched, items, timeout_s, taken)

    async def _enter(self, cm: KeyedAcquire) -> Acquisition:
        lowlevel = trio_lowlevel()  # under trio, a checkpoint as Acquisition.__aenter__ is
        if lowlevel is not None:
            await lowlevel.checkpoint_if_cancelled()
        with self._lock:
            sched = self._scheduler_locked(cm._key, self._clock())
            items = self._localise(cm._items, sched)
            receipts, waiter, start = self._take_or_queue_locked(
                sched, items, cm._timeout, async_waiter
            )
        if waiter is None:
            acq = Acquisition(self, sched, items, HELD, receipts)
            if lowlevel is not None:
                await lowlevel.cancel_shielded_checkpoint()
            return acq
        acq = Acquisition(self, sched, items, ACQUIRING, None, cm._timeout)
        try:
            await self._park_async(acq, waiter, start)
        except BaseException:
            acq._state = RELEASED
            raise
        return acq

    async def attempt(
        self, key: str, requested: Mapping[str, int | float] | None = None
    ) -> Attempt:
        """:meth:`try_acquire` for tasks, with :meth:`retry_after` and :meth:`get_stats` of
        ``key`` at the same moment (see :meth:`LimitSet.attempt`): one awaited round trip on a
        shared backend."""
        _check_client_key(key)
        template = self._items(requested)
        if self._shared is not None:
            proxy = self._checkout(key)
            try:
                return await self._attempt(proxy.sched, self._localise(template, proxy.sched))
            finally:
                self._checkin(proxy)
        with self._lock:
            now = self._clock()
            sched = self._scheduler_locked(key, now)
            return attempt_locked(self, sched, self._localise(template, sched), now)

    # -- questions and pause -----------------------------------------------------------------

    def retry_after(self, key: str, requested: Mapping[str, int | float] | None = None) -> float:
        """Seconds until ``key`` could be admitted ``requested``: 0.0 if at once, ``inf`` when
        only a release can make it admissible. Asking creates no key."""
        _check_client_key(key)
        template = self._items(requested)
        if self._shared is not None:
            peeked = self._peek(key)
            return self._retry_after(peeked, self._localise(template, peeked))
        with self._lock:
            now = self._clock()
            sched = self._entries.get(key) or self._fresh_scheduler(key, now)
            return retry_after_locked(sched, self._localise(template, sched), now)

    def pause(self, seconds: float, *, key: str | None = None) -> None:
        """Admit nobody before ``now + seconds``: for ``key`` only, or (``key=None``) for every
        key, including keys first seen during the pause. Waiters keep their places; overlapping
        pauses keep the later end. Pausing every key visits each key held (O(keys))."""
        seconds = check_seconds("seconds", seconds)
        if key is not None:
            _check_client_key(key)
        if self._shared is not None:
            self._pause_shared(seconds, key)
            return
        with self._lock:
            now = self._clock()
            until = now + seconds
            if key is not None:
                self._scheduler_locked(key, now).pause(until, now)
                return
            self._paused_until = max(self._paused_until, until)
            for sched in self._entries.values():
                sched.pause(until, now)

    def _pause_shared(self, seconds: float, key: str | None) -> None:
        """Pause ``key``'s shared state, or (None) that of every key this process has a proxy
        of, and of every key it uses during the pause."""
        if key is not None:
            proxy = self._checkout(key)
            try:
                self._pause(proxy.sched, seconds)
            finally:
                self._checkin(proxy)
            return
        with self._lock:
            until = self._clock() + seconds
            self._paused_until = max(self._paused_until, until)
            proxies = [proxy.sched for proxy in self._proxies.values()]
        for sched in proxies:
            with sched.lock:
                sched.pause(until, sched.clock())

    def change_limit(
        self,
        key: str,
        *,
        capacity: float | int | None = None,
        window_seconds: float | None = None,
    ) -> None:
        """Change the capacity and/or window of the limit ``key`` now, for every client key:
        those held now, and those first seen later. The rules are :meth:`LimitSet.change_limit`'s
        (semantics §4, "Limits that change at run time"), applied to each client key's state;
        on a shared backend every process of the set sees the change. Visits each key held
        (O(keys)), as pausing every key does.

        Args:
            key: the key of the limit (not a client key).
            capacity: the new capacity (None: unchanged).
            window_seconds: the new window (None: unchanged); not for a ResourceLimit.

        Raises:
            ValueError, TypeError: an unknown key, a number out of range, a window for a
                ResourceLimit; nothing is changed.
        """
        if self._shared is not None:
            self._change_shared(key, capacity, window_seconds)
            return
        with self._lock:
            changed = changed_limit(self._current, key, capacity, window_seconds)
            if changed is None:
                return
            index, limit = changed
            window = 0.0 if isinstance(limit, ResourceLimit) else limit.window_seconds
            now = self._clock()
            # The template bounds the amounts accepted; new keys are made from ``_current``.
            self._requests.index[limit.key][1].change(limit.capacity, window, now)
            for sched in self._entries.values():
                sched.change_limit(sched.states[index], limit.capacity, window, now)
            current = list(self._current)
            current[index] = limit
            self._current = tuple(current)
        limit_changes[0] += 1

    def _change_shared(self, key: str, capacity: object, window_seconds: object) -> None:
        change = getattr(self._shared, "change_limit", None)
        if change is None:
            raise NotImplementedError(
                f"change_limit is not supported yet for a KeyedLimitSet on {self._backend!r}: "
                "each client key's state lives in the shared store, and a change must reach "
                "all of them"
            )
        with self._lock:
            self._follow_shared()
            changed = changed_limit(self._current, key, capacity, window_seconds)
        if changed is None:
            return
        index, limit = changed
        # Recorded once for the set in the backend (not under this set's lock: a file write, or
        # Redis round trips); each key catches up at its next decision, in every process. Only
        # the numbers given change: another process may have changed the other since this one
        # last saw it.
        change(
            index,
            None if capacity is None else limit.capacity,
            None if window_seconds is None else getattr(limit, "window_seconds", None),
        )
        with self._lock:
            self._follow_shared()
            waiting = [proxy.sched for proxy in self._proxies.values() if not proxy.idle()]
        for sched in waiting:  # this process's waiters see it now: a grown limit admits them
            with sched.lock:
                pass
        limit_changes[0] += 1

    def _follow_shared(self) -> None:
        """Under the lock: take up the changes of the limits made in the backend (by any
        process) as this process last saw them; no I/O."""
        known = getattr(self._shared, "known_changes", None)
        if known is None:
            return
        generation, numbers = known()
        if generation <= self._generation:
            return
        now = self._clock()
        current = list(self._current)
        for index, (limit, (capacity, window)) in enumerate(zip(current, numbers, strict=True)):
            resource = isinstance(limit, ResourceLimit)
            if limit.capacity == capacity and (
                isinstance(limit, ResourceLimit) or limit.window_seconds == window
            ):
                continue
            numbers_now: dict[str, Any] = {"capacity": capacity}
            if not resource:
                numbers_now["window_seconds"] = window
            current[index] = attrs.evolve(limit, **numbers_now)
            self._requests.index[limit.key][1].change(capacity, window, now)
        self._current = tuple(current)
        self._generation = generation

    def get_stats(self, key: str) -> dict[str, Any]:
        """The statistics of ``key``, as :meth:`LimitSet.get_stats` gives them (a key not held
        shows fresh limits). Asking creates no key."""
        return self.statistics(key).as_dict()

    def statistics(self, key: str) -> LimitSetStatistics:
        """The statistics of ``key`` as a frozen, typed value, as :meth:`LimitSet.statistics`
        gives them (a key not held shows fresh limits). Asking creates no key."""
        _check_client_key(key)
        if self._shared is not None:
            return self._statistics(self._peek(key))
        with self._lock:
            now = self._clock()
            sched = self._entries.get(key)
            if sched is None:
                sched = self._fresh_scheduler(key, now)
            else:
                sched.catch_up(now)
            return limitset_statistics(self._limits, sched, now)

    def get_keys_stats(self) -> dict[str, Any]:
        """How many keys are held, and how many were dropped (``dropped``: fresh, no decision
        changed; ``forgotten``: at ``max_keys`` before they were fresh); see
        :meth:`keys_statistics`."""
        return self.keys_statistics().as_dict()

    def keys_statistics(self) -> KeyedStatistics:
        """The keys held and dropped, as a frozen, typed value (``get_keys_stats`` as a dict)."""
        with self._lock:
            now = self._clock()
            return KeyedStatistics(
                keys=len(self._entries) + len(self._proxies),
                max_keys=self._max_keys,
                dropped=self._dropped,
                forgotten=self._forgotten,
                paused_for=seconds_up(max(0.0, self._paused_until - now)),
            )

    # -- pickling ----------------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the recipe (limits, ``max_keys``, ``config``, backend, ``name``, ``clock``);
        it unpickles with no keys held here (a shared backend's keys keep their state there)."""
        check_picklable_clock(self, self._clock)
        rebuild = partial(
            KeyedLimitSet,
            max_keys=self._max_keys,
            config=dict(self._config),
            backend=self._backend,
            name=self._name,
            clock=self._clock,
            timer_slack=self._timer_slack,
        )
        return (rebuild, (self._limits,))

    def __repr__(self) -> str:
        name = f" name={self._name!r}" if self._name else ""
        backend = "" if self._shared is None else f" backend={self._backend!r}"
        return (
            f"<KeyedLimitSet{name} limits={list(self._limits)!r} keys={len(self)} "
            f"max_keys={self._max_keys}{backend}>"
        )


@final
class KeyedAcquire(DeferredAcquire):
    """``async with keyed.acquire(key, ...) as acq``: finds (or makes) the key's state on entry,
    so a key is never dropped between asking and acquiring. Single use."""

    __slots__ = ("_items", "_key", "_keyed", "_timeout")

    _owner = "keyed"

    def __init__(self, keyed: KeyedLimitSet, key: str, items: Items, timeout: float) -> None:
        super().__init__()
        self._keyed = keyed
        self._key = key
        self._items = items
        self._timeout = timeout

    async def __aenter__(self) -> Acquisition:
        if self._entered:
            raise RuntimeError("this acquisition was already entered; call acquire() again")
        self._entered = True  # single use, whatever happens next
        keyed = self._keyed
        if keyed._shared is not None:
            acq = self._acq = await keyed._enter_shared(self)
            return acq
        if _get_running_loop() is None and trio_lowlevel() is not None:
            acq = self._acq = await keyed._enter(self)  # a trio checkpoint, even uncontended
            return acq
        with keyed._lock:  # the fast path, inline: no waiter, no await
            now = keyed._clock()
            sched = keyed._scheduler_locked(self._key, now)
            items = keyed._localise(self._items, sched)
            receipts = sched.try_take(items, now)
        if receipts is not None:
            acq = self._acq = Acquisition(keyed, sched, items, HELD, receipts)
        else:  # finds the key again: it may have been dropped since
            acq = self._acq = await keyed._enter(self)
        return acq

    def __repr__(self) -> str:
        return f"<KeyedAcquire {self._state()} key={self._key!r} acquisition={self._acq!r}>"
