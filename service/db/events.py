"""Stripe webhook events received: claimed once by id, marked with their result, purged.

An event's row is what makes a redelivery a no-op. Stripe retries a delivery
for up to three days, so a row 30 days after its receipt guards nothing any
more and is purged (SPEC §6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from service.db.pool import Connection, Database

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


# The newest fact about a customer that an earlier delivery already decided
# on: what orders a metadata event, even after the mapping it made is gone
# (ix__stripe_events__customer_created). $4: the event being decided (NULL for none).
NEWEST_CUSTOMER_FACT = """
SELECT max(created) AS created, coalesce(bool_or(type = $5::text), false) AS deleted
FROM stripe_events
WHERE customer = $1 AND type = ANY($2::text[]) AND result = ANY($3::text[])
  AND id IS DISTINCT FROM $4::text
"""


@dataclass(frozen=True, slots=True)
class CustomerFact:
    """The newest decided event about a customer, and whether any said it was deleted."""

    created: datetime
    deleted: bool


async def newest_customer_fact(
    conn: Connection,
    customer: str,
    *,
    types: Sequence[str],
    results: Sequence[str],
    deletion_type: str,
    excluding: str | None,
) -> CustomerFact | None:
    """The newest event of ``types`` about ``customer`` that ended in one of ``results``."""
    row = await conn.fetchrow(
        NEWEST_CUSTOMER_FACT, customer, list(types), list(results), excluding, deletion_type
    )
    if row is None or row["created"] is None:
        return None
    return CustomerFact(row["created"], row["deleted"])


# By our receipt time, not Stripe's `created`: a redelivery is received again.
EVENT_RETENTION = timedelta(days=30)
# One statement deletes at most a batch (a short transaction, few locks); one
# purge at most PURGE_MAX_BATCHES of them, the rest waits for the next round.
PURGE_BATCH = 1000
PURGE_MAX_BATCHES = 10

PURGE_EVENTS = """
DELETE FROM stripe_events WHERE id IN (
    SELECT id FROM stripe_events WHERE received_at < now() - $1::interval
    ORDER BY received_at LIMIT $2)
"""


async def purge_old_events(
    db: Database,
    *,
    older_than: timedelta = EVENT_RETENTION,
    batch: int = PURGE_BATCH,
    max_batches: int = PURGE_MAX_BATCHES,
) -> int:
    """Delete events received more than ``older_than`` ago, in batches; how many."""
    purged = 0
    for _ in range(max_batches):
        status = await db.execute("purge_stripe_events", PURGE_EVENTS, older_than, batch)
        deleted = int(status.split()[-1])
        purged += deleted
        if deleted < batch:
            break
    return purged
