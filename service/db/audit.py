"""The audit trail's one statement: append a row (the table refuses UPDATE and DELETE)."""

from __future__ import annotations

from typing import Any

from service.db.pool import Connection, Database

INSERT_AUDIT = """
INSERT INTO audit_events (
    occurred_at, request_id, principal_type, principal_id, user_id, action, flow, outcome,
    http_status, error_code, stripe_customer_id, stripe_session_id, stripe_request_id,
    client_ip, user_agent, duration_ms, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
"""


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
    """Append one ``audit.AuditEvent``: through the pool, or in the caller's transaction."""
    if isinstance(target, Database):
        await target.execute("insert_audit", INSERT_AUDIT, *audit_args(event))
    else:
        await target.execute(INSERT_AUDIT, *audit_args(event))
