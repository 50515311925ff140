"""The Ray backend: limits shared by every task and actor of a Ray cluster, kept in a named
Ray actor. Needs the ``ray`` extra (``pip install aiolimits[ray]``); ``import aiolimits`` never
imports Ray."""

from ._backend import RayBackend as RayBackend

__all__ = ["RayBackend"]
