"""SPEC §14 with a real fleet: three ``serve`` processes on one database and one Redis.

Each test starts three replicas (``python -m service serve``, as production
runs them) against the test's database, the in-process Stripe stand-in and a
throwaway ``redis-server``, and spreads its requests over them:

* one ``Idempotency-Key`` sent to all three at once opens one Stripe session;
* a client limited to N a minute gets N answers in total, not 3N, and its
  refusals one audit row for the fleet;
* with the budget at 5 a second, the stand-in never sees more than 5 calls
  arrive in any second under a burst from all three; what cannot have a place
  in time is ``503 upstream_unavailable`` with ``Retry-After``;
* Redis stopped mid-run: requests keep succeeding and every replica's
  ``portal_gateway_redis_up`` reads 0; Redis back: the limits are shared again.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.stripe.client import SESSIONS_PATH
from tests.conftest import (
    ALLOWED_ORIGIN,
    LEAK_PATTERNS,
    STRIPE_TEST_KEY,
    Standin,
    create_client_token,
)
from tests.helpers import PATH, until
from tests.redis_server import RedisServer

PROJECT = Path(__file__).resolve().parent.parent
REPLICAS = 3
pytestmark = pytest.mark.usefixtures("world")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    base: str
    log: Path


@dataclass
class Fleet:
    replicas: list[Replica]
    http: aiohttp.ClientSession

    async def post(
        self, i: int, token: str, body: dict[str, Any], key: str | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        replica = self.replicas[i % len(self.replicas)]
        async with self.http.post(
            replica.base + PATH, data=orjson.dumps(body), headers=headers
        ) as resp:
            return resp.status, await resp.json(content_type=None), dict(resp.headers)

    async def burst(
        self, token: str, count: int, body: dict[str, Any] | None = None
    ) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
        """``count`` requests at once, spread round-robin over the replicas."""
        payload = body or {"user_id": "u_42"}
        return list(await asyncio.gather(*(self.post(i, token, payload) for i in range(count))))

    async def gauge(self, i: int, name: str) -> float:
        async with self.http.get(self.replicas[i].base + "/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return float(sample.value)
        raise AssertionError(f"{name} not exported")


@pytest.fixture
async def fleet(
    database_url: str, standin: Standin, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Replica] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(**extra: str) -> Fleet:
        async def one() -> Replica:
            port = _free_port()
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "DATABASE_URL": database_url,
                "STRIPE_API_KEY": STRIPE_TEST_KEY,
                "STRIPE_API_BASE": standin.url,
                "RETURN_URL_ALLOWLIST": ALLOWED_ORIGIN,
                "REDIS_URL": redis_server.url,
                # These tests count exact shares: a busy machine's event-loop lag must
                # not pass for a hung Redis (tests/test_shared_limits.py times that).
                "REDIS_TIMEOUT_SECONDS": "2",
                "HOST": "127.0.0.1",
                "PORT": str(port),
                "LOG_FORMAT": "json",
                **extra,
            }
            log = tmp_path / f"serve-{port}.jsonl"
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "service", "serve"),
                    cwd=PROJECT,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                )
            replica = Replica(process, f"http://127.0.0.1:{port}", log)
            started.append(replica)
            return replica

        replicas = [await one() for _ in range(REPLICAS)]
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        sessions.append(http)

        async def all_ready() -> bool:
            for replica in replicas:
                assert replica.process.returncode is None, replica.log.read_text()[-2000:]
                try:
                    async with http.get(replica.base + "/readyz") as resp:
                        if resp.status != 200:
                            return False
                except aiohttp.ClientConnectionError:
                    return False
            return True

        await until(all_ready, "three replicas answering /readyz 200", 30)
        return Fleet(replicas, http)

    try:
        yield start
    finally:
        for http in sessions:
            await http.close()
        for replica in started:
            if replica.process.returncode is None:
                replica.process.terminate()
        for replica in started:
            try:
                await asyncio.wait_for(replica.process.wait(), timeout=10)
            except TimeoutError:
                replica.process.kill()
                await replica.process.wait()
        leaks = [
            line
            for replica in started
            for line in replica.log.read_text().splitlines()
            if LEAK_PATTERNS.search(line) or redis_server.url in line
        ]
        assert leaks == [], leaks[:3]


async def test_one_idempotency_key_sent_to_three_replicas_opens_one_session(
    fleet: Callable[..., Any], standin: Standin, token: str
) -> None:
    replicas: Fleet = await fleet()
    # Slow enough that all three are at Stripe at the same time.
    standin.state.set_latency(300)
    body = {"user_id": "u_42", "flow": {"type": "payment_method_update"}}
    answers = await asyncio.gather(
        *(replicas.post(i, token, body, key="order-7") for i in range(REPLICAS))
    )
    assert [status for status, _, _ in answers] == [201] * REPLICAS
    assert len({answer["id"] for _, answer, _ in answers}) == 1
    assert len({answer["url"] for _, answer, _ in answers}) == 1
    # The Postgres claim gave the three one upstream key; Stripe made one session.
    sent = standin.requests()
    assert 1 <= len(sent) <= REPLICAS
    assert len({r.idempotency_key for r in sent}) == 1
    stored = [s for s in standin.state.idempotency.values() if s.path == SESSIONS_PATH]
    assert len(stored) == 1


async def test_a_client_limited_to_n_a_minute_gets_n_across_the_fleet(
    fleet: Callable[..., Any], conn: asyncpg.Connection
) -> None:
    replicas: Fleet = await fleet()
    limit = 6
    tiny = await create_client_token(conn, name="tiny", rate_limit=limit)
    answers = await replicas.burst(tiny, 10 * REPLICAS)
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [201] * limit + [429] * (10 * REPLICAS - limit)
    assert all(int(h["Retry-After"]) >= 1 for s, _, h in answers if s == 429)
    # One refusal window for the fleet: one rate_limited audit row, not one per replica.
    rows = await conn.fetchval(
        "SELECT count(*) FROM audit_events WHERE principal_id = 'tiny' AND http_status = 429"
    )
    assert rows == 1
    for i in range(REPLICAS):
        assert await replicas.gauge(i, "portal_gateway_redis_up") == 1


async def test_the_budget_holds_the_fleet_to_5_calls_a_second_at_stripe(
    fleet: Callable[..., Any], standin: Standin, token: str
) -> None:
    deadline = 3.0
    replicas: Fleet = await fleet(
        STRIPE_MAX_REQUESTS_PER_SECOND="5",
        REQUEST_DEADLINE_SECONDS=str(deadline),
        STRIPE_TIMEOUT_SECONDS="2",
    )
    answers = await replicas.burst(token, 20)
    statuses = [status for status, _, _ in answers]
    # Places at 0, 1.1 and 2.2 s fit in a 3 s deadline; the fourth wave does not.
    assert set(statuses) <= {201, 503}, statuses
    assert statuses.count(201) >= 10, statuses
    assert statuses.count(503) >= 5, statuses
    for status, problem, headers in answers:
        if status == 503:
            assert problem["code"] == "upstream_unavailable"
            assert int(headers["Retry-After"]) >= 1
    arrivals = sorted(r.received_at for r in standin.requests())
    assert len(arrivals) == statuses.count(201)  # a refused request never reached Stripe
    # No six calls within any one second, as the stand-in saw them arrive.
    crowded = [
        (round(arrivals[i + 5] - arrivals[i], 3))
        for i in range(len(arrivals) - 5)
        if arrivals[i + 5] - arrivals[i] <= 1.0
    ]
    assert crowded == [], (crowded, [round(a - arrivals[0], 3) for a in arrivals])


async def test_redis_stopped_mid_run_then_back(
    fleet: Callable[..., Any], redis_server: RedisServer, conn: asyncpg.Connection, token: str
) -> None:
    replicas: Fleet = await fleet()
    tiny = await create_client_token(conn, name="tiny", rate_limit=3)
    shared = sorted(s for s, _, _ in await replicas.burst(tiny, 2 * REPLICAS))
    assert shared == [201] * 3 + [429] * REPLICAS

    redis_server.stop()
    # Nobody is refused because of Redis; each replica notices and says so.
    during = await replicas.burst(token, 3 * REPLICAS)
    assert [s for s, _, _ in during] == [201] * (3 * REPLICAS)
    for i in range(REPLICAS):
        assert await replicas.gauge(i, "portal_gateway_redis_up") == 0

    redis_server.start()  # same port, empty: it keeps nothing

    async def all_shared_again() -> bool:
        await replicas.burst(token, REPLICAS)  # each replica asks Redis after its backoff
        gauges = [await replicas.gauge(i, "portal_gateway_redis_up") for i in range(REPLICAS)]
        return gauges == [1.0] * REPLICAS

    await until(all_shared_again, "every replica sharing through Redis again", 15)
    again = await create_client_token(conn, name="again", rate_limit=3)
    resumed = sorted(s for s, _, _ in await replicas.burst(again, 3 * REPLICAS))
    assert resumed == [201] * 3 + [429] * (3 * REPLICAS - 3)
    for replica in replicas.replicas:
        events = [orjson.loads(line).get("event") for line in replica.log.read_text().splitlines()]
        assert events.count("redis_unavailable") == 1, events
        assert "redis_recovered" in events
