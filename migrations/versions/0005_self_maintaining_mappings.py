"""Mappings that keep themselves true (SPEC §11): sources, Connect, scheduled cancellations.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

* ``customers.source``: where the mapping comes from — ``import`` (the CSV),
  ``api`` (``PUT /v1/users/{id}/customer``) or ``stripe_metadata`` (the
  customer's ``metadata[STRIPE_USER_METADATA_KEY]``, from webhooks or ``sync``).
  Explicit sources win over metadata. ``source_at``: the time of that fact (the
  event's ``created`` for metadata, the write for the others), which orders
  metadata facts.
* ``customers.connected_account``: the Connect account (``acct_…``) the
  customer lives on; every Stripe call about it carries ``Stripe-Account``.
* ``subscriptions.cancel_at`` / ``cancel_at_period_end``: a scheduled
  cancellation (flexible billing mode sets only ``cancel_at``).
* ``sync_cursors``: where ``portal-gateway sync --from-stripe`` stopped, so a
  rerun resumes.
* ``ix__stripe_events__customer_created``: the newest metadata event applied to
  a customer orders the next one, even after its mapping went away.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE customers
            ADD COLUMN source text NOT NULL DEFAULT 'import',
            ADD COLUMN source_at timestamptz NOT NULL DEFAULT now(),
            ADD COLUMN connected_account text,
            ADD CONSTRAINT ck__customers__source
                CHECK (source IN ('import', 'api', 'stripe_metadata')),
            ADD CONSTRAINT ck__customers__connected_account
                CHECK (connected_account LIKE 'acct\\_%')
        """
    )
    op.execute(
        """
        ALTER TABLE subscriptions
            ADD COLUMN cancel_at timestamptz,
            ADD COLUMN cancel_at_period_end boolean NOT NULL DEFAULT false
        """
    )
    op.execute(
        """
        CREATE TABLE sync_cursors (
            name text NOT NULL,
            cursor text,
            updated_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk__sync_cursors PRIMARY KEY (name)
        )
        """
    )
    op.execute(
        "CREATE INDEX ix__stripe_events__customer_created ON stripe_events (customer, created)"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix__stripe_events__customer_created")
    op.execute("DROP TABLE sync_cursors")
    op.execute("ALTER TABLE subscriptions DROP COLUMN cancel_at_period_end, DROP COLUMN cancel_at")
    op.execute(
        "ALTER TABLE customers DROP COLUMN connected_account, DROP COLUMN source_at,"
        " DROP COLUMN source"
    )
