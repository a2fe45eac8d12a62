"""The audit trail: one row and one ``audit`` log line per decided request.

The row is written before the response leaves (SPEC §6); if it can't be
written, a successful request is turned into 503 so no portal URL is handed
out unaudited. Rows never hold the portal URL or any token.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from service.db import queries
from service.db.pool import Database
from service.errors import DatabaseUnavailable
from service.metrics import Metrics

logger = structlog.get_logger("audit")

ACTION_CREATE_SESSION = "portal_session.create"


@dataclass(slots=True)
class AuditEvent:
    """Filled in as the request is decided; written once at the end."""

    request_id: str
    principal_type: str
    principal_id: str
    action: str
    client_ip: str | None
    user_agent: str | None
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    user_id: str | None = None
    flow: str | None = None
    outcome: str = "failed"
    http_status: int = 500
    error_code: str | None = None
    stripe_customer_id: str | None = None
    stripe_session_id: str | None = None
    stripe_request_id: str | None = None
    duration_ms: float = 0.0
    detail: dict[str, Any] | None = None


def outcome_for(status: int) -> str:
    """created / refused (the caller's problem) / failed (ours or Stripe's) / abandoned."""
    if status < 400:
        return "created"
    if status == 499:
        return "abandoned"  # the caller hung up before the answer
    return "refused" if status < 500 else "failed"


def clean_ip(value: str | None) -> str | None:
    """The address as Postgres' inet takes it, or None if it is not one."""
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(AuditEvent))


async def record(db: Database, metrics: Metrics, event: AuditEvent) -> None:
    """Write the row, then the log line. Raise DatabaseUnavailable if the row failed."""
    event.outcome = outcome_for(event.http_status)
    event.client_ip = clean_ip(event.client_ip)
    if event.user_agent is not None:
        event.user_agent = event.user_agent[:512]
    # A shallow copy: dataclasses.asdict deep-copies, a measurable cost per request.
    fields = {name: getattr(event, name) for name in _FIELD_NAMES}
    fields["occurred_at"] = event.occurred_at.isoformat()
    try:
        await queries.insert_audit(db, event)
    except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
        # Whatever the reason, an unaudited decision is not handed out.
        metrics.audit_events.labels(outcome="write_failed").inc()
        logger.error("audit_write_failed", error=type(exc).__name__, **fields)
        raise DatabaseUnavailable("The audit trail could not be written; retry later.") from exc
    metrics.audit_events.labels(outcome=event.outcome).inc()
    logger.info("audit", **fields)
