"""SPEC §14 piece by piece, against a real Redis (a throwaway ``redis-server``).

The rate-limit bucket and the upstream budget's log are Lua scripts: their
arithmetic, that two replicas (two limiters on one Redis) share them, the keys
they leave behind, and the same rule in the per-replica fallback. Then Redis
failing: stopped, the replica decides alone at once (gauge 0, one log line);
frozen, it waits no longer than REDIS_TIMEOUT_SECONDS; back, it shares again.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from service import keys, shared_redis
from service.config import Settings
from service.errors import ServiceUnavailable
from service.logs import tee
from service.metrics import Metrics
from service.ratelimit import REFUSAL_ROW_WINDOW_SECONDS, SharedRateLimiter
from service.shared_redis import REPROBE_SECONDS, SharedRedis
from service.upstream_budget import HOLD_SECONDS, MIN_ATTEMPT_SECONDS, LocalLog, UpstreamBudget
from tests.helpers import created, post_session
from tests.redis_server import RedisServer

KEY = "sk_test_sharedlimits0123456789"


class Clock:
    """A monotonic clock the test moves by hand (the reprobe backoff, the local log)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _settings(redis: RedisServer | None, **env: str) -> Settings:
    base = {"STRIPE_API_KEY": KEY, "REDIS_TIMEOUT_SECONDS": "0.1"}
    if redis is not None:
        base["REDIS_URL"] = redis.url
    return Settings.from_env({**base, **env})


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., SharedRedis]]:
    """SharedRedis clients (one per "replica"), closed at the end."""
    opened: list[SharedRedis] = []

    def make(
        server: RedisServer | None, metrics: Metrics | None = None, clock: Any = time.monotonic
    ) -> SharedRedis:
        settings = _settings(server)
        redis = SharedRedis.from_settings(settings, metrics)
        redis._clock = clock
        opened.append(redis)
        return redis

    try:
        yield make
    finally:
        for redis in opened:
            await redis.close()


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --------------------------------------------------------------------------- the bucket


async def test_the_shared_bucket_allows_the_minutes_allowance_once_for_two_replicas(
    redis_server: RedisServer, connect: Callable[..., SharedRedis]
) -> None:
    metrics = Metrics()
    a = SharedRateLimiter(connect(redis_server, metrics), metrics)
    b = SharedRateLimiter(connect(redis_server), None)
    verdicts = [await (a if i % 2 else b).acquire("client:tiny", 3) for i in range(6)]
    assert [v.wait == 0 for v in verdicts] == [True, True, True, False, False, False]
    # Empty at 3/min: the next token comes in 20 s (less the few ms spent here).
    for refused in verdicts[3:]:
        assert 19.5 < refused.wait <= 20.0
    # One refusal opens the window with its audit row, for both replicas.
    assert [v.first_refusal for v in verdicts[3:]] == [True, False, False]
    # Other keys have their own buckets.
    assert (await b.acquire("user:u_1", 3)).wait == 0
    decisions = "portal_gateway_rate_limit_decisions_total"
    # `a` made the second, fourth and sixth decisions.
    assert _value(metrics, decisions, backend="redis", result="allowed") == 1
    assert _value(metrics, decisions, backend="redis", result="refused") == 2
    assert _value(metrics, decisions, backend="local", result="allowed") == 0
    assert _value(metrics, "portal_gateway_redis_up") == 1


async def test_the_bucket_refills_continuously_on_redis_time(
    redis_server: RedisServer, connect: Callable[..., SharedRedis]
) -> None:
    limiter = SharedRateLimiter(connect(redis_server), None)
    # 60/min is one a second: empty, the bucket says when the next token comes...
    for _ in range(60):
        assert (await limiter.acquire("client:a", 60)).wait == 0
    refused = await limiter.acquire("client:a", 60)
    assert 0.5 < refused.wait <= 1.0
    # ... and it is there then, and only one.
    await asyncio.sleep(refused.wait + 0.02)
    assert (await limiter.acquire("client:a", 60)).wait == 0
    assert (await limiter.acquire("client:a", 60)).wait > 0.9


async def test_bucket_keys_name_no_principal_and_expire(
    redis_server: RedisServer, connect: Callable[..., SharedRedis]
) -> None:
    limiter = SharedRateLimiter(connect(redis_server), None)
    principal = "user:someone@example.com"
    await limiter.acquire(principal, 1)
    await limiter.acquire(principal, 1)  # refused: opens the refusal window
    with redis_server.client() as client:
        keys = sorted(k.decode() for k in client.keys("*"))
        assert len(keys) == 2, keys
        assert all(k.startswith("portal-gateway:ratelimit:{") for k in keys), keys
        assert not any("someone" in k for k in keys)
        bucket, window = keys
        assert window == bucket + ":refused"
        assert 0 < client.pttl(bucket) <= 61_000
        assert 0 < client.pttl(window) <= REFUSAL_ROW_WINDOW_SECONDS * 1000


# --------------------------------------------------------------------------- Redis failing


async def test_a_stopped_redis_means_deciding_alone_then_sharing_again(
    redis_server: RedisServer, connect: Callable[..., SharedRedis]
) -> None:
    metrics, clock = Metrics(), Clock()
    redis = connect(redis_server, metrics, clock)
    assert await redis.probe()
    limiter = SharedRateLimiter(redis, metrics)
    assert (await limiter.acquire("client:a", 2)).wait == 0

    redis_server.stop()
    buffer = io.StringIO()
    with tee(buffer):
        # Never refused because of Redis: the replica's own buckets, full to start.
        for _ in range(2):
            assert (await limiter.acquire("client:a", 2)).wait == 0
        refused = await limiter.acquire("client:a", 2)
        assert refused.wait > 0
        assert refused.first_refusal
        # Within the backoff, nothing is asked of Redis at all.
        for _ in range(20):
            await limiter.acquire("client:b", 1000)
    lines = [orjson.loads(line) for line in buffer.getvalue().splitlines()]
    warnings = [line for line in lines if line.get("event") == "redis_unavailable"]
    assert len(warnings) == 1, warnings  # at most once a minute
    assert warnings[0]["reason"] == "connection"
    assert redis_server.url not in buffer.getvalue()
    assert not redis.up
    assert _value(metrics, "portal_gateway_redis_up") == 0
    assert _value(metrics, "portal_gateway_redis_errors_total", reason="connection") == 1
    decisions = "portal_gateway_rate_limit_decisions_total"
    assert _value(metrics, decisions, backend="local", result="allowed") == 22
    assert _value(metrics, decisions, backend="local", result="refused") == 1

    # Still down after the backoff: one more error, no second log line within the minute.
    clock.now += REPROBE_SECONDS
    with tee(buffer):
        await limiter.acquire("client:b", 1000)
    assert _value(metrics, "portal_gateway_redis_errors_total", reason="connection") == 2
    lines = [orjson.loads(line) for line in buffer.getvalue().splitlines()]
    assert len([line for line in lines if line.get("event") == "redis_unavailable"]) == 1

    # Back (empty: it keeps nothing): the next call after the backoff shares again.
    redis_server.start()
    clock.now += REPROBE_SECONDS
    assert (await limiter.acquire("client:a", 2)).wait == 0
    assert redis.up
    assert _value(metrics, "portal_gateway_redis_up") == 1
    assert _value(metrics, decisions, backend="redis", result="allowed") == 2
    # A minute later, a new outage is logged again.
    clock.now += shared_redis.LOG_EVERY_SECONDS
    redis_server.stop()
    with tee(buffer):
        await limiter.acquire("client:a", 2)
    lines = [orjson.loads(line) for line in buffer.getvalue().splitlines()]
    assert len([line for line in lines if line.get("event") == "redis_unavailable"]) == 2


async def test_a_hung_redis_costs_a_request_the_short_timeout_only(
    redis_server: RedisServer, connect: Callable[..., SharedRedis]
) -> None:
    metrics = Metrics()
    redis = connect(redis_server, metrics)
    limiter = SharedRateLimiter(redis, metrics)
    budget = UpstreamBudget(5, redis, metrics, key="portal-gateway:test-budget")
    assert (await limiter.acquire("client:a", 100)).wait == 0  # connected
    redis_server.pause()
    try:
        started = time.perf_counter()
        # Concurrent requests: the first waits REDIS_TIMEOUT_SECONDS (0.1 s); the
        # others meanwhile either wait with it or, once it is down, not at all.
        verdicts = await asyncio.gather(*(limiter.acquire("client:a", 100) for _ in range(20)))
        took = time.perf_counter() - started
        assert all(v.wait == 0 for v in verdicts)
        assert took < 0.6, took
        assert _value(metrics, "portal_gateway_redis_errors_total", reason="timeout") >= 1
        assert _value(metrics, "portal_gateway_redis_up") == 0
        # The budget decides alone too, at once.
        started = time.perf_counter()
        await budget.wait(asyncio.get_running_loop().time() + 5)
        assert time.perf_counter() - started < 0.05
    finally:
        redis_server.resume()


async def test_without_redis_url_every_decision_is_local(
    connect: Callable[..., SharedRedis],
) -> None:
    metrics = Metrics()
    redis = connect(None, metrics)
    assert not redis.configured
    assert not await redis.probe()
    limiter = SharedRateLimiter(redis, metrics)
    assert [(await limiter.acquire("client:a", 1)).wait == 0 for _ in range(2)] == [True, False]
    assert _value(metrics, "portal_gateway_redis_up") == 0
    assert _value(metrics, "portal_gateway_redis_errors_total", reason="connection") == 0
    decisions = "portal_gateway_rate_limit_decisions_total"
    assert _value(metrics, decisions, backend="local", result="refused") == 1


# --------------------------------------------------------------------------- the budget


class Backend:
    """The budget's log in Redis, or the per-replica one, behind one interface."""

    def __init__(self, budget: UpstreamBudget | None, local: LocalLog | None) -> None:
        self.budget = budget
        self.local = local

    async def take(self, max_wait: float = 10.0, *, background: bool = False) -> tuple[bool, float]:
        if self.local is not None:
            answer = self.local.take(max_wait, background=background)
            return answer.granted, answer.wait
        assert self.budget is not None
        answer, backend = await self.budget.take(max_wait, background=background)
        assert backend == "redis"
        return answer.granted, answer.wait


@pytest.fixture(params=["redis", "local"])
def log_of_5(
    request: pytest.FixtureRequest, connect: Callable[..., SharedRedis], tmp_path: Any
) -> Backend:
    """A budget of 5 a second: Redis's log (a throwaway server), or a replica's own."""
    if request.param == "local":
        return Backend(None, LocalLog(5, clock=Clock()))
    server: RedisServer = request.getfixturevalue("redis_server")
    budget = UpstreamBudget(5, connect(server), None, key="portal-gateway:test-budget")
    return Backend(budget, None)


# Redis's clock moves while the test runs: a few ms either way.
SLACK = 0.05


async def test_a_burst_gets_n_places_at_once_then_n_each_hold(log_of_5: Backend) -> None:
    answers = [await log_of_5.take() for _ in range(12)]
    assert all(granted for granted, _ in answers)
    waits = [wait for _, wait in answers]
    assert all(w <= SLACK for w in waits[:5])
    assert all(abs(w - HOLD_SECONDS) <= SLACK for w in waits[5:10])
    assert all(abs(w - 2 * HOLD_SECONDS) <= SLACK for w in waits[10:])
    # No window of HOLD_SECONDS (more than the second Stripe counts) holds more than 5.
    starts = sorted(waits)
    assert all(starts[i + 5] - starts[i] >= HOLD_SECONDS - SLACK for i in range(len(starts) - 5))


async def test_a_place_beyond_the_longest_wait_is_refused_and_not_taken(
    log_of_5: Backend,
) -> None:
    for _ in range(5):
        await log_of_5.take()
    granted, hint = await log_of_5.take(max_wait=0.5)
    assert not granted
    assert abs(hint - HOLD_SECONDS) <= SLACK
    # Nothing was reserved for it: the next caller that can wait gets that place.
    granted, wait = await log_of_5.take(max_wait=2.0)
    assert granted
    assert abs(wait - HOLD_SECONDS) <= SLACK


async def test_background_callers_leave_a_quarter_and_never_pass_a_waiting_session(
    log_of_5: Backend,
) -> None:
    # 5 // 4 = 1 place left for sessions: background takes 4 at most.
    assert [(await log_of_5.take(background=True))[0] for _ in range(5)] == [
        True,
        True,
        True,
        True,
        False,
    ]
    # A session still gets the fifth at once...
    granted, wait = await log_of_5.take()
    assert granted
    assert wait <= SLACK
    # ... and the next one queues; background then waits behind it.
    granted, queued = await log_of_5.take()
    assert granted
    assert queued > 1.0
    granted, hint = await log_of_5.take(background=True)
    assert not granted
    assert abs(hint - queued) <= SLACK


async def test_a_refused_call_is_503_upstream_unavailable_with_retry_after(
    redis_server: RedisServer, connect: Callable[..., SharedRedis]
) -> None:
    metrics = Metrics()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    budget = UpstreamBudget(
        5, connect(redis_server, metrics), metrics, key="portal-gateway:b", sleep=sleep
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    for _ in range(10):  # 5 at once, 5 after HOLD_SECONDS: within the deadline
        await budget.wait(deadline)
    with pytest.raises(ServiceUnavailable) as refused:
        await budget.wait(deadline)  # 2 x HOLD_SECONDS + MIN_ATTEMPT_SECONDS > 2 s
    assert refused.value.code == "upstream_unavailable"
    assert refused.value.status == 503
    assert int(refused.value.headers["Retry-After"]) == 3  # ceil(2.2)
    assert 2 * HOLD_SECONDS + MIN_ATTEMPT_SECONDS > 2.0
    assert len(slept) == 5
    waits = "portal_gateway_upstream_budget_waits_total"
    assert _value(metrics, waits, outcome="immediate") == 5
    assert _value(metrics, waits, outcome="waited") == 5
    assert _value(metrics, waits, outcome="refused") == 1
    count = "portal_gateway_upstream_budget_wait_seconds_count"
    assert _value(metrics, count, backend="redis") == 10
    with redis_server.client() as client:
        assert 0 < client.pttl("portal-gateway:b") <= (2 * HOLD_SECONDS + 1) * 1000 + 1000


async def test_a_background_call_waits_its_turn_then_goes(
    redis_server: RedisServer, connect: Callable[..., SharedRedis]
) -> None:
    metrics = Metrics()
    budget = UpstreamBudget(4, connect(redis_server, metrics), metrics, key="portal-gateway:c")
    loop = asyncio.get_running_loop()
    for _ in range(4):
        await budget.wait(loop.time() + 5)
    started = loop.time()
    await budget.wait(loop.time() + 5, background=True)  # after the window passes
    assert loop.time() - started >= HOLD_SECONDS - SLACK
    waits = "portal_gateway_upstream_budget_waits_total"
    assert _value(metrics, waits, outcome="waited") == 1
    # A background call whose deadline comes before a free place gives up with a 503.
    for _ in range(4):
        await budget.take(5, background=False)
    started = loop.time()
    with pytest.raises(ServiceUnavailable):
        await budget.wait(loop.time() + 0.5, background=True)
    assert loop.time() - started < 0.5


# --------------------------------------------------------------------------- the service


@pytest.mark.usefixtures("world")
async def test_the_service_starts_and_serves_with_redis_down(make_service: Any, token: str) -> None:
    """Optional by design: a REDIS_URL that does not answer costs neither start-up,
    readiness nor a request; the gauge says it."""
    service = await make_service(REDIS_URL=f"redis://127.0.0.1:{_closed_port()}/0")
    assert (await service.get("/readyz")).status == 200
    await created(await post_session(service, {"user_id": "u_42"}, token))
    metrics = service.server.app[keys.METRICS]
    assert _value(metrics, "portal_gateway_redis_up") == 0
    assert _value(metrics, "portal_gateway_redis_errors_total", reason="connection") >= 1
    decisions = "portal_gateway_rate_limit_decisions_total"
    assert _value(metrics, decisions, backend="local", result="allowed") == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there
