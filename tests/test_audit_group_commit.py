"""§6 with group commit: the audit rows of concurrent requests share a statement and a
commit, and each is still committed before its response (service/db/grouping.py).

To make "concurrent" exact rather than likely, a test holds a SHARE lock on
audit_events from a connection of its own: the first batch's INSERT waits for it,
the rows of the requests that follow queue behind that batch, and the lock is let
go once they all have. Nothing here sleeps for a fixed time: each step polls for
the state it needs (the blocked INSERT in pg_stat_activity, the writer's queue,
the metrics), bounded.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest
import structlog
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from service import audit, keys
from service.audit import AuditEvent
from service.db.audit import AUDIT_ROWS
from service.db.pool import Database
from service.logs import tee
from service.metrics import Metrics
from tests.helpers import created, post_session, problem, table_locked, until

pytestmark = [pytest.mark.usefixtures("world"), pytest.mark.timeout(60)]

# Long enough that a batch held by the test's lock is not cut short by its timeout.
DB_TIMEOUT = "10"
WAITING_INSERTS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock'
  AND query LIKE '%INSERT INTO audit_events%'
"""


class Writer:
    """What the audit writer of one Database has done, read from its metrics and queue."""

    def __init__(self, db: Database, metrics: Metrics, conn: asyncpg.Connection) -> None:
        self.db = db
        self.metrics = metrics
        self.conn = conn

    def _sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    @property
    def statements(self) -> int:
        """insert_audit statements run (each observed once it has ended)."""
        return int(
            self._sample("portal_gateway_db_query_duration_seconds_count", query="insert_audit")
        )

    @property
    def batches(self) -> int:
        return int(self._sample("portal_gateway_db_batch_rows_count", query="insert_audit"))

    @property
    def batches_of_one(self) -> int:
        return int(
            self._sample("portal_gateway_db_batch_rows_bucket", query="insert_audit", le="1.0")
        )

    @property
    def rows_sent(self) -> int:
        """Rows of the batches started so far."""
        return int(self._sample("portal_gateway_db_batch_rows_sum", query="insert_audit"))

    @property
    def queued(self) -> int:
        group = self.db.grouped(AUDIT_ROWS)
        return group.queued if group is not None else 0

    async def waiting(self) -> list[int]:
        """Backends whose audit INSERT waits for the lock."""
        return [r["pid"] for r in await self.conn.fetch(WAITING_INSERTS)]

    async def until_held(self, rows: int, after: int | None = None) -> int:
        """Wait until a batch waits for the lock with ``rows`` rows sent or queued; its
        backend's pid (another than ``after``, one that was terminated)."""
        pids: list[int] = []

        async def held() -> bool:
            nonlocal pids
            pids = [pid for pid in await self.waiting() if pid != after]
            return len(pids) == 1 and self.rows_sent + self.queued == rows

        await until(held, f"{rows} audit rows sent or queued behind a held INSERT")
        return pids[0]


def _writer(service: TestClient[Any, Any], conn: asyncpg.Connection) -> Writer:
    app = service.server.app
    return Writer(app[keys.DB], app[keys.METRICS], conn)


def _request(service: TestClient[Any, Any], token: str, n: int, **headers: str) -> Any:
    return asyncio.ensure_future(
        post_session(service, {"user_id": "u_42"}, token, {"X-Request-ID": f"gc-{n}", **headers})
    )


async def _row(conn: asyncpg.Connection, request_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT outcome, http_status FROM audit_events WHERE request_id = $1", request_id
    )


async def test_concurrent_rows_share_one_statement_each_committed_before_its_answer(
    make_service: Any, token: str, conn: asyncpg.Connection, database_url: str
) -> None:
    service = await make_service(DB_TIMEOUT_SECONDS=DB_TIMEOUT)
    writer = _writer(service, conn)
    requests = 12
    async with table_locked(database_url, "audit_events", "SHARE"):
        pending = [_request(service, token, n) for n in range(requests)]
        await writer.until_held(requests)
        assert writer.batches == 1  # the first row (or the few first) went alone, at once
    for done in asyncio.as_completed(pending):
        resp: ClientResponse = await done
        await created(resp)
        # Read from another connection as soon as the answer is in: already committed.
        row = await _row(conn, resp.headers["X-Request-ID"])
        assert tuple(row or ()) == ("created", 201)
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == requests
    # The first batch, then every row that queued behind it: two statements, two commits.
    assert (writer.statements, writer.batches, writer.rows_sent) == (2, 2, requests)

    # Idle again: a lone row goes at once, by itself (the one-row statement).
    alone = writer.batches_of_one
    await created(await _request(service, token, requests))
    assert (writer.statements, writer.batches, writer.rows_sent) == (3, 3, requests + 1)
    assert writer.batches_of_one == alone + 1


async def test_a_refused_row_fails_only_its_own_request(
    make_service: Any, token: str, conn: asyncpg.Connection, database_url: str
) -> None:
    # The database refuses one row's data (class 22) — as it would a NUL that slipped through.
    await conn.execute(
        "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.user_agent = 'bad' THEN"
        "   RAISE EXCEPTION 'bad text' USING ERRCODE = 'character_not_in_repertoire';"
        " END IF; RETURN NEW; END $$"
    )
    await conn.execute(
        "CREATE TRIGGER refuse_bad BEFORE INSERT ON audit_events"
        " FOR EACH ROW EXECUTE FUNCTION refuse_bad()"
    )
    service = await make_service(DB_TIMEOUT_SECONDS=DB_TIMEOUT)
    writer = _writer(service, conn)
    async with table_locked(database_url, "audit_events", "SHARE"):
        first = _request(service, token, 0)
        await writer.until_held(1)
        rest = [_request(service, token, n) for n in range(1, 5)]
        bad = _request(service, token, 5, **{"User-Agent": "bad"})
        await writer.until_held(6)
    await created(await first)
    for resp in await asyncio.gather(*rest):
        await created(resp)
    await problem(await bad, 500, "internal_error")  # a refused row is a bug, not an outage
    ids = {r[0] for r in await conn.fetch("SELECT request_id FROM audit_events")}
    assert ids == {f"gc-{n}" for n in range(5)}
    # The batch of five failed as a whole, then went one row at a time.
    assert (writer.batches, writer.statements) == (2, 1 + 1 + 5)
    metrics = service.server.app[keys.METRICS]
    failed = metrics.registry.get_sample_value(
        "portal_gateway_audit_events_total", {"outcome": "write_failed"}
    )
    assert failed == 1


async def test_a_batch_lost_to_an_outage_fails_all_its_requests_then_writes_recover(
    make_service: Any, token: str, conn: asyncpg.Connection, database_url: str
) -> None:
    service = await make_service(DB_TIMEOUT_SECONDS=DB_TIMEOUT)
    writer = _writer(service, conn)
    async with table_locked(database_url, "audit_events", "SHARE"):
        alone = _request(service, token, 0)
        pid = await writer.until_held(1)
        batch = [_request(service, token, n) for n in range(1, 6)]
        await until(_queued(writer, 5), "five rows queued behind the first")
        # The connection of the INSERT in flight dies (a crash, a failover, a kill).
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        await problem(await alone, 503, "database_unavailable")
        # The five go next, together; that connection dies mid-statement too.
        pid = await writer.until_held(6, after=pid)
        assert writer.batches == 2
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        for resp in await asyncio.gather(*batch):
            await problem(resp, 503, "database_unavailable")
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 0
    # The server is back: the next requests are served and audited.
    for n in (6, 7):
        await created(await _request(service, token, n))
    ids = {r[0] for r in await conn.fetch("SELECT request_id FROM audit_events")}
    assert ids == {"gc-6", "gc-7"}


def _queued(writer: Writer, rows: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return writer.queued == rows

    return check


async def test_a_caller_that_hangs_up_while_its_row_waits_keeps_the_row(
    make_service: Any, token: str, conn: asyncpg.Connection, database_url: str
) -> None:
    service = await make_service(DB_TIMEOUT_SECONDS=DB_TIMEOUT)
    writer = _writer(service, conn)
    metrics = service.server.app[keys.METRICS]

    async def hung_up() -> bool:
        value = metrics.registry.get_sample_value(
            "portal_gateway_http_requests_total",
            {"method": "POST", "route": "/v1/portal-sessions", "status": "499"},
        )
        return value == 1

    async with table_locked(database_url, "audit_events", "SHARE"):
        first = _request(service, token, 0)
        await writer.until_held(1)
        gone = _request(service, token, 1)
        await until(_queued(writer, 1), "the second row queued")
        gone.cancel()  # the client hangs up; the server cancels its handler
        await until(hung_up, "the handler cancelled (499)")
    await created(await first)

    async def stored() -> bool:
        return await _row(conn, "gc-1") is not None

    # Its batch still ran: the row (of the success it was waiting to answer) is there.
    await until(stored, "the hung-up request's row committed")
    assert tuple(await _row(conn, "gc-1") or ()) == ("created", 201)
    # ...and the writer goes on.
    await created(await _request(service, token, 2))
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 3


def _event(n: int) -> AuditEvent:
    return AuditEvent(
        request_id=f"direct-{n}",
        principal_type="client",
        principal_id="billing-frontend",
        action=audit.ACTION_CREATE_SESSION,
        http_status=201,
    )


async def test_close_writes_the_queued_rows_before_the_pool_closes(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Shutdown cancels what is still running; the rows it queued are written anyway."""
    metrics = Metrics()
    db = await Database.connect(database_url, metrics=metrics, query_timeout=10)
    writer = Writer(db, metrics, conn)
    closed = False
    try:
        async with table_locked(database_url, "audit_events", "SHARE"):
            emits = [asyncio.ensure_future(audit.emit(db, metrics, _event(0)))]
            await writer.until_held(1)
            emits += [asyncio.ensure_future(audit.emit(db, metrics, _event(n))) for n in (1, 2)]
            await until(_queued(writer, 2), "two rows queued behind the held one")
            for task in emits:
                task.cancel()  # e.g. handlers cancelled at the end of the shutdown grace
            closing = asyncio.ensure_future(db.close())
            await asyncio.sleep(0)  # closing has begun: it waits for the writer
            assert not closing.done()
        await closing
        closed = True
        for task in emits:
            assert task.cancelled()
    finally:
        if not closed:
            await db.close()
    ids = {r[0] for r in await conn.fetch("SELECT request_id FROM audit_events")}
    assert ids == {"direct-0", "direct-1", "direct-2"}
    assert writer.statements == 2


async def test_a_row_lost_after_its_caller_left_is_still_logged(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """No caller is left to log and count it (audit.emit does): the writer says so."""
    metrics = Metrics()
    db = await Database.connect(database_url, metrics=metrics, query_timeout=10)
    writer = Writer(db, metrics, conn)
    try:
        with tee(io.StringIO()) as captured:
            async with table_locked(database_url, "audit_events", "SHARE"):
                structlog.contextvars.bind_contextvars(request_id="the-caller")
                emit = asyncio.ensure_future(audit.emit(db, metrics, _event(0)))
                structlog.contextvars.clear_contextvars()
                pid = await writer.until_held(1)
                emit.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await emit
                assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)

                async def logged() -> bool:
                    return "grouped_insert_failed" in captured.getvalue()

                await until(logged, "the lost row logged")
    finally:
        await db.close()
    lines = [orjson.loads(line) for line in captured.getvalue().splitlines()]
    (line,) = [line for line in lines if line.get("event") == "grouped_insert_failed"]
    assert (line["query"], line["error"], line["caller"]) == (
        "insert_audit",
        "DatabaseUnavailable",
        "cancelled",
    )
    assert "request_id" not in line  # the writer logs as none of the requests it serves
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 0
