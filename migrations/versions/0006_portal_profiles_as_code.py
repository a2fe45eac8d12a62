"""Portal profiles as code (SPEC §12): what the file applied, what Stripe reports.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

* ``managed``: the profile's configuration was created by ``profiles apply``
  (only those are deactivated by ``--prune``).
* ``connected_account``: the Connect account the configuration lives on.
* ``applied``: the configuration body the file last applied (prices resolved to
  ``price_…`` ids) and ``applied_hash`` its content hash (also in the
  configuration's metadata and the ``Idempotency-Key``).
* ``snapshot``: the configuration as Stripe last reported it (``apply``,
  ``profiles sync``, ``billing_portal.configuration.created|updated`` webhooks),
  ``snapshot_at`` the time of that report (Stripe's ``updated``), so an older
  event never overwrites a newer snapshot. Drift = snapshot differs from applied.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE portal_profiles
            ADD COLUMN managed boolean NOT NULL DEFAULT false,
            ADD COLUMN connected_account text,
            ADD COLUMN applied jsonb,
            ADD COLUMN applied_hash text,
            ADD COLUMN snapshot jsonb,
            ADD COLUMN snapshot_at timestamptz,
            ADD CONSTRAINT ck__portal_profiles__connected_account
                CHECK (connected_account IS NULL OR connected_account LIKE 'acct\\_%')
        """
    )
    op.execute(
        "CREATE INDEX ix__portal_profiles__configuration_id ON portal_profiles (configuration_id)"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix__portal_profiles__configuration_id")
    op.execute(
        """
        ALTER TABLE portal_profiles
            DROP CONSTRAINT ck__portal_profiles__connected_account,
            DROP COLUMN snapshot_at, DROP COLUMN snapshot, DROP COLUMN applied_hash,
            DROP COLUMN applied, DROP COLUMN connected_account, DROP COLUMN managed
        """
    )
