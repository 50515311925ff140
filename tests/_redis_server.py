"""Real ``redis-server`` processes for the Redis tests, on free loopback ports.

A session fixture starts one server (``--save '' --appendonly no``: nothing on disk) on a free
port of 127.0.0.1 and stops it by its pid at the end; the system Redis on 6379 is never used.
Without a ``redis-server`` binary or redis-py the Redis tests skip, saying why, unless
``AIOLIMITS_REQUIRE_REDIS=1`` (set by ``.ci/run``), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
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


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _attempt in range(100):
        port = random.randrange(20_000, 40_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a Cluster node")


@attrs.define(eq=False)
class RedisClusterNodes:
    """Three masters on 127.0.0.1 forming one Cluster (no replicas)."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @classmethod
    def start(cls, directory: str) -> RedisClusterNodes:
        nodes: list[RedisServer] = []
        try:
            # One at a time, so that a failure leaves the ones started in the list to stop.
            nodes.extend(
                RedisServer.start(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{i}.conf",
                    "--dir",
                    directory,
                    port=free_cluster_port(),
                )
                for i in range(3)
            )
            addresses = [f"127.0.0.1:{node.port}" for node in nodes]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            # `--cluster create` returns once the slots are assigned and the nodes have met;
            # each node declares the cluster ok after its next gossip round (bounded wait).
            for node in nodes:
                cls._wait_ok(node.port)
        except BaseException:
            for node in nodes:
                node.stop()
            raise
        return cls(nodes)

    @staticmethod
    def _wait_ok(port: int) -> None:
        for _attempt in range(200):
            out = subprocess.run(
                ["redis-cli", "-p", str(port), "cluster", "info"],
                check=True,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            if "cluster_state:ok" in out:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the Cluster node on port {port} never reported cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """A 3-master Redis Cluster for the session, on free loopback ports."""
    require_redis()
    if shutil.which("redis-cli") is None:
        reason = "no redis-cli binary on PATH (apt-get install redis-tools)"
        if os.environ.get("AIOLIMITS_REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason}, and AIOLIMITS_REQUIRE_REDIS=1 requires the Redis tests to run")
        pytest.skip(reason)
    cluster = RedisClusterNodes.start(str(tmp_path_factory.mktemp("redis-cluster")))
    try:
        yield cluster
    finally:
        cluster.stop()
