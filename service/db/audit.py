"""The audit trail: append a row (the table refuses UPDATE and DELETE); read a time range.

Rows appended through the pool are group-committed (``grouping.py``): the
rows of concurrent requests go in one statement and one commit, each request
waiting for the commit of its own. The monthly partitions and their pruning are
in ``audit_partitions.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg

from service.db.grouping import GroupedStatement
from service.db.pool import Connection, Database

INSERT_AUDIT = """
INSERT INTO audit_events (
    occurred_at, request_id, principal_type, principal_id, user_id, action, flow, outcome,
    http_status, error_code, stripe_customer_id, stripe_session_id, stripe_request_id,
    client_ip, user_agent, duration_ms, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
"""

# INSERT_AUDIT for many rows: one array per column, in the same order; one prepared
# statement whatever the number of rows.
INSERT_AUDIT_BATCH = """
INSERT INTO audit_events (
    occurred_at, request_id, principal_type, principal_id, user_id, action, flow, outcome,
    http_status, error_code, stripe_customer_id, stripe_session_id, stripe_request_id,
    client_ip, user_agent, duration_ms, detail)
SELECT * FROM unnest(
    $1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::smallint[], $10::text[], $11::text[], $12::text[], $13::text[], $14::inet[],
    $15::text[], $16::double precision[], $17::jsonb[])
"""

# Both are "insert_audit" in the query metrics: one observation per statement, whatever
# its rows (portal_gateway_db_batch_rows counts those).
AUDIT_ROWS = GroupedStatement("insert_audit", INSERT_AUDIT, INSERT_AUDIT_BATCH)

AUDIT_FIELDS = (
    "occurred_at",
    "request_id",
    "principal_type",
    "principal_id",
    "user_id",
    "action",
    "flow",
    "outcome",
    "http_status",
    "error_code",
    "stripe_customer_id",
    "stripe_session_id",
    "stripe_request_id",
    "client_ip",
    "user_agent",
    "duration_ms",
    "detail",
)


def audit_args(event: Any) -> list[Any]:
    """INSERT_AUDIT's parameters from an ``audit.AuditEvent``, in column order."""
    return [getattr(event, name) for name in AUDIT_FIELDS]


async def insert(target: Database | Connection, event: Any) -> None:
    """Append one ``audit.AuditEvent``: through the pool (committed with the rows of
    concurrent callers before this returns), or in the caller's transaction (committed
    with the change it records)."""
    if isinstance(target, Database):
        await target.run_grouped(AUDIT_ROWS, audit_args(event))
    else:
        await target.execute(INSERT_AUDIT, *audit_args(event))


# Oldest first; [since, until), until None meaning open-ended. The inet as text
# (host(): the address without a /32 or /128 mask).
EXPORT_AUDIT = """
SELECT id, occurred_at, request_id, principal_type, principal_id, user_id, action, flow,
       outcome, http_status, error_code, stripe_customer_id, stripe_session_id,
       stripe_request_id, host(client_ip) AS client_ip, user_agent, duration_ms, detail
FROM audit_events
WHERE occurred_at >= $1 AND occurred_at < coalesce($2::timestamptz, 'infinity')
ORDER BY occurred_at, id
"""


async def stream_range(
    conn: Connection,
    since: datetime,
    until: datetime | None,
    *,
    prefetch: int,
    fetch_timeout: float,
) -> AsyncIterator[asyncpg.Record]:
    """The rows of ``[since, until)`` through a server-side cursor, ``prefetch`` at a time.

    Only one batch is in memory at once, however many rows the range holds. A
    cursor lives in a transaction: the caller opens it.
    """
    rows = conn.cursor(EXPORT_AUDIT, since, until, prefetch=prefetch, timeout=fetch_timeout)
    async for row in rows:
        yield row
