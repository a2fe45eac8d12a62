"""Portal links (SPEC §13): a validated request waiting for its click.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

A link is found by the SHA-256 of its token (the token itself is never stored);
``request`` is the validated body of ``POST /v1/portal-links``, resolved again
at the click. ``opened_at`` is set by the one click that consumes the link and
cleared again when that click fails before a portal URL was handed out.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE portal_links (
            id bigint GENERATED ALWAYS AS IDENTITY,
            token_hash bytea NOT NULL,
            principal_type text NOT NULL,
            principal_id text NOT NULL,
            user_id text NOT NULL,
            request jsonb NOT NULL,
            return_url text,
            request_id text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL,
            opened_at timestamptz,
            CONSTRAINT pk__portal_links PRIMARY KEY (id),
            CONSTRAINT uq__portal_links__token_hash UNIQUE (token_hash),
            CONSTRAINT ck__portal_links__token_hash CHECK (length(token_hash) = 32),
            CONSTRAINT ck__portal_links__principal_type
                CHECK (principal_type IN ('client', 'user')),
            CONSTRAINT ck__portal_links__expiry CHECK (expires_at > created_at)
        )
        """
    )
    op.execute("CREATE INDEX ix__portal_links__expires_at ON portal_links (expires_at)")


def downgrade() -> None:
    op.execute("DROP TABLE portal_links")
