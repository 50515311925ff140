"""The httpx transport: acquire before sending, settle real usage, pause everyone on 429 and retry.

The inner transport is ``httpx.MockTransport`` and the limits run on a ManualClock, so every
wait is decided by the test moving the clock (asyncio, uvloop and trio: httpx runs on all).
The demo's test sends through it to a real server on 127.0.0.1.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest

from aiolimits import CallLimit, KeyedLimitSet, LimitPool, LimitSet, RateLimit, ResourceLimit
from aiolimits.integrations.httpx import LimitedSyncTransport, LimitedTransport
from aiolimits.testing import ManualClock

pytestmark = pytest.mark.anyio

URL = "http://llm.test/v1/chat/completions"


def tokens_of(request: httpx.Request) -> dict[str, int]:
    return {"tokens": int(json.loads(request.content)["max_tokens"])}


def total_tokens(request: httpx.Request, response: httpx.Response) -> dict[str, int]:
    return {"tokens": int(response.json()["usage"]["total_tokens"])}


def available(limits: LimitSet, key: str) -> float:
    value: float = limits.get_stats()["limits"][key]["available"]
    return value


async def test_acquires_the_cost_while_sending_and_settles_the_real_usage() -> None:
    clock = ManualClock()
    limits = LimitSet([RateLimit("tokens", window_seconds=60, capacity=100)], clock=clock)
    seen: list[float] = []

    def provider(request: httpx.Request) -> httpx.Response:
        seen.append(available(limits, "tokens"))
        return httpx.Response(200, json={"usage": {"total_tokens": 30}})

    transport = LimitedTransport(
        limits, transport=httpx.MockTransport(provider), cost=tokens_of, usage=total_tokens
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post(URL, json={"max_tokens": 80})
    assert response.status_code == 200
    assert response.json() == {"usage": {"total_tokens": 30}}
    assert seen == [20]  # 80 reserved while the request was out
    assert available(limits, "tokens") == 70  # settled to the 30 really used
    assert limits.get_stats()["refunded"] == 50


async def test_429_with_retry_after_pauses_the_limits_and_retries_when_the_pause_ends() -> None:
    clock = ManualClock()
    limits = LimitSet([CallLimit(window_seconds=1, capacity=100)], clock=clock)
    answers = [
        httpx.Response(429, headers={"Retry-After": "5"}),
        httpx.Response(200, json={"ok": True}),
    ]
    calls: list[float] = []

    def provider(request: httpx.Request) -> httpx.Response:
        calls.append(clock())
        return answers.pop(0)

    transport = LimitedTransport(limits, transport=httpx.MockTransport(provider))
    results: list[httpx.Response] = []
    async with httpx.AsyncClient(transport=transport) as client, anyio.create_task_group() as tg:

        async def send() -> None:
            results.append(await client.get(URL))

        tg.start_soon(send)
        await anyio.wait_all_tasks_blocked()
        stats = limits.get_stats()
        assert stats["paused_for"] == 5  # everyone sharing the limits backs off
        assert stats["waiting"] == 1  # the retry queues behind the pause, no polling
        assert not limits.try_acquire().successful
        clock.advance(4.999)
        await anyio.wait_all_tasks_blocked()
        assert results == []
        clock.advance(0.001)
    assert [r.status_code for r in results] == [200]
    assert calls == [0, 5]
    assert transport.stats == {"paused": 1, "retried": 1}


async def test_429_with_an_http_date_pauses_until_that_date() -> None:
    clock = ManualClock()
    limits = LimitSet([CallLimit(window_seconds=1, capacity=100)], clock=clock)
    answers = [
        httpx.Response(429, headers={"Retry-After": email.utils.formatdate(time.time() + 60)}),
        httpx.Response(200),
    ]
    transport = LimitedTransport(limits, transport=httpx.MockTransport(lambda _: answers.pop(0)))
    results: list[httpx.Response] = []
    async with httpx.AsyncClient(transport=transport) as client, anyio.create_task_group() as tg:

        async def send() -> None:
            results.append(await client.get(URL))

        tg.start_soon(send)
        await anyio.wait_all_tasks_blocked()
        # whole seconds in the date; reading the wall clock here costs at most a second more
        assert 58 <= limits.get_stats()["paused_for"] <= 60
        clock.advance(60)
    assert [r.status_code for r in results] == [200]


@pytest.mark.parametrize("form", ["seconds", "date"])
async def test_429_with_a_retry_after_beyond_range_is_returned_not_obeyed(form: str) -> None:
    limits = LimitSet([CallLimit(window_seconds=1, capacity=100)])
    # decades ahead: a broken or hostile server must not stop every caller for good
    far = "1e9" if form == "seconds" else email.utils.formatdate(time.time() + 1e9)

    def provider(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": far})

    transport = LimitedTransport(limits, transport=httpx.MockTransport(provider))
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(URL)
    assert response.status_code == 429
    assert limits.get_stats()["paused_for"] == 0
    assert transport.stats == {"paused": 0, "retried": 0}


async def test_retry_after_ms_is_preferred_and_the_429_is_returned_when_retries_run_out() -> None:
    clock = ManualClock()
    limits = LimitSet([CallLimit(window_seconds=1, capacity=100)], clock=clock)

    def provider(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "1", "retry-after-ms": "250"})

    transport = LimitedTransport(limits, transport=httpx.MockTransport(provider), retries=1)
    results: list[httpx.Response] = []
    async with httpx.AsyncClient(transport=transport) as client, anyio.create_task_group() as tg:

        async def send() -> None:
            results.append(await client.get(URL))

        tg.start_soon(send)
        await anyio.wait_all_tasks_blocked()
        assert limits.get_stats()["paused_for"] == 0.25
        clock.advance(0.25)
    assert [r.status_code for r in results] == [429]
    assert transport.stats == {"paused": 1, "retried": 1}
    assert limits.get_stats()["granted"] == 2


async def test_429_without_retry_after_is_returned_at_once_without_pausing() -> None:
    limits = LimitSet([CallLimit(window_seconds=1, capacity=100)], clock=ManualClock())
    transport = LimitedTransport(
        limits, transport=httpx.MockTransport(lambda request: httpx.Response(429))
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(URL)
    assert response.status_code == 429
    assert limits.get_stats()["paused_for"] == 0
    assert transport.stats == {"paused": 0, "retried": 0}


async def test_a_pool_pauses_only_the_set_whose_key_got_the_429() -> None:
    clock = ManualClock()
    sets = [
        LimitSet([CallLimit(1, 100)], config={"api_key": key}, clock=clock) for key in ("a", "b")
    ]
    pool = LimitPool(sets)
    used: list[str] = []

    def provider(request: httpx.Request) -> httpx.Response:
        key = request.extensions["aiolimits"]["api_key"]  # the chosen set's config
        used.append(key)
        if key == "a":
            return httpx.Response(429, headers={"Retry-After": "7"})
        return httpx.Response(200)

    transport = LimitedTransport(pool, transport=httpx.MockTransport(provider))
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(URL)
    assert response.status_code == 200
    assert used == ["a", "b"]  # round robin moved on to the other key
    assert sets[0].get_stats()["paused_for"] == 7
    assert sets[1].get_stats()["paused_for"] == 0


async def test_keyed_limits_pause_only_the_key_of_the_request() -> None:
    clock = ManualClock()
    keyed = KeyedLimitSet([CallLimit(1, 100)], max_keys=100, clock=clock)
    answers = {"t1": [httpx.Response(429, headers={"Retry-After": "3"}), httpx.Response(200)]}

    def provider(request: httpx.Request) -> httpx.Response:
        tenant = request.headers["x-tenant"]
        queue = answers.get(tenant)
        return queue.pop(0) if queue else httpx.Response(200)

    transport = LimitedTransport(
        keyed,
        transport=httpx.MockTransport(provider),
        key=lambda request: request.headers["x-tenant"],
    )
    statuses: list[int] = []
    async with httpx.AsyncClient(transport=transport) as client, anyio.create_task_group() as tg:

        async def send(tenant: str) -> None:
            statuses.append((await client.get(URL, headers={"x-tenant": tenant})).status_code)

        tg.start_soon(send, "t1")
        await anyio.wait_all_tasks_blocked()
        assert keyed.get_stats("t1")["paused_for"] == 3
        await send("t2")  # another tenant is not held back
        assert statuses == [200]
        clock.advance(3)
    assert statuses == [200, 200]
    assert keyed.get_stats("t2")["paused_for"] == 0


async def test_without_usage_the_acquisition_is_held_until_the_response_is_closed() -> None:
    limits = LimitSet([ResourceLimit("connections", capacity=1)])

    class Body(httpx.AsyncByteStream):  # streamed, as from the network
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 10

    transport = LimitedTransport(
        limits, transport=httpx.MockTransport(lambda request: httpx.Response(200, stream=Body()))
    )
    async with httpx.AsyncClient(transport=transport) as client:
        async with client.stream("GET", URL) as response:
            assert limits.get_stats()["limits"]["connections"]["in_use"] == 1
            body = await response.aread()
        assert body == b"x" * 100
        assert limits.get_stats()["limits"]["connections"]["in_use"] == 0
        response = await client.get(URL)  # a plain get reads and closes
        assert limits.get_stats()["limits"]["connections"]["in_use"] == 0


async def test_an_error_while_sending_releases_the_acquisition() -> None:
    limits = LimitSet([ResourceLimit("connections", capacity=1)])

    def provider(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    transport = LimitedTransport(limits, transport=httpx.MockTransport(provider))
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(URL)
    assert limits.get_stats()["limits"]["connections"]["in_use"] == 0


async def test_timeout_raises_when_the_limits_cannot_admit_in_time() -> None:
    clock = ManualClock()
    limits = LimitSet([RateLimit("tokens", 60, 100)], clock=clock)
    transport = LimitedTransport(
        limits,
        transport=httpx.MockTransport(lambda request: httpx.Response(200)),
        cost=tokens_of,
        timeout=10,
    )
    async with httpx.AsyncClient(transport=transport) as client:
        await client.post(URL, json={"max_tokens": 100})
        with pytest.raises(TimeoutError):  # 60 s until 100 tokens are back: at once
            await client.post(URL, json={"max_tokens": 100})


def test_bad_arguments_are_named() -> None:
    limits = LimitSet([CallLimit(1, 10)])
    with pytest.raises(TypeError, match="limits must be"):
        LimitedTransport(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key= needs a KeyedLimitSet"):
        LimitedTransport(limits, key=lambda request: "k")
    with pytest.raises(ValueError, match="pass key="):
        LimitedTransport(KeyedLimitSet([CallLimit(1, 10)], max_keys=100))
    with pytest.raises(ValueError, match="retries must be >= 0"):
        LimitedTransport(limits, retries=-1)
    with pytest.raises(TypeError, match="retries must be an int"):
        LimitedTransport(limits, retries=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cost must be a callable"):
        LimitedTransport(limits, cost=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="transport must be"):
        LimitedTransport(limits, transport=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        LimitedTransport(limits, timeout=-1)


async def test_usage_is_read_from_a_streamed_compressed_body_that_the_caller_still_gets() -> None:
    limits = LimitSet([RateLimit("tokens", window_seconds=60, capacity=100)], clock=ManualClock())
    payload = gzip.compress(json.dumps({"usage": {"total_tokens": 12}}).encode())

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield payload[:5]
            yield payload[5:]

    def provider(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-encoding": "gzip"}, stream=Body())

    transport = LimitedTransport(
        limits, transport=httpx.MockTransport(provider), cost=tokens_of, usage=total_tokens
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post(URL, json={"max_tokens": 50})
    assert response.json() == {"usage": {"total_tokens": 12}}  # decoded once, by the client
    assert available(limits, "tokens") == 88
    assert response.extensions["aiolimits_waited"] == 0.0


# -- the sync twin, for httpx.Client in threads ------------------------------------------------


def test_sync_transport_settles_usage_and_retries_after_a_pause() -> None:
    # Real time (a thread blocks while it waits), with a refill so slow that it does not show.
    limits = LimitSet([CallLimit(1, 100), RateLimit("tokens", 1e9, 100)])
    answers = [
        httpx.Response(429, headers={"retry-after-ms": "20"}),
        httpx.Response(200, json={"usage": {"total_tokens": 30}}),
    ]
    seen: list[float] = []

    def provider(request: httpx.Request) -> httpx.Response:
        seen.append(available(limits, "tokens"))
        return answers.pop(0)

    transport = LimitedSyncTransport(
        limits, transport=httpx.MockTransport(provider), cost=tokens_of, usage=total_tokens
    )
    with httpx.Client(transport=transport) as client:
        response = client.post(URL, json={"max_tokens": 40})
    assert response.status_code == 200
    assert transport.stats == {"paused": 1, "retried": 1}
    assert limits.get_stats()["granted"] == 2  # two attempts, each one call
    assert seen[0] == pytest.approx(60)  # 40 reserved while the first attempt was out
    # The first attempt keeps its 40 (a 429'd attempt is not refunded); the second settled at 30.
    assert available(limits, "tokens") == pytest.approx(100 - 40 - 30)


def test_sync_transport_holds_a_streamed_response_until_it_is_closed() -> None:
    limits = LimitSet([ResourceLimit("connections", capacity=1)])

    class Body(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b"abc"

    transport = LimitedSyncTransport(
        limits, transport=httpx.MockTransport(lambda request: httpx.Response(200, stream=Body()))
    )
    with httpx.Client(transport=transport) as client, client.stream("GET", URL) as response:
        assert limits.get_stats()["limits"]["connections"]["in_use"] == 1
        assert response.read() == b"abc"
    assert limits.get_stats()["limits"]["connections"]["in_use"] == 0


def test_sync_transport_serves_threads_and_a_pool() -> None:
    sets = [LimitSet([ResourceLimit("slot", 1)], config={"api_key": k}) for k in ("a", "b")]
    keys: list[str] = []

    def provider(request: httpx.Request) -> httpx.Response:
        keys.append(request.extensions["aiolimits"]["api_key"])
        return httpx.Response(200)

    transport = LimitedSyncTransport(
        LimitPool(sets, load_balancing="least_wait"), transport=httpx.MockTransport(provider)
    )
    with httpx.Client(transport=transport) as client:
        threads = [threading.Thread(target=client.get, args=(URL,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(keys) == 8
    assert set(keys) <= {"a", "b"}
    assert sum(s.get_stats()["granted"] for s in sets) == 8


async def test_sync_transport_refuses_to_block_an_event_loop() -> None:
    transport = LimitedSyncTransport(
        LimitSet([CallLimit(1, 10)]), transport=httpx.MockTransport(lambda r: httpx.Response(200))
    )
    with httpx.Client(transport=transport) as client, pytest.raises(RuntimeError):
        client.get(URL)  # noqa: ASYNC212 - the blocking call on a loop is what is tested


def test_sync_transport_checks_its_transport() -> None:
    with pytest.raises(TypeError, match=r"transport must be an httpx\.BaseTransport"):
        LimitedSyncTransport(LimitSet(), transport=object())  # type: ignore[arg-type]
