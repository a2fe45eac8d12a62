"""Every SQL statement of the request path and the CLI, parameterised.

The portal request needs at most two lookups: the client token (service
callers only) and ``RESOLVE``, which fetches the customer, portal profile,
plan, offer and subscriptions, and claims the idempotency key, in one round
trip. Every lookup goes through a primary key or unique index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from service.db.pool import Database

# --- service clients -----------------------------------------------------

FIND_CLIENT = """
SELECT id, name, scopes, rate_limit_per_minute
FROM api_clients
WHERE token_hash = $1 AND revoked_at IS NULL
"""


@dataclass(frozen=True, slots=True)
class ClientRow:
    id: int
    name: str
    scopes: tuple[str, ...]
    rate_limit_per_minute: int


async def find_client(db: Database, token_hash: bytes) -> ClientRow | None:
    """The active client holding this token hash, if any."""
    row = await db.fetchrow("find_client", FIND_CLIENT, token_hash)
    if row is None:
        return None
    return ClientRow(row["id"], row["name"], tuple(row["scopes"]), row["rate_limit_per_minute"])


# --- resolution ----------------------------------------------------------

_RESOLVE_SELECT = """
SELECT
    c.user_id IS NOT NULL AS customer_found,
    c.stripe_customer_id, c.stripe_account_id, c.locale AS customer_locale,
    c.stale_at IS NOT NULL AS customer_stale,
    prof.name AS profile_name, prof.configuration_id, prof.on_behalf_of,
    prof.default_return_url,
    pl.stripe_price_id AS plan_price_id, pl.active AS plan_active,
    o.kind AS offer_kind, o.stripe_id AS offer_stripe_id,
    CASE WHEN $5 THEN (
        SELECT json_agg(json_build_object(
            'id', s.stripe_subscription_id, 'ref', s.external_ref, 'status', s.status,
            'item_id', s.item_id, 'stale', s.stale_at IS NOT NULL)
            ORDER BY s.stripe_subscription_id)
        FROM subscriptions s WHERE s.user_id = $1
    ) END AS subscriptions
    {idempotency_columns}
FROM (SELECT 1) AS one
LEFT JOIN customers c ON c.user_id = $1
LEFT JOIN LATERAL (
    SELECT p.name, p.configuration_id, p.on_behalf_of, p.default_return_url
    FROM portal_profiles p WHERE p.name = coalesce($2, c.portal)
    UNION ALL
    SELECT p.name, p.configuration_id, p.on_behalf_of, p.default_return_url
    FROM portal_profiles p WHERE p.is_default AND $2::text IS NULL AND c.portal IS NULL
    LIMIT 1
) prof ON true
LEFT JOIN plans pl ON pl.plan = $3
LEFT JOIN offers o ON o.name = $4
"""

# Formatted once at import from constants: no caller input reaches the SQL text.
RESOLVE = _RESOLVE_SELECT.format(idempotency_columns="")

# The caller's Idempotency-Key is claimed in the same round trip. An expired
# key is taken over with a fresh upstream key, so an old replay starts a new
# session instead of handing back an expired URL.
RESOLVE_WITH_IDEMPOTENCY = """
WITH claim AS (
    INSERT INTO idempotency_keys AS k (principal, key, request_hash, upstream_key, expires_at)
    VALUES ($6, $7, $8, $9, now() + make_interval(secs => $10))
    ON CONFLICT (principal, key) DO UPDATE
        SET request_hash = EXCLUDED.request_hash, upstream_key = EXCLUDED.upstream_key,
            created_at = now(), expires_at = EXCLUDED.expires_at
        WHERE k.expires_at <= now()
    RETURNING request_hash, upstream_key
), existing AS (
    SELECT request_hash, upstream_key FROM idempotency_keys WHERE principal = $6 AND key = $7
)
""" + _RESOLVE_SELECT.format(
    idempotency_columns=""",
    coalesce((SELECT request_hash FROM claim), (SELECT request_hash FROM existing))
        AS idem_request_hash,
    coalesce((SELECT upstream_key FROM claim), (SELECT upstream_key FROM existing))
        AS idem_upstream_key"""
)


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    principal: str
    key: str
    request_hash: bytes
    upstream_key: str
    ttl_seconds: int


async def resolve(
    db: Database,
    *,
    user_id: str,
    portal: str | None,
    plan: str | None,
    offer: str | None,
    with_subscriptions: bool,
    claim: IdempotencyClaim | None,
) -> dict[str, Any]:
    """Everything needed to build the Stripe call for one user, as one row."""
    args: list[Any] = [user_id, portal, plan, offer, with_subscriptions]
    if claim is None:
        row = await db.fetchrow("resolve", RESOLVE, *args)
    else:
        args += [
            claim.principal,
            claim.key,
            claim.request_hash,
            claim.upstream_key,
            float(claim.ttl_seconds),
        ]
        row = await db.fetchrow("resolve_idempotent", RESOLVE_WITH_IDEMPOTENCY, *args)
        if row is not None and row["idem_request_hash"] is None:
            # A concurrent request claimed the key after our snapshot was taken;
            # a second statement sees its row.
            row = await db.fetchrow("resolve_idempotent", RESOLVE_WITH_IDEMPOTENCY, *args)
    assert row is not None  # the query always yields exactly one row
    return dict(row)


# --- audit ---------------------------------------------------------------

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


async def insert_audit(db: Database, event: Any) -> None:
    """Append one audit event (an ``audit.AuditEvent``)."""
    await db.execute("insert_audit", INSERT_AUDIT, *audit_args(event))


# --- operations ----------------------------------------------------------

CURRENT_REVISION = "SELECT version_num FROM alembic_version"


async def current_revision(db: Database) -> str | None:
    """The alembic revision the database is at, or None if unmigrated."""
    try:
        row = await db.fetchrow("current_revision", CURRENT_REVISION)
    except asyncpg.UndefinedTableError:  # not migrated yet
        return None
    return None if row is None else str(row["version_num"])


RECORD_MODE = """
WITH ins AS (
    INSERT INTO deployment (livemode) VALUES ($1) ON CONFLICT (singleton) DO NOTHING
    RETURNING livemode
)
SELECT livemode FROM ins UNION ALL SELECT livemode FROM deployment
LIMIT 1
"""


async def record_mode(db: Database, livemode: bool) -> bool:
    """Record the database's mode on first use; return the mode it maps."""
    row = await db.fetchrow("record_mode", RECORD_MODE, livemode)
    if row is None:
        # Another process inserted the row after our snapshot was taken (two
        # replicas starting on a new database); a second statement sees it.
        row = await db.fetchrow("record_mode", RECORD_MODE, livemode)
    assert row is not None
    return bool(row["livemode"])


PURGE_IDEMPOTENCY = "DELETE FROM idempotency_keys WHERE expires_at < now() - interval '1 hour'"


async def purge_expired_idempotency_keys(db: Database) -> int:
    """Drop keys long past their TTL; returns how many."""
    status = await db.execute("purge_idempotency", PURGE_IDEMPOTENCY)
    return int(status.split()[-1])
