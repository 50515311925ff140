"""Real ``redis-server`` processes for the Redis tests, on free loopback ports.

A session fixture starts one server (``--save '' --appendonly no``: nothing on disk) on a free
port of 127.0.0.1 and stops it by its pid at the end; the system Redis on 6379 is never used.
Without a ``redis-server`` binary or redis-py the Redis tests skip, saying why, unless
``AIOLIMITS_REQUIRE_REDIS=1`` (set by ``.ci/run``), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import IO

import attrs
import pytest

READY = "Ready to accept connections"


def missing_reason() -> str | None:
    """Why the Redis tests cannot run here, or None when they can."""
    if shutil.which("redis-server") is None:
        return "no redis-server binary on PATH (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install 'aiolimits[redis]')"
    return None


def require_redis() -> None:
    """Skip the calling test when Redis is missing, or fail when AIOLIMITS_REQUIRE_REDIS=1."""
    reason = missing_reason()
    if reason is None:
        return
    if os.environ.get("AIOLIMITS_REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason}, and AIOLIMITS_REQUIRE_REDIS=1 requires the Redis tests to run")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _drain(stream: IO[str], lines: list[str]) -> None:
    lines.extend(stream)  # until the process closes its end


@attrs.define(eq=False)
class RedisServer:
    """One ``redis-server`` child process on 127.0.0.1."""

    port: int
    process: subprocess.Popen[str]
    log: list[str] = attrs.field(factory=list)
    drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, *extra: str, port: int | None = None) -> RedisServer:
        port = free_port() if port is None else port
        argv = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            *extra,
        ]
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        server = cls(port, process)
        # The server says when it listens: read its log up to that line (no retry loop).
        for line in process.stdout:
            server.log.append(line)
            if READY in line:
                break
        else:
            process.wait()
            raise RuntimeError(f"redis-server on port {port} did not start:\n{''.join(server.log)}")
        server.drain = threading.Thread(
            target=_drain, args=(process.stdout, server.log), daemon=True
        )
        server.drain.start()
        return server

    def stop(self) -> None:
        """Stop the server by its pid (SIGCONT first, in case a test left it stopped)."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait()
        if self.drain is not None:
            self.drain.join()  # the log ends when the process does
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session (tests use distinct names, so they share it)."""
    require_redis()
    server = RedisServer.start()
    try:
        yield server
    finally:
        server.stop()
