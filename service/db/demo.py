"""The demo's seed data for ``make run`` (idempotent)."""

from __future__ import annotations

from service.db.pool import Database

SEED_DEMO = """
INSERT INTO portal_profiles (name, configuration_id, default_return_url, is_default)
VALUES ('default', NULL, $1, true)
ON CONFLICT (name) DO UPDATE SET default_return_url = EXCLUDED.default_return_url;
INSERT INTO customers (user_id, stripe_customer_id, locale)
VALUES ('demo-user', 'cus_demo0001', 'en')
ON CONFLICT (user_id) DO NOTHING;
INSERT INTO subscriptions (stripe_subscription_id, user_id, external_ref, status, item_id,
                           price_id, quantity)
VALUES ('sub_demo0001', 'demo-user', 'team-plan', 'active', 'si_demo0001', 'price_basic_monthly', 1)
ON CONFLICT (stripe_subscription_id) DO NOTHING;
INSERT INTO plans (plan, stripe_price_id, active) VALUES ('pro-yearly', 'price_pro_yearly', true)
ON CONFLICT (plan) DO NOTHING;
INSERT INTO offers (name, kind, stripe_id) VALUES ('stay-20', 'coupon', 'coupon_stay20')
ON CONFLICT (name) DO NOTHING;
"""


async def seed_demo(db: Database, return_url: str) -> None:
    """The demo's user, subscription, plan, profile and offer (idempotent)."""
    async with db.connection() as conn, conn.transaction():
        # Several statements need the simple protocol, which takes no parameters.
        quoted = "'" + return_url.replace("'", "''") + "'"
        await conn.execute(SEED_DEMO.replace("$1", quoted))
