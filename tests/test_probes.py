"""Probes and scrapes at scale (SPEC §5, §8): ``/readyz`` answers from a
database check at most a second old, and ``/metrics`` can live on its own port.

The database checks are counted with the service's own metric
(``portal_gateway_db_query_duration_seconds_count{query="current_revision"}``);
time is moved with the readiness clock, never slept.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service import keys
from service.handlers.health import metrics_app
from service.readiness import MAX_AGE_SECONDS, Readiness
from tests.helpers import problem


def _revision_queries(service: Any) -> float:
    value = service.app[keys.METRICS].registry.get_sample_value(
        "portal_gateway_db_query_duration_seconds_count", {"query": "current_revision"}
    )
    return value or 0.0


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(service: Any) -> FrozenClock:
    frozen = FrozenClock()
    readiness: Readiness = service.app[keys.READINESS]
    readiness.clock = frozen
    return frozen


async def _readyz(client: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/readyz")
    return resp.status, await resp.json()


async def test_many_probes_and_scrapes_cost_one_query_per_second(
    service: Any, clock: FrozenClock
) -> None:
    before = _revision_queries(service)  # the start-up check
    answers = await asyncio.gather(
        *(_readyz(service) for _ in range(40)), *(service.get("/metrics") for _ in range(10))
    )
    probes = answers[:40]
    assert {status for status, _ in probes} == {200}
    assert all(body["checks"] == {"database": "ok", "migrations": "ok"} for _, body in probes)
    assert _revision_queries(service) == before + 1

    clock.now += MAX_AGE_SECONDS - 0.001
    for _ in range(10):
        assert (await _readyz(service))[0] == 200
    assert _revision_queries(service) == before + 1

    clock.now += 0.001  # a second old: the next probe asks again, once
    await asyncio.gather(*(_readyz(service) for _ in range(10)))
    assert _revision_queries(service) == before + 2


async def test_draining_is_unready_at_once_whatever_the_cache(
    service: Any, clock: FrozenClock
) -> None:
    assert (await _readyz(service))[0] == 200
    queries = _revision_queries(service)
    service.app[keys.LIFECYCLE].draining = True
    status, body = await _readyz(service)
    assert (status, body["status"], body["checks"]["draining"]) == (503, "not_ready", "yes")
    assert _revision_queries(service) == queries  # no query needed to say so
    text = await (await service.get("/metrics")).text()
    assert "portal_gateway_ready 0.0" in text


async def test_a_hung_database_is_asked_once_by_all_the_probes_waiting(
    make_service: Any, conn: asyncpg.Connection
) -> None:
    service = await make_service(DB_TIMEOUT_SECONDS="0.3")
    clock = FrozenClock()
    service.app[keys.READINESS].clock = clock
    before = _revision_queries(service)
    # The check's SELECT waits for this lock until DB_TIMEOUT_SECONDS: a hung server.
    hold = conn.transaction()
    await hold.start()
    try:
        await conn.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
        answers = await asyncio.gather(*(_readyz(service) for _ in range(20)))
    finally:
        await hold.rollback()
    assert {status for status, _ in answers} == {503}
    assert all(body["checks"] == {"database": "unavailable"} for _, body in answers)
    assert _revision_queries(service) == before + 1
    # Back: the next check, a second later, says so.
    clock.now += MAX_AGE_SECONDS
    assert (await _readyz(service))[0] == 200
    assert _revision_queries(service) == before + 2


async def test_metrics_port_serves_metrics_and_the_api_port_does_not(
    make_service: Any,
) -> None:
    # The listener itself is cli._serve's (tests/test_shutdown.py runs it for
    # real); here the two apps it serves.
    service = await make_service(METRICS_PORT="9464")
    await problem(await service.get("/metrics"), 404, "not_found")
    assert (await _readyz(service))[0] == 200
    async with TestClient(TestServer(metrics_app(service.app), host="127.0.0.1")) as scraper:
        resp = await scraper.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
        # The API app's registry: its requests, its pool, its readiness.
        assert 'route="unmatched",status="404"' in text
        assert "portal_gateway_ready 1.0" in text
        assert 'portal_gateway_db_pool_connections{state="idle"}' in text
        # Nothing but /metrics on that port.
        for path in ("/readyz", "/healthz", "/v1/portal-sessions", "/api/docs/swagger.json"):
            assert (await scraper.get(path)).status == 404, path
