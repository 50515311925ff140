"""The build hook that compiles aiolimits' hot modules with mypyc, or leaves them pure Python.

Hatchling runs it for every wheel (``pip install .``, ``python -m build``) and editable install
(``pip install -e .``). The modules in ``COMPILED`` are compiled into one C extension when a C
compiler and the Python headers are there; otherwise, or when compiling fails for any reason, the
build goes on with the same modules as pure Python (same behaviour, slower) and says so on
stderr (``pip install -v`` shows it). ``aiolimits.COMPILED`` tells which build is installed.

Environment variables read here:

* ``AIOLIMITS_PURE=1``: do not compile (a pure-Python build, also on a machine that could).
* ``AIOLIMITS_REQUIRE_COMPILED=1``: fail the build instead of falling back (CI sets it, so
  that a broken compile cannot pass as a pure build).

An editable install puts the compiled files beside the sources (in place, as mypyc's own
``build_ext --inplace`` does), where they win over the ``.py`` files; every editable build first
removes those of an earlier one, so ``AIOLIMITS_PURE=1 pip install -e .`` goes back to pure
Python. Edits to a compiled module take effect after the next ``pip install -e .``
(``scripts/_venv.sh`` does it when a compiled module is newer than the last build).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
import traceback
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: The modules compiled together (one mypyc group): the acquisition's fast path and what it calls.
COMPILED = (
    "aiolimits/_scheduler.py",
    "aiolimits/_requests.py",
    "aiolimits/_acquisition.py",
)

#: The name of the shared library the group compiles into (a top-level module of the wheel).
GROUP = "aiolimits__mypyc"


def _say(message: str) -> None:
    print(f"aiolimits build: {message}", file=sys.stderr, flush=True)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _outputs(root: Path) -> list[Path]:
    """The compiled files an earlier in-place (editable) build left beside the sources."""
    found: list[Path] = []
    for suffix in (".so", ".pyd"):
        found += root.glob(f"{GROUP}*{suffix}")
        found += (root / "aiolimits").glob(f"*{suffix}")
    return found


def _missing_toolchain() -> str | None:
    """Why a C extension cannot be built here, found without trying (None: it may be)."""
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").exists():
        return f"the Python headers are not installed (no Python.h in {include})"
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = cc.split()[0] if isinstance(cc, str) and cc.split() else "cc"
    if sys.platform != "win32" and shutil.which(compiler) is None:
        return f"no C compiler ({compiler!r} is not on PATH)"
    return None


def compile_modules(root: Path, out: Path) -> list[Path]:
    """Compile ``COMPILED`` with mypyc into ``out``; returns the files made, paths under ``out``
    that mirror where they go in the package. Raises whatever mypyc or the compiler raise."""
    # Imported here: a pure build needs neither.
    from mypyc.build import mypycify
    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    temp = Path(tempfile.mkdtemp(prefix="aiolimits-mypyc-"))
    cwd = Path.cwd()
    os.chdir(root)  # mypyc names the modules after their paths relative to here
    try:
        extensions = mypycify(
            list(COMPILED),
            opt_level="3",
            debug_level="0",
            group_name=GROUP,
            target_dir=str(temp / "c"),
        )
        dist = Distribution({"name": "aiolimits", "ext_modules": extensions})
        cmd = build_ext(dist)
        cmd.build_lib = str(out)
        cmd.build_temp = str(temp / "o")
        cmd.inplace = False
        cmd.ensure_finalized()
        cmd.run()
    finally:
        os.chdir(cwd)
        shutil.rmtree(temp, ignore_errors=True)
    made = [p for p in out.rglob("*") if p.is_file()]
    if not made:
        raise RuntimeError("mypyc produced no files")
    return made


def _up_to_date(root: Path) -> bool:
    """Whether an earlier editable build left compiled files for this Python, newer than every
    compiled source and this hook (then a reinstall, say for another extra, keeps them)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    built = [p for p in _outputs(root) if p.name.endswith(suffix)]
    shims = {p.name.removesuffix(suffix) for p in built if p.parent.name == "aiolimits"}
    if not built or shims != {Path(m).stem for m in COMPILED}:
        return False
    newest = max((root / m).stat().st_mtime for m in (*COMPILED, "hatch_build.py"))
    return min(p.stat().st_mtime for p in built) > newest


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        editable = version == "editable"
        pure = _flag("AIOLIMITS_PURE")
        if editable and not pure and _up_to_date(root):
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
            _say("the compiled files beside the sources are up to date: kept")
            return
        if editable:
            for stale in _outputs(root):
                stale.unlink()
        if pure:
            _say("AIOLIMITS_PURE is set: pure-Python build (aiolimits.COMPILED is False)")
            return
        why = _missing_toolchain()
        made: list[Path] = []
        out = Path(tempfile.mkdtemp(prefix="aiolimits-ext-"))
        if why is None:
            try:
                made = compile_modules(root, out)
            except BaseException as exc:  # SystemExit from distutils' compiler errors too
                if isinstance(exc, KeyboardInterrupt):
                    raise
                why = f"compiling failed ({type(exc).__name__}: {exc})"
                traceback.print_exc(file=sys.stderr)
        if why is not None:
            shutil.rmtree(out, ignore_errors=True)
            if _flag("AIOLIMITS_REQUIRE_COMPILED"):
                raise RuntimeError(f"aiolimits build: AIOLIMITS_REQUIRE_COMPILED is set, but {why}")
            _say(
                f"{why}; installing the pure-Python modules instead (the same behaviour, "
                "slower; aiolimits.COMPILED is False)"
            )
            return
        if editable:
            for path in made:
                target = root / path.relative_to(out)
                shutil.copy2(path, target)
            shutil.rmtree(out, ignore_errors=True)
        else:
            # Kept until the wheel is written: hatchling reads force_include when it packs.
            force = build_data.setdefault("force_include", {})
            for path in made:
                force[str(path)] = path.relative_to(out).as_posix()
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        _say(f"compiled {', '.join(COMPILED)} with mypyc (aiolimits.COMPILED is True)")
