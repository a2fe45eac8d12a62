"""Portal profiles as code (SPEC §12): the ``portal_profiles`` rows ``profiles apply`` keeps.

A managed profile's row holds what the file last applied (``applied``, the
configuration params with prices resolved, and ``applied_hash``) and the
configuration as Stripe last reported it (``snapshot``, with ``snapshot_at``
= Stripe's ``updated`` of that report). A snapshot is only ever replaced by a
newer one, whoever brings it (``apply``, ``profiles sync``, a webhook).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.db.pool import Connection, Database

LOAD_PROFILES = """
SELECT name, configuration_id, on_behalf_of, default_return_url, is_default, self_serve,
       managed, connected_account, applied, applied_hash, snapshot, snapshot_at
FROM portal_profiles ORDER BY name
"""

# The partial unique index allows one default: the old one steps down first (as imports do).
CLEAR_OTHER_DEFAULTS = """
UPDATE portal_profiles SET is_default = false WHERE is_default AND name <> $1
"""

# Everything the file decides is written; the snapshot only when it is not older
# than the one stored (a webhook may have brought a newer one meanwhile).
UPSERT_APPLIED = """
INSERT INTO portal_profiles AS p
    (name, configuration_id, on_behalf_of, default_return_url, is_default, self_serve,
     managed, connected_account, applied, applied_hash, snapshot, snapshot_at)
VALUES ($1, $2, $3, $4, $5, $6, true, $7, $8, $9, $10, $11)
ON CONFLICT (name) DO UPDATE SET
    configuration_id = EXCLUDED.configuration_id,
    on_behalf_of = EXCLUDED.on_behalf_of,
    default_return_url = EXCLUDED.default_return_url,
    is_default = EXCLUDED.is_default,
    self_serve = EXCLUDED.self_serve,
    managed = true,
    connected_account = EXCLUDED.connected_account,
    applied = EXCLUDED.applied,
    applied_hash = EXCLUDED.applied_hash,
    snapshot = CASE
        WHEN p.configuration_id IS DISTINCT FROM EXCLUDED.configuration_id
          OR p.snapshot_at IS NULL OR p.snapshot_at <= EXCLUDED.snapshot_at
        THEN EXCLUDED.snapshot ELSE p.snapshot END,
    snapshot_at = CASE
        WHEN p.configuration_id IS DISTINCT FROM EXCLUDED.configuration_id
          OR p.snapshot_at IS NULL OR p.snapshot_at <= EXCLUDED.snapshot_at
        THEN EXCLUDED.snapshot_at ELSE p.snapshot_at END
"""

# Customers naming a removed profile fall back to the default (the foreign key's
# ON DELETE SET NULL does it); counted first, for the report.
COUNT_CUSTOMERS_OF = "SELECT count(*) FROM customers WHERE portal = ANY($1::text[])"
DELETE_MANAGED = "DELETE FROM portal_profiles WHERE managed AND name = ANY($1::text[])"

# Only a newer report replaces the snapshot, and only of the configuration the
# profile still names.
STORE_SNAPSHOT = """
UPDATE portal_profiles SET snapshot = $3, snapshot_at = $4
WHERE name = $1 AND configuration_id = $2 AND (snapshot_at IS NULL OR snapshot_at < $4)
"""


@dataclass(frozen=True, slots=True)
class StoredProfile:
    """One ``portal_profiles`` row as ``profiles plan|apply|sync`` read it."""

    name: str
    configuration_id: str | None
    on_behalf_of: str | None
    default_return_url: str | None
    is_default: bool
    self_serve: bool
    managed: bool
    connected_account: str | None
    applied: dict[str, Any] | None
    applied_hash: str | None
    snapshot: dict[str, Any] | None
    snapshot_at: datetime | None


@dataclass(frozen=True, slots=True)
class AppliedProfile:
    """What ``profiles apply`` writes for one profile after Stripe accepted it."""

    name: str
    configuration_id: str
    on_behalf_of: str | None
    default_return_url: str | None
    is_default: bool
    self_serve: bool
    connected_account: str | None
    applied: dict[str, Any]
    applied_hash: str
    snapshot: dict[str, Any]
    snapshot_at: datetime


async def load_profiles(db: Database | Connection) -> dict[str, StoredProfile]:
    """Every profile row, managed or not, by name."""
    if isinstance(db, Database):
        rows = await db.fetch("load_profiles", LOAD_PROFILES)
    else:
        rows = await db.fetch(LOAD_PROFILES)
    return {r["name"]: StoredProfile(**dict(r)) for r in rows}


async def write_applied(conn: Connection, profiles: Sequence[AppliedProfile]) -> None:
    """Upsert the applied profiles (inside the caller's transaction); a new default steps in."""
    defaults = [p.name for p in profiles if p.is_default]
    if len(defaults) > 1:
        raise ValueError("at most one default profile")  # the file's check comes first
    if defaults:
        await conn.execute(CLEAR_OTHER_DEFAULTS, defaults[0])
    for p in profiles:
        await conn.execute(
            UPSERT_APPLIED,
            p.name,
            p.configuration_id,
            p.on_behalf_of,
            p.default_return_url,
            p.is_default,
            p.self_serve,
            p.connected_account,
            p.applied,
            p.applied_hash,
            p.snapshot,
            p.snapshot_at,
        )


async def delete_managed(conn: Connection, names: Sequence[str]) -> int:
    """Remove managed profiles; returns how many customers named one (they now get the default)."""
    if not names:
        return 0
    customers: int = await conn.fetchval(COUNT_CUSTOMERS_OF, list(names))
    await conn.execute(DELETE_MANAGED, list(names))
    return customers


async def store_snapshot(
    db: Database, name: str, configuration_id: str, snapshot: dict[str, Any], at: datetime
) -> bool:
    """Keep ``snapshot`` if it is newer than the stored one; whether it was kept."""
    status = await db.execute(
        "store_profile_snapshot", STORE_SNAPSHOT, name, configuration_id, snapshot, at
    )
    return status.endswith(" 1")


# --- webhooks' snapshots and the drift gauge (by configuration, not by name) ---

# A billing_portal.configuration.* event names a configuration on one account:
# store its object on every profile of that configuration and account whose
# snapshot is older (a tie keeps what is there), and list them all, so the
# caller tells "stored" from "superseded" from "no such profile". The UPDATE
# re-checks snapshot_at on the newest row version after a concurrent delivery,
# so the newest report wins whatever the arrival order.
STORE_REPORTED_SNAPSHOT = """
WITH stored AS (
    UPDATE portal_profiles SET snapshot = $3, snapshot_at = $4
    WHERE configuration_id = $1 AND connected_account IS NOT DISTINCT FROM $2
      AND (snapshot_at IS NULL OR snapshot_at < $4)
    RETURNING name, applied
)
SELECT p.name, s.name IS NOT NULL AS stored, s.applied
FROM portal_profiles p LEFT JOIN stored s ON s.name = p.name
WHERE p.configuration_id = $1 AND p.connected_account IS NOT DISTINCT FROM $2
ORDER BY p.name
"""

# Bounded: one row per profile with both sides (profiles are declared in a file).
DRIFT_INPUTS = """
SELECT name, applied, snapshot FROM portal_profiles
WHERE applied IS NOT NULL AND snapshot IS NOT NULL
ORDER BY name
"""


@dataclass(frozen=True, slots=True)
class SnapshotTarget:
    """A profile of the reported configuration, and whether the report was stored on it."""

    name: str
    stored: bool
    # What the file last applied to it (None: not stored, or not managed by the file).
    applied: dict[str, Any] | None


async def store_reported_snapshot(
    conn: Connection,
    configuration_id: str,
    connected_account: str | None,
    snapshot: dict[str, Any],
    at: datetime,
) -> list[SnapshotTarget]:
    """Store ``snapshot`` (Stripe's ``updated`` = ``at``) where it is newer, in the caller's
    transaction; every profile of that configuration on that account ([]: none)."""
    rows = await conn.fetch(
        STORE_REPORTED_SNAPSHOT, configuration_id, connected_account, snapshot, at
    )
    return [SnapshotTarget(r["name"], r["stored"], r["applied"]) for r in rows]


async def drift_inputs(db: Database) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, applied, snapshot) of every profile that has both."""
    rows = await db.fetch("profile_drift", DRIFT_INPUTS)
    return [(r["name"], r["applied"], r["snapshot"]) for r in rows]
