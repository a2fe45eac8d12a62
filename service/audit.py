"""The audit trail: one row and one ``audit`` log line per decided action.

Every writer — the request path, webhooks, resync and the CLI — calls
:func:`emit`, which always writes both. On the request path the row is written
before the response leaves (SPEC §6); if it can't be written, the caller gets
503 instead of an unaudited portal URL. Rows never hold the portal URL or any
token.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from service.db import audit as audit_db
from service.db.pool import Connection, Database
from service.errors import DatabaseUnavailable
from service.metrics import Metrics

logger = structlog.get_logger("audit")

# Actions (the ``action`` column): what was decided.
ACTION_CREATE_SESSION = "portal_session.create"
ACTION_MAPPING_CREATE = "mapping.create"
ACTION_MAPPING_UPDATE = "mapping.update"
ACTION_MAPPING_DELETE = "mapping.delete"
ACTION_MAPPING_RESYNC = "mapping.resync"

MAX_USER_AGENT = 512


@dataclass(slots=True)
class AuditEvent:
    """Filled in as the action is decided; emitted once at the end."""

    request_id: str
    principal_type: str
    principal_id: str
    action: str
    client_ip: str | None = None
    user_agent: str | None = None
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    user_id: str | None = None
    flow: str | None = None
    # None: derived from http_status when emitted (see outcome_for).
    outcome: str | None = None
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


async def emit(target: Database | Connection, metrics: Metrics | None, event: AuditEvent) -> None:
    """Write the row, then the ``audit`` log line; DatabaseUnavailable if the row failed.

    ``target`` is the pool, or the connection of the caller's transaction when
    the row must commit (or roll back) with the change it records.
    """
    if event.outcome is None:
        event.outcome = outcome_for(event.http_status)
    event.client_ip = clean_ip(event.client_ip)
    if event.user_agent is not None:
        event.user_agent = event.user_agent[:MAX_USER_AGENT]
    # A shallow copy: dataclasses.asdict deep-copies, a measurable cost per request.
    fields = {name: getattr(event, name) for name in _FIELD_NAMES}
    fields["occurred_at"] = event.occurred_at.isoformat()
    try:
        await audit_db.insert(target, event)
    except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
        # Whatever the reason, an unaudited decision is not handed out.
        if metrics is not None:
            metrics.audit_events.labels(outcome="write_failed").inc()
        logger.error("audit_write_failed", error=type(exc).__name__, **fields)
        raise DatabaseUnavailable("The audit trail could not be written; retry later.") from exc
    if metrics is not None:
        metrics.audit_events.labels(outcome=event.outcome).inc()
    logger.info("audit", **fields)
