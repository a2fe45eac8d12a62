"""The monthly partitions of ``audit_events``: list, create ahead, drop (schema owner only).

Migration 0004 made ``audit_events`` ``PARTITION BY RANGE (occurred_at)``: one
partition per UTC month, ``audit_events_pYYYY_MM`` covering
``[YYYY-MM-01, next month)``, created by the database function
``audit_events_create_partition(date)``, and ``audit_events_default`` for any
row no month covers. Everything here is DDL or reads the catalogue: it runs with
MIGRATE_DATABASE_URL (the owner); the runtime role may do none of it (SPEC §5).

DDL on a partition takes an ACCESS EXCLUSIVE lock on ``audit_events`` itself.
Queued behind a long reader (an ``audit export``), it would make every audit
insert queue behind it in turn, so each statement runs in its own transaction
with a short ``lock_timeout`` and gives up instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

from service.db.pool import Connection

DEFAULT_PARTITION = "audit_events_default"
# What audit_events_create_partition() names a month's partition.
MONTH_PARTITION = re.compile(r"audit_events_p(\d{4})_(\d{2})")
# The longest an audit insert queued behind our DDL waits: under DB_TIMEOUT_SECONDS
# (1.5 s by default), past which its caller would get a 503.
LOCK_TIMEOUT = "1s"
# Taken around each create or drop: `migrate` on many replicas at once, or with an
# `audit prune`, would otherwise race to CREATE the same partition.
PARTITIONS_LOCK_ID = 0x61756469745F70  # "audit_p"

LIST_PARTITIONS = """
SELECT c.relname AS name
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'public.audit_events'::regclass
ORDER BY c.relname
"""

IS_PARTITIONED = """
SELECT relkind = 'p' FROM pg_class
WHERE relname = 'audit_events' AND relnamespace = 'public'::regnamespace
"""

# The current month (UTC) and the cutoff, both by the database's clock.
CURRENT_MONTH = "SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date"
CUTOFF = "SELECT now() - make_interval(days => $1)"

CREATE_PARTITION = "SELECT audit_events_create_partition($1)"

# Rows in the default partition within [$1, $2): a month partition for that range
# can't be created while they are there (Postgres refuses: they'd be in the wrong place).
DEFAULT_ROWS_BETWEEN = """
SELECT EXISTS (SELECT 1 FROM audit_events_default WHERE occurred_at >= $1 AND occurred_at < $2)
"""

DEFAULT_SPAN = "SELECT count(*), min(occurred_at), max(occurred_at) FROM audit_events_default"

# Names come from the catalogue and match MONTH_PARTITION or are DEFAULT_PARTITION;
# no input reaches these (DDL takes no parameters).
_HAS_ROWS_SINCE = "SELECT EXISTS (SELECT 1 FROM {table} WHERE occurred_at >= $1)"
_DROP = "DROP TABLE {table}"
CREATE_DEFAULT = (
    f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF audit_events DEFAULT",
    # Row triggers come from the parent; TRUNCATE of a partition needs its own.
    f"CREATE TRIGGER tr__audit_events__no_truncate BEFORE TRUNCATE ON {DEFAULT_PARTITION}"
    " FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()",
)


@dataclass(frozen=True, slots=True)
class MonthPartition:
    """``audit_events_pYYYY_MM``: rows with ``start <= occurred_at < end`` (UTC)."""

    name: str
    start: datetime
    end: datetime


def month_start(day: date) -> datetime:
    """Midnight UTC on the first of ``day``'s month."""
    return datetime(day.year, day.month, 1, tzinfo=UTC)


def next_month(day: date) -> date:
    """The first of the month after ``day``'s."""
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def partition_name(month: date) -> str:
    """The name audit_events_create_partition() gives ``month``'s partition."""
    return f"audit_events_p{month.year:04d}_{month.month:02d}"


def month_partition(name: str) -> MonthPartition | None:
    """The month a partition covers, from its name; None for any other table."""
    match = MONTH_PARTITION.fullmatch(name)
    if match is None:
        return None
    first = date(int(match[1]), int(match[2]), 1)
    return MonthPartition(name, month_start(first), month_start(next_month(first)))


async def is_partitioned(conn: Connection) -> bool:
    """Whether audit_events is partitioned (False below revision 0004)."""
    return bool(await conn.fetchval(IS_PARTITIONED))


async def list_partitions(conn: Connection) -> list[str]:
    """The names of audit_events' partitions."""
    return [r["name"] for r in await conn.fetch(LIST_PARTITIONS)]


async def current_month(conn: Connection) -> date:
    """The first of this month (UTC), by the database's clock."""
    month: date = await conn.fetchval(CURRENT_MONTH)
    return month


async def cutoff(conn: Connection, days: int) -> datetime:
    """``days`` days before now, by the database's clock."""
    value: datetime = await conn.fetchval(CUTOFF, days)
    return value


async def default_holds_rows_between(conn: Connection, start: datetime, end: datetime) -> bool:
    """Whether the default partition holds rows in ``[start, end)``."""
    return bool(await conn.fetchval(DEFAULT_ROWS_BETWEEN, start, end))


async def default_span(conn: Connection) -> tuple[int, datetime | None, datetime | None]:
    """How many rows the default partition holds, and its oldest and newest time."""
    row = await conn.fetchrow(DEFAULT_SPAN)
    assert row is not None
    return row[0], row[1], row[2]


async def create_month(conn: Connection, first: date) -> str | None:
    """Create the partition of ``first``'s month; its name, or None if it existed."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITIONS_LOCK_ID)
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        name: str | None = await conn.fetchval(CREATE_PARTITION, first)
        return name


async def drop_if_older(conn: Connection, name: str, cutoff: datetime) -> bool:
    """Drop partition ``name`` unless it holds a row at or after ``cutoff``.

    The default partition is dropped and created again, empty, in the same
    transaction, so there is never a moment without it.
    """
    is_default = name == DEFAULT_PARTITION
    if not is_default and month_partition(name) is None:
        raise ValueError(f"not an audit_events partition: {name!r}")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITIONS_LOCK_ID)
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        # Take the lock DROP takes before looking: no row can arrive in between.
        await conn.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
        if await conn.fetchval(_HAS_ROWS_SINCE.format(table=name), cutoff):
            return False
        await conn.execute(_DROP.format(table=name))
        if is_default:
            for statement in CREATE_DEFAULT:
                await conn.execute(statement)
    return True
