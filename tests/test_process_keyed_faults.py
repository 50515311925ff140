"""KeyedLimitSet on ProcessBackend on an unlucky machine: a full tmpfs (root: it mounts one)."""

from __future__ import annotations

from pathlib import Path

from .faults.test_process_signals import _run, small_tmpfs

__all__ = ["small_tmpfs"]  # the fixture, used below


def test_a_full_tmpfs_refuses_a_new_key_clearly_and_keeps_the_others(small_tmpfs: Path) -> None:
    done = _run(
        """
        import errno, sys
        from aiolimits import KeyedLimitSet, ProcessBackend, RateLimit
        keyed = KeyedLimitSet(
            [RateLimit("r", 3600, 10)], backend=ProcessBackend(sys.argv[1]), name="many"
        )
        for i in range(100_000):
            try:
                keyed.try_acquire(f"client-{i}", {"r": 1})
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                print("ENOSPC after", i, "keys:", exc)
                break
        else:
            raise SystemExit("never ran out of space")
        # The keys already stored keep working, with their state.
        print("client-0 has", keyed.get_stats("client-0")["limits"]["r"]["available"])
        assert keyed.try_acquire("client-0", {"r": 1}).successful
        print("still answers")
        """,
        str(small_tmpfs),
    )
    assert done.returncode == 0, done.stderr
    assert "ENOSPC after" in done.stdout
    assert "cannot reserve" in done.stdout  # the message says what failed
    assert "client-0 has 9" in done.stdout
    assert "still answers" in done.stdout
