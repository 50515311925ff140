"""Acquisition: what a caller holds between acquiring and releasing, and how it reports usage.

An Acquisition is also the context manager returned by ``LimitSet.acquire`` (async),
``acquire_sync`` and ``try_acquire``: one object per call, nothing else allocated on the fast path.

Release is synchronous and never awaits (trio/anyio's rule): it runs in ``__aexit__`` even inside a
cancelled scope, on exceptions, and on ``release()``; it is idempotent. Usage updates (§5) settle
each rate limit from the amount taken to the amount really used, refunding or charging as §3
allows; a refund wakes waiters it makes admissible.
"""

from __future__ import annotations

import math
from asyncio import _get_running_loop
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, final

from ._compiled import mypyc_attr
from ._waiters import GRANTED, AsyncioWaiter, async_waiter, trio_lowlevel

if TYPE_CHECKING:
    from ._door import Door
    from ._scheduler import Items, Scheduler

__all__ = ["Acquisition", "DeferredAcquire"]

PENDING: Final = 0  # returned by acquire(), not yet entered
HELD: Final = 1
FAILED: Final = 2  # try_acquire could not take it
RELEASED: Final = 3
ACQUIRING: Final = 4  # entered, waiting in the queue

_STATE_NAMES = {
    PENDING: "pending",
    HELD: "held",
    FAILED: "failed",
    RELEASED: "released",
    ACQUIRING: "acquiring",
}


@final
class Acquisition:
    """Units taken from a LimitSet, held until released.

    Use it as ``async with limits.acquire(...) as acq`` (async), ``with limits.acquire_sync(...)
    as acq`` (threads) or ``with limits.try_acquire(...) as acq`` (never waits; check
    ``acq.successful``). Leaving the block releases resource slots; rate limits count the amounts
    requested unless :meth:`update` reports other usage.

    Attributes:
        successful: whether every limit was taken (always True once ``acquire`` returns).
        requested: the amount taken per key, including the implicit ``call_count`` and resource
            slots.
        config: the LimitSet's ``config`` mapping (which account, region or API key this is).
        waited: seconds spent waiting in the queue, on the LimitSet's clock.
    """

    __slots__ = (
        "_items",
        "_limitset",
        "_receipts",
        "_sched",
        "_settled",
        "_state",
        "_timeout",
        "waited",
    )

    # All positional: every acquire() makes one, and a keyword argument costs a noticeable share.
    def __init__(  # noqa: PLR0917
        self,
        limitset: Door,
        sched: Scheduler,
        items: Items,
        state: int,
        receipts: list[Any] | None = None,
        timeout: float = math.inf,
    ) -> None:
        self._limitset = limitset
        self._sched = sched
        self._items = items
        self._state = state
        self._receipts = receipts
        self._timeout = timeout
        self._settled: dict[str, list[Any]] | None = None
        self.waited = 0.0

    # -- what it is --------------------------------------------------------------------------

    @property
    def successful(self) -> bool:
        """Whether this acquisition got everything it asked for (it may since have released)."""
        return self._receipts is not None

    @property
    def requested(self) -> Mapping[str, float]:
        """The amounts asked for, per key (the defaults filled in, skipped limits left out)."""
        return {state.key: amount for state, amount in self._items}

    @property
    def config(self) -> Mapping[str, Any]:
        """The ``config`` of the LimitSet this was acquired from."""
        return self._limitset.config

    @property
    def released(self) -> bool:
        return self._state == RELEASED

    # -- usage -------------------------------------------------------------------------------

    def update(self, usage: Mapping[str, int | float]) -> None:
        """Report the real usage of rate limits; the last report for a key counts.

        Lower than requested gives units back as the algorithm allows (§3) and may wake waiters;
        higher is charged now. Keys not named keep their last reported (or requested) amount.

        Args:
            usage: real amount per RateLimit key; ``call_count`` may only be 1.

        Raises:
            RuntimeError: the acquisition was released, or holds nothing.
            ValueError: an unknown key, a resource limit, a negative, NaN or infinite amount,
                a fraction for a window algorithm, or ``call_count`` other than 1.
            TypeError: a non-numeric amount or a non-mapping ``usage``.
        """
        if self._state != HELD:
            if self._state == RELEASED:
                raise RuntimeError("update() after the acquisition was released")
            raise RuntimeError(f"update() on an acquisition that is {_STATE_NAMES[self._state]}")
        limitset = self._limitset
        sched = self._sched
        checked = limitset._usage(usage, sched)  # validates everything before changing anything
        with sched.lock:
            if self._state != HELD:  # released by another thread meanwhile
                raise RuntimeError("update() after the acquisition was released")
            if sched.dropped:  # a keyed set dropped its key meanwhile: move to the live state
                sched, checked = limitset._relocate(self, checked)
            now = sched.clock()
            settled = self._settled
            if settled is None:
                receipts = self._receipts or ()
                settled = self._settled = {
                    state.key: [state, receipt, amount]
                    for (state, amount), receipt in zip(self._items, receipts, strict=True)
                }
            refunded = False
            for state, value in checked:
                entry = settled.get(state.key)
                if entry is None:
                    entry = settled[state.key] = [state, None, 0.0]
                held = entry[2]
                entry[1], entry[2] = sched.settle(state, entry[1], held, value, now)
                refunded = refunded or entry[2] < held
            if refunded:
                sched.after_refund(now)

    # -- release -----------------------------------------------------------------------------

    def release(self) -> None:
        """Give back resource slots now. Idempotent, thread-safe, synchronous, never waits."""
        if self._state != HELD or not self._limitset._has_resources:
            self._state = RELEASED
            return
        sched = self._sched
        with sched.lock:
            # Re-checked under the lock: two threads releasing at once must give back once.
            if self._state != HELD:
                return
            self._state = RELEASED
            sched.release(self._items, self._receipts)

    # -- context manager protocols -----------------------------------------------------------

    async def __aenter__(self) -> Acquisition:
        if self._state == PENDING:
            loop = _get_running_loop()
            if loop is None:
                lowlevel = trio_lowlevel()
                if lowlevel is not None:
                    return await self._enter_trio(lowlevel)
            sched = self._sched
            if sched.remote:
                # Single use: whatever happens next (granted, timed out, cancelled), this
                # object cannot be entered again.
                self._state = ACQUIRING
                try:
                    await self._limitset._acquire_async(self)
                except BaseException:
                    self._state = RELEASED
                    raise
                return self
            limitset = self._limitset
            with sched.lock:
                start = sched.clock()
                receipts = sched.try_take(self._items, start)
                if receipts is not None:  # the fast path: no waiter, no await
                    self._receipts = receipts
                    self._state = HELD
                    return self
                # Queued under the same hold of the lock, with its first wake time (as
                # Door._queue_locked; the loop is known already).
                self._state = RELEASED  # single use, as above, if it raises here
                items = self._items
                deadline = start + self._timeout
                waiter = (
                    AsyncioWaiter(items, deadline, loop)
                    if loop is not None
                    else async_waiter(items, deadline)  # no loop, no trio: it raises
                )
                if not sched.enqueue(waiter, start):
                    raise limitset._timeout_error(items, self._timeout)
                until = sched.sleep_until(waiter)
            self._state = ACQUIRING
            # Door._park_async inline (a coroutine fewer for every waiting task).
            steps = limitset._parking(sched, waiter, until)
            try:
                for delay in steps:
                    try:
                        await waiter.sleep(delay)
                    finally:
                        waiter.unpark()
                if waiter.state == GRANTED:
                    self._receipts = waiter.receipts
                    self._state = HELD
                    self.waited = waiter.granted_at - start
                else:
                    limitset._finish(self, waiter, start, self._timeout)  # raises
            except BaseException:
                steps.close()  # cancelled while queued: leave the queue, holding nothing
                self._state = RELEASED
                raise
        elif self._state == RELEASED:
            raise RuntimeError("this acquisition was already released; call acquire() again")
        elif self._state == ACQUIRING:
            raise RuntimeError("this acquisition is already being acquired by another task")
        return self

    async def _enter_trio(self, lowlevel: Any) -> Acquisition:
        """``__aenter__`` in a trio task: a checkpoint even when nothing waits, as
        ``trio.Semaphore.acquire`` is. A cancelled scope raises ``Cancelled`` before anything is
        taken; once taken, the task yields with the cancellation shielded, so that what it took
        is never lost to it (``checkpoint_if_cancelled``, then ``cancel_shielded_checkpoint``)."""
        self._state = ACQUIRING  # single use, as in __aenter__
        try:
            await lowlevel.checkpoint_if_cancelled()
            sched = self._sched
            receipts = None
            if not sched.remote:
                with sched.lock:
                    receipts = sched.try_take(self._items, sched.clock())
            if receipts is None:
                await self._limitset._acquire_async(self)
            else:
                self._receipts = receipts
                self._state = HELD
        except TimeoutError:
            self._state = RELEASED
            await lowlevel.cancel_shielded_checkpoint()  # refused at once is a checkpoint too
            raise
        except BaseException:
            self._state = RELEASED
            raise
        # Also after a wait, which may have ended without yielding (granted on arrival).
        await lowlevel.cancel_shielded_checkpoint()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != HELD or not self._limitset._has_resources:
            self._state = RELEASED  # release(), without the call: nothing to give back
        else:
            self.release()

    def __enter__(self) -> Acquisition:
        if self._state == PENDING:
            raise RuntimeError(
                "acquire() returns an async context manager: use `async with`; "
                "from a thread, use acquire_sync()"
            )
        if self._state == RELEASED:
            raise RuntimeError("this acquisition was already released; acquire again")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    # -- used by LimitSet --------------------------------------------------------------------

    def _granted(self, receipts: list[Any], waited: float) -> None:
        self._receipts = receipts
        self._state = HELD
        self.waited = waited

    def __repr__(self) -> str:
        state = _STATE_NAMES[self._state]
        if self._state == RELEASED and not self.successful:
            state = "released (never held)"
        return (
            f"<Acquisition {state} requested={dict(self.requested)!r} "
            f"waited={self.waited:.6g}s config={dict(self.config)!r}>"
        )


# Subclassed by the pools and the keyed sets (in Python, when this module is compiled).
@mypyc_attr(allow_interpreted_subclasses=True)
class DeferredAcquire:
    """An async context manager whose :class:`Acquisition` is made on entry: a pool picks its set
    then, a keyed set finds (or makes) its key's state then. Leaving it releases that
    acquisition. Single use. Subclasses define :meth:`_enter`."""

    __slots__ = ("_acq", "_entered")

    #: How the owner's verbs are named in the error for a plain ``with``.
    _owner: ClassVar[str] = "limits"

    def __init__(self) -> None:
        self._entered = False
        self._acq: Acquisition | None = None

    @property
    def acquisition(self) -> Acquisition | None:
        """The acquisition, once granted."""
        return self._acq

    async def _enter(self) -> Acquisition:
        raise NotImplementedError

    async def __aenter__(self) -> Acquisition:
        if self._entered:
            raise RuntimeError("this acquisition was already entered; call acquire() again")
        self._entered = True  # single use, whatever happens next
        acq = self._acq = await self._enter()
        return acq

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._acq is not None:
            self._acq.release()

    def __enter__(self) -> Acquisition:
        owner = self._owner
        raise RuntimeError(
            f"{owner}.acquire() returns an async context manager: use `async with`; "
            f"from a thread, use {owner}.acquire_sync()"
        )

    def __exit__(self, *exc_info: object) -> None:  # pragma: no cover - __enter__ always raises
        pass

    def _state(self) -> str:
        return "pending" if not self._entered else ("held" if self._acq else "entered")
