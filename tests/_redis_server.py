"""Real ``redis-server`` processes for the Redis tests, on free loopback ports.

A session fixture starts one server (``--save '' --appendonly no``: nothing on disk) on a free
port of 127.0.0.1 and stops it by its pid at the end; the system Redis on 6379 is never used.
Without a ``redis-server`` binary or redis-py the Redis tests skip, saying why, unless
``AIOLIMITS_REQUIRE_REDIS=1`` (set by ``.ci/run``), which turns the skip into a failure.
"""

from __future__ import annotations

import gc
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
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


def cli(port: int, *args: str) -> str:
    """One ``redis-cli`` command to the node on ``port`` (a test helper, not the library)."""
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout


def _fields(text: str) -> dict[str, str]:
    """The ``key:value`` lines of an INFO or CLUSTER INFO reply."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def require_redis_cli() -> None:
    """As :func:`require_redis`, for the ``redis-cli`` that builds a Cluster."""
    require_redis()
    if shutil.which("redis-cli") is None:
        reason = "no redis-cli binary on PATH (apt-get install redis-tools)"
        if os.environ.get("AIOLIMITS_REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason}, and AIOLIMITS_REQUIRE_REDIS=1 requires the Redis tests to run")
        pytest.skip(reason)


def start_cluster_nodes(
    directory: str, count: int, replicas: int, *options: str
) -> list[RedisServer]:
    """``count`` Cluster nodes on free loopback ports, made into one Cluster with ``replicas``
    replicas per master. A failure stops the nodes already started."""
    nodes: list[RedisServer] = []
    try:
        # One at a time, so that a failure leaves the ones started in the list to stop.
        nodes.extend(
            RedisServer.start(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{i}.conf",
                *options,
                "--dir",
                directory,
                port=free_cluster_port(),
            )
            for i in range(count)
        )
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        per_master = ["--cluster-replicas", str(replicas)]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, *per_master, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


@attrs.define(eq=False)
class RedisClusterNodes:
    """Three masters on 127.0.0.1 forming one Cluster (no replicas)."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @classmethod
    def start(cls, directory: str) -> RedisClusterNodes:
        cluster = cls(start_cluster_nodes(directory, 3, 0))
        try:
            # `--cluster create` returns once the slots are assigned and the nodes have met;
            # each node declares the cluster ok after its next gossip round (bounded wait).
            for node in cluster.nodes:
                cls._wait_ok(node.port)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @staticmethod
    def _wait_ok(port: int) -> None:
        for _attempt in range(200):
            if "cluster_state:ok" in cli(port, "cluster", "info"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the Cluster node on port {port} never reported cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """A 3-master Redis Cluster for the session, on free loopback ports."""
    require_redis_cli()
    cluster = RedisClusterNodes.start(str(tmp_path_factory.mktemp("redis-cluster")))
    try:
        yield cluster
    finally:
        cluster.stop()


@attrs.define(eq=False)
class RedisFailoverCluster(RedisClusterNodes):
    """Three masters with one replica each on 127.0.0.1 (``cluster-node-timeout`` 1000 ms), for
    tests that kill a master and wait for its replica to take over. Every node is stopped by its
    pid at the end (a killed one is already gone)."""

    @classmethod
    def start(cls, directory: str) -> RedisFailoverCluster:
        cluster = cls(
            start_cluster_nodes(
                directory,
                6,
                1,
                "--cluster-node-timeout",
                "1000",
                "--repl-diskless-sync-delay",
                "0",
                "--cluster-replica-validity-factor",
                "0",
            )
        )
        try:
            cluster.wait_converged()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def alive(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process.poll() is None]

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def master_of(self, key: str) -> RedisServer:
        """The node that serves ``key`` now, as the first live node that answers says."""
        slot = cli(self.alive()[0].port, "cluster", "keyslot", key).strip()
        for line in cli(self.alive()[0].port, "cluster", "nodes").splitlines():
            parts = line.split()
            flags = parts[2].split(",")
            if "master" not in flags or "fail" in flags:
                continue
            for assigned in parts[8:]:
                low, _, high = assigned.partition("-")
                if not low.isdigit():
                    continue  # a slot being migrated: none in these tests
                if int(low) <= int(slot) <= int(high or low):
                    return self.node(int(parts[1].split("@")[0].rpartition(":")[2]))
        raise LookupError(f"no live master serves the slot of {key!r}")

    def replica_of(self, master: RedisServer) -> RedisServer:
        node_id = cli(master.port, "cluster", "myid").strip()
        for line in cli(master.port, "cluster", "nodes").splitlines():
            parts = line.split()
            if parts[3] == node_id:
                return self.node(int(parts[1].split("@")[0].rpartition(":")[2]))
        raise LookupError(f"the master on port {master.port} has no replica")

    def wait_replicated(self, master: RedisServer) -> None:
        """Until the replicas of ``master`` have processed everything it has written (its
        replication offset), so that no write it acknowledged is missing from them."""
        for _attempt in range(400):
            info = _fields(cli(master.port, "info", "replication"))
            offset = info["master_repl_offset"]
            replicas = [v for k, v in info.items() if k.startswith("slave")]
            if replicas and all(f"offset={offset}," in v for v in replicas):
                return
            time.sleep(0.025)
        raise RuntimeError(f"the replicas of port {master.port} never caught up")

    def wait_converged(self) -> None:
        """Until every live node says the cluster is ok, every replica's link to its master is
        up and every slot is served by a live master (bounded: the failure detection and
        election of a Cluster take a few node timeouts)."""
        for _attempt in range(600):
            if self._converged():
                return
            time.sleep(0.05)
        raise RuntimeError("the Cluster did not converge within 30 s")

    def _converged(self) -> bool:
        for node in self.alive():
            if _fields(cli(node.port, "cluster", "info")).get("cluster_state") != "ok":
                return False
            info = _fields(cli(node.port, "info", "replication"))
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
            for line in cli(node.port, "cluster", "nodes").splitlines():
                flags = line.split()[2].split(",")
                if "fail?" in flags or ("master" in flags and "fail" in flags and line.split()[8:]):
                    return False
        return True


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server of this test's own, which the test may stop, kill, restart, or count the
    connections of."""
    require_redis()
    server = RedisServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_failover_cluster(tmp_path: pathlib.Path) -> Iterator[RedisFailoverCluster]:
    """A Cluster of 3 masters with 1 replica each, of this test's own (it may kill nodes).

    At the end it also collects what redis-py dropped without closing: when its Cluster client
    reads the topology again (after a failover), it replaces its node objects, and the old
    nodes' pooled connections are left to the garbage collector, which warns about their open
    sockets. Collected here, ignoring those warnings, so that they cannot surface in a later
    test (or fail the run at exit)."""
    require_redis_cli()
    cluster = RedisFailoverCluster.start(str(tmp_path))
    try:
        yield cluster
    finally:
        cluster.stop()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def wait_reachable(backend: object, timeout: float = 30.0) -> None:
    """Wait until ``backend`` (a RedisBackend) found Redis back after a fault: its probe closed
    the circuit, so that calls go to Redis again (an event, not a poll)."""
    circuit = backend._circuit  # type: ignore[attr-defined]
    assert circuit.reachable.wait(timeout), f"Redis was not found back within {timeout}s"
