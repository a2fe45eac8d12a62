"""The SQL that reads the plans table by plan name (the profiles file resolves its prices here)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from service.db.pool import Database


@dataclass(frozen=True, slots=True)
class PlanPrice:
    """A plan as the profiles file needs it: its Stripe price and whether it is on sale."""

    plan: str
    stripe_price_id: str
    active: bool


PLANS_BY_NAME = """
SELECT plan, stripe_price_id, active FROM plans WHERE plan = ANY($1::text[])
"""


async def plans_by_name(db: Database, names: Collection[str]) -> dict[str, PlanPrice]:
    """Plan name → its price and active flag, for those of ``names`` that exist."""
    if not names:
        return {}
    rows = await db.fetch("plans_by_name", PLANS_BY_NAME, sorted(set(names)))
    return {r["plan"]: PlanPrice(r["plan"], r["stripe_price_id"], r["active"]) for r in rows}
