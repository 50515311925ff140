"""ProcessBackend on an unlucky machine: a full tmpfs, a state file truncated or overwritten
while attached. Issue #13 found the worker killed by SIGBUS in both; it must raise a clear
error or carry on, never die by a signal. Each case runs in a child process, so that a signal
death shows as a negative return code instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._needs import require_root, require_tool


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr[-2000:]}"
    return done


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, like a /dev/shm that other programs have filled."""
    require_root()
    mount, umount = require_tool("mount"), require_tool("umount")
    where = tmp_path / "shm"
    where.mkdir(mode=0o700)
    subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        subprocess.run([umount, "-l", str(where)], check=True)


def test_a_full_tmpfs_is_an_error_not_sigbus(small_tmpfs: Path) -> None:
    done = _run(
        """
        import errno, sys
        from aiolimits import LimitSet, ProcessBackend, RateLimit
        # A sliding window keeps one entry per acquisition: the state outgrows 64 KiB.
        limits = LimitSet(
            [RateLimit("log", 3600, 1_000_000, algorithm="sliding_window")],
            backend=ProcessBackend(sys.argv[1]),
            name="big",
        )
        for i in range(100_000):
            try:
                limits.try_acquire({"log": 1})
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                print("ENOSPC after", i, "acquisitions:", exc)
                break
        else:
            raise SystemExit("never ran out of space")
        # The process is fine, and so is the state it could store (the last intact copy).
        used = limits.get_stats()["limits"]["log"]
        print("still answers", used)
        """,
        str(small_tmpfs),
    )
    assert done.returncode == 0, done.stderr
    assert "ENOSPC after" in done.stdout
    assert "cannot reserve" in done.stdout  # the message says what failed
    assert "still answers" in done.stdout


_TRUNCATE = """
import os, sys, warnings
from aiolimits import CallLimit, LimitSet, ProcessBackend, ResourceLimit
place, how = sys.argv[1], sys.argv[2]
warnings.simplefilter("always")
limits = LimitSet(
    [CallLimit(3600, 10), ResourceLimit("conn", 2)], backend=ProcessBackend(place), name="s"
)
held = limits.try_acquire()
assert held.successful
for _ in range(4):
    other = limits.try_acquire()
    assert other.successful
    other.release()
path = os.path.join(place, "s.limits")
size = os.path.getsize(path)
# Someone else damages the file while this process is attached to it.
if how == "truncate":
    os.truncate(path, 0)
elif how == "shorten":
    os.truncate(path, 100)
else:
    with open(path, "r+b") as f:
        f.write(os.urandom(size))
try:
    with warnings.catch_warnings(record=True) as caught:
        stats = limits.get_stats()
        again = limits.try_acquire()
        ok = again.successful
        again.release()
except ValueError as exc:  # a clear error is acceptable: a signal is not
    print("error:", exc)
else:
    print("warned:", [str(w.message) for w in caught])
    left = round(stats["limits"]["call_count"]["available"])
    print("calls left", left, "conn", stats["limits"]["conn"])
    print("acquired again", ok)
held.release()
print("survived")
"""


@pytest.mark.parametrize("how", ["truncate", "shorten", "garbage"])
def test_a_state_file_damaged_while_attached_is_no_signal_death(tmp_path: Path, how: str) -> None:
    place = tmp_path / "state"
    done = _run(_TRUNCATE, str(place), how)
    assert done.returncode == 0, done.stderr
    assert "survived" in done.stdout, done.stdout + done.stderr
    # Re-initialised from this process's last view: nothing it knew is lost.
    assert "was damaged (truncated or overwritten) while in use" in done.stdout
    assert "calls left 5 " in done.stdout
    assert "'in_use': 1" in done.stdout
    assert "acquired again True" in done.stdout
