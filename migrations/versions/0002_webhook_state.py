"""Webhook state: a deletion marker per subscription, and what each Stripe event was about.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

* ``subscriptions.deleted_at``: set by ``customer.subscription.deleted``. A
  deleted subscription is final in Stripe, so any later-applied event for it
  (a late ``updated``, or one Stripe sends after the deletion) leaves it
  deleted; only ``resync``, which reads Stripe's current state, may clear it.
* ``stripe_events.customer`` / ``object_id``: the Stripe customer and object an
  event was about, so events for customers we do not map (``result =
  'unknown_customer'``) are recorded and can be found, instead of failing and
  being retried by Stripe for days.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE subscriptions ADD COLUMN deleted_at timestamptz")
    op.execute("ALTER TABLE stripe_events ADD COLUMN customer text, ADD COLUMN object_id text")
    # Ops look up the customers Stripe tells us about that we do not map.
    op.execute(
        "CREATE INDEX ix__stripe_events__customer ON stripe_events (customer)"
        " WHERE result = 'unknown_customer'"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix__stripe_events__customer")
    op.execute("ALTER TABLE stripe_events DROP COLUMN object_id, DROP COLUMN customer")
    op.execute("ALTER TABLE subscriptions DROP COLUMN deleted_at")
