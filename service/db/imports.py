"""The SQL of ``portal-gateway import``: existence checks and batched upserts.

Everything runs on the one connection of :func:`transaction`, so an import is
all-or-nothing. Rows are sent as parallel arrays and expanded with ``unnest``
in batches of :data:`BATCH_SIZE`: one round trip per batch instead of one per
row, and one statement per batch stays well inside the command timeout.

A constraint the database still enforces after validation (a race with the
service, or an id swap between two users) surfaces as :class:`Refused`, which
carries the constraint name and the offending key so the importer can name
the line.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import asyncpg

from service.db.pool import Connection, Database

BATCH_SIZE = 5000
T = TypeVar("T")

# --- rows ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CustomerRow:
    user_id: str
    stripe_customer_id: str | None
    stripe_account_id: str | None
    portal: str | None
    locale: str | None
    # Connect: the account the customer lives on (SPEC §11); None: the platform.
    connected_account: str | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionRow:
    user_id: str
    stripe_subscription_id: str
    external_ref: str | None
    status: str
    item_id: str | None
    price_id: str | None
    quantity: int | None


@dataclass(frozen=True, slots=True)
class PlanRow:
    plan: str
    stripe_price_id: str
    active: bool
    self_serve: bool = False


@dataclass(frozen=True, slots=True)
class ProfileRow:
    name: str
    configuration_id: str | None
    on_behalf_of: str | None
    default_return_url: str | None
    is_default: bool
    self_serve: bool = False


@dataclass(frozen=True, slots=True)
class OfferRow:
    name: str
    kind: str
    stripe_id: str
    self_serve: bool = False


# --- the transaction -------------------------------------------------------

# "Key (user_id, external_ref)=(u_1, team) already exists." and
# 'Key (portal)=(gold) is not present in table "portal_profiles".'
_KEY_DETAIL = re.compile(
    r"Key \((?P<columns>[^)]*)\)=\((?P<values>.*)\) (?:already exists|is not present)"
)


class Refused(Exception):
    """The database refused a write the validation let through."""

    def __init__(
        self,
        message: str,
        *,
        constraint: str | None,
        columns: tuple[str, ...] = (),
        key: str | None = None,
        unique: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.constraint = constraint
        # The columns and the key exactly as Postgres formats them ("a, b"),
        # which is also how the importer indexes its lines.
        self.columns = columns
        self.key = key
        self.unique = unique

    @classmethod
    def from_error(cls, exc: asyncpg.PostgresError) -> Refused:
        columns: tuple[str, ...] = ()
        key = None
        match = _KEY_DETAIL.match(exc.detail or "")
        if match is not None:
            columns = tuple(c.strip() for c in match["columns"].split(","))
            key = match["values"]
        return cls(
            str(exc),
            constraint=exc.constraint_name,
            columns=columns,
            key=key,
            unique=isinstance(exc, asyncpg.UniqueViolationError),
        )


@asynccontextmanager
async def transaction(db: Database) -> AsyncIterator[Connection]:
    """One connection in one transaction; constraint violations become :class:`Refused`."""
    async with db.connection() as conn:
        try:
            async with conn.transaction():
                yield conn
        except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
            # The transaction has rolled back by now: nothing was imported.
            raise Refused.from_error(exc) from exc


def _batches(rows: Sequence[T]) -> list[Sequence[T]]:
    return [rows[i : i + BATCH_SIZE] for i in range(0, len(rows), BATCH_SIZE)]


@dataclass(frozen=True, slots=True)
class Upsert:
    """A batched upsert: ``$1`` is an array of ``columns[0]`` of every row, and so on."""

    sql: str
    columns: tuple[str, ...]


def upserting(upsert: Upsert) -> Callable[[Connection, Sequence[Any]], Awaitable[int]]:
    """The writer of ``upsert``: rows in, the number of rows written out."""

    async def write(conn: Connection, rows: Sequence[Any]) -> int:
        return await _execute_batches(conn, upsert, rows)

    return write


async def _execute_batches(conn: Connection, upsert: Upsert, rows: Sequence[Any]) -> int:
    written = 0
    for batch in _batches(rows):
        arrays = [[getattr(row, column) for row in batch] for column in upsert.columns]
        status = await conn.execute(upsert.sql, *arrays)
        written += int(status.split()[-1])
    return written


# --- cross-table checks ----------------------------------------------------

# The names of the file that the table lacks: a missing reference names its line.
MISSING = {
    "profiles": """
SELECT name FROM unnest($1::text[]) AS wanted(name)
WHERE NOT EXISTS (SELECT 1 FROM portal_profiles p WHERE p.name = wanted.name)
""",
    "customers": """
SELECT user_id FROM unnest($1::text[]) AS wanted(user_id)
WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.user_id = wanted.user_id)
""",
}


async def missing(
    conn: Connection, kind: Literal["profiles", "customers"], keys: Collection[str]
) -> set[str]:
    """Those of ``keys`` that are not portal profile names / users with a customer mapping."""
    rows = await conn.fetch(MISSING[kind], list(keys))
    return {r[0] for r in rows}


STRIPE_ID_OWNERS = """
SELECT c.user_id, c.stripe_customer_id AS stripe_id
FROM customers c JOIN unnest($1::text[]) AS f(id) ON c.stripe_customer_id = f.id
UNION ALL
SELECT c.user_id, c.stripe_account_id
FROM customers c JOIN unnest($2::text[]) AS f(id) ON c.stripe_account_id = f.id
"""


async def stripe_id_owners(
    conn: Connection, customer_ids: Collection[str], account_ids: Collection[str]
) -> dict[str, str]:
    """Stripe id → the user it is mapped to now, for those ids already mapped."""
    rows = await conn.fetch(STRIPE_ID_OWNERS, list(customer_ids), list(account_ids))
    return {r["stripe_id"]: r["user_id"] for r in rows}


EXTERNAL_REF_OWNERS = """
SELECT s.user_id, s.external_ref, s.stripe_subscription_id
FROM subscriptions s
JOIN unnest($1::text[], $2::text[]) AS f(user_id, external_ref)
    ON s.user_id = f.user_id AND s.external_ref = f.external_ref
"""


async def external_ref_owners(
    conn: Connection, pairs: Collection[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    """(user_id, external_ref) → the subscription holding it now, for those taken."""
    rows = await conn.fetch(EXTERNAL_REF_OWNERS, [p[0] for p in pairs], [p[1] for p in pairs])
    return {(r["user_id"], r["external_ref"]): r["stripe_subscription_id"] for r in rows}


# --- upserts ---------------------------------------------------------------

# A re-imported mapping that changes the Stripe id (or the account it lives on)
# clears the stale mark (the new id has not been refused by Stripe); an
# unchanged one keeps it. An import is an explicit mapping (SPEC §11): it wins
# over metadata, and its fact is the write itself. A file without the
# connected_account column maps its customers on the platform account.
UPSERT_CUSTOMERS = Upsert(
    """
INSERT INTO customers AS c (
    user_id, stripe_customer_id, stripe_account_id, portal, locale, connected_account,
    source, source_at)
SELECT t.*, 'import', now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) AS t
ON CONFLICT (user_id) DO UPDATE SET
    stripe_customer_id = EXCLUDED.stripe_customer_id,
    stripe_account_id = EXCLUDED.stripe_account_id,
    portal = EXCLUDED.portal,
    locale = EXCLUDED.locale,
    connected_account = EXCLUDED.connected_account,
    source = EXCLUDED.source,
    source_at = EXCLUDED.source_at,
    stale_at = CASE
        WHEN c.stripe_customer_id IS NOT DISTINCT FROM EXCLUDED.stripe_customer_id
         AND c.stripe_account_id IS NOT DISTINCT FROM EXCLUDED.stripe_account_id
         AND c.connected_account IS NOT DISTINCT FROM EXCLUDED.connected_account
        THEN c.stale_at END,
    updated_at = now()
""",
    ("user_id", "stripe_customer_id", "stripe_account_id", "portal", "locale", "connected_account"),
)


# last_event_at is left alone: it orders webhook events, which an import is not.
# stale_at too: it marks this very subscription id as refused by Stripe.
UPSERT_SUBSCRIPTIONS = Upsert(
    """
INSERT INTO subscriptions
    (stripe_subscription_id, user_id, external_ref, status, item_id, price_id, quantity)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::integer[])
ON CONFLICT (stripe_subscription_id) DO UPDATE SET
    user_id = EXCLUDED.user_id,
    external_ref = EXCLUDED.external_ref,
    status = EXCLUDED.status,
    item_id = EXCLUDED.item_id,
    price_id = EXCLUDED.price_id,
    quantity = EXCLUDED.quantity,
    updated_at = now()
""",
    (
        "stripe_subscription_id",
        "user_id",
        "external_ref",
        "status",
        "item_id",
        "price_id",
        "quantity",
    ),
)


# self_serve is always written: a file without the column marks its rows not
# self-serve (SPEC §5: an end user sees only what an operator marked).
UPSERT_PLANS = Upsert(
    """
INSERT INTO plans (plan, stripe_price_id, active, self_serve)
SELECT * FROM unnest($1::text[], $2::text[], $3::boolean[], $4::boolean[])
ON CONFLICT (plan) DO UPDATE SET
    stripe_price_id = EXCLUDED.stripe_price_id,
    active = EXCLUDED.active,
    self_serve = EXCLUDED.self_serve
""",
    ("plan", "stripe_price_id", "active", "self_serve"),
)


# The partial unique index allows one default: the old one steps down first.
CLEAR_OTHER_DEFAULTS = """
UPDATE portal_profiles SET is_default = false WHERE is_default AND name <> $1
"""
UPSERT_PROFILES = Upsert(
    """
INSERT INTO portal_profiles
    (name, configuration_id, on_behalf_of, default_return_url, is_default, self_serve)
SELECT * FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::boolean[], $6::boolean[])
ON CONFLICT (name) DO UPDATE SET
    configuration_id = EXCLUDED.configuration_id,
    on_behalf_of = EXCLUDED.on_behalf_of,
    default_return_url = EXCLUDED.default_return_url,
    is_default = EXCLUDED.is_default,
    self_serve = EXCLUDED.self_serve
""",
    (
        "name",
        "configuration_id",
        "on_behalf_of",
        "default_return_url",
        "is_default",
        "self_serve",
    ),
)


async def upsert_profiles(conn: Connection, rows: Sequence[ProfileRow]) -> int:
    """Insert or update portal profiles by name; a new default replaces the old one."""
    defaults = [r.name for r in rows if r.is_default]
    if len(defaults) > 1:
        raise ValueError("at most one default profile")  # the importer checks this first
    if defaults:
        await conn.execute(CLEAR_OTHER_DEFAULTS, defaults[0])
    return await _execute_batches(conn, UPSERT_PROFILES, rows)


UPSERT_OFFERS = Upsert(
    """
INSERT INTO offers (name, kind, stripe_id, self_serve)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[])
ON CONFLICT (name) DO UPDATE SET
    kind = EXCLUDED.kind,
    stripe_id = EXCLUDED.stripe_id,
    self_serve = EXCLUDED.self_serve
""",
    ("name", "kind", "stripe_id", "self_serve"),
)
