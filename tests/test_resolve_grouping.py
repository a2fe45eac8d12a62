"""Grouped RESOLVE (service/db/grouping.py, service/db/resolve.py): the lookups of
concurrent requests are answered by one statement, each request its own row, and
nothing a lone lookup would refuse or see is lost by sharing.

To make "concurrent" exact rather than likely, a test holds an ACCESS EXCLUSIVE
lock on ``plans`` from a connection of its own: the first RESOLVE waits for it,
the lookups of the requests that follow queue behind it, and the lock is let go
once they all have. Nothing sleeps for a fixed time: each step polls, bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import keys
from service.db.pool import Database
from service.db.resolve import RESOLVE, RESOLVE_BATCH, RESOLVE_GROUPED
from tests.conftest import create_client_token
from tests.helpers import created, post_session, problem, table_locked, until, with_real_servers

pytestmark = [pytest.mark.usefixtures("world"), pytest.mark.timeout(60)]

DB_TIMEOUT = "10"
# RESOLVE's opening lines (pg_stat_activity keeps only the first 1 kB of a query).
WAITING_LOOKUPS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock'
  AND query LIKE '%c.user_id IS NOT NULL AS customer_found%'
"""
USERS = ("u_42", "u_7", "u_none", "u_two", "u_multi")
CUSTOMERS = {"u_42": "cus_42", "u_7": "cus_7", "u_none": "cus_none", "u_two": "cus_two"}
CUSTOMERS["u_multi"] = "cus_multi"


class Lookups:
    """What the RESOLVE runner of one service has done, from its metrics and queue."""

    def __init__(self, service: Any, conn: asyncpg.Connection) -> None:
        app = service.server.app
        self.db: Database = app[keys.DB]
        self.registry = app[keys.METRICS].registry
        self.conn = conn

    def _sample(self, name: str, **labels: str) -> int:
        return int(self.registry.get_sample_value(name, {"query": "resolve", **labels}) or 0)

    @property
    def statements(self) -> int:
        return self._sample("portal_gateway_db_query_duration_seconds_count")

    @property
    def batches(self) -> int:
        return self._sample("portal_gateway_db_batch_rows_count")

    @property
    def callers_sent(self) -> int:
        return self._sample("portal_gateway_db_batch_rows_sum")

    @property
    def queued(self) -> int:
        group = self.db.grouped(RESOLVE_GROUPED)
        return group.queued if group is not None else 0

    async def until_held(self, callers: int) -> None:
        """One RESOLVE waits for the lock, ``callers`` sent or queued behind it."""

        async def held() -> bool:
            waiting = await self.conn.fetchval(WAITING_LOOKUPS)
            return bool(waiting == 1 and self.callers_sent + self.queued == callers)

        await until(held, f"{callers} lookups sent or queued behind a held RESOLVE")


def _request(service: Any, token: str, user: str, n: int) -> asyncio.Future[Any]:
    return asyncio.ensure_future(
        post_session(service, {"user_id": user}, token, {"X-Request-ID": f"rg-{n}"})
    )


async def test_concurrent_lookups_share_one_statement_each_gets_its_own_row(
    make_service: Any, token: str, conn: asyncpg.Connection, database_url: str
) -> None:
    service = await make_service(DB_TIMEOUT_SECONDS=DB_TIMEOUT)
    lookups = Lookups(service, conn)
    users = [USERS[n % len(USERS)] for n in range(12)]
    async with table_locked(database_url, "plans", "ACCESS EXCLUSIVE"):
        first = _request(service, token, users[0], 0)
        await lookups.until_held(1)
        rest = [_request(service, token, user, n) for n, user in enumerate(users) if n > 0]
        await lookups.until_held(len(users))
        assert lookups.batches == 1
    for resp in [await first, *await asyncio.gather(*rest)]:
        await created(resp)
    # The first alone, then every lookup that queued behind it: two statements.
    assert (lookups.statements, lookups.batches, lookups.callers_sent) == (2, 2, len(users))
    # Each request got its own user's customer, not a neighbour's.
    rows = await conn.fetch(
        "SELECT request_id, user_id, stripe_customer_id FROM audit_events"
        " WHERE action = 'portal_session.create'"
    )
    assert {r["request_id"]: (r["user_id"], r["stripe_customer_id"]) for r in rows} == {
        f"rg-{n}": (user, CUSTOMERS[user]) for n, user in enumerate(users)
    }


async def test_a_token_revoked_while_its_lookup_queues_is_refused(
    make_service: Any, token: str, conn: asyncpg.Connection, database_url: str
) -> None:
    """Revocation stays effective on the very next request: a lookup queued behind
    a batch in flight runs after the revocation committed, and sees it."""
    doomed = await create_client_token(conn, name="doomed")
    service = await make_service(DB_TIMEOUT_SECONDS=DB_TIMEOUT)
    lookups = Lookups(service, conn)
    # The doomed token is cached by the authenticator: its next lookup confirms it.
    await created(await _request(service, doomed, "u_42", 0))
    sent = lookups.callers_sent
    async with table_locked(database_url, "plans", "ACCESS EXCLUSIVE"):
        first = _request(service, token, "u_7", 1)
        await lookups.until_held(sent + 1)
        queued = _request(service, doomed, "u_42", 2)
        alive = _request(service, token, "u_two", 3)
        await lookups.until_held(sent + 3)
        await conn.execute("UPDATE api_clients SET revoked_at = now() WHERE name = 'doomed'")
    await created(await first)
    await problem(await queued, 401, "unauthenticated")
    await created(await alive)


async def test_a_value_the_database_refuses_fails_only_its_own_lookup(
    database_url: str, conn: asyncpg.Connection
) -> None:
    db = await Database.connect(database_url, query_timeout=10)
    try:
        async with table_locked(database_url, "plans", "ACCESS EXCLUSIVE"):
            first = asyncio.ensure_future(
                db.run_grouped(RESOLVE_GROUPED, ["u_42", None, None, None, False, None])
            )
            await until(_waiting(conn), "the first RESOLVE waiting for the lock")
            good = [
                asyncio.ensure_future(
                    db.run_grouped(RESOLVE_GROUPED, [user, None, None, None, True, None])
                )
                for user in USERS
            ]
            # A NUL no validation let through: text Postgres cannot store.
            bad = asyncio.ensure_future(
                db.run_grouped(RESOLVE_GROUPED, ["u_\x00", None, None, None, False, None])
            )
            group = db.grouped(RESOLVE_GROUPED)
            await until(_queued(group, len(USERS) + 1), "the lookups queued")
        assert (await first)["stripe_customer_id"] == "cus_42"
        for user, row in zip(USERS, await asyncio.gather(*good), strict=True):
            assert row["stripe_customer_id"] == CUSTOMERS[user]
        with pytest.raises(asyncpg.DataError):
            await bad
    finally:
        await db.close()


def _waiting(conn: asyncpg.Connection) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(await conn.fetchval(WAITING_LOOKUPS) == 1)

    return check


def _queued(group: Any, callers: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return group is not None and bool(group.queued == callers)

    return check


# --- the batch statement answers exactly what the single one does ------------------

SNAPSHOT = (
    '{"active": true, "features": {"payment_method_update": {"enabled": true},'
    ' "subscription_cancel": {"enabled": false}, "subscription_update": {"enabled": true,'
    ' "products": [{"product": "prod_1", "prices": ["price_pro_yearly", "price_b"]}]}}}'
)
REVOKED = hashlib.sha256(b"revoked").digest()
ACTIVE = hashlib.sha256(b"active").digest()

lookup = st.tuples(
    st.sampled_from([*USERS, "u_acct", "u_missing", "o'brien", "ü-ñ", ""]),
    st.sampled_from([None, "default", "connect", "missing"]),
    st.sampled_from([None, "pro-yearly", "legacy", "nope"]),
    st.sampled_from([None, "stay-20", "spring-promo", "nope"]),
    st.booleans(),
    st.sampled_from([None, ACTIVE, REVOKED, b"\x00" * 32]),
)


@pytest.fixture
async def lookup_world(conn: asyncpg.Connection, database_url: str) -> AsyncIterator[Any]:
    """A connection of the service's pool (its JSON codecs), profiles with and without
    a snapshot, an active and a revoked client."""
    await conn.execute("UPDATE portal_profiles SET snapshot = $1 WHERE name = 'connect'", SNAPSHOT)
    for name, token_hash, revoked in (("active", ACTIVE, False), ("revoked", REVOKED, True)):
        await conn.execute(
            "INSERT INTO api_clients (name, token_hash, scopes, rate_limit_per_minute,"
            " revoked_at) VALUES ($1, $2, '{portal_sessions:create}', 60,"
            " CASE WHEN $3 THEN now() END)",
            name,
            token_hash,
            revoked,
        )
    db = await Database.connect(database_url)
    try:
        async with db.connection() as pooled:
            yield pooled
    finally:
        await db.close()


@with_real_servers(max_examples=150)
@given(batch=st.lists(lookup, min_size=2, max_size=12))
async def test_the_batch_answers_each_caller_what_a_lone_lookup_would(
    lookup_world: Any, batch: list[tuple[Any, ...]]
) -> None:
    conn = lookup_world
    together = await conn.fetch(RESOLVE_BATCH, *RESOLVE_GROUPED.batch_args(batch))
    alone = [await conn.fetchrow(RESOLVE, *values) for values in batch]
    assert [dict(row) for row in together] == [dict(row) for row in alone if row is not None]
    assert len(together) == len(batch)
