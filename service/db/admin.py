"""Database administration: create the database if missing, manage API clients."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from service.db.pool import Database


async def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if it does not exist; True if created."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name:
        return False
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(maintenance, timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        # Identifiers can't be parameters; quote_ident-equivalent escaping.
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(f"CREATE DATABASE {quoted}")
        return True
    finally:
        await conn.close()


@dataclass(frozen=True, slots=True)
class ClientInfo:
    name: str
    scopes: tuple[str, ...]
    rate_limit_per_minute: int
    created_at: datetime
    revoked_at: datetime | None


INSERT_CLIENT = """
INSERT INTO api_clients (name, token_hash, scopes, rate_limit_per_minute)
VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO NOTHING
RETURNING id
"""
LIST_CLIENTS = """
SELECT name, scopes, rate_limit_per_minute, created_at, revoked_at
FROM api_clients ORDER BY name
"""
REVOKE_CLIENT = """
UPDATE api_clients SET revoked_at = now()
WHERE name = $1 AND revoked_at IS NULL
RETURNING id
"""
DELETE_REVOKED_CLIENT = "DELETE FROM api_clients WHERE name = $1 AND revoked_at IS NOT NULL"


async def create_client(
    db: Database, name: str, token_hash: bytes, scopes: list[str], rate_limit: int
) -> bool:
    """Store a new client; False if the name is taken."""
    row = await db.fetchrow("insert_client", INSERT_CLIENT, name, token_hash, scopes, rate_limit)
    return row is not None


async def list_clients(db: Database) -> list[ClientInfo]:
    """All clients, revoked ones included."""
    rows = await db.fetch("list_clients", LIST_CLIENTS)
    return [
        ClientInfo(
            r["name"],
            tuple(r["scopes"]),
            r["rate_limit_per_minute"],
            r["created_at"],
            r["revoked_at"],
        )
        for r in rows
    ]


async def revoke_client(db: Database, name: str) -> bool:
    """Revoke an active client; False if there is none by that name."""
    return await db.fetchrow("revoke_client", REVOKE_CLIENT, name) is not None


async def forget_revoked_client(db: Database, name: str) -> None:
    """Free a revoked client's name (the demo re-creates its client each run)."""
    await db.execute("delete_revoked_client", DELETE_REVOKED_CLIENT, name)


SEED_DEMO = """
INSERT INTO portal_profiles (name, configuration_id, default_return_url, is_default)
VALUES ('default', NULL, $1, true)
ON CONFLICT (name) DO UPDATE SET default_return_url = EXCLUDED.default_return_url;
INSERT INTO customers (user_id, stripe_customer_id, locale)
VALUES ('demo-user', 'cus_demo0001', 'en')
ON CONFLICT (user_id) DO NOTHING;
INSERT INTO subscriptions (stripe_subscription_id, user_id, external_ref, status, item_id,
                           price_id, quantity)
VALUES ('sub_demo0001', 'demo-user', 'team-plan', 'active', 'si_demo0001', 'price_basic_monthly', 1)
ON CONFLICT (stripe_subscription_id) DO NOTHING;
INSERT INTO plans (plan, stripe_price_id, active) VALUES ('pro-yearly', 'price_pro_yearly', true)
ON CONFLICT (plan) DO NOTHING;
INSERT INTO offers (name, kind, stripe_id) VALUES ('stay-20', 'coupon', 'coupon_stay20')
ON CONFLICT (name) DO NOTHING;
"""


async def seed_demo(db: Database, return_url: str) -> None:
    """The demo's user, subscription, plan, profile and offer (idempotent)."""
    async with db.connection() as conn, conn.transaction():
        # Several statements need the simple protocol, which takes no parameters.
        quoted = "'" + return_url.replace("'", "''") + "'"
        await conn.execute(SEED_DEMO.replace("$1", quoted))
