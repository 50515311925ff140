"""Errors of aiolimits beyond the builtins (semantics §11)."""

from __future__ import annotations

__all__ = ["BackendUnavailable"]


class BackendUnavailable(Exception):
    """A shared backend (Redis, the process store) could not be reached in time. Raised with the
    ``on_unavailable="raise"`` policy; the caller holds nothing (a request that timed out may
    still be applied by the store later: its units then count as used, never admitting more)."""
