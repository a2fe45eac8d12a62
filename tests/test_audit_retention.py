"""SPEC §6, bounded growth: audit_events partitioned by month, ``audit prune`` drops
whole partitions (with the owner's credentials), ``audit export`` streams JSON lines,
and stripe_events older than 30 days are purged by serve's housekeeping.

The CLI runs as a real process (``python -m service audit ...``), like ``resync``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from service import audit_retention, migrations
from service.db import audit_partitions, events
from service.db.pool import Database
from tests.conftest import _admin_execute, _admin_url, _with_database

REPO = Path(__file__).resolve().parent.parent

INSERT = """
INSERT INTO audit_events (occurred_at, request_id, principal_type, principal_id, user_id,
    action, outcome, http_status, client_ip, user_agent, duration_ms, detail)
VALUES ($1, $2, 'client', 'billing', $3, 'portal_session.create', 'created', 201,
    $4, $5, 12.5, $6)
RETURNING id
"""


async def _insert(
    conn: asyncpg.Connection,
    at: datetime,
    request_id: str,
    *,
    user_id: str = "u_42",
    client_ip: str | None = "10.0.0.1",
    user_agent: str | None = "billing-ui/1.0",
    detail: str | None = None,
) -> int:
    # As the owner (the test connection): the append-only trigger allows INSERT.
    row_id: int = await conn.fetchval(
        INSERT, at, request_id, user_id, client_ip, user_agent, detail
    )
    return row_id


async def _partition_of(conn: asyncpg.Connection, request_id: str) -> str:
    name: str = await conn.fetchval(
        "SELECT tableoid::regclass::text FROM audit_events WHERE request_id = $1", request_id
    )
    return name


async def _partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT inhrelid::regclass::text FROM pg_inherits"
        " WHERE inhparent = 'audit_events'::regclass"
    )
    return {r[0] for r in rows}


def _month(day: date, delta: int) -> date:
    """The first of the month ``delta`` months from ``day``'s."""
    index = day.year * 12 + day.month - 1 + delta
    return date(index // 12, index % 12 + 1, 1)


def _at(month: date, day: int) -> datetime:
    return datetime(month.year, month.month, day, 12, tzinfo=UTC)


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "audit",
        *args,
        cwd=REPO,
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out, err.decode()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await Database.connect(database_url, query_timeout=10, min_size=1, max_size=2)
    try:
        yield database
    finally:
        await database.close()


# --------------------------------------------------------------------------- the schema


async def test_audit_events_is_partitioned_by_month_with_partitions_ahead(
    conn: asyncpg.Connection,
) -> None:
    this_month = await conn.fetchval("SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date")
    expected = {
        audit_partitions.partition_name(_month(this_month, n))
        for n in range(audit_retention.MONTHS_AHEAD + 1)
    }
    assert await _partitions(conn) == expected | {"audit_events_default"}
    key = await conn.fetchval(
        "SELECT pg_get_partkeydef('audit_events'::regclass)",
    )
    assert key == "RANGE (occurred_at)"
    constraints = await conn.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE conrelid = 'audit_events'::regclass"
    )
    assert [(c["conname"], c["def"]) for c in constraints] == [
        ("pk__audit_events", "PRIMARY KEY (id, occurred_at)")
    ]
    indexes = await conn.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'audit_events' ORDER BY 1"
    )
    assert [i[0] for i in indexes] == [
        "ix__audit_events__occurred_at",
        "ix__audit_events__user_id",
        "pk__audit_events",
    ]
    # Rows land in their month's partition.
    await _insert(conn, datetime.now(UTC), "now")
    assert await _partition_of(conn, "now") == audit_partitions.partition_name(this_month)


async def test_inserts_beyond_the_prepared_partitions_land_in_the_default_partition(
    conn: asyncpg.Connection,
) -> None:
    await _insert(conn, datetime(2001, 1, 1, tzinfo=UTC), "long-ago")
    await _insert(conn, datetime.now(UTC) + timedelta(days=5 * 366), "far-future")
    assert await _partition_of(conn, "long-ago") == "audit_events_default"
    assert await _partition_of(conn, "far-future") == "audit_events_default"


APPEND_ONLY_STATEMENTS = ["UPDATE {t} SET outcome = 'refused'", "DELETE FROM {t}", "TRUNCATE {t}"]


async def test_rows_stay_append_only_on_the_parent_and_on_each_partition(
    conn: asyncpg.Connection,
) -> None:
    this_month = audit_partitions.partition_name(datetime.now(UTC).date())
    await _insert(conn, datetime.now(UTC), "month-row")
    await _insert(conn, datetime(2001, 1, 1, tzinfo=UTC), "default-row")
    for table in ("audit_events", this_month, "audit_events_default"):
        for statement in APPEND_ONLY_STATEMENTS:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement.format(t=table))
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 2


# --------------------------------------------------------------------------- prune


async def test_prune_drops_only_partitions_entirely_older_than_the_cutoff(
    database_url: str, conn: asyncpg.Connection
) -> None:
    now = datetime.now(UTC)
    months = {n: _month(now.date(), -n) for n in range(4)}  # this month and 3 back
    for n in (1, 2, 3):
        await conn.fetchval("SELECT audit_events_create_partition($1)", months[n])
    await _insert(conn, _at(months[3], 15), "m3")
    await _insert(conn, _at(months[2], 2), "m2-before-cutoff")
    await _insert(conn, _at(months[2], 25), "m2-after-cutoff")
    await _insert(conn, _at(months[1], 15), "m1")
    await _insert(conn, now, "m0")
    # A cutoff on the 12th or 13th of two months ago: inside that month's partition.
    days = (now - datetime(months[2].year, months[2].month, 12, tzinfo=UTC)).days

    code, out, err = await _cli(
        "prune", "--older-than", str(days), env={"DATABASE_URL": database_url}
    )

    assert code == 0, err
    old = audit_partitions.partition_name(months[3])
    assert out.decode().splitlines() == [f"dropped {old}"]
    assert "audit prune: 1 partitions older than" in err
    assert old not in await _partitions(conn)
    assert audit_partitions.partition_name(months[2]) in await _partitions(conn)
    left = await conn.fetch("SELECT request_id FROM audit_events ORDER BY occurred_at")
    # Never rows: the partition that straddles the cutoff keeps its older row too.
    assert [r[0] for r in left] == ["m2-before-cutoff", "m2-after-cutoff", "m1", "m0"]

    # Again: nothing more to drop.
    code, out, err = await _cli(
        "prune", "--older-than", str(days), env={"DATABASE_URL": database_url}
    )
    assert (code, out) == (0, b""), err


async def test_prune_creates_partitions_ahead_and_leaves_months_held_by_the_default(
    conn: asyncpg.Connection, db: Database
) -> None:
    this_month = datetime.now(UTC).date().replace(day=1)
    last = _month(this_month, audit_retention.MONTHS_AHEAD)
    nearly_last = _month(this_month, audit_retention.MONTHS_AHEAD - 1)
    for month in (last, nearly_last):
        await conn.execute(f"DROP TABLE {audit_partitions.partition_name(month)}")
    # A row of a month without a partition: into the default partition.
    await _insert(conn, _at(last, 3), "in-default")

    pruned = await audit_retention.prune(db, 365)

    assert pruned.prepared.created == [audit_partitions.partition_name(nearly_last)]
    assert pruned.prepared.left_in_default == [audit_partitions.partition_name(last)]
    assert pruned.dropped == []
    assert pruned.default_rows == 1
    assert await _partition_of(conn, "in-default") == "audit_events_default"
    # The created partition is append-only like the others, TRUNCATE included.
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await conn.execute(f"TRUNCATE {audit_partitions.partition_name(nearly_last)}")


async def test_prune_drops_the_default_partition_once_all_its_rows_are_old(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await _insert(conn, datetime(2001, 1, 1, tzinfo=UTC), "long-ago")

    code, out, err = await _cli("prune", "--older-than", "30", env={"DATABASE_URL": database_url})

    assert code == 0, err
    assert out.decode().splitlines() == ["dropped audit_events_default"]
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 0
    # A new, empty default partition took its place, append-only too.
    await _insert(conn, datetime(2001, 1, 1, tzinfo=UTC), "long-ago-again")
    assert await _partition_of(conn, "long-ago-again") == "audit_events_default"
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await conn.execute("TRUNCATE audit_events_default")


async def test_prune_keeps_a_default_partition_that_holds_a_newer_row(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await _insert(conn, datetime(2001, 1, 1, tzinfo=UTC), "long-ago")
    await _insert(conn, datetime.now(UTC) + timedelta(days=5 * 366), "far-future")

    code, out, err = await _cli("prune", "--older-than", "30", env={"DATABASE_URL": database_url})

    assert (code, out) == (0, b""), err
    assert "warning: 2 rows are in the default partition" in err
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 2


async def test_prune_gives_up_on_a_busy_table_rather_than_stall_audit_writes(
    database_url: str, conn: asyncpg.Connection
) -> None:
    old = _month(datetime.now(UTC).date(), -3)
    await conn.fetchval("SELECT audit_events_create_partition($1)", old)
    reader = await asyncpg.connect(database_url)  # a long `audit export`, say
    try:
        async with reader.transaction():
            await reader.fetch("SELECT id FROM audit_events")
            code, out, err = await _cli(
                "prune", "--older-than", "40", env={"DATABASE_URL": database_url}
            )
    finally:
        await reader.close()

    assert (code, out) == (1, b"")
    assert err.startswith("error: audit_events is busy")
    assert len(err.splitlines()) == 1
    assert audit_partitions.partition_name(old) in await _partitions(conn)


@pytest.mark.parametrize("days", ["0", "-3"])
async def test_prune_refuses_fewer_than_one_day(database_url: str, days: str) -> None:
    code, out, err = await _cli("prune", "--older-than", days, env={"DATABASE_URL": database_url})
    assert (code, out) == (2, b"")
    assert err == "usage error: --older-than must be at least 1\n"


@pytest.fixture
async def runtime_role(database_url: str, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A login role with what serve has on audit_events (SPEC §5): INSERT and SELECT."""
    role = f"pgw_runtime_{uuid.uuid4().hex[:8]}"
    database = database_url.rsplit("/", 1)[1]
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    await conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {role}')
    await conn.execute(f"GRANT SELECT, INSERT ON audit_events TO {role}")
    try:
        yield role
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_prune_needs_the_owner_and_uses_migrate_database_url(
    database_url: str, conn: asyncpg.Connection, runtime_role: str
) -> None:
    old = _month(datetime.now(UTC).date(), -3)
    await conn.fetchval("SELECT audit_events_create_partition($1)", old)
    parts = urlsplit(database_url)
    runtime_url = urlunsplit(parts._replace(netloc=f"{runtime_role}@{parts.netloc.split('@')[-1]}"))

    code, out, err = await _cli("prune", "--older-than", "40", env={"DATABASE_URL": runtime_url})
    assert (code, out) == (1, b"")
    assert len(err.splitlines()) == 1
    assert "MIGRATE_DATABASE_URL" in err
    assert audit_partitions.partition_name(old) in await _partitions(conn)

    env = {"DATABASE_URL": runtime_url, "MIGRATE_DATABASE_URL": database_url}
    code, out, err = await _cli("prune", "--older-than", "40", env=env)
    assert code == 0, err
    assert out.decode().splitlines() == [f"dropped {audit_partitions.partition_name(old)}"]


# --------------------------------------------------------------------------- export


async def test_export_streams_exactly_the_rows_in_range_as_json_lines(
    database_url: str, conn: asyncpg.Connection
) -> None:
    await conn.fetchval("SELECT audit_events_create_partition('2025-12-01')")
    await conn.fetchval("SELECT audit_events_create_partition('2026-01-01')")
    await _insert(conn, datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC), "before")
    first = await _insert(
        conn,
        datetime(2026, 1, 1, tzinfo=UTC),
        "first",
        client_ip="2001:db8::1",
        user_agent="curl/8 \u00e9\u0001",
        detail='{"plan": "pro", "n": 2}',
    )
    await _insert(conn, datetime(2026, 1, 15, 8, 30, tzinfo=UTC), "middle", client_ip=None)
    await _insert(conn, datetime(2026, 2, 1, tzinfo=UTC), "until-excluded")

    env = {"DATABASE_URL": database_url}
    code, out, err = await _cli(
        "export", "--since", "2026-01-01T00:00:00Z", "--until", "2026-02-01", env=env
    )

    assert code == 0, err
    assert err == "audit export: 2 rows\n"
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [line["request_id"] for line in lines] == ["first", "middle"]
    row = lines[0]
    assert row["id"] == first
    assert row["occurred_at"] == "2026-01-01T00:00:00+00:00"
    assert datetime.fromisoformat(lines[1]["occurred_at"]) == datetime(
        2026, 1, 15, 8, 30, tzinfo=UTC
    )
    assert row["client_ip"] == "2001:db8::1"
    assert lines[1]["client_ip"] is None
    assert row["user_agent"] == "curl/8 \u00e9\u0001"
    assert row["detail"] == {"plan": "pro", "n": 2}
    assert set(row) == {
        "id",
        "occurred_at",
        "request_id",
        "principal_type",
        "principal_id",
        "user_id",
        "action",
        "flow",
        "outcome",
        "http_status",
        "error_code",
        "stripe_customer_id",
        "stripe_session_id",
        "stripe_request_id",
        "client_ip",
        "user_agent",
        "duration_ms",
        "detail",
    }

    # Without --until: everything from --since on; a time without offset is UTC.
    code, out, err = await _cli("export", "--since", "2026-01-15T08:30:00", env=env)
    assert code == 0, err
    assert [orjson.loads(line)["request_id"] for line in out.splitlines()] == [
        "middle",
        "until-excluded",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "usage error: --since: 'yesterday' is not an ISO-8601 time"),
        (
            ["--since", "2026-01-01", "--until", "2026-13-01"],
            "usage error: --until: '2026-13-01' is not an ISO-8601 time",
        ),
        (
            ["--since", "2026-02-01", "--until", "2026-01-01"],
            "usage error: --until must be later than --since",
        ),
    ],
)
async def test_export_refuses_a_bad_time_with_one_line_and_exit_2(
    database_url: str, args: list[str], message: str
) -> None:
    code, out, err = await _cli("export", *args, env={"DATABASE_URL": database_url})
    assert (code, out) == (2, b"")
    assert len(err.splitlines()) == 1
    assert err.startswith(message)


async def test_export_reads_through_a_server_side_cursor_in_constant_memory(
    conn: asyncpg.Connection, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory is bounded by the cursor's prefetch, never by the size of the range."""
    start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    for i in range(25):
        await _insert(conn, start + timedelta(minutes=i), f"r{i:02d}")
    monkeypatch.setattr(audit_retention, "EXPORT_PREFETCH", 4)
    cursors: list[dict[str, Any]] = []
    fetches: list[int] = []
    real_cursor = asyncpg.connection.Connection.cursor

    def spy_cursor(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        cursors.append({"query": query, "in_transaction": self.is_in_transaction(), **kwargs})
        return real_cursor(self, query, *args, **kwargs)

    def spy_fetch(*args: Any, **kwargs: Any) -> Any:
        fetches.append(1)
        raise AssertionError("the export must not fetch all rows at once")

    monkeypatch.setattr(asyncpg.connection.Connection, "cursor", spy_cursor)
    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", spy_fetch)
    lines: list[bytes] = []

    count = await audit_retention.export(db, start, None, lines.append)

    assert count == 25
    assert [orjson.loads(line)["request_id"] for line in lines] == [f"r{i:02d}" for i in range(25)]
    (cursor,) = cursors
    assert cursor["prefetch"] == 4
    assert cursor["in_transaction"]
    assert "FROM audit_events" in cursor["query"]
    assert fetches == []


# --------------------------------------------------------------------------- migration


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"pgw_empty_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(_admin_url(), name)
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


ALL_ROWS = "SELECT * FROM audit_events ORDER BY id"


def test_migration_keeps_existing_rows_up_and_down(empty_database: str) -> None:
    url = empty_database
    migrations.upgrade(url, "0003")
    times = [
        datetime(2024, 3, 9, tzinfo=UTC),
        datetime.now(UTC),
        datetime.now(UTC) + timedelta(days=3 * 366),
    ]
    for i, at in enumerate(times):
        _query(
            url,
            INSERT.replace("RETURNING id", ""),
            at,
            f"req-{i}",
            "u_1",
            "10.0.0.1",
            "ua",
            '{"k": 1}',
        )
    before = [dict(r) for r in _query(url, ALL_ROWS)]

    migrations.upgrade(url, "head")

    assert [dict(r) for r in _query(url, ALL_ROWS)] == before
    where = _query(url, "SELECT tableoid::regclass::text FROM audit_events ORDER BY id")
    assert [r[0] for r in where] == [
        "audit_events_p2024_03",
        audit_partitions.partition_name(times[1].date()),
        "audit_events_default",
    ]
    # The identity sequence goes on after the copied ids.
    (new,) = _query(url, INSERT, datetime.now(UTC), "req-new", None, None, None, None)
    assert new["id"] == before[-1]["id"] + 1

    migrations.downgrade(url, "0003")

    after = [dict(r) for r in _query(url, ALL_ROWS)]
    assert after[:-1] == before
    (kind,) = _query(url, "SELECT relkind::text FROM pg_class WHERE relname = 'audit_events'")
    assert kind[0] == "r"


# --------------------------------------------------------------------------- stripe_events


async def _events(conn: asyncpg.Connection, ages_in_days: dict[str, float]) -> None:
    for event_id, age in ages_in_days.items():
        await conn.execute(
            "INSERT INTO stripe_events (id, type, created, received_at, result)"
            " VALUES ($1, 'customer.subscription.updated', now() - $2::interval,"
            " now() - $2::interval, 'applied')",
            event_id,
            timedelta(days=age),
        )


async def _event_ids(conn: asyncpg.Connection) -> list[str]:
    return [r[0] for r in await conn.fetch("SELECT id FROM stripe_events ORDER BY id")]


async def test_stripe_events_older_than_30_days_are_purged_in_bounded_batches(
    conn: asyncpg.Connection, db: Database
) -> None:
    old = {f"evt_old{i}": 31 + i for i in range(5)}
    await _events(conn, {**old, "evt_29days": 29.9, "evt_new": 0})

    # Two batches of two: one old event waits for the next round.
    assert await events.purge_old_events(db, batch=2, max_batches=2) == 4
    assert await _event_ids(conn) == ["evt_29days", "evt_new", "evt_old0"]
    assert await events.purge_old_events(db, batch=2, max_batches=2) == 1
    assert await _event_ids(conn) == ["evt_29days", "evt_new"]
    assert await events.purge_old_events(db) == 0


async def test_serve_housekeeping_purges_old_stripe_events(
    conn: asyncpg.Connection, make_service: Any
) -> None:
    await _events(conn, {"evt_old": 45, "evt_recent": 3})

    await make_service()  # the housekeeping task purges at start, then every 10 minutes

    deadline = asyncio.get_running_loop().time() + 10
    while await _event_ids(conn) != ["evt_recent"]:
        assert asyncio.get_running_loop().time() < deadline, await _event_ids(conn)
        await asyncio.sleep(0.05)
