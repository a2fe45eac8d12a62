"""Self-service flags: which plans, offers and portal profiles an end user may name.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

SPEC §5: for an end user, an item that is not self-serve does not exist. The
default is false, so nothing an end user could reach before stays reachable
until an operator marks it.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("plans", "offers", "portal_profiles")


def upgrade() -> None:
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} ADD COLUMN self_serve boolean NOT NULL DEFAULT false")


def downgrade() -> None:
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} DROP COLUMN self_serve")
