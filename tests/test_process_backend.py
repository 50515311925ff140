"""The process backend: the LimitSet contract, then what only several processes can show.

Multi-process tests use ``multiprocessing`` with the spawn method: the children import this
module and attach to the same state by location and name, as independent processes would.
"""

from __future__ import annotations

import gc
import itertools
import marshal
import math
import multiprocessing
import multiprocessing.process
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import aiolimits
from aiolimits import (
    Acquisition,
    CallLimit,
    LimitSet,
    ProcessBackend,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)
from aiolimits._algorithms import TokenBucketState
from aiolimits._backends import _process_peers as peers
from aiolimits._backends._process_file import StateFile, open_directory
from aiolimits._backends._process_scheduler import ProcessScheduler
from aiolimits._backends.process import runtime_directory
from aiolimits.testing import ManualClock

from . import _process_workers as workers
from .contract import AnyLimit, LimitSetContract, MakeLimitSet, limitset_factory, settle

_names = itertools.count()


@pytest.fixture
def backend(tmp_path: Path) -> ProcessBackend:
    return ProcessBackend(tmp_path)


@pytest.fixture
def make_limitset(backend: ProcessBackend) -> MakeLimitSet:
    return limitset_factory(backend, lambda: f"set-{next(_names)}")


class TestProcessBackend(LimitSetContract):
    """Every contract test, on ProcessBackend (one process: the shared file is still used)."""


# -- several processes ---------------------------------------------------------------------

_spawn = multiprocessing.get_context("spawn")


def _start(target: Callable[..., None], *args: Any) -> multiprocessing.process.BaseProcess:
    proc = _spawn.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def test_four_processes_never_exceed_any_limit(backend: ProcessBackend) -> None:
    limits = LimitSet(workers.HAMMER_LIMITS, backend=backend, name="hammer")
    inside, peak = _spawn.Value("i", 0), _spawn.Value("i", 0)
    out, go = _spawn.Queue(), _spawn.Event()
    # The LimitSet travels pickled: each child re-attaches to the same shared state.
    procs = [_start(workers.hammer_child, limits, inside, peak, out, go) for _ in range(3)]
    for _ in procs:
        assert out.get(timeout=60) == "ready"
    go.set()
    per_process = [workers.hammer(limits, inside, peak, threads=2, tasks=3)]
    per_process += [out.get(timeout=100) for _ in procs]
    grants = [g for grants in per_process for g in grants]
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    calls = len(grants)
    assert sum(1 for grants in per_process if grants) >= 2  # they did share the limits
    tokens = sum(g[0] for g in grants)
    gcra = sum(g[2] for g in grants)
    # Every window is an hour: over the few seconds of the test, less than one unit refills.
    assert calls <= 240
    assert tokens <= 500
    assert calls <= 180  # the sliding window log
    assert gcra <= 400
    assert calls <= 300  # the fixed window (2 h windows: at most one boundary crossed)
    assert peak.value <= 3
    # Some limit ran dry (else the test proved nothing): the sliding log is the tightest.
    assert calls == 180 or tokens > 490 or gcra > 390
    stats = limits.get_stats()
    assert stats["granted"] == calls  # the counters are shared
    assert stats["limits"]["conn"]["in_use"] == 0
    assert stats["waiting"] == 0


@pytest.mark.parametrize("pidfds", [True, False], ids=["pidfd", "lease"])
def test_sigkill_while_holding_a_slot_does_not_leak_it(
    backend: ProcessBackend, monkeypatch: pytest.MonkeyPatch, pidfds: bool
) -> None:
    """A waiter in another process gets the slot: at once through the holder's pidfd, or within
    the lease on kernels without pidfds."""
    monkeypatch.setattr(peers, "pidfds_work", pidfds and peers.pidfds_work)
    location, name = str(backend.directory), "crash-slot"
    limits = LimitSet([ResourceLimit("conn", capacity=1)], backend=backend, name=name)
    ready = _spawn.Event()
    proc = _start(workers.hold_slot_forever, location, name, ready)
    assert ready.wait(60)
    assert not limits.try_acquire().successful
    got: list[Acquisition] = []
    waiter = threading.Thread(target=lambda: got.append(limits.acquire_sync(timeout=60)))
    waiter.start()
    proc.kill()
    proc.join(10)
    waiter.join(60)  # the listener sees the holder's pidfd close and reclaims the slot
    assert got
    assert got[0].successful
    assert limits.get_stats()["limits"]["conn"]["in_use"] == 1
    got[0].release()
    assert limits.get_stats()["limits"]["conn"]["in_use"] == 0


def test_a_full_resource_reclaims_a_dead_holders_slot_on_try_acquire(
    backend: ProcessBackend,
) -> None:
    location, name = str(backend.directory), "crash-try"
    ready = _spawn.Event()
    proc = _start(workers.hold_slot_forever, location, name, ready)
    assert ready.wait(60)
    proc.kill()
    proc.join(10)
    limits = LimitSet([ResourceLimit("conn", capacity=1)], backend=backend, name=name)
    with limits.try_acquire() as acq:
        assert acq.successful


def test_stats_and_retry_after_do_not_count_a_dead_holders_slot(
    backend: ProcessBackend,
) -> None:
    location, name = str(backend.directory), "crash-stats"
    limits = LimitSet([ResourceLimit("conn", capacity=1)], backend=backend, name=name)
    ready = _spawn.Event()
    proc = _start(workers.hold_slot_forever, location, name, ready)
    assert ready.wait(60)
    assert limits.get_stats()["limits"]["conn"]["in_use"] == 1
    assert limits.retry_after() == math.inf
    proc.kill()
    proc.join(10)
    assert limits.retry_after() == 0.0
    assert limits.get_stats()["limits"]["conn"]["in_use"] == 0


def test_sigkill_while_holding_the_lock_does_not_block_the_group(
    backend: ProcessBackend,
) -> None:
    location, name = str(backend.directory), "crash-lock"
    limits = LimitSet([ResourceLimit("conn", capacity=1)], backend=backend, name=name)
    ready = _spawn.Event()
    proc = _start(workers.hold_lock_forever, location, name, ready)
    assert ready.wait(60)
    proc.kill()
    proc.join(10)
    with limits.try_acquire() as acq:
        assert acq.successful
    assert limits.get_stats()["granted"] == 1


def test_waiters_in_two_processes_are_served_in_arrival_order(backend: ProcessBackend) -> None:
    limits = LimitSet([ResourceLimit("conn", capacity=1)], backend=backend, name="fifo")
    held = limits.try_acquire()
    assert held.successful
    events, release = _spawn.Queue(), _spawn.Event()
    proc = _start(workers.queue_then_report, limits, events, release)
    _until(lambda: limits.get_stats()["waiting"] == 1)  # the child is queued first

    def second() -> None:
        with limits.acquire_sync(timeout=60):
            events.put("parent")

    thread = threading.Thread(target=second)
    thread.start()
    _until(lambda: limits.get_stats()["waiting"] == 2)
    assert limits.get_stats()["limits"]["conn"]["waiting"] == 2
    held.release()  # wakes the child's waiter, in the other process
    assert events.get(timeout=60) == "child"
    release.set()
    assert events.get(timeout=60) == "parent"
    thread.join(60)
    proc.join(60)
    assert proc.exitcode == 0


def test_many_handovers_between_processes_all_complete(backend: ProcessBackend) -> None:
    """Each release wakes the waiter of the other process (a lost wake-up would time out)."""
    limits = LimitSet([ResourceLimit("conn", capacity=1)], backend=backend, name="pingpong")
    out = _spawn.Queue()
    procs = [_start(workers.ping_pong, limits, 60, out) for _ in range(2)]
    workers.ping_pong(limits, 60, out)
    assert [out.get(timeout=100) for _ in range(3)] == [60, 60, 60]
    for proc in procs:
        proc.join(10)
    stats = limits.get_stats()
    assert stats["granted"] == 180
    assert stats["timed_out"] == 0
    assert stats["limits"]["conn"]["in_use"] == 0


def test_a_refund_in_one_process_wakes_a_waiter_in_another(backend: ProcessBackend) -> None:
    limits = LimitSet(
        [RateLimit("r", window_seconds=3600, capacity=4)], backend=backend, name="refund"
    )
    held = limits.try_acquire({"r": 4})
    assert held.successful
    events = _spawn.Queue()
    proc = _start(workers.wait_for_tokens, limits, events)
    _until(lambda: limits.get_stats()["waiting"] == 1)
    held.update({"r": 3})  # one token back: the waiter, which would sleep ~15 min, is told
    assert events.get(timeout=60) == "granted"
    proc.join(10)
    stats = limits.get_stats()
    assert stats["refunded"] == 1
    assert stats["granted"] == 2


def test_a_first_waiter_leaving_in_one_process_lets_the_next_one_in_another_in(
    backend: ProcessBackend,
) -> None:
    limits = LimitSet(
        [RateLimit("r", window_seconds=3600, capacity=2), ResourceLimit("conn", capacity=1)],
        backend=backend,
        name="leave",
    )
    held = limits.try_acquire({"r": 0})  # the slot only
    assert held.successful
    events = _spawn.Queue()
    proc = _start(workers.wait_then_time_out, limits, events)  # first: token + slot
    _until(lambda: limits.get_stats()["waiting"] == 1)
    got: list[Acquisition] = []
    second = threading.Thread(
        target=lambda: got.append(limits.acquire_sync({"r": 1, "conn": 0}, timeout=60))
    )
    second.start()  # admissible by the limits, but queued behind the other process's waiter
    _until(lambda: limits.get_stats()["waiting"] == 2)
    assert not got
    assert events.get(timeout=60) == "timed out"
    second.join(60)  # the leaving process told ours that its waiter is now first
    assert got
    assert got[0].successful
    held.release()
    proc.join(10)
    assert limits.get_stats()["timed_out"] == 1


def test_an_arrival_does_not_pass_a_waiter_of_another_process(backend: ProcessBackend) -> None:
    limits = LimitSet(
        [RateLimit("r", window_seconds=3600, capacity=2)], backend=backend, name="nobarge"
    )
    assert limits.try_acquire({"r": 1}).successful
    events, release = _spawn.Queue(), _spawn.Event()
    # The child asks for 2 (not admissible for an hour); we then ask for 1, which is.
    proc = _start(workers.queue_for_two, limits, events)
    _until(lambda: limits.get_stats()["waiting"] == 1)
    assert not limits.try_acquire({"r": 1}).successful
    proc.kill()
    proc.join(10)
    release.set()
    # The dead waiter's ticket is dropped as soon as someone finds it in the way.
    assert limits.try_acquire({"r": 1}).successful


@pytest.mark.anyio
async def test_retry_after_behind_another_processs_waiter_is_finite(
    backend: ProcessBackend,
) -> None:
    """Two attachments stand for two processes. The second one's waiter waits behind the first
    one's (it sleeps until told, with no timer): retry_after still answers from the limits."""
    clock = ManualClock()
    limits = [RateLimit("r", window_seconds=10, capacity=2)]
    first = LimitSet(limits, backend=backend, name="retry", clock=clock)
    second = LimitSet(limits, backend=backend, name="retry", clock=clock)
    assert first.try_acquire({"r": 2}).successful
    async with anyio.create_task_group() as tg:
        tg.start_soon(_acquire_quietly, first, {"r": 1})
        await settle()
        tg.start_soon(_acquire_quietly, second, {"r": 1})
        await settle()
        assert second.get_stats()["waiting"] == 2
        # Each counts the waiter queued in its own process (the other's is not: a lower bound).
        assert first.retry_after({"r": 1}) == 10.0
        assert second.retry_after({"r": 1}) == 10.0
        tg.cancel_scope.cancel()


async def _acquire_quietly(limits: LimitSet, requested: Mapping[str, float]) -> None:
    async with limits.acquire(requested):
        pass


@pytest.mark.parametrize(
    ("other", "says"),
    [
        (
            [CallLimit(window_seconds=60, capacity=11)],
            "CallLimit(window_seconds=60, capacity=11, algorithm='token_bucket') where it has "
            "CallLimit(window_seconds=60, capacity=10, algorithm='token_bucket')",
        ),
        (
            [CallLimit(window_seconds=60, capacity=10), ResourceLimit("conn", capacity=2)],
            "extra ResourceLimit('conn', capacity=2)",
        ),
        ([], "missing CallLimit(window_seconds=60, capacity=10, algorithm='token_bucket')"),
    ],
)
def test_a_process_declaring_other_limits_is_rejected(
    backend: ProcessBackend, other: list[AnyLimit], says: str
) -> None:
    LimitSet([CallLimit(window_seconds=60, capacity=10)], backend=backend, name="decl")
    out = _spawn.Queue()
    proc = _start(workers.attach_with, str(backend.directory), "decl", other, out)
    message = out.get(timeout=60)
    proc.join(10)
    assert message is not None
    assert "'decl' was created with other limits" in message
    assert says in message


def _until(predicate: Callable[[], bool]) -> None:
    """Wait (test-side only) until another process has done what ``predicate`` checks."""
    deadline = time.monotonic() + 60
    while not predicate():
        assert time.monotonic() < deadline, "the other process did not get there"
        time.sleep(0.005)


# -- several attachments in one process: the shared state against the memory backend ---------

_MIRROR_LIMITS = (
    CallLimit(window_seconds=4, capacity=6),
    RateLimit("tb", window_seconds=8, capacity=10),
    RateLimit("gcra", window_seconds=8, capacity=10, algorithm="gcra"),
    RateLimit("leaky", window_seconds=8, capacity=10, algorithm="leaky_bucket"),
    RateLimit("sw", window_seconds=8, capacity=10, algorithm="sliding_window"),
    RateLimit("fw", window_seconds=8, capacity=10, algorithm="fixed_window"),
    ResourceLimit("conn", capacity=3),
)
_KEYS = ("tb", "gcra", "leaky", "sw", "fw")

_step = st.tuples(
    st.integers(0, 2),  # which attachment acts
    st.sampled_from(["take", "take", "update", "release", "pause"]),
    st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]),  # clock advance before it
    st.lists(st.integers(0, 4), min_size=6, max_size=6),  # amounts (or usage), conn last
    st.integers(0, 1000),  # which held acquisition
)


@settings(max_examples=max(50, settings().max_examples // 10))
@given(steps=st.lists(_step, max_size=60))
# Take in one attachment, write from another, then refund in the first (reloaded meanwhile).
@example(
    steps=[
        (0, "take", 0, [0, 0, 0, 4, 0, 0], 0),
        (1, "take", 0, [0, 0, 0, 1, 0, 0], 0),
        (0, "update", 0, [0, 0, 0, 1, 0, 0], 0),
    ]
)
@example(
    steps=[
        (0, "take", 0, [0, 0, 4, 0, 0, 0], 0),
        (1, "take", 0, [0, 0, 1, 0, 0, 0], 0),
        (0, "update", 0.25, [0, 0, 1, 0, 0, 0], 0),
        (2, "take", 0, [0, 0, 1, 0, 0, 0], 0),
    ]
)
def test_attachments_decide_exactly_like_one_memory_set(
    tmp_path_factory: pytest.TempPathFactory, steps: list[Any]
) -> None:
    """Three attachments to one shared state, used in turns, make the very decisions (to the
    float) that one in-memory set makes for the same calls: every reload restores the state
    exactly, and refunds reach the entries their receipts name."""
    backend = ProcessBackend(tmp_path_factory.mktemp("mirror"))
    name = f"mirror-{next(_names)}"
    shared_clock, memory_clock = ManualClock(100.0), ManualClock(100.0)
    shared = [
        LimitSet(_MIRROR_LIMITS, backend=backend, name=name, clock=shared_clock) for _ in range(3)
    ]
    memory = LimitSet(_MIRROR_LIMITS, clock=memory_clock)
    held: list[tuple[int, Acquisition, Acquisition]] = []
    for who, kind, dt, amounts, pick in steps:
        shared_clock.advance(dt)
        memory_clock.advance(dt)
        if kind == "take":
            requested = dict(zip((*_KEYS, "conn"), amounts, strict=True))
            requested["conn"] = min(requested["conn"], 1)
            a, b = shared[who].try_acquire(requested), memory.try_acquire(requested)
            assert a.successful == b.successful
            if a.successful:
                held.append((who, a, b))
        elif kind == "pause":
            shared[who].pause(amounts[0] / 4)
            memory.pause(amounts[0] / 4)
        elif held:
            i, a, b = held[pick % len(held)]
            if kind == "update":
                usage = dict(zip(_KEYS, amounts[:5], strict=True))
                a.update(usage)
                b.update(usage)
            else:
                held.remove((i, a, b))
                a.release()
                b.release()
        assert shared[(who + 1) % 3].get_stats() == memory.get_stats()
    for _who, a, b in held:
        a.release()
        b.release()
    assert shared[0].get_stats() == memory.get_stats()


# -- the state file --------------------------------------------------------------------------


def _state_file(directory: Path, name: str = "s.limits") -> StateFile:
    return StateFile(open_directory(str(directory)), name, str(directory / name))


def test_state_file_keeps_the_last_intact_copy_when_a_write_is_torn(tmp_path: Path) -> None:
    path = str(tmp_path / "s.limits")
    f = _state_file(tmp_path)
    f.write(b"one")
    f.write(b"two" * 5000)  # grows into a new region
    f.write(b"three")
    assert f.read() == (b"three", True)
    # A writer killed after the slot's fields but before their crc: that slot is ignored.
    with open(path, "r+b") as raw:
        raw.seek((64, 128)[f._newest] + 36)
        raw.write(b"\0\0\0\0")
    assert _state_file(tmp_path).read() == (b"two" * 5000, True)
    # A writer killed in the middle of the data: the crc of the data catches it.
    g = _state_file(tmp_path)
    assert g.read() == (b"two" * 5000, True)
    g.write(b"four")
    assert g.read() == (b"four", True)
    slot = g._fields[g._newest]
    assert slot is not None
    with open(path, "r+b") as raw:
        raw.seek(slot[1])
        raw.write(b"XX")
    assert _state_file(tmp_path).read() == (b"two" * 5000, True)
    f.close()
    g.close()


def test_a_file_that_is_not_a_state_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.limits"
    path.write_bytes(b"hello" * 1000)
    path.chmod(0o600)
    with pytest.raises(ValueError, match="not an aiolimits state file"):
        _state_file(tmp_path, "other.limits")
    assert path.read_bytes() == b"hello" * 1000  # untouched


def test_state_from_a_previous_boot_is_replaced(backend: ProcessBackend) -> None:
    limits = LimitSet([ResourceLimit("conn", capacity=1)], backend=backend, name="boot")
    held = limits.try_acquire()
    assert held.successful
    sched = limits._scheduler
    assert isinstance(sched, ProcessScheduler)
    # Rewrite the stored boot id, as if the file had survived a reboot.
    with sched.lock:
        sched._meta = ("another-boot", *sched._meta[1:])
        sched._bytes = b""
    again = LimitSet([ResourceLimit("conn", capacity=1)], backend=backend, name="boot")
    assert again.get_stats()["limits"]["conn"]["in_use"] == 0


def test_name_is_required_and_location_is_checked(backend: ProcessBackend) -> None:
    with pytest.raises(ValueError, match="name is required with ProcessBackend"):
        LimitSet([CallLimit(1, 1)], backend=backend)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        LimitSet([CallLimit(1, 1)], backend=backend, name="")
    with pytest.raises(ValueError, match="location"):
        ProcessBackend("")
    with pytest.raises(TypeError, match="location"):
        ProcessBackend(3)  # type: ignore[arg-type]


def test_a_bare_name_lives_in_the_runtime_directory() -> None:
    backend = ProcessBackend("aiolimits-test-bare")
    assert backend.directory == runtime_directory() / "aiolimits-test-bare"
    assert ProcessBackend("/tmp/x").directory == Path("/tmp/x")
    assert repr(backend) == "ProcessBackend('aiolimits-test-bare')"
    again = pickle.loads(pickle.dumps(backend))  # the resolved directory travels
    assert again == backend
    assert again.location == str(runtime_directory() / "aiolimits-test-bare")


def test_a_private_clock_cannot_be_shared_with_monotonic(backend: ProcessBackend) -> None:
    clock = ManualClock()
    LimitSet([CallLimit(1, 1)], backend=backend, name="clocked", clock=clock)
    with pytest.raises(ValueError, match="another clock"):
        LimitSet([CallLimit(1, 1)], backend=backend, name="clocked")


def test_names_are_files_whatever_they_contain(backend: ProcessBackend) -> None:
    odd = LimitSet([CallLimit(1, 1)], backend=backend, name="a/b c:%")
    long = LimitSet([CallLimit(1, 1)], backend=backend, name="x" * 500)
    assert odd.try_acquire().successful
    assert long.try_acquire().successful
    assert {p.parent for p in backend.directory.iterdir()} == {backend.directory}


# -- issue #13: spelling, relative locations, what is stored and what is read ------------------


def test_equal_limits_attach_however_spelled(backend: ProcessBackend) -> None:
    LimitSet(
        [
            CallLimit(60, 10),
            RateLimit("tokens", 60, 1000, algorithm=RateLimitAlgorithm.GCRA),
            ResourceLimit("conn", 2),
        ],
        backend=backend,
        name="spelled",
    )
    other: list[AnyLimit] = [
        CallLimit(60.0, 10.0),
        RateLimit("tokens", 60.0, 1000.0, algorithm="gcra"),
        ResourceLimit("conn", 2),
    ]
    LimitSet(other, backend=backend, name="spelled")  # no ValueError(None)
    out = _spawn.Queue()
    proc = _start(workers.attach_with, str(backend.directory), "spelled", other, out)
    assert out.get(timeout=60) is None
    proc.join(10)


def test_a_real_mismatch_says_what_differs_even_with_other_spellings(
    backend: ProcessBackend,
) -> None:
    LimitSet([CallLimit(60, 10)], backend=backend, name="differs")
    with pytest.raises(ValueError, match="created with other limits") as caught:
        LimitSet([CallLimit(60.0, 10.5)], backend=backend, name="differs")
    assert str(caught.value) == (
        "the shared state 'differs' was created with other limits: "
        "CallLimit(window_seconds=60, capacity=10.5, algorithm='token_bucket') where it has "
        "CallLimit(window_seconds=60, capacity=10, algorithm='token_bucket') "
        "(every process must declare the same limits under one name)"
    )


def test_a_relative_location_is_resolved_when_the_backend_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = ProcessBackend("./state")
    assert backend.directory == tmp_path / "state"
    limits = LimitSet([ResourceLimit("conn", 1)], backend=backend, name="rel")
    held = limits.try_acquire()
    assert held.successful
    # The pickled set, in a process with another working directory, finds the same state.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import pickle, sys\n"
        "limits = pickle.loads(sys.stdin.buffer.read())\n"
        "print(limits.try_acquire().successful, limits._scheduler._file.path)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps(limits),
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(Path(aiolimits.__file__).parents[1])},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["False", str(tmp_path / "state" / "rel.limits")]
    held.release()


def test_a_non_finite_number_is_never_written(backend: ProcessBackend) -> None:
    limits = LimitSet([RateLimit("t", 60, 100)], backend=backend, name="finite")
    assert limits.try_acquire({"t": 1}).successful
    sched = limits._scheduler
    assert isinstance(sched, ProcessScheduler)
    state = sched.states[0]
    assert isinstance(state, TokenBucketState)
    with pytest.raises(ValueError, match="refusing to store a non-finite number"), sched.lock:
        state._level = -math.inf  # what an unchecked update(usage=1e308) once left there
    # The file still holds the last finite state: another attachment, and this one, see it.
    again = LimitSet([RateLimit("t", 60, 100)], backend=backend, name="finite")
    assert 98.9 < again.get_stats()["limits"]["t"]["available"] <= 99.1
    assert 98.9 < limits.get_stats()["limits"]["t"]["available"] <= 99.1


@pytest.mark.parametrize(
    ("stored", "says"),
    [
        (marshal.dumps((3, "x")), "not a state tuple"),
        (marshal.dumps(compile("1", "x", "eval")), "not a state tuple"),
        (b"\xff\x00garbage", "not a state tuple"),
    ],
)
def test_a_stored_state_that_is_not_one_is_refused_clearly(
    tmp_path: Path, stored: bytes, says: str
) -> None:
    f = _state_file(tmp_path, "g.limits")
    f.write(stored)
    f.close()
    with pytest.raises(ValueError, match=rf"is damaged or was not written by .* \({says}\)"):
        LimitSet([CallLimit(60, 10)], backend=ProcessBackend(tmp_path), name="g")


def test_a_stored_state_with_bad_numbers_is_refused_clearly(backend: ProcessBackend) -> None:
    limits = LimitSet([CallLimit(60, 10)], backend=backend, name="bad")
    sched = limits._scheduler
    assert isinstance(sched, ProcessScheduler)
    shared = list(marshal.loads(sched._bytes))
    shared[2] = (0, 0, 0, None, [math.nan])  # a refunded tally that is not a number
    f = _state_file(backend.directory, "bad.limits")
    assert f.read()[0] == sched._bytes
    f.write(marshal.dumps(tuple(shared), 2))
    f.close()
    with pytest.raises(ValueError, match=r"is damaged .* \(bad counters\)"):
        limits.try_acquire()
    with pytest.raises(ValueError, match=r"is damaged .* \(bad counters\)"):
        LimitSet([CallLimit(60, 10)], backend=backend, name="bad")


def test_processes_creating_one_state_at_once_agree_on_one_file(tmp_path: Path) -> None:
    go, done, out = _spawn.Event(), _spawn.Event(), _spawn.Queue()
    procs = [_start(workers.race_to_create, str(tmp_path), "race", go, done, out) for _ in range(4)]
    time.sleep(0.5)  # let them all start: they attach together when told
    go.set()
    took = [out.get(timeout=60) for _ in procs]
    done.set()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert sorted(took) == [False, False, False, True]
    # One state file, and nothing left of the temporary ones each built.
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["race.limits"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".new")]


def test_a_directory_no_set_uses_is_closed_and_cleaned(tmp_path: Path) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()
    before = fds()
    for i in range(50):
        place = tmp_path / f"d{i}"
        limits = LimitSet([ResourceLimit("c", 1)], backend=ProcessBackend(place), name="x")
        held = limits.try_acquire()  # records a holder: a life file
        assert held.successful
        assert [p for p in place.iterdir() if p.name.startswith(".life-")]
        held.release()
        del limits, held
    gc.collect()
    assert fds() <= before  # other threads of the session (Ray, Redis) may close theirs meanwhile
    # Its life files went with it (and wake-up sockets, had it waited).
    assert not list(tmp_path.glob("d*/.*"))


def test_threads_making_the_life_file_and_socket_at_once_all_succeed(tmp_path: Path) -> None:
    """Two threads of one process that find no life file each used to open and flock it: the
    second flock failed (BlockingIOError) and its acquisition with it."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    found = peers.Directory(fd, str(tmp_path))
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def make() -> None:
        start.wait()
        try:
            found.keep_alive()
            found.wake_address()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len([p for p in os.listdir(tmp_path) if p.startswith(".wake-")]) == 1
    found.close_own(unlink=True)


def _counting_preads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    reads: list[tuple[int, int]] = []
    real = os.pread

    def pread(fd: int, length: int, offset: int) -> bytes:
        reads.append((length, offset))
        return real(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    return reads


def test_a_change_made_elsewhere_is_read_with_one_pread(
    backend: ProcessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two attachments of one set: `two` stands for another process.
    one = LimitSet([RateLimit("t", 60, 100), ResourceLimit("r", 3)], backend=backend, name="pr")
    two = LimitSet([RateLimit("t", 60, 100), ResourceLimit("r", 3)], backend=backend, name="pr")
    held = two.try_acquire({"t": 10})
    assert held.successful
    reads = _counting_preads(monkeypatch)
    with one.try_acquire({"t": 1}) as acq:
        assert acq.successful
        # The header page read to see whether anything changed is the page loaded: one read.
        assert reads == [(4096, 0)]
        assert one.get_stats()["limits"]["r"]["in_use"] == 2  # two's slot and this one
    reads.clear()
    assert one.get_stats()["limits"]["r"]["in_use"] == 1
    assert reads == [(4096, 0)]  # nothing changed since: the page, compared, and nothing else
    held.release()
    assert 88.9 < two.get_stats()["limits"]["t"]["available"] <= 89.1


def test_the_stored_state_is_the_marshal_of_the_whole_layout(backend: ProcessBackend) -> None:
    # The layout and declaration are encoded once and the rest appended (ProcessScheduler
    # ._prefix): what is stored is still the one marshal of the whole state tuple.
    limits = LimitSet(
        [CallLimit(60, 100), RateLimit("t", 60, 1e12), ResourceLimit("r", 3)],
        backend=backend,
        name="whole",
    )
    with limits.acquire_sync({"t": 1.5}):
        sched = limits._scheduler
        assert isinstance(sched, ProcessScheduler)
        data = sched._bytes
        f = _state_file(backend.directory, "whole.limits")
        assert f.read()[0] == data
        f.close()
        assert marshal.dumps(marshal.loads(data), 2) == data
        assert marshal.loads(data)[0] == 4


@pytest.mark.parametrize(
    "value",
    [
        (math.inf, 1.0, 0),
        (1.0, -math.inf, (3, [1], [2.0])),
        (1.0, 2.0, (3, [1], [math.nan])),
        (1.0, 2.0, (3, [1], ["x"])),
        (1.0, 2.0, "x"),
    ],
)
def test_a_stored_limit_state_with_a_bad_number_deep_inside_is_refused(
    backend: ProcessBackend, value: Any
) -> None:
    limits = LimitSet([RateLimit("t", 60, 100)], backend=backend, name="deep")
    sched = limits._scheduler
    assert isinstance(sched, ProcessScheduler)
    shared = list(marshal.loads(sched._bytes))
    shared[3] = [(100, 60, value)]
    f = _state_file(backend.directory, "deep.limits")
    f.write(marshal.dumps(tuple(shared), 2))
    f.close()
    with pytest.raises(ValueError, match=r"is damaged .* \(bad (limit states|numbers)\)"):
        limits.try_acquire({"t": 1})


def test_a_slot_whose_fields_are_unchanged_but_data_overwritten_is_not_used(
    tmp_path: Path,
) -> None:
    # A reader reuses what it parsed of a slot whose fields are byte for byte those it last
    # saw; the data's crc is still checked: the other, intact copy is taken.
    f = _state_file(tmp_path)
    f.lock()
    f.write(b"one")
    f.write(b"two")  # the other slot: both valid, "two" the newest
    assert f.read() == (b"two", True)
    os.pwrite(f.fd, b"xyz", 2080 + 40)  # the newest slot's inline data, its fields untouched
    assert f.changed()
    assert f.read() == (b"one", True)
    f.unlock()
    f.close()
