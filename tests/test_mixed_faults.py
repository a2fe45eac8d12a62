"""A bad Stripe hour in miniature: 500 requests, 20 at a time, through a storm of
transient faults. Every caller still gets its 201, no click opens two sessions,
and every answer has its audit row.

The stand-in's fault queue is consumed in arrival order by every attempt of
every request: it holds, shuffled, one entry per logical request that answers
normally plus the faults (20 % 5xx, 10 % 429, 5 % connection resets, and a few
answers that come too late, after the attempt timed out). Each fault costs
exactly one failed attempt, so the attempts add up to requests + faults.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.app import create_app
from service.metrics import Metrics
from tests.conftest import Standin, create_client_token, make_settings
from tests.helpers import created, metric_value, post_session

pytestmark = pytest.mark.usefixtures("world")

REQUESTS = 500
CONCURRENCY = 20
ATTEMPT_TIMEOUT = 0.5
# Faults are drawn in arrival order, so one unlucky request can draw several in
# a row: with about 27 % of attempts failing, running out of 21 attempts has a
# chance below 1e-11 per request. (STRIPE_MAX_RETRIES stops at 10 for operators;
# the test sets the field directly.)
MAX_RETRIES = 20
ANSWER: dict[str, Any] = {"latency_ms": 0}  # no fault: Stripe answers normally


def fault_queue(rng: random.Random) -> list[dict[str, Any]]:
    def share(percent: int) -> int:
        return REQUESTS * percent // 100

    faults: list[dict[str, Any]] = []
    for i in range(share(20)):  # 5xx, some telling us explicitly to retry
        status = (500, 502, 503, 504)[i % 4]
        headers = {"Stripe-Should-Retry": "true"} if i % 5 == 0 else {}
        faults.append({"status": status, "headers": headers})
    for i in range(share(10)):  # rate limits and lock timeouts (both 429)
        code = "lock_timeout" if i % 3 == 0 else "rate_limit"
        faults.append({"status": 429, "code": code, "headers": {"Retry-After": "0"}})
    faults += [{"reset": True}] * share(5)
    # Stripe answers after the attempt gave up: the retry races the late answer
    # under the same Idempotency-Key, and the stand-in keeps one session for both.
    faults += [{"latency_ms": ATTEMPT_TIMEOUT * 1000 * 2}] * 10
    answers = [ANSWER] * REQUESTS
    queue = faults + answers
    rng.shuffle(queue)
    # End on a normal answer: it is drawn last, so every fault before it is drawn.
    last = max(i for i, entry in enumerate(queue) if entry == ANSWER)
    queue[last], queue[-1] = queue[-1], queue[last]
    return queue


@pytest.fixture
async def storm_service(database_url: str, standin: Standin) -> AsyncIterator[TestClient[Any, Any]]:
    settings = make_settings(
        database_url,
        standin.url,
        STRIPE_TIMEOUT_SECONDS=str(ATTEMPT_TIMEOUT),
        STRIPE_BACKOFF_INITIAL_SECONDS="0.005",
        STRIPE_BACKOFF_MAX_SECONDS="0.02",
        REQUEST_DEADLINE_SECONDS="30",
    ).replace(stripe_max_retries=MAX_RETRIES)
    client: TestClient[Any, Any] = TestClient(
        TestServer(create_app(settings, metrics=Metrics()), host="127.0.0.1")
    )
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


@pytest.mark.timeout(120)
async def test_every_request_survives_a_storm_of_transient_faults(
    storm_service: TestClient[Any, Any], standin: Standin, conn: asyncpg.Connection
) -> None:
    token = await create_client_token(conn, "storm", rate_limit=1_000_000)
    queue = fault_queue(random.Random(20251001))
    faults = sum(1 for entry in queue if entry != ANSWER)
    standin.state.queue_faults(queue)

    ids: list[str] = []
    pending = iter(range(REQUESTS))

    async def client_loop() -> None:
        for n in pending:
            # A fifth of the callers send their own Idempotency-Key.
            headers = {"Idempotency-Key": f"storm-{n}"} if n % 5 == 0 else None
            resp = await post_session(storm_service, {"user_id": "u_42"}, token, headers)
            ids.append((await created(resp))["id"])

    await asyncio.gather(*(client_loop() for _ in range(CONCURRENCY)))

    # Every caller got its own session.
    assert len(ids) == REQUESTS
    assert len(set(ids)) == REQUESTS

    # Stripe's side: one key per logical request on all its attempts, one session per key.
    attempts = standin.requests()
    assert all(r.idempotency_key for r in attempts)
    per_key = Counter(r.idempotency_key for r in attempts)
    assert len(per_key) == REQUESTS
    assert max(per_key.values()) <= 1 + MAX_RETRIES
    # Each fault costs exactly one failed attempt. A normal answer can also arrive
    # after its attempt timed out when the machine is busy (the suite runs on two
    # workers): such an attempt is retried like any timeout, and the service counts
    # it, so it is accounted for, not ignored. The late answers always time out.
    timeouts = await metric_value(
        storm_service, "portal_gateway_upstream_requests_total", outcome="timeout", status="none"
    )
    late_answers = sum(1 for entry in queue if entry.get("latency_ms", 0) > 0)
    extra_timeouts = int(timeouts) - late_answers
    assert extra_timeouts >= 0
    assert len(attempts) == REQUESTS + faults + extra_timeouts
    assert not standin.state.faults  # the whole storm was used up
    stored = {orjson.loads(s.body)["id"] for s in standin.state.idempotency.values()}
    assert len(standin.state.idempotency) == REQUESTS
    assert stored == set(ids)

    # Our side: one audit row per response, each a created session.
    rows = await conn.fetch("SELECT http_status, stripe_session_id FROM audit_events")
    assert len(rows) == REQUESTS
    assert {r["http_status"] for r in rows} == {201}
    assert {r["stripe_session_id"] for r in rows} == set(ids)
