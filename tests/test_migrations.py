"""Migrations: every revision goes up, down and up again cleanly; `migrate` is
safe from many replicas at once; the audit table is append-only (SPEC §4, §6, §8).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import orjson
import pytest
from alembic.script import ScriptDirectory

from service import migrations
from tests.conftest import _admin_execute, _admin_url, _with_database

REPO = Path(__file__).resolve().parent.parent
PORTAL_GATEWAY = Path(sys.executable).parent / "portal-gateway"
# The lock id migrations/env.py takes; replicas only agree if it never changes.
MIGRATION_LOCK_ID = 0x706F7274616C
SPEC_TABLES = {
    "customers",
    "subscriptions",
    "plans",
    "portal_profiles",
    "offers",
    "api_clients",
    "idempotency_keys",
    "audit_events",
    "stripe_events",
    "deployment",
}
# Everything a migration can leave behind, as comparable text.
SCHEMA_QUERY = """
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' '
       || is_nullable || ' ' || coalesce(column_default, '')
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'trigger ' || tgrelid::regclass || ' ' || tgname FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'function ' || p.oid::regprocedure FROM pg_proc p
WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'relation ' || relkind::text || ' ' || relname FROM pg_class
WHERE relnamespace = 'public'::regnamespace
UNION ALL
SELECT 'type ' || typname FROM pg_type t
WHERE typnamespace = 'public'::regnamespace AND typtype IN ('e', 'd', 'c', 'r')
  AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
"""


def _snapshot(url: str) -> set[str]:
    """The public schema as a set of lines, without alembic's own bookkeeping."""

    async def query() -> set[str]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(SCHEMA_QUERY)
        finally:
            await conn.close()
        return {r[0] for r in rows if "alembic_version" not in r[0]}

    return asyncio.run(query())


def _tables(url: str) -> set[str]:
    # Plain tables and partitioned ones (audit_events, SPEC §6).
    tables = ("relation r ", "relation p ")
    return {line.split()[2] for line in _snapshot(url) if line.startswith(tables)}


def _revision(url: str) -> str | None:
    async def query() -> str | None:
        conn = await asyncpg.connect(url)
        try:
            value: str | None = await conn.fetchval("SELECT version_num FROM alembic_version")
            return value
        finally:
            await conn.close()

    return asyncio.run(query())


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A brand-new database with nothing in it, dropped afterwards."""
    name = f"pgw_empty_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(_admin_url(), name)
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def missing_database() -> Iterator[str]:
    """The URL of a database that does not exist yet (dropped afterwards if created)."""
    name = f"pgw_new_{uuid.uuid4().hex[:12]}"
    try:
        yield _with_database(_admin_url(), name)
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_stairway_every_revision_upgrades_downgrades_and_upgrades_again(
    empty_database: str,
) -> None:
    url = empty_database
    script = ScriptDirectory.from_config(migrations.alembic_config(url))
    revisions = list(reversed(list(script.walk_revisions("base", "heads"))))
    assert revisions, "no migrations found"
    assert revisions[-1].revision == migrations.head_revision()

    before = _snapshot(url)
    assert before == set()
    for rev in revisions:
        migrations.upgrade(url, rev.revision)
        after = _snapshot(url)
        assert after != before, f"{rev.revision} changed nothing"
        migrations.downgrade(url, "-1")
        # The downgrade undoes exactly what the upgrade did...
        assert _snapshot(url) == before, f"downgrade of {rev.revision} is not its inverse"
        migrations.upgrade(url, rev.revision)
        # ...so the upgrade can run again and lands on the same schema.
        assert _snapshot(url) == after, f"{rev.revision} differs on its second upgrade"
        assert _revision(url) == rev.revision
        before = after


def test_head_has_every_table_and_base_has_none(empty_database: str) -> None:
    url = empty_database
    migrations.upgrade(url, "head")
    assert _tables(url) >= SPEC_TABLES
    assert _revision(url) == migrations.head_revision()

    migrations.downgrade(url, "base")
    assert _snapshot(url) == set()  # no table, index, function, trigger or type left
    assert _revision(url) is None


@contextmanager
def migrate_processes(url: str, count: int) -> Iterator[list[subprocess.Popen[str]]]:
    """``count`` replicas running ``portal-gateway migrate`` at once; none outlives the test."""
    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": url, "LOG_FORMAT": "json"}
    procs = [
        subprocess.Popen(
            [str(PORTAL_GATEWAY), "migrate"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def _finish(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    results = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=60)
        results.append((proc.returncode, stderr))
    return results


def _exited(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    return [(p.returncode, p.communicate()[1]) for p in procs if p.poll() is not None]


def test_concurrent_migrate_creates_the_database_once_and_reaches_head(
    missing_database: str,
) -> None:
    """Replicas of a first deployment all run `migrate` against a database not yet there."""
    with migrate_processes(missing_database, 2) as procs:
        results = _finish(procs)
    for returncode, stderr in results:
        assert returncode == 0, stderr
        assert "Traceback" not in stderr
    assert _revision(missing_database) == migrations.head_revision()
    assert _tables(missing_database) >= SPEC_TABLES


async def _waiting_for_lock(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return count


def test_concurrent_migrate_waits_for_the_advisory_lock(empty_database: str) -> None:
    """While one replica migrates, the others wait on the lock, then find the schema at head."""

    async def scenario(procs: list[subprocess.Popen[str]], holder: asyncpg.Connection) -> None:
        deadline = time.monotonic() + 30
        while await _waiting_for_lock(holder) < len(procs):
            assert not _exited(procs), _exited(procs)
            assert time.monotonic() < deadline, "migrate never waited for the lock"
            await asyncio.sleep(0.05)
        assert not _exited(procs)  # blocked, not failed
        # Nothing was migrated while the lock was held, not even alembic's table.
        assert await _tables_now(holder) == set()

    async def run() -> list[tuple[int, str]]:
        holder = await asyncpg.connect(empty_database)
        try:
            # Play the replica that is migrating right now.
            await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
            with migrate_processes(empty_database, 2) as procs:
                try:
                    await scenario(procs, holder)
                finally:
                    await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
                return await asyncio.to_thread(_finish, procs)
        finally:
            await holder.close()

    for returncode, stderr in asyncio.run(run()):
        assert returncode == 0, stderr
    assert _revision(empty_database) == migrations.head_revision()
    assert _tables(empty_database) >= SPEC_TABLES


async def _tables_now(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in rows}


async def test_audit_events_are_append_only(conn: asyncpg.Connection) -> None:
    row_id = await conn.fetchval(
        "INSERT INTO audit_events (request_id, principal_type, principal_id, action, outcome,"
        " http_status, duration_ms) VALUES ('req-1', 'client', 'billing', 'portal_session.create',"
        " 'created', 201, 12.5) RETURNING id"
    )
    statements = [
        "UPDATE audit_events SET outcome = 'refused'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ]
    for sql in statements:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(sql)
    row = await conn.fetchrow("SELECT id, outcome FROM audit_events")
    assert row is not None
    assert (row["id"], row["outcome"]) == (row_id, "created")


def test_migrate_at_info_shows_revisions_not_alembic_set_up_lines(empty_database: str) -> None:
    """What `make run` (and `migrate`) print at INFO: the revisions applied, without
    alembic's plugin, dialect and DDL-mode lines; a failed migration is still loud."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": empty_database,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    run = [str(PORTAL_GATEWAY), "migrate"]
    done = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    events = [orjson.loads(line)["event"] for line in done.stdout.splitlines()]
    assert any(event.startswith("Running upgrade") for event in events), events
    chatter = ("setup plugin", "Context impl", "Will assume")
    assert [event for event in events if event.startswith(chatter)] == []
    failed = subprocess.run(
        [*run, "no_such_revision"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode != 0
    assert "no_such_revision" in failed.stdout + failed.stderr
