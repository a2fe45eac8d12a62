"""Where a resumable walk through Stripe stopped: one named cursor per walk (``sync_cursors``).

``sync --from-stripe`` writes its row when a run starts (``cursor`` NULL:
nothing done yet), stores the last customer id of each page it finished, and
deletes the row when the run finishes. A row therefore means "a run was cut
short", and its cursor where the next one resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.db.pool import Database

LOAD_CURSOR = "SELECT cursor, updated_at FROM sync_cursors WHERE name = $1"

SAVE_CURSOR = """
INSERT INTO sync_cursors AS c (name, cursor, updated_at) VALUES ($1, $2, now())
ON CONFLICT (name) DO UPDATE SET cursor = EXCLUDED.cursor, updated_at = now()
"""

CLEAR_CURSOR = "DELETE FROM sync_cursors WHERE name = $1"


@dataclass(frozen=True, slots=True)
class Cursor:
    """An unfinished walk: the last id done (None: no page yet), and when it was stored."""

    value: str | None
    updated_at: datetime


async def load_cursor(db: Database, name: str) -> Cursor | None:
    """The unfinished walk ``name``, or None when the last one finished (or none ran)."""
    row = await db.fetchrow("load_sync_cursor", LOAD_CURSOR, name)
    return None if row is None else Cursor(row["cursor"], row["updated_at"])


async def save_cursor(db: Database, name: str, cursor: str | None) -> None:
    """Everything up to and including ``cursor`` is done (None: a walk started, nothing done)."""
    await db.execute("save_sync_cursor", SAVE_CURSOR, name, cursor)


async def clear_cursor(db: Database, name: str) -> None:
    """The walk is finished: the next one starts at the beginning."""
    await db.execute("clear_sync_cursor", CLEAR_CURSOR, name)
