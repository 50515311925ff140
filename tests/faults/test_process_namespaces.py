"""ProcessBackend across PID namespaces (containers sharing a directory), as issue #13 found it:
a holder in another namespace was judged dead by a pid that means something else there, its
slot reclaimed, and a ResourceLimit(1) was held twice.

The holder runs under ``unshare --pid --fork --mount-proc`` (its own PID namespace and /proc,
the same filesystem): it takes the only slot, says so, and waits for its stdin to close; then
it exits without releasing, as a crashed container would.
"""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from aiolimits import LimitSet, ProcessBackend, ResourceLimit

from ._needs import require_root, require_tool

_HOLDER = textwrap.dedent(
    """
    import os, sys
    from aiolimits import LimitSet, ProcessBackend, ResourceLimit
    limits = LimitSet([ResourceLimit("conn", 1)], backend=ProcessBackend(sys.argv[1]), name="s")
    held = limits.try_acquire()
    print("held" if held.successful else "refused", os.getpid(), flush=True)
    sys.stdin.read()
    os._exit(0)  # gone without releasing, like a killed container
    """
)


def test_a_holder_in_another_pid_namespace_is_not_judged_dead(tmp_path: Path) -> None:
    require_root()
    unshare = require_tool("unshare")
    place = tmp_path / "shared"
    limits = LimitSet([ResourceLimit("conn", 1)], backend=ProcessBackend(place), name="s")
    holder = subprocess.Popen(
        [unshare, "--pid", "--fork", "--mount-proc", sys.executable, "-c", _HOLDER, str(place)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        ready, _w, _x = select.select([holder.stdout], [], [], 60)
        assert ready, "the holder did not start"
        said = holder.stdout.readline().split()
        assert said[0] == "held", said
        assert int(said[1]) < 10  # a pid of its namespace, which means another process here
        # While it lives, its slot is its own: every way of looking must leave it there.
        for _ in range(20):
            attempt = limits.try_acquire()
            assert not attempt.successful
            assert limits.get_stats()["limits"]["conn"]["in_use"] == 1
            assert limits.retry_after() > 0
        granted: list[float] = []

        def wait() -> None:
            with limits.acquire_sync(timeout=60):
                granted.append(time.monotonic())

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.3)
        assert not granted  # still held
    finally:
        holder.stdin.close()  # the holder exits without releasing
        holder.wait(60)
        holder.stdout.close()
    # Gone: its slot is reclaimed, and the waiter granted (its listener re-checks a holder
    # of another namespace every second: it has no pidfd to sleep on).
    waiter.join(60)
    assert granted
    assert limits.get_stats()["limits"]["conn"]["in_use"] == 0
    assert limits.try_acquire().successful
