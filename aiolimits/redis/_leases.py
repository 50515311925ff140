"""The resource leases of a Redis-backed set: which limits are leased, for how long, by whom.

A resource slot taken in Redis is a lease named by a holder id, one per acquisition: this
process's prefix (random, per set) and a counter. The scheduler holds the leases of its
acquisitions (``RedisScheduler._leases``) and the set's renewer thread extends them while they
are held, so that a process that dies frees its slots within one lease; ending an acquisition
ends its lease. :class:`LeaseTerms` holds what the schedulers of one set share (a keyed set's
proxies too, so that a proxy made again for a key never reuses an earlier proxy's holder id).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from typing import Any

from .._limits import Limit, ResourceLimit
from .._scheduler import Items
from ._script import decode_receipt

__all__ = ["LeaseTerms"]


class LeaseTerms:
    """The leases of one set: its resource limits' keys, the lease's length in seconds, and
    the holder ids of this process.

    Args:
        limits: the set's limits (the resource limits among them are leased).
        seconds: how long a lease lasts unless renewed.
    """

    __slots__ = ("_count", "_prefix", "resources", "seconds")

    def __init__(self, limits: Sequence[Limit], seconds: float) -> None:
        #: The keys of the set's resource limits.
        self.resources = frozenset(
            limit.key for limit in limits if isinstance(limit, ResourceLimit)
        )
        self.seconds = seconds
        self._prefix = uuid.uuid4().hex
        self._count = itertools.count()

    def new_holder(self) -> str:
        """A holder id never used before by this process for this set."""
        return f"{self._prefix}:{next(self._count)}"

    def keys(self, items: Items) -> tuple[str, ...]:
        """The keys of the leased limits among ``items``."""
        return tuple(state.key for state, _amount in items if state.key in self.resources)

    def receipts(self, items: Items, holder: str, raw: Any) -> tuple[list[Any], tuple[str, ...]]:
        """The receipts of a grant to ``holder`` from the script's reply ``raw`` (a resource
        limit's receipt is the holder id of its lease), and the keys it leases."""
        receipts: list[Any] = []
        held: list[str] = []
        for (state, _amount), receipt in zip(items, raw, strict=True):
            if state.key in self.resources:
                receipts.append(holder)
                held.append(state.key)
            else:
                receipts.append(decode_receipt(receipt))
        return receipts, tuple(held)

    def holder_of(self, items: Items, receipts: Sequence[Any]) -> str | None:
        """The holder id of the acquisition with ``receipts`` (None: it leases nothing)."""
        for (state, _amount), receipt in zip(items, receipts, strict=True):
            if state.key in self.resources:
                return str(receipt)
        return None
