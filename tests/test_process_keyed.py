"""KeyedLimitSet on ProcessBackend: each key's limits shared exactly by every process.

Real uvicorn worker processes serve a per-IP limit together; a worker killed while holding a
key's slot loses it to nobody; the keyed contract of ``test_keyed.py`` (each key decides as its
own LimitSet, fresh keys dropped) replayed on the shared table; the table's bound, its hostile
keys and its files.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import socket
import stat
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import Phase, given, settings

from aiolimits import (
    KeyedLimitSet,
    LimitSet,
    ProcessBackend,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)
from aiolimits._backends._process_file import StateFileError
from aiolimits._backends._process_keyed import KeyedTable, ProcessKeys
from aiolimits._limits import Limit
from aiolimits.testing import ManualClock

from . import _process_keyed_app as app
from .contract._support import eventually, settle
from .test_keyed import _LIMIT_SPECS, _OPS, FIRST, KEYS, SECOND, AnyioBackend, Spec, replay

_spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def backend(tmp_path: Path) -> ProcessBackend:
    return ProcessBackend(tmp_path)


def _listening() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class _Workers:
    """Two uvicorn worker processes, each on a socket of its own (listening before it starts,
    so requests queue in the kernel until it accepts them)."""

    def __init__(self, location: str) -> None:
        self.socks = [_listening(), _listening()]
        self.urls = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in self.socks]
        self.procs = [
            _spawn.Process(target=app.serve, args=(sock, location), daemon=True)
            for sock in self.socks
        ]
        for proc in self.procs:
            proc.start()

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.join(10)
        for sock in self.socks:
            sock.close()


@pytest.fixture
def workers(tmp_path: Path) -> Any:
    found = _Workers(str(tmp_path))
    yield found
    found.close()


def test_two_uvicorn_workers_admit_exactly_the_per_ip_limit(workers: _Workers) -> None:
    with httpx.Client(timeout=60) as client:
        answers = [client.get(workers.urls[i % 2] + "/") for i in range(4 * app.PER_IP)]
    admitted = [r for r in answers if r.status_code == 200]
    assert len(admitted) == app.PER_IP
    assert {r.status_code for r in answers} == {200, 429}
    assert len({r.text for r in admitted}) == 2  # both workers admitted some


def test_a_worker_killed_holding_a_keys_slot_loses_nothing(workers: _Workers) -> None:
    with httpx.Client(timeout=60) as client:
        client_a = {"x-client": "a"}
        assert client.get(workers.urls[0] + "/hold", headers=client_a).status_code == 200
        assert client.get(workers.urls[1] + "/try", headers=client_a).status_code == 409
        assert client.get(workers.urls[1] + "/try", headers={"x-client": "b"}).status_code == 200
        workers.procs[0].kill()
        workers.procs[0].join(10)
        # The dead worker's slot is reclaimed when the key is found full.
        assert client.get(workers.urls[1] + "/try", headers=client_a).status_code == 200
        assert client.get(workers.urls[1] + "/hold", headers=client_a).status_code == 200
        assert client.get(workers.urls[1] + "/try", headers=client_a).status_code == 409


# -- the keyed contract, on the shared table -----------------------------------------------------


def _process_keyed(directory: Path) -> Any:
    def make(limits: list[Limit], clock: ManualClock) -> KeyedLimitSet:
        return KeyedLimitSet(
            limits,
            max_keys=len(KEYS),  # never reached: only fresh keys are removed
            backend=ProcessBackend(directory),
            name=uuid.uuid4().hex,
            clock=clock,
        )

    return make


def test_the_model_replays_agree_on_the_process_backend(tmp_path: Path) -> None:
    for spec, ops, start in (FIRST, SECOND):
        replay(spec, ops, start, make_keyed=_process_keyed(tmp_path))


@settings(max_examples=15, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(spec=_LIMIT_SPECS, ops=_OPS)
def test_each_key_on_the_process_backend_decides_as_its_own_limitset(
    tmp_path_factory: pytest.TempPathFactory, spec: Spec, ops: list[int]
) -> None:
    replay(spec, ops, 5.5, make_keyed=_process_keyed(tmp_path_factory.mktemp("replay")))


async def test_one_keys_waiters_never_delay_another_across_two_sets(
    anyio_backend: AnyioBackend, tmp_path: Path
) -> None:
    clock = ManualClock()
    limits = [RateLimit("tokens", window_seconds=20, capacity=2)]  # a token per 10 s
    one, two = (
        KeyedLimitSet(limits, backend=ProcessBackend(tmp_path), name="iso", clock=clock)
        for _ in range(2)
    )
    assert one.try_acquire("a", {"tokens": 2}).successful
    order: list[tuple[str, float]] = []

    async def run(keyed: KeyedLimitSet, name: str) -> None:
        async with keyed.acquire("a", {"tokens": 1}):
            order.append((name, clock()))

    async with anyio.create_task_group() as tg:
        for name, keyed in (("a1", one), ("a2", two), ("a3", one)):
            tg.start_soon(run, keyed, name)
            await settle()
        assert two.get_stats("a")["waiting"] == 3
        assert not two.try_acquire("a", {"tokens": 1}).successful  # no barging past them
        assert two.retry_after("b", {"tokens": 1}) == 0.0
        with anyio.fail_after(5):
            async with two.acquire("b", {"tokens": 1}) as acq:
                assert acq.waited == 0.0
        for granted in range(1, 4):
            clock.advance(10.0)
            await eventually(partial(lambda n: len(order) == n, granted))
    assert order == [("a1", 10.0), ("a2", 20.0), ("a3", 30.0)]


async def test_a_release_in_one_set_admits_a_keys_waiter_in_another(
    anyio_backend: AnyioBackend, tmp_path: Path
) -> None:
    one, two = (_slots(ProcessBackend(tmp_path), "handover") for _ in range(2))
    holder = one.try_acquire("a", {"conn": 1})
    assert holder.successful
    granted: list[bool] = []

    async def wait() -> None:
        async with two.acquire("a", {"conn": 1}, timeout=30) as acq:
            granted.append(acq.successful)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await eventually(lambda: one.get_stats("a")["waiting"] == 1)
        assert one.retry_after("a", {"conn": 1}) == math.inf
        assert two.try_acquire("b", {"conn": 1}).successful  # another key is free
        holder.release()
    assert granted == [True]
    assert _table(one).live_keys() == 1  # "b", never released (an acquisition dropped)


def _table(keyed: KeyedLimitSet) -> KeyedTable:
    assert isinstance(keyed._shared, ProcessKeys)
    return keyed._shared.table


def _start(target: Any, *args: Any) -> Any:
    proc = _spawn.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _until(predicate: Any) -> None:
    """Wait (test-side only) until another process has done what ``predicate`` checks."""
    deadline = time.monotonic() + 60
    while not predicate():
        assert time.monotonic() < deadline, "the other process did not get there"
        time.sleep(0.005)


def _slots(backend: ProcessBackend, name: str, capacity: int = 1) -> KeyedLimitSet:
    return KeyedLimitSet([ResourceLimit("conn", capacity=capacity)], backend=backend, name=name)


def test_a_keys_waiters_in_two_processes_are_served_in_arrival_order(
    backend: ProcessBackend,
) -> None:
    keyed = _slots(backend, "fifo")
    held = keyed.try_acquire("k", {"conn": 1})
    assert held.successful
    other = keyed.try_acquire("other", {"conn": 1})  # another key is not behind them
    assert other.successful
    other.release()
    events, release = _spawn.Queue(), _spawn.Event()
    proc = _start(app.queue_then_report, keyed, "k", events, release)
    _until(lambda: keyed.get_stats("k")["waiting"] == 1)  # the child is queued first

    def second() -> None:
        with keyed.acquire_sync("k", {"conn": 1}, timeout=60):
            events.put("parent")

    thread = threading.Thread(target=second)
    thread.start()
    _until(lambda: keyed.get_stats("k")["waiting"] == 2)
    assert not keyed.try_acquire("k", {"conn": 1}).successful  # no barging past them
    held.release()  # wakes the child's waiter, in the other process
    assert events.get(timeout=60) == "child"
    release.set()
    assert events.get(timeout=60) == "parent"
    thread.join(60)
    proc.join(60)
    assert proc.exitcode == 0
    assert _table(keyed).live_keys() == 0  # every key fresh again: gone from the table


def test_many_handovers_of_one_key_between_processes_all_complete(
    backend: ProcessBackend,
) -> None:
    keyed = _slots(backend, "pingpong")
    out = _spawn.Queue()
    procs = [_start(app.ping_pong, keyed, "k", 40, out) for _ in range(2)]
    app.ping_pong(keyed, "k", 40, out)
    assert [out.get(timeout=100) for _ in range(3)] == [40, 40, 40]
    for proc in procs:
        proc.join(10)
    assert keyed.get_stats("k")["limits"]["conn"]["in_use"] == 0


def test_a_refund_in_one_process_wakes_a_keys_waiter_in_another(backend: ProcessBackend) -> None:
    keyed = KeyedLimitSet(
        [RateLimit("r", window_seconds=3600, capacity=4)], backend=backend, name="refund"
    )
    held = keyed.try_acquire("k", {"r": 4})
    assert held.successful
    events = _spawn.Queue()
    proc = _start(app.wait_for_tokens, keyed, "k", events)
    _until(lambda: keyed.get_stats("k")["waiting"] == 1)
    held.update({"r": 3})  # one token back: the waiter, which would sleep ~15 min, is told
    assert events.get(timeout=60) == "granted"
    proc.join(10)
    stats = keyed.get_stats("k")
    assert stats["refunded"] == 1
    assert stats["granted"] == 2


def test_a_process_killed_inside_a_keys_lock_blocks_nobody(backend: ProcessBackend) -> None:
    keyed = _slots(backend, "crash-lock")
    ready = _spawn.Event()
    proc = _start(app.hold_lock_forever, keyed, "k", ready)
    assert ready.wait(60)
    proc.kill()
    proc.join(10)
    with keyed.try_acquire("k", {"conn": 1}) as acq:
        assert acq.successful


def test_a_pause_of_one_key_is_shared(backend: ProcessBackend) -> None:
    limits = [RateLimit("r", window_seconds=3600, capacity=4)]
    one = KeyedLimitSet(limits, backend=backend, name="pause")
    two = KeyedLimitSet(limits, backend=backend, name="pause")
    one.pause(3600, key="k")
    assert not two.try_acquire("k", {"r": 1}).successful
    assert two.try_acquire("j", {"r": 1}).successful
    assert two.get_stats("k")["paused_for"] > 3000


@pytest.mark.parametrize("algorithm", list(RateLimitAlgorithm))
def test_two_sets_on_one_name_share_every_algorithm_per_key(
    backend: ProcessBackend, algorithm: RateLimitAlgorithm
) -> None:
    clock = ManualClock(0.0)
    limits = [RateLimit("r", window_seconds=60, capacity=8, algorithm=algorithm)]
    sets = [KeyedLimitSet(limits, backend=backend, name="share", clock=clock) for _ in range(2)]
    model = {key: LimitSet(limits, clock=clock) for key in ("a", "b", "c")}
    admitted = 0
    for i in range(120):
        key = "abc"[i % 3]
        mine = sets[i % 2].try_acquire(key, {"r": 1 + i % 2})
        assert mine.successful == model[key].try_acquire({"r": 1 + i % 2}).successful
        admitted += mine.successful
        clock.advance(0.5)
    assert 0 < admitted < 120


def test_a_long_log_outgrows_its_record_and_stays_shared(backend: ProcessBackend) -> None:
    clock = ManualClock(0.0)
    limits = [RateLimit("r", window_seconds=10, capacity=60, algorithm="sliding_window")]
    one = KeyedLimitSet(limits, backend=backend, name="log", clock=clock)
    for _ in range(50):
        assert one.try_acquire("k", {"r": 1}).successful
        clock.advance(0.01)
    spill = [p for p in os.listdir(backend.directory) if p.endswith(".ov")]
    assert len(spill) == 1
    assert stat.S_IMODE(os.stat(backend.directory / spill[0]).st_mode) == 0o600
    assert one.get_stats("k")["limits"]["r"]["available"] == 10
    proxy = one._proxies.pop("k")  # a new proxy reads it back from the file
    assert proxy.sched.idle()
    assert one.get_stats("k")["limits"]["r"]["available"] == 10
    assert sum(one.try_acquire("k", {"r": 1}).successful for _ in range(20)) == 10
    clock.advance(20)  # fresh again: the next change removes it, and its file
    assert one.try_acquire("k", {"r": 1}).successful
    clock.advance(20)
    one.pause(0, key="k")  # a change: the key is fresh, so it goes
    assert [p for p in os.listdir(backend.directory) if p.endswith(".ov")] == []
    assert _table(one).live_keys() == 0


# -- the bound, keys and files -------------------------------------------------------------------


def test_at_max_keys_a_new_key_forgets_an_unused_idle_key_never_a_held_one(
    backend: ProcessBackend,
) -> None:
    limits: list[Limit] = [RateLimit("r", 3600, 2), ResourceLimit("conn", capacity=1)]
    keyed = KeyedLimitSet(limits, max_keys=2, backend=backend, name="bound")
    table = _table(keyed)
    table.geo.shards = 1  # every key in one shard, so that the sweep meets them all
    held = keyed.try_acquire("held", {"conn": 1})
    assert held.successful
    assert keyed.try_acquire("a", {"r": 2, "conn": 0}).successful
    assert table.live_keys() == 2
    assert keyed.try_acquire("b", {"r": 2, "conn": 0}).successful  # at the bound: "a" is forgotten
    assert table.live_keys() == 2
    assert keyed.try_acquire("a", {"r": 2, "conn": 0}).successful  # back from full limits; "b" goes
    assert table.live_keys() == 2
    assert keyed.get_stats("held")["limits"]["conn"]["in_use"] == 1
    assert not keyed.try_acquire("held", {"conn": 1}).successful


@pytest.mark.parametrize(
    "key", ["x" * 1_000_000, "../../etc/passwd", "a/b", "nul\0byte", "\ud800lone", "", "é"]
)
def test_hostile_keys_stay_in_the_table(backend: ProcessBackend, key: str) -> None:
    limits = [RateLimit("r", window_seconds=3600, capacity=1)]
    one = KeyedLimitSet(limits, backend=backend, name="hostile")
    two = KeyedLimitSet(limits, backend=backend, name="hostile")
    assert one.try_acquire(key, {"r": 1}).successful
    assert not two.try_acquire(key, {"r": 1}).successful
    assert two.try_acquire(key[:-1] + "!", {"r": 1}).successful
    assert sorted(p for p in os.listdir(backend.directory) if not p.startswith(".")) == [
        "hostile.keyed"
    ]
    assert stat.S_IMODE(os.stat(backend.directory / "hostile.keyed").st_mode) == 0o600


def test_other_limits_clock_or_max_keys_are_refused(backend: ProcessBackend) -> None:
    limits = [RateLimit("r", window_seconds=60, capacity=5)]
    KeyedLimitSet(limits, backend=backend, name="decl")
    with pytest.raises(ValueError, match=r"'decl'.*capacity"):
        KeyedLimitSet([RateLimit("r", 60, 6)], backend=backend, name="decl")
    with pytest.raises(ValueError, match=r"max_keys=100000, not 10\b"):
        KeyedLimitSet(limits, max_keys=10, backend=backend, name="decl")
    with pytest.raises(ValueError, match="another clock"):
        KeyedLimitSet(limits, backend=backend, name="decl", clock=ManualClock())
    with pytest.raises(ValueError, match="name is required with ProcessBackend"):
        KeyedLimitSet(limits, backend=backend)


def test_a_symlink_or_a_foreign_file_is_refused(backend: ProcessBackend, tmp_path: Path) -> None:
    limits = [RateLimit("r", window_seconds=60, capacity=5)]
    backend.directory.mkdir(exist_ok=True)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, backend.directory / "link.keyed")
    with pytest.raises(ValueError, match="symlink"):
        KeyedLimitSet(limits, backend=backend, name="link")
    foreign = backend.directory / "foreign.keyed"
    foreign.write_bytes(b"not a table")
    foreign.chmod(0o600)
    with pytest.raises(ValueError, match="not an aiolimits keyed state file"):
        KeyedLimitSet(limits, backend=backend, name="foreign")
    foreign.chmod(0o644)
    with pytest.raises(ValueError, match="0600"):
        KeyedLimitSet(limits, backend=backend, name="foreign")


def test_threads_of_two_sets_never_hold_more_of_a_key_than_its_capacity(
    backend: ProcessBackend,
) -> None:
    sets = [_slots(backend, "threads", capacity=2) for _ in range(2)]
    inside = dict.fromkeys(("a", "b"), 0)
    peak = dict.fromkeys(("a", "b"), 0)
    guard = threading.Lock()

    def work(worker: int) -> None:
        keyed = sets[worker % 2]
        for i in range(60):
            key = "ab"[(worker + i) % 2]
            with keyed.acquire_sync(key, {"conn": 1}, timeout=60):
                with guard:
                    inside[key] += 1
                    peak[key] = max(peak[key], inside[key])
                with guard:
                    inside[key] -= 1

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert max(peak.values()) <= 2
    assert sum(s.get_stats(k)["granted"] for s in sets[:1] for k in "ab") == 0  # all fresh
    assert _table(sets[0]).live_keys() == 0


def test_the_guides_keyed_example_shares_each_client_between_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "aiolimits._backends.process.runtime_directory", lambda: tmp_path / "aiolimits"
    )
    guide = (Path(__file__).parent.parent / "docs" / "process-backend.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", guide, re.DOTALL) if "Keyed" in b)
    workers: list[dict[str, Any]] = [{}, {}]
    for namespace in workers:
        exec(compile(block, "docs/process-backend.md", "exec"), namespace)  # one per "worker"
    admitted = [workers[i % 2]["per_client"].try_acquire("1.2.3.4").successful for i in range(10)]
    assert admitted == [True] * 5 + [False] * 5
    assert (tmp_path / "aiolimits" / "myapp" / "per-client.keyed").exists()


def test_damaged_changes_in_the_header_are_an_error_not_other_limits(
    backend: ProcessBackend,
) -> None:
    keyed = KeyedLimitSet([RateLimit("r", 60, 5)], backend=backend, name="hdr")
    keyed.change_limit("r", capacity=3)
    assert keyed.try_acquire("a", {"r": 1}).successful
    path = backend.directory / "hdr.keyed"
    with path.open("r+b") as file:  # generation 7, and a body that fails its crc
        file.seek(512)
        file.write((7).to_bytes(8, "little") + b"\xff" * 40)
    with pytest.raises(StateFileError, match="damaged"):
        keyed.try_acquire("a", {"r": 1})
    with pytest.raises(StateFileError, match="damaged"):
        keyed.change_limit("r", capacity=4)
    assert keyed.limits == (RateLimit("r", 60, 3),)


@pytest.mark.parametrize("algorithm", [RateLimitAlgorithm.TokenBucket, RateLimitAlgorithm.GCRA])
def test_a_refund_from_an_earlier_life_of_the_key_gives_nothing(
    backend: ProcessBackend, algorithm: RateLimitAlgorithm
) -> None:
    """An acquisition held while its key went fresh (and was removed, then made again by new
    takes) refunds nothing into the key's new life, as with a dropped key in memory: its units
    were absorbed before. Its receipt's number (5) lies after every operation of the new life,
    so it used to be refunded in full, admitting more than the limit."""
    clock = ManualClock(100.0)
    limits = [RateLimit("r", capacity=5, window_seconds=2.0, algorithm=algorithm)]
    shared = KeyedLimitSet(limits, backend=backend, name=uuid.uuid4().hex, clock=clock)
    memory = KeyedLimitSet(limits, clock=clock)
    for keyed in (shared, memory):
        for _ in range(4):  # operations of the key's first life, numbered 1 to 4
            assert keyed.try_acquire("k", {"r": 1}).successful
    old = [keyed.try_acquire("k", {"r": 1}) for keyed in (shared, memory)]  # the fifth
    assert all(acq.successful for acq in old)
    clock.advance(10.0)
    for keyed in (shared, memory):
        # Written while fresh: the shared record is removed (a memory key is kept: a lone key
        # is never looked at for dropping); the next take starts the key's new life.
        assert keyed.try_acquire("k", {"r": 0}).successful
        assert keyed.try_acquire("k", {"r": 4}).successful
    for acq in old:
        acq.update({"r": 0})  # a refund of the unit taken in the key's earlier life
    assert shared.retry_after("k", {"r": 5}) == memory.retry_after("k", {"r": 5}) > 0
    assert shared.get_stats("k")["limits"]["r"]["available"] == 1.0
