"""Four processes share one LimitSet through Redis and never exceed any of its limits.

Each worker records the Redis server time of every grant (read from the script's reply, the
time the decision was made) and when it held its resource slot; the test checks the combined log
against the limits' definitions (semantics §3): every interval of the sliding window holds at most C
calls, the GCRA tokens between any two grants stay within C plus the refill, and at no moment do
more than C slots appear held.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from ._redis_server import RedisServer, redis_server

__all__ = ["redis_server"]  # the session fixture

CALLS, TOKENS, SLOTS = 20, 60.0, 2  # per second, per second, at once
PER_WORKER = 15

WORKER = textwrap.dedent(
    """
    import json, random, sys, time
    from aiolimits import CallLimit, LimitSet, RateLimit, ResourceLimit
    from aiolimits.redis import RedisBackend
    from aiolimits.redis._script import acquire_reply

    url, name, count, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    limits = LimitSet(
        [CallLimit(1.0, 20, "sliding_window"), RateLimit("tokens", 1.0, 60, "gcra"),
         ResourceLimit("conns", 2)],
        backend=RedisBackend(url), name=name,
    )
    decisions = []
    cls = type(limits._scheduler)
    call = cls._call

    def spy(self, op, now, *args, **kwargs):  # the server time of each grant, from its reply
        reply = call(self, op, now, *args, **kwargs)
        if op == "acquire" and acquire_reply(reply)[0] == 1:
            decisions.append(float(acquire_reply(reply)[1]))
        elif op == "batch" and reply[2]:  # one waiter at a time here: a batch grants it alone
            decisions.append(float(reply[0]))
        return reply

    cls._call = spy  # in this worker process only
    rng = random.Random(seed)
    grants, holds = [], []
    for _ in range(count):
        tokens = rng.randint(1, 5)
        with limits.acquire_sync({"tokens": tokens}, timeout=60):
            start = time.time()
            time.sleep(rng.random() * 0.01)
            holds.append((start, time.time()))
        grants.append((decisions[-1], tokens))
    assert len(decisions) == count, decisions  # every grant's decision was seen
    print(json.dumps({"grants": grants, "holds": holds}), flush=True)
    """
)


@pytest.mark.slow
def test_four_processes_never_exceed_any_limit(redis_server: RedisServer) -> None:
    name = uuid.uuid4().hex
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_server.url, name, str(PER_WORKER), str(seed)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    logs = []
    for worker in workers:
        out, _err = worker.communicate(timeout=100)
        assert worker.returncode == 0
        logs.append(json.loads(out))
    grants = sorted((t, n) for log in logs for t, n in log["grants"])
    assert len(grants) == 4 * PER_WORKER

    # SlidingWindow: every [t, t + 1) holds at most 20 calls.
    times = [t for t, _n in grants]
    for i, t in enumerate(times):
        inside = sum(1 for u in times[i:] if u < t + 1.0)
        assert inside <= CALLS, f"{inside} calls in [{t}, {t + 1})"

    # GCRA (a token bucket): the tokens granted from grant i to grant j fit C + r * elapsed.
    for i in range(len(grants)):
        total = 0.0
        for j in range(i, len(grants)):
            total += grants[j][1]
            elapsed = grants[j][0] - grants[i][0]
            assert total <= TOKENS + TOKENS * elapsed + 1e-6, (i, j, total, elapsed)

    # ResourceLimit: the recorded holds lie inside the real ones; never more than 2 overlap.
    events = sorted(
        [(start, 1) for log in logs for start, _end in log["holds"]]
        + [(end, -1) for log in logs for _start, end in log["holds"]],
        key=lambda e: (e[0], e[1]),
    )
    held = 0
    for _t, change in events:
        held += change
        assert held <= SLOTS
