"""mypyc's options for the classes of the modules ``hatch_build.py`` compiles.

``mypyc_attr`` is ``mypy_extensions.mypyc_attr`` to mypy and mypyc (which read it at compile
time) and a decorator that changes nothing at run time, so that ``mypy_extensions`` is not a
dependency. The pure-Python modules and the compiled ones behave the same (CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

__all__ = ["mypyc_attr"]

T = TypeVar("T")

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr
else:

    def mypyc_attr(*attrs: str, **kwattrs: Any) -> Callable[[T], T]:
        def keep(cls: T) -> T:
            return cls

        return keep
