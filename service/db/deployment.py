"""The database as a deployment: created if missing, its migration revision, its test/live mode."""

from __future__ import annotations

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


READ_MODE = "SELECT livemode FROM deployment"


async def read_mode(db: Database) -> bool | None:
    """The mode the database maps, None before anything recorded it (a read-only check)."""
    row = await db.fetchrow("read_mode", READ_MODE)
    return None if row is None else bool(row["livemode"])
