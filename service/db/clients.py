"""API clients: the token-hash lookup of the request path and the CLI's ``clients`` commands."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.db.pool import Database

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
