"""Running alembic from the service: ``migrate`` and the head revision for /readyz."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config

# alembic (and SQLAlchemy under it) are imported only when a migration runs:
# they cost ~0.3 s of start-up that `serve` and the CLI's other commands don't need.

# The migrations live beside the package (and are copied into the image).
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# The advisory lock one `migrate` holds at a time: env.py around the upgrade, then
# db/grants.py around the grants. Any constant works; it only has to be the same
# for every replica (and every release), so it never changes.
MIGRATION_LOCK_ID = 0x706F7274616C  # "portal"


def alembic_config(database_url: str) -> Config:
    """An alembic Config for our migrations folder and this database."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on a '%' in a password.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate to ``revision`` (under the advisory lock taken in env.py)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Migrate down to ``revision``."""
    from alembic import command

    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str | None:
    """The newest revision in the migrations folder."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()
