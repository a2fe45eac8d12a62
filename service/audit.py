"""The audit trail: one row and one ``audit`` log line per decided action.

Every writer — the request path, webhooks, resync and the CLI — calls
:func:`emit`, which writes both — except for a principal hammering past its
rate limit, whose refusals after the first of each minute get the log line and
the metric but no row (SPEC §6). On the request path the row is written
before the response leaves (SPEC §6); if it can't be written, the caller gets
503 instead of an unaudited portal URL. Rows never hold the portal URL or any
token.
"""

from __future__ import annotations

import dataclasses
import functools
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
from service.safe_text import MAX_HEADER_TEXT, printable

logger = structlog.get_logger("audit")

# Actions (the ``action`` column): what was decided.
ACTION_CREATE_SESSION = "portal_session.create"
# Portal links (SPEC §13): made by a caller, opened by whoever holds the link.
ACTION_PORTAL_LINK_CREATE = "portal_link_create"
ACTION_PORTAL_LINK_OPEN = "portal_link_open"
ACTION_MAPPING_CREATE = "mapping.create"
ACTION_MAPPING_UPDATE = "mapping.update"
ACTION_MAPPING_DELETE = "mapping.delete"
ACTION_MAPPING_RESYNC = "mapping.resync"
ACTION_MAPPING_BACKFILL = "mapping.backfill"
# Stripe metadata (SPEC §11): a user linked to, re-pointed at or unlinked from a
# customer; a metadata fact that an explicit mapping (or another account) overrules.
ACTION_MAPPING_LINK = "mapping.link"
ACTION_MAPPING_UNLINK = "mapping.unlink"
ACTION_MAPPING_CONFLICT = "mapping_conflict"
# `sync --from-stripe`: one row per run with its counts (its changes have their own rows).
ACTION_MAPPING_SYNC = "mapping.sync"
# The mapping API (SPEC §11): PUT/GET/DELETE /v1/users/{user_id}[/customer].
ACTION_MAPPING_API_PUT = "mapping.api.put"
ACTION_MAPPING_API_GET = "mapping.api.get"
ACTION_MAPPING_API_DELETE = "mapping.api.delete"
# `profiles apply` (SPEC §12): one row per run, what changed at Stripe and in the rows.
ACTION_PROFILES_APPLY = "profiles_apply"
# A Stripe webhook reported a portal configuration; stored as its profiles' snapshot (SPEC §12).
ACTION_PROFILE_SNAPSHOT = "profile_snapshot"

MAX_USER_AGENT = MAX_HEADER_TEXT


class AuditRowRefused(Exception):
    """The database refused the row's data: a bug (a 500), not an outage (a 503).

    Header text is made printable before it is stored, so no request can cause it.
    """


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


# The same few addresses (proxies, busy callers) come again and again.
@functools.lru_cache(maxsize=1024)
def clean_ip(value: str | None) -> str | None:
    """The address as Postgres' inet takes it, or None if it is not one."""
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(AuditEvent))


async def emit(
    target: Database | Connection,
    metrics: Metrics | None,
    event: AuditEvent,
    *,
    store: bool = True,
) -> None:
    """Write the row, then the ``audit`` log line; DatabaseUnavailable if the row failed
    (AuditRowRefused if the database refused its data).

    ``target`` is the pool, or the connection of the caller's transaction when
    the row must commit (or roll back) with the change it records. ``store=False``
    (a principal refused again within its rate-limit window, SPEC §6) skips the
    row: the event is still counted and logged, with ``stored=False``.
    """
    if event.outcome is None:
        event.outcome = outcome_for(event.http_status)
    event.client_ip = clean_ip(event.client_ip)
    if event.user_agent is not None:
        # Any header bytes (SPEC §5): Postgres refuses NUL and lone surrogates.
        event.user_agent = printable(event.user_agent, MAX_USER_AGENT)
    if event.stripe_request_id is not None:
        # Stripe's Request-Id header: the same goes for upstream header bytes.
        event.stripe_request_id = printable(event.stripe_request_id, MAX_HEADER_TEXT)
    # A shallow copy: dataclasses.asdict deep-copies, a measurable cost per request.
    fields = {name: getattr(event, name) for name in _FIELD_NAMES}
    fields["occurred_at"] = event.occurred_at.isoformat()
    if not store:
        if metrics is not None:
            metrics.audit_event(event.outcome)
        logger.info("audit", stored=False, **fields)
        return
    try:
        await audit_db.insert(target, event)
    except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
        # Whatever the reason, an unaudited decision is not handed out.
        if metrics is not None:
            metrics.audit_event("write_failed")
        logger.error("audit_write_failed", error=type(exc).__name__, **fields)
        if isinstance(exc, asyncpg.DataError):
            # Class 22, or a value asyncpg cannot encode: what we sent was wrong, the
            # database is fine. Not a 503 nor counted as one.
            raise AuditRowRefused(f"the audit row was refused: {type(exc).__name__}") from exc
        raise DatabaseUnavailable("The audit trail could not be written; retry later.") from exc
    if metrics is not None:
        metrics.audit_event(event.outcome)
    logger.info("audit", **fields)
