"""Bounded growth of the audit trail (SPEC §6): partitions ahead, ``prune`` and ``export``.

``audit_events`` is partitioned by UTC month (migration 0004). The runtime role
has no DDL (SPEC §5), so partitions are made ahead of time by the schema owner:
``migrate`` and ``audit prune`` create this month's and the next
``MONTHS_AHEAD`` months' (a monthly ``audit prune`` CronJob keeps six months
ready). A row no partition covers lands in ``audit_events_default``, the safety
net: an insert never fails for want of a partition. A month whose rows are
already in the default partition gets no partition of its own (Postgres can't
create it over them); the default partition is dropped, like a month, once its
newest row is older than the cutoff.

``prune`` drops whole partitions, never rows: a month goes once its end is at
or before the cutoff (``now() - DAYS``), so a partition that also holds newer
rows stays. ``export`` streams ``[since, until)`` as JSON lines through a
server-side cursor, one batch of ``EXPORT_PREFETCH`` rows in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import asyncpg
import orjson

from service.db import audit as audit_db
from service.db import audit_partitions as partitions
from service.db.pool import Connection, Database

MONTHS_AHEAD = 6
# With 0, last month's partition would go the moment the month ends: no retention.
MIN_PRUNE_DAYS = 1
# Rows per round trip of the export cursor: the most it holds in memory at once.
EXPORT_PREFETCH = 500
# One fetch of the cursor; the first may wait for the server to sort a large range.
EXPORT_FETCH_TIMEOUT = 600.0


class RetentionFailed(Exception):
    """Prune or export could not be done; the message is one line."""


class OutputClosed(Exception):
    """The reader of the export went away (a closed pipe)."""


@dataclass(slots=True)
class Prepared:
    """What ``prepare_partitions`` did."""

    created: list[str] = field(default_factory=list)
    # Months left to the default partition: it already holds rows of theirs.
    left_in_default: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Pruned:
    """What ``prune`` did."""

    cutoff: datetime
    prepared: Prepared
    dropped: list[str] = field(default_factory=list)
    # Rows in the default partition after the prune, and the newest one's time.
    default_rows: int = 0
    default_newest: datetime | None = None


def parse_time(raw: str) -> datetime:
    """An ISO-8601 date or date-time; one without an offset is UTC. ValueError if neither."""
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise ValueError(
            f"{raw!r} is not an ISO-8601 time (e.g. 2026-01-31 or 2026-01-31T12:00:00Z)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _failed(exc: asyncpg.PostgresError) -> RetentionFailed:
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return RetentionFailed(
            f"audit_events is busy (a long query, e.g. an export, holds it) and could not be"
            f" locked within {partitions.LOCK_TIMEOUT}: try again"
        )
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return RetentionFailed(
            f"{exc}: partitions are created and dropped with the schema owner's credentials"
            " (MIGRATE_DATABASE_URL)"
        )
    return RetentionFailed(f"{type(exc).__name__}: {exc}")


async def prepare_partitions(conn: Connection) -> Prepared:
    """Create the partitions of this month and the next MONTHS_AHEAD that are missing."""
    prepared = Prepared()
    if not await partitions.is_partitioned(conn):
        return prepared  # migrated to a revision before 0004
    existing = set(await partitions.list_partitions(conn))
    month = await partitions.current_month(conn)
    for _ in range(MONTHS_AHEAD + 1):
        name = partitions.partition_name(month)
        if name not in existing:
            await _create(conn, month, name, prepared)
        month = partitions.next_month(month)
    return prepared


async def _create(conn: Connection, month: date, name: str, prepared: Prepared) -> None:
    start = partitions.month_start(month)
    end = partitions.month_start(partitions.next_month(month))
    if await partitions.default_holds_rows_between(conn, start, end):
        prepared.left_in_default.append(name)
        return
    try:
        created = await partitions.create_month(conn, month)
    except asyncpg.CheckViolationError:
        # A row of this month reached the default partition since we looked.
        prepared.left_in_default.append(name)
        return
    if created is not None:  # None: another `migrate` or `prune` was first
        prepared.created.append(created)


async def prepare_partitions_at(db: Database) -> Prepared:
    """``prepare_partitions`` for ``migrate``; RetentionFailed if the owner can't."""
    try:
        async with db.connection() as conn:
            return await prepare_partitions(conn)
    except asyncpg.PostgresError as exc:
        raise _failed(exc) from None


async def prune(db: Database, older_than_days: int) -> Pruned:
    """Make partitions ahead, then drop every partition entirely older than the cutoff."""
    if older_than_days < MIN_PRUNE_DAYS:
        raise ValueError(f"--older-than must be at least {MIN_PRUNE_DAYS} day")
    try:
        async with db.connection() as conn:
            return await _prune(conn, older_than_days)
    except asyncpg.PostgresError as exc:
        raise _failed(exc) from None


async def _prune(conn: Connection, older_than_days: int) -> Pruned:
    if not await partitions.is_partitioned(conn):
        raise RetentionFailed("audit_events is not partitioned: run `portal-gateway migrate`")
    pruned = Pruned(await partitions.cutoff(conn, older_than_days), await prepare_partitions(conn))
    for name in await partitions.list_partitions(conn):
        month = partitions.month_partition(name)
        entirely_older = month is not None and month.end <= pruned.cutoff
        if entirely_older and await partitions.drop_if_older(conn, name, pruned.cutoff):
            pruned.dropped.append(name)
    rows, _, newest = await partitions.default_span(conn)
    if rows and newest is not None and newest < pruned.cutoff:
        if await partitions.drop_if_older(conn, partitions.DEFAULT_PARTITION, pruned.cutoff):
            pruned.dropped.append(partitions.DEFAULT_PARTITION)
        rows, _, newest = await partitions.default_span(conn)
    pruned.default_rows, pruned.default_newest = rows, newest
    return pruned


def export_line(row: asyncpg.Record) -> bytes:
    """One audit row as a JSON line: times in ISO-8601, the client IP as text."""
    return orjson.dumps(dict(row.items()), option=orjson.OPT_APPEND_NEWLINE)


async def export(
    db: Database, since: datetime, until: datetime | None, write: Callable[[bytes], object]
) -> int:
    """Write the rows of ``[since, until)``, oldest first, one JSON line each; how many.

    One transaction (a consistent snapshot, read-only) around a server-side
    cursor: memory stays at one batch whatever the range holds.
    """
    if until is not None and until <= since:
        raise ValueError("--until must be later than --since")
    count = 0
    try:
        async with (
            db.connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rows = audit_db.stream_range(
                conn,
                since,
                until,
                prefetch=EXPORT_PREFETCH,
                fetch_timeout=EXPORT_FETCH_TIMEOUT,
            )
            async for row in rows:
                try:
                    write(export_line(row))
                except OSError as exc:  # not a database error: see Database.connection
                    raise OutputClosed(str(exc)) from None
                count += 1
    except asyncpg.PostgresError as exc:
        raise RetentionFailed(f"{type(exc).__name__}: {exc}") from None
    return count
