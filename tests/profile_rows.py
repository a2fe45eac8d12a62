"""Portal profile rows with an applied body and a Stripe snapshot, seeded directly.

The snapshot is the configuration object the Stripe stand-in makes from the
same params (``stripe_standin.configurations``), so "no drift" is Stripe's
answer to exactly what was applied, not this suite's idea of it.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from stripe_standin.configurations import dashboard_edit, new_configuration

# What a profiles file would apply: every deep link allowed, one product with two prices.
APPLIED: dict[str, Any] = {
    "business_profile": {"headline": "Manage your plan"},
    "features": {
        "invoice_history": {"enabled": True},
        "payment_method_update": {"enabled": True},
        "subscription_cancel": {"enabled": True, "mode": "at_period_end"},
        "subscription_update": {
            "enabled": True,
            "default_allowed_updates": ["price", "quantity"],
            "products": [{"product": "prod_pro", "prices": ["price_pro_yearly", "price_basic"]}],
        },
    },
    "metadata": {"portal_gateway_profile": "default", "content_hash": "0" * 64},
}
T0 = 1_760_000_000  # the snapshot's `updated`


def _form(value: Any) -> Any:
    """Params as Stripe decodes them from the form: booleans are ``true``/``false``."""
    if isinstance(value, dict):
        return {k: _form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_form(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def configuration(
    configuration_id: str,
    applied: dict[str, Any] | None = None,
    *,
    updated: int = T0,
    edit: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration object Stripe reports after a create with ``applied``, then
    ``edit`` made "in the Dashboard", last updated at ``updated``."""
    config = new_configuration(configuration_id, _form(applied or APPLIED), updated - 3600)
    if edit is not None:
        dashboard_edit(config, copy.deepcopy(edit))
    config["updated"] = updated
    return config


async def seed_profile(
    conn: asyncpg.Connection,
    name: str,
    configuration_id: str,
    *,
    applied: dict[str, Any] | None = APPLIED,
    snapshot: dict[str, Any] | None = None,
    connected_account: str | None = None,
    is_default: bool = False,
) -> None:
    """Insert or replace a profile row with ``applied`` and ``snapshot`` (snapshot_at its
    ``updated``), as ``profiles apply`` would leave it."""
    at = datetime.fromtimestamp(snapshot["updated"], UTC) if snapshot is not None else None
    await conn.execute(
        """
        INSERT INTO portal_profiles AS p (name, configuration_id, is_default, managed,
            connected_account, applied, applied_hash, snapshot, snapshot_at)
        VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8::text::jsonb, $9)
        ON CONFLICT (name) DO UPDATE SET configuration_id = EXCLUDED.configuration_id,
            managed = EXCLUDED.managed, connected_account = EXCLUDED.connected_account,
            applied = EXCLUDED.applied, applied_hash = EXCLUDED.applied_hash,
            snapshot = EXCLUDED.snapshot, snapshot_at = EXCLUDED.snapshot_at
        """,
        name,
        configuration_id,
        is_default,
        applied is not None,
        connected_account,
        _json(applied),
        "0" * 64 if applied is not None else None,
        _json(snapshot),
        at,
    )


async def stored_snapshot(conn: asyncpg.Connection, name: str) -> tuple[Any, datetime | None]:
    """(snapshot, snapshot_at) of one profile row."""
    row = await conn.fetchrow(
        "SELECT snapshot::text, snapshot_at FROM portal_profiles WHERE name = $1", name
    )
    assert row is not None, name
    return (orjson.loads(row[0]) if row[0] is not None else None), row[1]


def _json(value: dict[str, Any] | None) -> str | None:
    return orjson.dumps(value).decode() if value is not None else None
