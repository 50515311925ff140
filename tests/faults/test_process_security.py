"""ProcessBackend against another local user (uid 65534, via ``setpriv``), as issue #13 found it.

The test process (root in CI) is the victim; the attacker's steps run as ``nobody`` through
``setpriv --reuid=65534 --regid=65534 --clear-groups``. The shared playground is a sticky,
world-writable directory, like ``/tmp`` or ``/dev/shm``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiolimits import CallLimit, LimitSet, ProcessBackend, ResourceLimit
from aiolimits._backends import process as process_module

from ._needs import require_root, require_tool

NOBODY = 65534


def _python(code: str) -> list[str]:
    return [sys.executable, "-I", "-c", code]


def _as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as uid/gid 65534 with no groups."""
    setpriv = require_tool("setpriv")
    return subprocess.run(
        [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *_python(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def playground() -> Iterator[Path]:
    """A sticky world-writable directory (like /dev/shm) both users can reach, in a directory
    both can traverse (pytest's own temporary directories are private to root)."""
    require_root()
    top = Path(tempfile.mkdtemp(prefix="aiolimits-faults-"))
    try:
        top.chmod(0o711)
        shared = top / "shm"
        shared.mkdir()
        shared.chmod(0o1777)
        yield shared
    finally:
        shutil.rmtree(top)


def test_a_directory_made_by_another_user_is_refused(playground: Path) -> None:
    target = playground.parent / "authorized_keys"
    target.write_text("ssh-ed25519 AAAA victim\n")
    trap = playground / "myapp"
    # The attacker makes the directory first, open to all, and plants a symlink at the name of
    # the state file, aimed at a file of the victim.
    done = _as_nobody(
        f"import os; os.mkdir({str(trap)!r}); os.chmod({str(trap)!r}, 0o777); "
        f"os.symlink({str(target)!r}, {str(trap / 'openai.limits')!r})"
    )
    assert done.returncode == 0, done.stderr
    with pytest.raises(ValueError, match=r"myapp is owned by uid 65534, not by this user"):
        LimitSet([CallLimit(60, 10)], backend=ProcessBackend(trap), name="openai")
    assert target.read_text() == "ssh-ed25519 AAAA victim\n"  # untouched


def test_the_default_per_user_directory_made_by_another_user_is_refused(
    playground: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_user = playground / f"aiolimits-{os.getuid()}"
    monkeypatch.setattr(process_module, "runtime_directory", lambda: per_user)
    done = _as_nobody(f"import os; os.mkdir({str(per_user)!r}); os.chmod({str(per_user)!r}, 0o777)")
    assert done.returncode == 0, done.stderr
    with pytest.raises(ValueError, match=rf"{per_user} is owned by uid 65534"):
        LimitSet([CallLimit(60, 10)], backend=ProcessBackend("myapp"), name="openai")
    assert not (per_user / "myapp").exists()


def test_a_group_or_world_writable_directory_of_ours_is_refused(tmp_path: Path) -> None:
    for mode, who in ((0o777, "group and others"), (0o770, "group"), (0o703, "others")):
        place = tmp_path / f"open-{mode:o}"
        place.mkdir()
        place.chmod(mode)
        with pytest.raises(ValueError, match=rf"open-{mode:o} is writable by {who} \(mode"):
            LimitSet([CallLimit(60, 10)], backend=ProcessBackend(place), name="x")
        assert list(place.iterdir()) == []


def test_a_symlink_at_the_state_file_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    place = tmp_path / "state"
    place.mkdir(mode=0o700)
    (place / "openai.limits").symlink_to(target)
    with pytest.raises(ValueError, match="is a symlink: refusing to follow it"):
        LimitSet([CallLimit(60, 10)], backend=ProcessBackend(place), name="openai")
    assert target.read_bytes() == b"keep me"


def _planted_state_file(path: Path) -> None:
    # What the previous version wrote: its magic, a 4 KiB header (it would have accepted this).
    path.write_bytes(b"AIOLIMv1".ljust(4096, b"\0"))


def test_a_planted_world_writable_or_foreign_state_file_is_refused(tmp_path: Path) -> None:
    require_root()
    place = tmp_path / "state"
    place.mkdir(mode=0o700)
    planted = place / "openai.limits"
    _planted_state_file(planted)
    planted.chmod(0o666)
    with pytest.raises(ValueError, match=r"openai.limits has mode 0o666"):
        LimitSet([CallLimit(60, 10)], backend=ProcessBackend(place), name="openai")
    planted.chmod(0o600)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(ValueError, match=r"openai.limits is owned by uid 65534"):
        LimitSet([CallLimit(60, 10)], backend=ProcessBackend(place), name="openai")
    assert planted.read_bytes() == b"AIOLIMv1".ljust(4096, b"\0")


def test_a_state_file_of_the_previous_format_gets_a_clear_error(tmp_path: Path) -> None:
    place = tmp_path / "state"
    place.mkdir(mode=0o700)
    _planted_state_file(place / "openai.limits")
    (place / "openai.limits").chmod(0o600)
    with pytest.raises(ValueError, match=r"older aiolimits \(state file format 1"):
        LimitSet([CallLimit(60, 10)], backend=ProcessBackend(place), name="openai")


def test_directories_are_0700_and_files_0600_whatever_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_user = tmp_path / "runtime" / "aiolimits-0"
    monkeypatch.setattr(process_module, "runtime_directory", lambda: per_user)
    old = os.umask(0)
    try:
        deep = LimitSet([CallLimit(60, 10)], backend=ProcessBackend(tmp_path / "a" / "b"), name="n")
        bare = LimitSet([CallLimit(60, 10)], backend=ProcessBackend("myapp"), name="n")
    finally:
        os.umask(old)
    assert deep.try_acquire().successful
    assert bare.try_acquire().successful
    for made in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "runtime", per_user):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    for file in (tmp_path / "a" / "b" / "n.limits", per_user / "myapp" / "n.limits"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_an_existing_directory_of_ours_readable_by_others_is_narrowed(tmp_path: Path) -> None:
    place = tmp_path / "old"
    place.mkdir()
    place.chmod(0o755)  # as the previous version made the per-user directory
    LimitSet([CallLimit(60, 10)], backend=ProcessBackend(place), name="n")
    assert stat.S_IMODE(place.stat().st_mode) == 0o700


def _wake_up_addresses(place: Path) -> list[str]:
    """This process's aiolimits wake-up sockets, as another user finds them in /proc/net/unix:
    an abstract name (``@...``, the previous version) or a path (bound through this process's
    ``/proc/self/fd``, resolved here to the path anyone else would use)."""
    found = []
    with open("/proc/net/unix") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            name = fields[7] if len(fields) >= 8 else ""
            if name.startswith("@aiolimits-") and f"-{os.getpid()}-" in name:
                found.append(name)
            elif name.startswith("/proc/self/fd/") and ".wake-" in name:
                fd, _slash, rest = name.removeprefix("/proc/self/fd/").partition("/")
                try:
                    where = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if where == str(place):
                    found.append(f"{where}/{rest}")
    return found


def test_another_user_cannot_reach_the_wake_up_socket(playground: Path) -> None:
    place = playground / "victim"  # made 0700 by the backend
    limits = LimitSet([ResourceLimit("conn", 1)], backend=ProcessBackend(place), name="s")
    held = limits.try_acquire()
    assert held.successful
    waiting = threading.Thread(target=lambda: limits.acquire_sync(timeout=30).release())
    waiting.start()  # a waiter: this process now has a wake-up socket
    try:
        for _ in range(1000):
            if limits.get_stats()["waiting"]:
                break
            threading.Event().wait(0.01)
        addresses = _wake_up_addresses(place)
        assert addresses, "no wake-up socket found"
        # The attacker sends to every one of them, as fast as it can, for a moment.
        flood = _as_nobody(
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
            f"for name in {addresses!r}:\n"
            "    address = b'\\0' + name[1:].encode() if name.startswith('@') else name\n"
            "    for _ in range(1000):\n"
            "        try:\n"
            "            s.sendto(b'!', address)\n"
            "        except PermissionError:\n"
            "            print('denied', name)\n"
            "            break\n"
            "    else:\n"
            "        print('delivered', name)\n"
        )
        assert flood.returncode == 0, flood.stderr
        assert "delivered" not in flood.stdout
        assert flood.stdout.count("denied") == len(addresses)
    finally:
        held.release()
        waiting.join(30)
    assert not waiting.is_alive()
