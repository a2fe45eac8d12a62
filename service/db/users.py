"""SQL of the mapping API (SPEC §11): one user's customer mapping and subscriptions,
read, written (source ``api``) and removed.

Each function is one round trip, but the write: a transaction of two statements.
Every lookup goes through a primary key or a
unique index, except the plan name of a subscription's price: ``plans`` has no
index on ``stripe_price_id`` (a few dozen rows, read per subscription of one user).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from service.db.pool import Database

# The user's mapping, who else maps this Stripe id, and whether the profile exists.
# Both owner lookups are unique-index probes; the other user is the one the PUT
# must not take the id from.
PUT_LOOKUP = """
SELECT
    c.user_id IS NOT NULL AS mapped,
    (SELECT o.user_id FROM (
        SELECT user_id FROM customers WHERE stripe_customer_id = $2::text
        UNION ALL
        SELECT user_id FROM customers WHERE stripe_account_id = $3::text
     ) o WHERE o.user_id <> $1 LIMIT 1) AS owner,
    $4::text IS NULL OR EXISTS (SELECT 1 FROM portal_profiles p WHERE p.name = $4::text)
        AS portal_found
FROM (SELECT 1) AS one
LEFT JOIN customers c ON c.user_id = $1
"""

# The user's mapping before a PUT, locked: two PUTs for one user are decided one
# after the other, each against what the other left.
LOCK_PREVIOUS = """
SELECT stripe_customer_id, stripe_account_id, connected_account
FROM customers WHERE user_id = $1 FOR UPDATE
"""

# Upsert as an explicit mapping (source `api`, its fact time the write): it
# replaces whatever was there, from any source, and clears a stale mark. When
# the user's customer changes ($7: another id, or another connected account),
# their subscription rows belonged to the old one and go in the same statement;
# the backfill that follows lists the new customer's.
PUT_CUSTOMER = """
WITH written AS (
    INSERT INTO customers AS c (
        user_id, stripe_customer_id, stripe_account_id, connected_account, portal, locale,
        source, source_at, stale_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, 'api', now(), NULL, now())
    ON CONFLICT (user_id) DO UPDATE SET
        stripe_customer_id = EXCLUDED.stripe_customer_id,
        stripe_account_id = EXCLUDED.stripe_account_id,
        connected_account = EXCLUDED.connected_account,
        portal = EXCLUDED.portal,
        locale = EXCLUDED.locale,
        source = EXCLUDED.source,
        source_at = EXCLUDED.source_at,
        stale_at = NULL,
        updated_at = now()
    RETURNING (c.xmax = 0) AS inserted
), dropped AS (
    DELETE FROM subscriptions WHERE user_id = $1 AND $7::boolean
    RETURNING stripe_subscription_id
)
SELECT written.inserted, ARRAY(SELECT stripe_subscription_id FROM dropped ORDER BY 1) AS dropped
FROM written
"""

# Everything GET /v1/users/{user_id} shows, in one row (no row: no mapping).
# Times leave as epoch seconds, so their text form does not depend on the
# session's TimeZone.
READ_USER = """
SELECT
    c.user_id, c.stripe_customer_id, c.stripe_account_id, c.source,
    c.source_at, c.stale_at IS NOT NULL AS stale, c.portal, c.locale, c.connected_account,
    coalesce((
        SELECT json_agg(json_build_object(
            'ref', s.external_ref,
            'stripe_subscription_id', s.stripe_subscription_id,
            'status', s.status,
            'cancel_at', extract(epoch FROM s.cancel_at),
            'cancel_at_period_end', s.cancel_at_period_end,
            'item_id', s.item_id,
            'price_id', s.price_id,
            'plan', pl.plan,
            'quantity', s.quantity)
            ORDER BY s.stripe_subscription_id)
        FROM subscriptions s
        LEFT JOIN LATERAL (
            -- Several plans may name one price: the active one, then by name.
            SELECT p.plan FROM plans p WHERE p.stripe_price_id = s.price_id
            ORDER BY p.active DESC, p.plan LIMIT 1
        ) pl ON true
        WHERE s.user_id = c.user_id
    ), '[]'::json) AS subscriptions
FROM customers c
WHERE c.user_id = $1
"""

# The subquery sees the rows the cascade is about to delete.
DELETE_USER_CUSTOMER = """
DELETE FROM customers c
WHERE c.user_id = $1
RETURNING c.stripe_customer_id, c.stripe_account_id, c.connected_account, c.source, ARRAY(
    SELECT s.stripe_subscription_id FROM subscriptions s
    WHERE s.user_id = c.user_id ORDER BY s.stripe_subscription_id) AS subscriptions
"""

_CUSTOMER_ID_TAKEN = {"uq__customers__stripe_customer_id", "uq__customers__stripe_account_id"}


class CustomerTaken(Exception):
    """Another user maps this Stripe id (a concurrent PUT won the unique index)."""


class PortalMissing(Exception):
    """The named portal profile is gone (deleted between the lookup and the write)."""


@dataclass(frozen=True, slots=True)
class CustomerWrite:
    """What a PUT writes for one user: exactly one of the two Stripe ids."""

    user_id: str
    stripe_customer_id: str | None
    stripe_account_id: str | None
    connected_account: str | None
    portal: str | None
    locale: str | None


@dataclass(frozen=True, slots=True)
class PutLookup:
    """What the PUT decides on before it asks Stripe anything."""

    mapped: bool
    # The other user who maps the Stripe id, if any.
    owner: str | None
    portal_found: bool


@dataclass(frozen=True, slots=True)
class PutResult:
    inserted: bool
    # The mapping before the write (all None when there was none).
    previous_customer_id: str | None
    previous_account_id: str | None
    previous_connected_account: str | None
    # Subscription rows removed because the user's customer changed.
    dropped: list[str]


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    ref: str | None
    stripe_subscription_id: str
    status: str
    cancel_at: datetime | None
    cancel_at_period_end: bool
    item_id: str | None
    price_id: str | None
    plan: str | None
    quantity: int | None


@dataclass(frozen=True, slots=True)
class UserMapping:
    """One user's customer mapping and subscriptions, as the mapping API shows them."""

    user_id: str
    stripe_customer_id: str | None
    stripe_account_id: str | None
    source: str
    source_at: datetime
    stale: bool
    portal: str | None
    locale: str | None
    connected_account: str | None
    subscriptions: list[SubscriptionView]


@dataclass(frozen=True, slots=True)
class DeletedMapping:
    stripe_customer_id: str | None
    stripe_account_id: str | None
    connected_account: str | None
    source: str
    subscriptions: list[str]


async def put_lookup(db: Database, write: CustomerWrite) -> PutLookup:
    """The checks a PUT makes on our side, in one round trip."""
    row = await db.fetchrow(
        "mapping_put_lookup",
        PUT_LOOKUP,
        write.user_id,
        write.stripe_customer_id,
        write.stripe_account_id,
        write.portal,
    )
    assert row is not None  # the query always yields exactly one row
    return PutLookup(row["mapped"], row["owner"], row["portal_found"])


async def put_customer(db: Database, write: CustomerWrite) -> PutResult:
    """Write the mapping (source ``api``) in one transaction; CustomerTaken /
    PortalMissing if a concurrent change beat the lookup."""
    try:
        async with db.connection() as conn, conn.transaction():
            previous = await conn.fetchrow(LOCK_PREVIOUS, write.user_id)
            moved = previous is not None and (
                previous["stripe_customer_id"],
                previous["stripe_account_id"],
                previous["connected_account"],
            ) != (write.stripe_customer_id, write.stripe_account_id, write.connected_account)
            row = await conn.fetchrow(
                PUT_CUSTOMER,
                write.user_id,
                write.stripe_customer_id,
                write.stripe_account_id,
                write.connected_account,
                write.portal,
                write.locale,
                moved,
            )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name in _CUSTOMER_ID_TAKEN:
            raise CustomerTaken() from None
        raise
    except asyncpg.ForeignKeyViolationError:
        raise PortalMissing() from None
    assert row is not None  # an upsert always returns its row
    return PutResult(
        inserted=row["inserted"],
        previous_customer_id=previous["stripe_customer_id"] if previous else None,
        previous_account_id=previous["stripe_account_id"] if previous else None,
        previous_connected_account=previous["connected_account"] if previous else None,
        dropped=list(row["dropped"]),
    )


async def read_user(db: Database, user_id: str) -> UserMapping | None:
    """The user's mapping and subscriptions; None when no customer is mapped."""
    row = await db.fetchrow("mapping_read_user", READ_USER, user_id)
    if row is None:
        return None
    return UserMapping(
        user_id=row["user_id"],
        stripe_customer_id=row["stripe_customer_id"],
        stripe_account_id=row["stripe_account_id"],
        source=row["source"],
        source_at=row["source_at"],
        stale=row["stale"],
        portal=row["portal"],
        locale=row["locale"],
        connected_account=row["connected_account"],
        subscriptions=[_subscription(s) for s in row["subscriptions"]],
    )


async def delete_user_customer(db: Database, user_id: str) -> DeletedMapping | None:
    """Remove the user's mapping and, by cascade, their subscriptions; None if none."""
    row = await db.fetchrow("mapping_delete_user", DELETE_USER_CUSTOMER, user_id)
    if row is None:
        return None
    return DeletedMapping(
        row["stripe_customer_id"],
        row["stripe_account_id"],
        row["connected_account"],
        row["source"],
        list(row["subscriptions"]),
    )


def _subscription(obj: dict[str, Any]) -> SubscriptionView:
    cancel_at = obj["cancel_at"]
    return SubscriptionView(
        ref=obj["ref"],
        stripe_subscription_id=obj["stripe_subscription_id"],
        status=obj["status"],
        cancel_at=None if cancel_at is None else datetime.fromtimestamp(cancel_at, UTC),
        cancel_at_period_end=obj["cancel_at_period_end"],
        item_id=obj["item_id"],
        price_id=obj["price_id"],
        plan=obj["plan"],
        quantity=obj["quantity"],
    )
