"""KeyedLimitSet on ProcessBackend: each key's limits shared exactly by every process.

Real uvicorn worker processes serve a per-IP limit together; a worker killed while holding a
key's slot loses it to nobody; the keyed contract of ``test_keyed.py`` (each key decides as its
own LimitSet, fresh keys dropped) replayed on the shared table; the table's bound, its hostile
keys and its files.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import stat
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiolimits import (
    CallLimit,
    KeyedLimitSet,
    ProcessBackend,
    RateLimit,
    RateLimitAlgorithm,
    ResourceLimit,
)
from aiolimits._limits import Limit
from aiolimits.testing import ManualClock

from . import _process_keyed_app as app
from .test_keyed import FIRST, SECOND, replay

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
            max_keys=3,
            backend=ProcessBackend(directory),
            name=uuid.uuid4().hex,
            clock=clock,
        )

    return make


def test_the_model_replays_agree_on_the_process_backend(tmp_path: Path) -> None:
    for spec, ops, start in (FIRST, SECOND):
        replay(spec, ops, start, make_keyed=_process_keyed(tmp_path))
