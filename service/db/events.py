"""Stripe webhook events received: claimed once by id, then marked with their result."""

from __future__ import annotations

from datetime import datetime

from service.db.pool import Connection

# The event id is claimed first: a replay (or a concurrent duplicate delivery,
# which waits here on the primary key) finds it taken and changes nothing.
CLAIM_EVENT = """
INSERT INTO stripe_events (id, type, created, result, customer, object_id)
VALUES ($1, $2, $3, 'processing', $4, $5)
ON CONFLICT (id) DO NOTHING
RETURNING true
"""

FINISH_EVENT = "UPDATE stripe_events SET result = $2 WHERE id = $1"


async def claim_event(
    conn: Connection,
    event_id: str,
    event_type: str,
    created: datetime,
    customer: str | None,
    object_id: str | None,
) -> bool:
    """Record the event; False if it was already recorded (a duplicate delivery)."""
    claimed = await conn.fetchval(CLAIM_EVENT, event_id, event_type, created, customer, object_id)
    return bool(claimed)


async def finish_event(conn: Connection, event_id: str, result: str) -> None:
    """Store what applying the event did."""
    await conn.execute(FINISH_EVENT, event_id, result)
