"""Portal links (SPEC §13): stored at creation, looked at by GET, consumed by the click.

Every statement finds the link by the SHA-256 of its token (a unique index);
the token itself never reaches the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from service.db.pool import Database

INSERT_LINK = """
INSERT INTO portal_links
    (token_hash, principal_type, principal_id, user_id, request, return_url, request_id,
     expires_at)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, now() + make_interval(secs => $8))
RETURNING id, expires_at
"""

# A link made by a service client lives only as long as that client may still
# open sessions: revoking the client (or taking its scope away) kills its links.
_LINK = """
SELECT l.id, l.token_hash, l.principal_type, l.principal_id, l.user_id, l.request,
       l.return_url, l.opened_at, l.expires_at <= now() AS expired,
       l.principal_type = 'user' OR c.id IS NOT NULL AS creator_active
FROM portal_links l
LEFT JOIN api_clients c
    ON l.principal_type = 'client' AND c.name = l.principal_id AND c.revoked_at IS NULL
    AND $2 = ANY(c.scopes)
WHERE l.token_hash = $1
"""

VIEW_LINK = _LINK

# Consumed in one statement: of concurrent clicks, the UPDATE of exactly one
# finds ``opened_at`` still NULL (the others wait on the row lock, re-check and
# match nothing), and only that one gets ``taken``.
CONSUME_LINK = f"""
WITH link AS ({_LINK}), taken AS (
    UPDATE portal_links p SET opened_at = clock_timestamp()
    FROM link
    WHERE p.id = link.id AND p.opened_at IS NULL AND NOT link.expired AND link.creator_active
    RETURNING p.opened_at
)
SELECT link.*, taken.opened_at AS taken_at FROM link LEFT JOIN taken ON true
"""  # noqa: S608 - built once, from the constant above

# The click failed before a portal URL left: the link may be clicked again.
RELEASE_LINK = "UPDATE portal_links SET opened_at = NULL WHERE id = $1 AND opened_at = $2"

# Kept a day past expiry so "expired" (not "unknown") is what a late click sees.
PURGE_LINKS = """
DELETE FROM portal_links WHERE id IN (
    SELECT id FROM portal_links WHERE expires_at < now() - interval '1 day' LIMIT 10000
)
"""


@dataclass(frozen=True, slots=True)
class Link:
    """A stored link as a click sees it."""

    id: int
    principal_type: str
    principal_id: str
    user_id: str
    request: dict[str, Any]
    return_url: str | None
    opened_at: datetime | None
    expired: bool
    creator_active: bool
    # Set when this statement consumed the link.
    taken_at: datetime | None = None


def _link(row: Any) -> Link:
    request = row["request"]
    return Link(
        row["id"],
        row["principal_type"],
        row["principal_id"],
        row["user_id"],
        orjson.loads(request) if isinstance(request, str | bytes) else request,
        row["return_url"],
        row["opened_at"],
        row["expired"],
        row["creator_active"],
        row.get("taken_at"),
    )


async def insert_link(
    db: Database,
    *,
    token_hash: bytes,
    principal_type: str,
    principal_id: str,
    user_id: str,
    request: dict[str, Any],
    return_url: str | None,
    request_id: str,
    ttl_seconds: int,
) -> tuple[int, datetime]:
    """Store a new link; its id and expiry."""
    row = await db.fetchrow(
        "insert_portal_link",
        INSERT_LINK,
        token_hash,
        principal_type,
        principal_id,
        user_id,
        orjson.dumps(request).decode(),
        return_url,
        request_id,
        ttl_seconds,
    )
    assert row is not None  # INSERT ... RETURNING yields the row
    return row["id"], row["expires_at"]


async def view_link(db: Database, token_hash: bytes, scope: str) -> Link | None:
    """The link, unchanged; None when no link has this token."""
    row = await db.fetchrow("view_portal_link", VIEW_LINK, token_hash, scope)
    return None if row is None else _link(row)


async def consume_link(db: Database, token_hash: bytes, scope: str) -> Link | None:
    """Take the link if it is open; ``taken_at`` says whether this call took it."""
    row = await db.fetchrow("consume_portal_link", CONSUME_LINK, token_hash, scope)
    return None if row is None else _link(row)


async def release_link(db: Database, link_id: int, taken_at: datetime) -> None:
    """Give back a link whose click failed, unless something else changed it since."""
    await db.execute("release_portal_link", RELEASE_LINK, link_id, taken_at)


async def purge_old_links(db: Database) -> int:
    """Drop links a day past their expiry, at most 10,000 per call; returns how many."""
    status = await db.execute("purge_portal_links", PURGE_LINKS)
    return int(status.split()[-1])
