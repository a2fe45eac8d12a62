"""SQL that keeps the customer and subscription mapping true: webhook upserts, stale marks, resync.

Ordering is decided by Postgres, not Python: the subscription upsert only
overwrites a row whose ``last_event_at`` is older than the event (``ON CONFLICT
DO UPDATE ... WHERE`` re-checks the newest committed row version under its row
lock), so concurrent deliveries for one subscription end with the newest
event's state whatever order they commit in. Every statement goes through a
primary key or unique index. Functions that take a ``Connection`` run inside
the caller's transaction on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from service.db.pool import Connection, Database
from service.domain import SubscriptionState

# The owner is found through the unique customer (or Accounts v2 account) id,
# on the event's Connect account ($13; NULL: the platform's own customers).
# With no owner nothing is inserted and no row comes back: an unknown customer.
# A deletion applies once, whatever its time (deletion is final in Stripe);
# anything else applies only to a row that is not deleted and whose last
# event is older. On a tie (Stripe's `created` has one-second resolution) the
# later delivery wins, except a `created` event, which is always a first state.
APPLY_SUBSCRIPTION = """
WITH owner AS (
    SELECT user_id FROM customers
    WHERE stripe_customer_id = $2::text AND connected_account IS NOT DISTINCT FROM $13::text
    UNION ALL
    SELECT user_id FROM customers
    WHERE stripe_account_id = $3::text AND connected_account IS NOT DISTINCT FROM $13::text
    LIMIT 1
), applied AS (
    INSERT INTO subscriptions AS s (
        stripe_subscription_id, user_id, status, item_id, price_id, quantity,
        cancel_at, cancel_at_period_end, last_event_at, deleted_at, stale_at, updated_at)
    SELECT $1::text, owner.user_id, $4::text, $5::text, $6::text, $7::integer,
           $11::timestamptz, $12::boolean,
           $8::timestamptz, CASE WHEN $9::boolean THEN $8::timestamptz END, NULL, now()
    FROM owner
    ON CONFLICT (stripe_subscription_id) DO UPDATE SET
        user_id = EXCLUDED.user_id,
        -- A ref is unique per user: it does not follow a subscription to another user.
        external_ref = CASE WHEN s.user_id = EXCLUDED.user_id THEN s.external_ref END,
        status = EXCLUDED.status,
        item_id = EXCLUDED.item_id,
        price_id = EXCLUDED.price_id,
        quantity = EXCLUDED.quantity,
        cancel_at = EXCLUDED.cancel_at,
        cancel_at_period_end = EXCLUDED.cancel_at_period_end,
        last_event_at = greatest(s.last_event_at, EXCLUDED.last_event_at),
        deleted_at = EXCLUDED.deleted_at,
        stale_at = NULL,
        updated_at = now()
    WHERE s.deleted_at IS NULL AND (
        $9::boolean
        OR s.last_event_at IS NULL
        OR s.last_event_at < EXCLUDED.last_event_at
        OR (s.last_event_at = EXCLUDED.last_event_at AND NOT $10::boolean))
    RETURNING s.external_ref, (s.xmax = 0) AS inserted
)
SELECT owner.user_id, applied.inserted, applied.external_ref
FROM owner LEFT JOIN applied ON true
"""


@dataclass(frozen=True, slots=True)
class Applied:
    """What the subscription upsert did: no owner, superseded, inserted or updated."""

    user_id: str | None
    applied: bool
    inserted: bool
    external_ref: str | None


async def apply_subscription(
    conn: Connection,
    sub: SubscriptionState,
    event_time: datetime,
    *,
    deletion: bool,
    creation: bool,
    connected_account: str | None,
) -> Applied:
    """Upsert the subscription if the event is newer than what the row holds.

    Only a customer mapped on ``connected_account`` (None: the platform) owns it:
    an event from one Connect account never touches another's mappings.
    """
    row = await conn.fetchrow(
        APPLY_SUBSCRIPTION,
        sub.id,
        sub.customer,
        sub.account,
        sub.status,
        sub.item_id,
        sub.price_id,
        sub.quantity,
        event_time,
        deletion,
        creation,
        sub.cancel_at,
        sub.cancel_at_period_end,
        connected_account,
    )
    if row is None:
        return Applied(None, applied=False, inserted=False, external_ref=None)
    inserted = row["inserted"]
    return Applied(
        row["user_id"],
        applied=inserted is not None,
        inserted=bool(inserted),
        external_ref=row["external_ref"],
    )


# The subquery sees the rows the cascade is about to delete. Only a mapping on
# the event's Connect account ($2; NULL: the platform) is the event's to delete.
DELETE_CUSTOMER = """
DELETE FROM customers c
WHERE c.stripe_customer_id = $1 AND c.connected_account IS NOT DISTINCT FROM $2
RETURNING c.user_id, ARRAY(
    SELECT s.stripe_subscription_id FROM subscriptions s
    WHERE s.user_id = c.user_id ORDER BY s.stripe_subscription_id) AS subscriptions
"""


async def delete_customer(
    conn: Connection, stripe_customer_id: str, *, connected_account: str | None
) -> tuple[str, list[str]] | None:
    """Remove the customer mapping on ``connected_account`` (and, by cascade, its subscriptions)."""
    row = await conn.fetchrow(DELETE_CUSTOMER, stripe_customer_id, connected_account)
    if row is None:
        return None
    return row["user_id"], list(row["subscriptions"])


# --- stale marks -------------------------------------------------------------

# Only while the row still maps that very id, and only once: the caller counts
# a mapping going stale, not every request that finds it stale.
MARK_CUSTOMER_STALE = """
UPDATE customers SET stale_at = now(), updated_at = now()
WHERE user_id = $1 AND (stripe_customer_id = $2 OR stripe_account_id = $2)
  AND stale_at IS NULL
RETURNING true
"""

MARK_SUBSCRIPTION_STALE = """
UPDATE subscriptions SET stale_at = now(), updated_at = now()
WHERE stripe_subscription_id = $2 AND user_id = $1 AND stale_at IS NULL
RETURNING true
"""


async def mark_stale(db: Database, kind: str, user_id: str, stripe_id: str) -> bool:
    """Mark the user's ``customer`` or ``subscription`` mapping stale; True if it was not."""
    sql = MARK_CUSTOMER_STALE if kind == "customer" else MARK_SUBSCRIPTION_STALE
    row = await db.fetchrow(f"mark_{kind}_stale", sql, user_id, stripe_id)
    return row is not None


# --- resync ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CustomerMapping:
    user_id: str
    stripe_customer_id: str | None
    stripe_account_id: str | None
    # Connect: the account the customer lives on (every Stripe call about it says so).
    connected_account: str | None = None


FIND_CUSTOMER = """
SELECT user_id, stripe_customer_id, stripe_account_id, connected_account
FROM customers WHERE user_id = $1
"""

# Keyset pagination over the primary key: `resync --all` never holds a big result.
CUSTOMERS_AFTER = """
SELECT user_id, stripe_customer_id, stripe_account_id, connected_account FROM customers
WHERE user_id > $1 ORDER BY user_id LIMIT $2
"""


def _customer(row: asyncpg.Record) -> CustomerMapping:
    return CustomerMapping(
        row["user_id"],
        row["stripe_customer_id"],
        row["stripe_account_id"],
        row["connected_account"],
    )


async def find_customer(conn: Connection, user_id: str) -> CustomerMapping | None:
    """The user's customer mapping, if any."""
    row = await conn.fetchrow(FIND_CUSTOMER, user_id)
    return None if row is None else _customer(row)


async def customers_after(conn: Connection, after: str, limit: int) -> list[CustomerMapping]:
    """The next page of customer mappings in user_id order."""
    return [_customer(r) for r in await conn.fetch(CUSTOMERS_AFTER, after, limit)]


# Serialises rewrites of one user and checks the mapping (customer and the
# account it lives on) did not change while Stripe was being read.
LOCK_CUSTOMER = """
SELECT true FROM customers
WHERE user_id = $1 AND stripe_customer_id = $2 AND connected_account IS NOT DISTINCT FROM $3
FOR UPDATE
"""

# Stripe's answer read at $7 is the truth, except for rows an event newer than
# that read has already updated. A ref stays with its subscription id.
RESYNC_UPSERT = """
INSERT INTO subscriptions AS s (
    stripe_subscription_id, user_id, status, item_id, price_id, quantity,
    cancel_at, cancel_at_period_end, last_event_at, deleted_at, stale_at, updated_at)
SELECT t.id, $1::text, t.status, t.item_id, t.price_id, t.quantity,
       t.cancel_at, t.cancel_at_period_end, $7::timestamptz,
       CASE WHEN t.status IN ('canceled', 'incomplete_expired') THEN $7::timestamptz END,
       NULL, now()
FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::integer[],
            $8::timestamptz[], $9::boolean[])
    AS t(id, status, item_id, price_id, quantity, cancel_at, cancel_at_period_end)
ON CONFLICT (stripe_subscription_id) DO UPDATE SET
    user_id = EXCLUDED.user_id,
    external_ref = CASE WHEN s.user_id = EXCLUDED.user_id THEN s.external_ref END,
    status = EXCLUDED.status,
    item_id = EXCLUDED.item_id,
    price_id = EXCLUDED.price_id,
    quantity = EXCLUDED.quantity,
    cancel_at = EXCLUDED.cancel_at,
    cancel_at_period_end = EXCLUDED.cancel_at_period_end,
    last_event_at = EXCLUDED.last_event_at,
    deleted_at = CASE WHEN EXCLUDED.deleted_at IS NOT NULL
                      THEN coalesce(s.deleted_at, EXCLUDED.deleted_at) END,
    stale_at = NULL,
    updated_at = now()
WHERE s.last_event_at IS NULL OR s.last_event_at <= EXCLUDED.last_event_at
RETURNING s.stripe_subscription_id
"""

# Rows Stripe does not list for this customer (even with status=all) are not
# its subscriptions: they go, unless an event newer than the read created them.
RESYNC_REMOVE = """
DELETE FROM subscriptions
WHERE user_id = $1 AND stripe_subscription_id <> ALL($2::text[])
  AND (last_event_at IS NULL OR last_event_at <= $3::timestamptz)
RETURNING stripe_subscription_id
"""

CLEAR_CUSTOMER_STALE = """
UPDATE customers SET stale_at = NULL, updated_at = now()
WHERE user_id = $1 AND stale_at IS NOT NULL
"""


@dataclass(frozen=True, slots=True)
class Rewritten:
    written: list[str]
    removed: list[str]


async def rewrite_subscriptions(
    conn: Connection,
    customer: CustomerMapping,
    subs: list[SubscriptionState],
    read_at: datetime,
) -> Rewritten | None:
    """Make the user's rows what Stripe listed at ``read_at``; None if the mapping moved."""
    assert customer.stripe_customer_id is not None
    locked = await conn.fetchval(
        LOCK_CUSTOMER, customer.user_id, customer.stripe_customer_id, customer.connected_account
    )
    if not locked:
        return None
    ids = [s.id for s in subs]
    written = await conn.fetch(
        RESYNC_UPSERT,
        customer.user_id,
        ids,
        [s.status for s in subs],
        [s.item_id for s in subs],
        [s.price_id for s in subs],
        [s.quantity for s in subs],
        read_at,
        [s.cancel_at for s in subs],
        [s.cancel_at_period_end for s in subs],
    )
    removed = await conn.fetch(RESYNC_REMOVE, customer.user_id, ids, read_at)
    await conn.execute(CLEAR_CUSTOMER_STALE, customer.user_id)
    return Rewritten(
        written=[r["stripe_subscription_id"] for r in written],
        removed=sorted(r["stripe_subscription_id"] for r in removed),
    )


# --- links by Stripe metadata (SPEC §11) -------------------------------------
#
# The decision (link, re-link, unlink, conflict) is service/linking.py's; these
# statements read and write the rows it decides about. Every write is guarded
# by `source = 'stripe_metadata'`: metadata never changes an explicit mapping,
# whatever the caller decided.

SOURCE_METADATA = "stripe_metadata"

# Facts about one customer, or naming one user, are decided one at a time
# across replicas: a decision reads the mappings and the newest fact about the
# customer, then writes, and two facts deciding at once could both link one
# customer (or one user). Transaction-scoped advisory locks, one per customer
# and per user, taken in one global order (so two facts never wait on each
# other) in one round trip; facts about other customers and users go on in parallel.
LOCK_STATEMENT = "SELECT pg_advisory_xact_lock({key})"


@dataclass(frozen=True, slots=True)
class LinkedMapping:
    """A customer mapping as the metadata rules see it."""

    user_id: str
    stripe_customer_id: str | None
    stripe_account_id: str | None
    source: str
    source_at: datetime
    connected_account: str | None


# The mapping that holds the customer and the user's own (one row when they
# are the same), locked until the decision is written.
LINK_CANDIDATES = """
SELECT user_id, stripe_customer_id, stripe_account_id, source, source_at, connected_account
FROM customers WHERE stripe_customer_id = $1 OR user_id = $2
FOR UPDATE
"""

INSERT_METADATA_LINK = """
INSERT INTO customers (user_id, stripe_customer_id, source, source_at, connected_account)
VALUES ($1, $2, 'stripe_metadata', $3, $4)
"""

# A re-link points the user at another customer: the old customer's
# subscriptions are not the new one's, so they go (the backfill brings the new ones).
RELINK_METADATA = """
WITH moved AS (
    UPDATE customers SET stripe_customer_id = $2, stripe_account_id = NULL, source_at = $3,
                         connected_account = $4, stale_at = NULL, updated_at = now()
    WHERE user_id = $1 AND source = 'stripe_metadata'
    RETURNING user_id
), gone AS (
    DELETE FROM subscriptions s USING moved WHERE s.user_id = moved.user_id
    RETURNING s.stripe_subscription_id
)
SELECT EXISTS (SELECT 1 FROM moved) AS moved,
       ARRAY(SELECT stripe_subscription_id FROM gone ORDER BY 1) AS subscriptions
"""

# The subquery sees the rows the cascade is about to delete.
UNLINK_METADATA = """
DELETE FROM customers c
WHERE c.user_id = $1 AND c.stripe_customer_id = $2 AND c.source = 'stripe_metadata'
RETURNING ARRAY(
    SELECT s.stripe_subscription_id FROM subscriptions s
    WHERE s.user_id = c.user_id ORDER BY s.stripe_subscription_id) AS subscriptions
"""

# The same fact seen again, later: the row records the newest time it was true.
CONFIRM_METADATA_LINK = """
UPDATE customers SET source_at = greatest(source_at, $2)
WHERE user_id = $1 AND source = 'stripe_metadata'
"""


def _lock_key(kind: str, value: str) -> int:
    """A stable signed 64-bit advisory-lock key (the same on every replica)."""
    digest = hashlib.blake2b(f"portal-gateway:{kind}:{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def lock_links(conn: Connection, stripe_customer_id: str, user_id: str | None) -> None:
    """Wait for (then hold until commit) the right to decide a fact about this customer and user."""
    keys = {_lock_key("customer", stripe_customer_id)}
    if user_id is not None:
        keys.add(_lock_key("user", user_id))
    # Integers only, so inlined: a simple query runs its statements in order.
    await conn.execute("; ".join(LOCK_STATEMENT.format(key=key) for key in sorted(keys)))


async def link_candidates(
    conn: Connection, stripe_customer_id: str, user_id: str | None
) -> list[LinkedMapping]:
    """The mapping holding the customer and the user's mapping, locked FOR UPDATE."""
    rows = await conn.fetch(LINK_CANDIDATES, stripe_customer_id, user_id)
    return [
        LinkedMapping(
            r["user_id"],
            r["stripe_customer_id"],
            r["stripe_account_id"],
            r["source"],
            r["source_at"],
            r["connected_account"],
        )
        for r in rows
    ]


async def insert_metadata_link(
    conn: Connection,
    user_id: str,
    stripe_customer_id: str,
    *,
    source_at: datetime,
    connected_account: str | None,
) -> None:
    """Give a user without a mapping this customer, sourced from metadata."""
    await conn.execute(
        INSERT_METADATA_LINK, user_id, stripe_customer_id, source_at, connected_account
    )


async def relink_metadata(
    conn: Connection,
    user_id: str,
    stripe_customer_id: str,
    *,
    source_at: datetime,
    connected_account: str | None,
) -> list[str] | None:
    """Point a metadata mapping at another customer; the subscriptions removed, None if none."""
    row = await conn.fetchrow(
        RELINK_METADATA, user_id, stripe_customer_id, source_at, connected_account
    )
    assert row is not None  # SELECT without FROM: always one row
    return list(row["subscriptions"]) if row["moved"] else None


async def unlink_metadata(
    conn: Connection, user_id: str, stripe_customer_id: str
) -> list[str] | None:
    """Delete a metadata mapping and its subscriptions; their ids, None if there was none."""
    row = await conn.fetchrow(UNLINK_METADATA, user_id, stripe_customer_id)
    return None if row is None else list(row["subscriptions"])


async def confirm_metadata_link(conn: Connection, user_id: str, source_at: datetime) -> None:
    """Record that a metadata mapping was still true at ``source_at``."""
    await conn.execute(CONFIRM_METADATA_LINK, user_id, source_at)
