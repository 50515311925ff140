"""RedisBackend on a 3-master Redis Cluster (started by the tests on loopback ports).

Each LimitSet is one hash whose name is a hash tag, so every call of its script touches one slot
(no CROSSSLOT); sets with different names land on different nodes. The whole LimitSet contract
runs here as on a single server, from a URL naming any one node.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from aiolimits import CallLimit, LimitSet, ResourceLimit

from ._redis_server import RedisClusterNodes, redis_cluster
from .contract import MakeLimitSet, limitset_factory
from .contract._support import background_work
from .test_redis_contract import RedisContract, watched

__all__ = ["redis_cluster"]  # the session fixture


@pytest.fixture
def make_limitset(redis_cluster: RedisClusterNodes) -> Iterator[MakeLimitSet]:
    from aiolimits.redis import RedisBackend

    backend = RedisBackend(redis_cluster.url, prefix="cluster")
    with background_work():
        yield watched(limitset_factory(backend, lambda: uuid.uuid4().hex))


class TestRedisCluster(RedisContract):
    """Every contract test, on a Redis Cluster."""

    # semantics §4 queue-aware timeouts: not yet on Redis (see QueueTimeoutContract).
    queue_forecast_missing = (
        "the Lua script decides on the state in Redis and does not forecast the queue ahead "
        "(RedisScheduler.forecasts_queue = False): a request behind others fails at its deadline"
    )


def test_sets_spread_over_the_nodes_and_survive_a_function_flush(
    redis_cluster: RedisClusterNodes,
) -> None:
    import redis
    from redis.cluster import RedisCluster

    from aiolimits.redis import RedisBackend

    backend = RedisBackend(redis_cluster.url)
    sets = [
        LimitSet(
            [CallLimit(3600, 1, "sliding_window"), ResourceLimit("c", 1)],
            backend=backend,
            name=f"s{i}",
        )
        for i in range(12)
    ]
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        owners = {client.get_node_from_key(backend.hash_key(f"s{i}")).port for i in range(12)}  # type: ignore[no-untyped-call]
        assert len(owners) > 1  # the sets really are spread over several masters
        for node in redis_cluster.nodes:  # every node forgets the library
            plain = redis.Redis.from_url(node.url)
            plain.function_flush()
            plain.close()
    finally:
        client.close()
    for limits in sets:
        assert limits.try_acquire().successful  # Function not found: loaded again, everywhere
        assert not limits.try_acquire().successful
    assert all(library_on(node.url) for node in redis_cluster.nodes)


def library_on(url: str) -> bool:
    import redis

    from aiolimits.redis._script import FUNCTION

    plain = redis.Redis.from_url(url)
    try:
        return bool(plain.function_list(FUNCTION))
    finally:
        plain.close()


def test_a_node_that_never_saw_the_library_is_sent_it(redis_cluster: RedisClusterNodes) -> None:
    import redis
    from redis.cluster import RedisCluster

    from aiolimits.redis import RedisBackend

    backend = RedisBackend(redis_cluster.url)
    name = uuid.uuid4().hex
    limits = LimitSet([CallLimit(3600, 2, "sliding_window")], backend=backend, name=name)
    assert limits.try_acquire().successful
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        owner = client.get_node_from_key(backend.hash_key(name))  # type: ignore[no-untyped-call]
    finally:
        client.close()
    plain = redis.Redis(host=owner.host, port=owner.port)
    try:
        plain.function_flush()  # only the node of this set forgets it
        assert not library_on(f"redis://{owner.host}:{owner.port}")
        assert limits.try_acquire().successful  # loaded again, and the call made once
        assert not limits.try_acquire().successful
        assert library_on(f"redis://{owner.host}:{owner.port}")
    finally:
        plain.close()
    for node in redis_cluster.nodes:  # FCALL is sent straight to its node, without asking
        each = redis.Redis.from_url(node.url)
        stats: Any = each.info("commandstats")
        each.close()
        assert "cmdstat_command|getkeys" not in stats


@pytest.mark.anyio
async def test_a_release_in_another_process_wakes_a_waiter_on_a_cluster(
    redis_cluster: RedisClusterNodes,
) -> None:
    import anyio

    from aiolimits.redis import RedisBackend

    name = uuid.uuid4().hex
    a = LimitSet([ResourceLimit("conns", 1)], backend=RedisBackend(redis_cluster.url), name=name)
    b = LimitSet([ResourceLimit("conns", 1)], backend=RedisBackend(redis_cluster.url), name=name)
    held = a.try_acquire()
    assert held.successful

    async def wait_in_b() -> None:
        async with b.acquire(timeout=20):
            pass

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_in_b)
            await anyio.sleep(0.2)  # b waits with nothing to wake it but the publication
            held.release()
    assert b.get_stats()["granted"] == 1
