"""The two builds: the core compiled with mypyc (hatch_build.py) or the same modules as pure Python.

``aiolimits.COMPILED`` must name the build that runs; CI sets ``AIOLIMITS_EXPECT_COMPILED`` for
each of its two runs, so that a run cannot test the other build by mistake. The build hook is
tested here with the compiler replaced (compiling for real takes minutes): what it puts in the
wheel, and how it falls back, and says so, when it cannot compile.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import aiolimits
from aiolimits import _acquisition, _requests, _scheduler

ROOT = Path(__file__).resolve().parent.parent


def is_extension(module: ModuleType) -> bool:
    path = module.__file__ or ""
    return any(path.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def test_compiled_names_the_build_that_runs() -> None:
    modules = [_scheduler, _requests, _acquisition]
    assert isinstance(aiolimits.COMPILED, bool)
    assert [is_extension(m) for m in modules] == [aiolimits.COMPILED] * len(modules)
    expected = os.environ.get("AIOLIMITS_EXPECT_COMPILED")
    if expected is not None:
        want = expected == "1"
        assert aiolimits.COMPILED is want, f"this run imports {_scheduler.__file__}"


def test_compiled_is_exported() -> None:
    assert "COMPILED" in aiolimits.__all__


# -- the build hook ----------------------------------------------------------------------------


@pytest.fixture
def hook_module() -> ModuleType:
    pytest.importorskip("hatchling")
    spec = importlib.util.spec_from_file_location("_aiolimits_hatch_build", ROOT / "hatch_build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _clean_build_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AIOLIMITS_PURE", "AIOLIMITS_REQUIRE_COMPILED"):
        monkeypatch.delenv(name, raising=False)


def make_hook(module: ModuleType, root: Path) -> Any:
    hook = module.CustomBuildHook.__new__(module.CustomBuildHook)
    # BuildHookInterface keeps the project root in a private attribute read by ``root``.
    hook._BuildHookInterface__root = str(root)
    return hook


def fake_compiler(made: list[str]) -> Any:
    """A ``compile_modules`` that writes ``made`` (paths relative to its output) instead."""

    def compile_modules(root: Path, out: Path) -> list[Path]:
        paths = []
        for name in made:
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"compiled")
            paths.append(path)
        return paths

    return compile_modules


SO = "cpython-311-x86_64-linux-gnu.so"
MADE = [f"aiolimits__mypyc__mypyc.{SO}", f"aiolimits/_scheduler.{SO}"]


def test_build_hook_puts_the_compiled_files_in_the_wheel(
    hook_module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hook_module, "_missing_toolchain", lambda: None)
    monkeypatch.setattr(hook_module, "compile_modules", fake_compiler(MADE))
    build_data: dict[str, Any] = {}
    make_hook(hook_module, tmp_path).initialize("standard", build_data)
    assert sorted(build_data["force_include"].values()) == sorted(MADE)
    assert all(Path(source).read_bytes() == b"compiled" for source in build_data["force_include"])
    assert build_data["pure_python"] is False
    assert build_data["infer_tag"] is True


def test_editable_build_compiles_beside_the_sources_and_a_pure_one_removes_them(
    hook_module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "aiolimits").mkdir()
    monkeypatch.setattr(hook_module, "_missing_toolchain", lambda: None)
    monkeypatch.setattr(hook_module, "compile_modules", fake_compiler(MADE))
    make_hook(hook_module, tmp_path).initialize("editable", {})
    assert all((tmp_path / name).exists() for name in MADE)

    monkeypatch.setenv("AIOLIMITS_PURE", "1")
    build_data: dict[str, Any] = {}
    make_hook(hook_module, tmp_path).initialize("editable", build_data)
    assert not any((tmp_path / name).exists() for name in MADE)  # stale ones would win
    assert build_data == {}


@pytest.mark.parametrize("failure", [SystemExit("error: command '/bin/false' failed"), OSError()])
def test_build_hook_falls_back_to_pure_python_when_compiling_fails(
    hook_module: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: BaseException,
) -> None:
    def broken(root: Path, out: Path) -> list[Path]:
        raise failure

    monkeypatch.setattr(hook_module, "_missing_toolchain", lambda: None)
    monkeypatch.setattr(hook_module, "compile_modules", broken)
    build_data: dict[str, Any] = {}
    make_hook(hook_module, tmp_path).initialize("standard", build_data)
    assert build_data == {}  # a pure-Python wheel, tagged py3-none-any
    err = capsys.readouterr().err
    assert "compiling failed" in err
    assert "installing the pure-Python modules instead" in err


def test_build_hook_without_a_compiler_says_so_and_does_not_try(
    hook_module: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def never(root: Path, out: Path) -> list[Path]:
        raise AssertionError("compiled without a compiler")

    (tmp_path / "Python.h").touch()  # the headers are there, the compiler is not
    monkeypatch.setattr(hook_module.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setattr(hook_module, "compile_modules", never)
    build_data: dict[str, Any] = {}
    make_hook(hook_module, tmp_path).initialize("standard", build_data)
    assert build_data == {}
    err = capsys.readouterr().err
    assert "no C compiler ('no-such-compiler-here' is not on PATH)" in err


def test_build_hook_fails_instead_of_falling_back_when_compiled_is_required(
    hook_module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hook_module, "_missing_toolchain", lambda: "no C compiler (a test)")
    monkeypatch.setenv("AIOLIMITS_REQUIRE_COMPILED", "1")
    with pytest.raises(RuntimeError, match="AIOLIMITS_REQUIRE_COMPILED is set, but no C compiler"):
        make_hook(hook_module, tmp_path).initialize("standard", {})


def test_build_hook_pure_flag_does_not_compile(
    hook_module: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def never(root: Path, out: Path) -> list[Path]:
        raise AssertionError("compiled although AIOLIMITS_PURE=1")

    monkeypatch.setenv("AIOLIMITS_PURE", "1")
    monkeypatch.setattr(hook_module, "compile_modules", never)
    build_data: dict[str, Any] = {}
    make_hook(hook_module, tmp_path).initialize("standard", build_data)
    assert build_data == {}
    assert "AIOLIMITS_PURE is set" in capsys.readouterr().err


def test_build_hook_compiles_the_modules_it_names(hook_module: ModuleType) -> None:
    # Each exists, and the scripts that rebuild (scripts/_venv.sh) find them by this pattern.
    assert hook_module.COMPILED
    for path in hook_module.COMPILED:
        assert (ROOT / path).is_file()
        assert path.startswith("aiolimits/")
        assert path.endswith(".py")


def test_editable_build_keeps_compiled_files_newer_than_their_sources(
    hook_module: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reinstall for another extra must not compile again; an edited source must.
    (tmp_path / "aiolimits").mkdir()
    (tmp_path / "hatch_build.py").write_text("")
    for module in hook_module.COMPILED:
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_text("")
    suffix = hook_module.sysconfig.get_config_var("EXT_SUFFIX")
    made = [f"aiolimits__mypyc__mypyc{suffix}"] + [
        f"{module.removesuffix('.py')}{suffix}" for module in hook_module.COMPILED
    ]
    monkeypatch.setattr(hook_module, "_missing_toolchain", lambda: None)
    monkeypatch.setattr(hook_module, "compile_modules", fake_compiler(made))
    make_hook(hook_module, tmp_path).initialize("editable", {})
    for name in made:  # built after the sources
        os.utime(tmp_path / name, (2e9, 2e9))

    def never(root: Path, out: Path) -> list[Path]:
        raise AssertionError("compiled again although up to date")

    monkeypatch.setattr(hook_module, "compile_modules", never)
    build_data: dict[str, Any] = {}
    make_hook(hook_module, tmp_path).initialize("editable", build_data)
    assert build_data == {"pure_python": False, "infer_tag": True}
    assert all((tmp_path / name).exists() for name in made)

    os.utime(tmp_path / hook_module.COMPILED[0], (3e9, 3e9))  # edited since
    monkeypatch.setattr(hook_module, "compile_modules", fake_compiler(made))
    make_hook(hook_module, tmp_path).initialize("editable", {})
    assert (tmp_path / made[1]).stat().st_mtime < 3e9  # made again
