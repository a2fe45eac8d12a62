"""§3 under injected Stripe faults: retries, deadline, circuit breaker, pool, shedding.

Every test drives the real service over HTTP against the stand-in, whose fault
queue scripts what the next Stripe answers are; the stand-in's recordings say
how many attempts reached "Stripe" and with which Idempotency-Key.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from typing import Any

import asyncpg
import orjson
import pytest

from service import keys
from service.errors import ServiceUnavailable
from service.stripe import CircuitBreaker, StripeClient
from tests.conftest import Standin, make_settings
from tests.helpers import created, post_session, problem, until

pytestmark = pytest.mark.usefixtures("world")

BODY = {"user_id": "u_42"}
# Retries in milliseconds, not seconds: the tests are about counts and bounds.
FAST = {"STRIPE_BACKOFF_INITIAL_SECONDS": "0.01", "STRIPE_BACKOFF_MAX_SECONDS": "0.05"}


def attempts(standin: Standin) -> list[Any]:
    return standin.requests()


def keys_of(standin: Standin) -> set[str | None]:
    return {r.idempotency_key for r in attempts(standin)}


async def metric(client: Any, line_start: str) -> float:
    """The value of the first /metrics sample whose line starts with ``line_start``."""
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start!r}")


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("caller_key", [None, "click-1"])
async def test_503_then_200_is_one_retry_with_the_same_key(
    make_service: Any, standin: Standin, token: str, conn: asyncpg.Connection, caller_key: Any
) -> None:
    service = await make_service(**FAST)
    standin.state.queue_faults([{"status": 503}])
    headers = {"Idempotency-Key": caller_key} if caller_key else None
    body = await created(await post_session(service, BODY, token, headers))
    assert [r.status for r in attempts(standin)] == [503, 200]
    (key,) = keys_of(standin)
    assert key
    row = await conn.fetchrow("SELECT * FROM audit_events")
    assert row is not None
    assert (row["http_status"], row["stripe_session_id"]) == (201, body["id"])
    assert orjson.loads(row["detail"]) == {"attempts": 2}
    retries = 'portal_gateway_upstream_retries_total{reason="server_error"}'
    assert await metric(service, retries) == 1


@pytest.mark.parametrize("code", ["rate_limit", "lock_timeout"])
async def test_429_retry_after_is_honoured(
    make_service: Any, standin: Standin, token: str, code: str
) -> None:
    service = await make_service(**FAST)
    standin.state.queue_faults([{"status": 429, "code": code, "headers": {"Retry-After": "1"}}])
    started = time.monotonic()
    await created(await post_session(service, BODY, token))
    assert time.monotonic() - started >= 1.0
    assert [r.status for r in attempts(standin)] == [429, 200]
    assert len(keys_of(standin)) == 1


async def test_retry_after_beyond_the_deadline_fails_at_once(
    make_service: Any, standin: Standin, token: str
) -> None:
    service = await make_service(**FAST)
    standin.state.queue_faults([{"status": 429, "headers": {"Retry-After": "30"}}])
    started = time.monotonic()
    resp = await post_session(service, BODY, token)
    await problem(resp, 503, "upstream_unavailable")
    assert resp.headers["Retry-After"] == "30"
    assert time.monotonic() - started < 1.0  # it did not sit out a wait it could not finish
    assert len(attempts(standin)) == 1


async def test_should_retry_false_wins_over_a_500(
    make_service: Any, standin: Standin, token: str
) -> None:
    service = await make_service(**FAST)
    standin.state.queue_faults([{"status": 500, "headers": {"Stripe-Should-Retry": "false"}}])
    resp = await post_session(service, BODY, token)
    await problem(resp, 503, "upstream_unavailable")
    assert resp.headers["Retry-After"]
    assert len(attempts(standin)) == 1


async def test_should_retry_true_wins_over_a_400(
    make_service: Any, standin: Standin, token: str
) -> None:
    service = await make_service(**FAST)
    standin.state.queue_faults([{"status": 400, "headers": {"Stripe-Should-Retry": "true"}}])
    await created(await post_session(service, BODY, token))
    assert [r.status for r in attempts(standin)] == [400, 200]
    assert len(keys_of(standin)) == 1


async def test_409_is_retried(make_service: Any, standin: Standin, token: str) -> None:
    service = await make_service(**FAST)
    standin.state.queue_faults([{"status": 409}])
    await created(await post_session(service, BODY, token))
    assert [r.status for r in attempts(standin)] == [409, 200]


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "upstream_rejected"),
        (402, "upstream_rejected"),
        (404, "upstream_rejected"),
        (401, "upstream_auth_failed"),
        (403, "upstream_auth_failed"),
    ],
)
async def test_other_4xx_are_never_retried(
    make_service: Any, standin: Standin, token: str, status: int, code: str
) -> None:
    service = await make_service(**FAST)
    standin.state.queue_faults([{"status": status, "repeat": 3}])
    await problem(await post_session(service, BODY, token), 502, code)
    assert len(attempts(standin)) == 1


async def test_persistent_500_makes_exactly_1_plus_max_retries_attempts(
    make_service: Any, standin: Standin, token: str
) -> None:
    service = await make_service(STRIPE_MAX_RETRIES="3", **FAST)
    standin.state.queue_faults([{"status": 500, "repeat": 10}])
    resp = await post_session(service, BODY, token)
    await problem(resp, 503, "upstream_unavailable")
    assert resp.headers["Retry-After"] == "1"
    assert [r.status for r in attempts(standin)] == [500] * 4
    assert len(keys_of(standin)) == 1


async def test_a_hang_is_a_504_within_the_deadline(
    make_service: Any, standin: Standin, token: str
) -> None:
    deadline = 1.2
    service = await make_service(
        STRIPE_TIMEOUT_SECONDS="0.5", REQUEST_DEADLINE_SECONDS=str(deadline), **FAST
    )
    standin.state.queue_faults([{"hang": True, "repeat": 10}])
    started = time.monotonic()
    await problem(await post_session(service, BODY, token), 504, "upstream_timeout")
    elapsed = time.monotonic() - started
    assert deadline - 0.3 <= elapsed < deadline + 0.5
    # Timeouts are retried (same key) as long as the deadline leaves room.
    assert len(attempts(standin)) >= 2
    assert len(keys_of(standin)) == 1


@pytest.mark.parametrize(
    "fault",
    [
        {"reset": True},
        {"truncated": True},  # Content-Length promised, half sent, connection closed
        {"non_json": True, "status": 502},  # a proxy's HTML error page
    ],
    ids=["reset", "truncated", "proxy-html-502"],
)
async def test_a_lost_answer_is_retried_with_the_same_key(
    make_service: Any, standin: Standin, token: str, fault: dict[str, Any]
) -> None:
    service = await make_service(**FAST)
    standin.state.queue_faults([fault])
    await created(await post_session(service, BODY, token))
    assert len(attempts(standin)) == 2
    assert len(keys_of(standin)) == 1


async def test_persistent_resets_are_503(make_service: Any, standin: Standin, token: str) -> None:
    service = await make_service(**FAST)
    standin.state.queue_faults([{"reset": True, "repeat": 10}])
    await problem(await post_session(service, BODY, token), 503, "upstream_unavailable")
    assert len(attempts(standin)) == 3


@pytest.mark.parametrize(
    "fault",
    [{"truncated": "json"}, {"non_json": True}, {"wrong_object": True}],
    ids=["half-json-200", "html-200", "wrong-object"],
)
async def test_a_2xx_that_is_not_a_session_is_502(
    make_service: Any, standin: Standin, token: str, conn: asyncpg.Connection, fault: Any
) -> None:
    service = await make_service(**FAST)
    standin.state.queue_faults([fault])
    body = await problem(await post_session(service, BODY, token), 502, "upstream_bad_response")
    assert "billing.stripe.com" not in str(body)
    assert len(attempts(standin)) == 1
    row = await conn.fetchrow("SELECT http_status, error_code FROM audit_events")
    assert row is not None
    assert tuple(row) == (502, "upstream_bad_response")


async def test_connection_refused_is_503(make_service: Any, token: str) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    service = await make_service(STRIPE_API_BASE=f"http://127.0.0.1:{port}", **FAST)
    await problem(await post_session(service, BODY, token), 503, "upstream_unavailable")
    sample = 'portal_gateway_upstream_requests_total{outcome="connection_error",status="none"}'
    assert await metric(service, sample) == 3


# --------------------------------------------------------------------------- breaker


async def test_breaker_opens_fails_fast_probes_and_closes(
    make_service: Any, standin: Standin, token: str
) -> None:
    service = await make_service(
        BREAKER_FAILURE_THRESHOLD="2",
        BREAKER_COOLDOWN_SECONDS="0.3",
        STRIPE_MAX_RETRIES="0",
        **FAST,
    )
    breaker = service.app[keys.STRIPE].breaker
    gauge = "portal_gateway_upstream_circuit_open "
    assert await metric(service, gauge) == 0

    standin.state.queue_faults([{"status": 500, "repeat": 2}])
    for _ in range(2):
        await problem(await post_session(service, BODY, token), 503, "upstream_unavailable")
    assert breaker.state == "open"
    assert await metric(service, gauge) == 1

    # Open: refused at once, Stripe is not contacted.
    resp = await post_session(service, BODY, token)
    body = await problem(resp, 503, "upstream_unavailable")
    assert resp.headers["Retry-After"] == "1"
    assert "paused" in body["detail"]
    assert len(attempts(standin)) == 2

    # Half-open: one probe; it fails, so the breaker opens again for a new cooldown.
    await until(lambda: breaker.state == "half_open", 'breaker.state == "half_open"', 5)
    standin.state.queue_faults([{"status": 500}])
    await problem(await post_session(service, BODY, token), 503, "upstream_unavailable")
    assert breaker.state == "open"
    await problem(await post_session(service, BODY, token), 503, "upstream_unavailable")
    assert len(attempts(standin)) == 3

    # Half-open again: while the (slow) probe is out, others are still refused.
    await until(lambda: breaker.state == "half_open", 'breaker.state == "half_open"', 5)
    standin.state.queue_faults([{"latency_ms": 300}])
    probe = asyncio.ensure_future(post_session(service, BODY, token))
    await until(lambda: len(attempts(standin)) == 4, "len(attempts(standin)) == 4", 5)
    await problem(await post_session(service, BODY, token), 503, "upstream_unavailable")
    await created(await probe)
    assert breaker.state == "closed"
    assert await metric(service, gauge) == 0
    await created(await post_session(service, BODY, token))
    assert len(attempts(standin)) == 5


async def test_a_cancelled_probe_does_not_wedge_the_breaker(standin: Standin) -> None:
    settings = make_settings(
        "postgresql://unused@127.0.0.1:1/unused",
        standin.url,
        BREAKER_FAILURE_THRESHOLD="1",
        BREAKER_COOLDOWN_SECONDS="0.05",
        STRIPE_MAX_RETRIES="0",
    )
    session = StripeClient.new_session(settings)
    try:
        client = StripeClient(session, settings, None)
        params = {"customer": "cus_42"}

        async def call() -> Any:
            deadline = asyncio.get_running_loop().time() + 5
            return await client.create_portal_session(
                params, idempotency_key=f"k-{random.random()}", deadline=deadline
            )

        standin.state.queue_faults([{"status": 500}])
        with pytest.raises(ServiceUnavailable):
            await call()
        await until(
            lambda: client.breaker.state == "half_open", 'client.breaker.state == "half_open"', 5
        )

        # The probe hangs at Stripe and its request is cancelled (client gone, shutdown).
        standin.state.queue_faults([{"hang": True}])
        probe = asyncio.ensure_future(call())
        await until(lambda: len(attempts(standin)) == 2, "len(attempts(standin)) == 2", 5)
        with pytest.raises(ServiceUnavailable):  # one probe at a time
            await call()
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe

        # The slot is free again: the next request is the probe, and it closes the breaker.
        assert client.breaker.state == "half_open"
        session_obj = await call()
        assert session_obj.id.startswith("bps_")
        assert client.breaker.state == "closed"
    finally:
        await session.close()


def test_breaker_unit_transitions() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=3600, metrics=None)
    for _ in range(2):
        breaker.settle(breaker.admit(), False)
    assert breaker.state == "open"
    with pytest.raises(ServiceUnavailable) as info:
        breaker.admit()
    assert info.value.headers["Retry-After"] == "3600"
    # A request that had started before the breaker opened and then got a good
    # answer is evidence enough that Stripe is back.
    ticket_before = object()
    breaker.settle(ticket_before, True)
    assert breaker.state == "closed"
    # No verdict (cancelled, or Stripe never asked) changes nothing.
    breaker.settle(breaker.admit(), None)
    breaker.settle(breaker.admit(), False)
    assert breaker.state == "closed"


# --------------------------------------------------------------------------- pool and shedding


async def test_the_connection_pool_to_stripe_is_bounded(
    make_service: Any, standin: Standin, token: str
) -> None:
    service = await make_service(STRIPE_MAX_CONNECTIONS="2")
    standin.state.set_latency(200)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, sum(1 for r in attempts(standin) if r.status is None))
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    started = time.monotonic()
    try:
        responses = await asyncio.gather(*(post_session(service, BODY, token) for _ in range(6)))
    finally:
        watcher.cancel()
    for resp in responses:
        await created(resp)
    assert 1 <= peak <= 2
    assert time.monotonic() - started >= 3 * 0.2  # three waves of two


async def test_above_max_in_flight_requests_are_shed_at_once(
    make_service: Any, standin: Standin, token: str
) -> None:
    service = await make_service(MAX_IN_FLIGHT="2")
    standin.state.set_latency(500)
    slow: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(post_session(service, BODY, token)) for _ in range(2)
    ]
    await until(lambda: len(attempts(standin)) == 2, "len(attempts(standin)) == 2", 5)

    started = time.monotonic()
    resp = await post_session(service, BODY, token)
    await problem(resp, 503, "overloaded")
    assert resp.headers["Retry-After"] == "1"
    assert not any(task.done() for task in slow)  # answered before the slow ones ended
    assert time.monotonic() - started < 0.4
    # Probes and scrapes are never shed.
    assert (await service.get("/readyz")).status == 200
    assert (await service.get("/healthz")).status == 200
    assert len(attempts(standin)) == 2

    for resp in await asyncio.gather(*slow):
        await created(resp)
    await created(await post_session(service, BODY, token))
