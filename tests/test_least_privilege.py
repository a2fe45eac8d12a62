"""Least privilege in the database (SPEC §5, issue 12 item 4).

`migrate` runs as the schema owner (MIGRATE_DATABASE_URL) and grants the runtime
role (`--grant-to ROLE`) only what `serve` and the runtime CLI commands need.
Proved here as that role: the audit trail can't be deleted, updated, truncated,
its trigger disabled or dropped, and no DDL runs at all, while the service
started with that role's DATABASE_URL serves a portal session and writes its
audit row, and every statement of the runtime code is granted.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import pkgutil
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

import service.db
from service import cli, keys, migrations
from service.app import create_app
from service.db import grants, resolve
from service.metrics import Metrics
from tests.conftest import (
    Standin,
    _admin_execute,
    _admin_url,
    _with_database,
    _with_role,
    create_client_token,
    make_settings,
    seed_world,
)
from tests.helpers import (
    WEBHOOK_SECRET,
    created,
    deliver,
    post_session,
    subscription_event,
)

REPO = Path(__file__).resolve().parent.parent
PORTAL_GATEWAY = Path(sys.executable).parent / "portal-gateway"

# Modules whose SQL runs only with the owner's credentials (or the demo's single
# role): `migrate` itself, `audit prune`'s partition DDL, `make run`'s seed.
OWNER_ONLY_MODULES = frozenset({"grants", "audit_partitions", "demo"})
_SQL = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", re.IGNORECASE)
_TEMPLATE = re.compile(r"\{[a-z_]*\}")


@dataclass(frozen=True)
class Runtime:
    """A test database migrated by the owner, and the runtime role granted on it."""

    role: str
    owner_url: str  # the migrating (owner's) connection
    url: str  # the same database as the runtime role: serve's DATABASE_URL


async def _create_role(role: str, password: str) -> None:
    await _admin_execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")


async def _drop_role(role: str) -> None:
    # After its databases are dropped (its grants go with them).
    await _admin_execute(f'DROP ROLE IF EXISTS "{role}"')


def _role_name() -> str:
    return f"pgw_rt_{uuid.uuid4().hex[:10]}"


async def _insert_audit_row(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO audit_events (request_id, principal_type, principal_id, action, outcome,"
        " http_status, duration_ms) VALUES ('req-1', 'client', 'billing',"
        " 'portal_session.create', 'created', 201, 12.5)"
    )


@pytest.fixture
async def runtime(template_database: str) -> AsyncIterator[Runtime]:
    """A migrated database holding one audit row, and a fresh role granted with --grant-to."""
    role, password = _role_name(), secrets.token_hex(16)
    name = f"pgw_lp_{uuid.uuid4().hex[:12]}"
    owner_url = _with_database(_admin_url(), name)
    await _create_role(role, password)
    try:
        await _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        try:
            owner = await asyncpg.connect(owner_url)
            try:
                await _insert_audit_row(owner)
            finally:
                await owner.close()
            await grants.grant_runtime_privileges(owner_url, role)
            yield Runtime(role, owner_url, _with_role(owner_url, role, password))
        finally:
            await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await _drop_role(role)


@pytest.fixture
async def as_runtime(runtime: Runtime) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the runtime role, the way serve connects."""
    conn = await asyncpg.connect(runtime.url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def as_owner(runtime: Runtime) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(runtime.owner_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _audit_trail_intact(owner: asyncpg.Connection) -> None:
    assert await owner.fetchval("SELECT count(*) FROM audit_events") == 1
    triggers = await owner.fetch(
        "SELECT tgname, tgenabled::text AS enabled FROM pg_trigger"
        " WHERE tgrelid = 'audit_events'::regclass AND NOT tgisinternal"
    )
    assert {t["tgname"] for t in triggers} >= {
        "tr__audit_events__append_only",
        "tr__audit_events__no_truncate",
    }
    assert {t["enabled"] for t in triggers} == {"O"}  # enabled: fires in origin mode


def _refused_by_privileges(exc: asyncpg.InsufficientPrivilegeError) -> None:
    # The append-only trigger raises the same SQLSTATE: the point here is that
    # the statement never got that far.
    message = str(exc)
    assert "append-only" not in message
    assert "permission denied" in message or "must be owner" in message, message


# --- the audit trail, as the runtime role ------------------------------------------------

ATTEMPTS = {
    "delete": "DELETE FROM audit_events",
    "update": "UPDATE audit_events SET outcome = 'refused'",
    "truncate": "TRUNCATE audit_events",
    "disable_user_triggers": "ALTER TABLE audit_events DISABLE TRIGGER USER",
    "disable_all_triggers": "ALTER TABLE audit_events DISABLE TRIGGER ALL",
    "drop_trigger": "DROP TRIGGER tr__audit_events__append_only ON audit_events",
    "replica_mode": "SET session_replication_role = replica",
    "rename_table": "ALTER TABLE audit_events RENAME TO audit_events_old",
    "drop_table": "DROP TABLE audit_events",
    "detach_partition": "ALTER TABLE audit_events DETACH PARTITION audit_events_default",
    "create_table": "CREATE TABLE audit_events_copy (id bigint)",
    "create_temp_table": "CREATE TEMP TABLE scratch (id bigint)",
    "create_function": "CREATE FUNCTION noop() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "create_schema": "CREATE SCHEMA elsewhere",
}


@pytest.mark.parametrize("sql", ATTEMPTS.values(), ids=ATTEMPTS.keys())
async def test_runtime_role_cannot_erase_or_alter_the_audit_trail(
    sql: str, as_runtime: asyncpg.Connection, as_owner: asyncpg.Connection
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
        await as_runtime.execute(sql)
    _refused_by_privileges(refused.value)
    await _audit_trail_intact(as_owner)


async def test_runtime_role_cannot_take_the_tables_over(
    runtime: Runtime, as_runtime: asyncpg.Connection, as_owner: asyncpg.Connection
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
        await as_runtime.execute(f'ALTER TABLE audit_events OWNER TO "{runtime.role}"')
    _refused_by_privileges(refused.value)
    # Granting itself more is a no-op (Postgres only warns): DELETE is still refused.
    await as_runtime.execute(f'GRANT DELETE, TRUNCATE ON audit_events TO "{runtime.role}"')
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        await as_runtime.execute("DELETE FROM audit_events")
    await _audit_trail_intact(as_owner)


async def test_runtime_role_cannot_reach_the_audit_partitions_directly(
    as_runtime: asyncpg.Connection, as_owner: asyncpg.Connection
) -> None:
    # Rows go in through the parent, whose privileges are the ones checked then;
    # a partition itself grants the runtime role nothing.
    partitions = await as_owner.fetch(
        "SELECT format('%I', c.relname) AS name FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'audit_events'::regclass"
    )
    assert partitions, "audit_events is partitioned by month (SPEC §6)"
    for partition in (p["name"] for p in partitions):
        for sql in (
            f"SELECT count(*) FROM {partition}",
            f"INSERT INTO {partition} (request_id) VALUES ('x')",
            f"DELETE FROM {partition}",
            f"TRUNCATE {partition}",
            f"ALTER TABLE {partition} DISABLE TRIGGER USER",
            f"DROP TABLE {partition}",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
                await as_runtime.execute(sql)
            _refused_by_privileges(refused.value)
    await _audit_trail_intact(as_owner)


async def test_runtime_role_appends_and_reads_the_audit_trail(
    as_runtime: asyncpg.Connection, as_owner: asyncpg.Connection
) -> None:
    await _insert_audit_row(as_runtime)
    assert await as_runtime.fetchval("SELECT count(*) FROM audit_events") == 2
    assert await as_owner.fetchval("SELECT count(*) FROM audit_events") == 2


# --- what is granted ---------------------------------------------------------------------


async def _privileges(conn: asyncpg.Connection, role: str) -> dict[str, frozenset[str]]:
    """Every relation of the schema → the table privileges ``role`` has on it."""
    rows = await conn.fetch(
        "SELECT c.relname, array_agg(p.privilege) FILTER (WHERE p.privilege IS NOT NULL)"
        " AS held FROM pg_class c"
        " LEFT JOIN unnest($2::text[]) AS p(privilege)"
        "   ON has_table_privilege($1, c.oid, p.privilege)"
        " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')"
        " GROUP BY c.relname",
        role,
        list(grants.TABLE_PRIVILEGES),
    )
    return {r["relname"]: frozenset(r["held"] or ()) for r in rows}


async def _partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT relname FROM pg_class WHERE relispartition")
    return {r[0] for r in rows}


async def _assert_exactly_declared(conn: asyncpg.Connection, role: str) -> None:
    held = await _privileges(conn, role)
    partitions = await _partitions(conn)
    expected = {
        table: frozenset() if table in partitions else grants.RUNTIME_PRIVILEGES[table]
        for table in held
    }
    assert held == expected
    assert held["audit_events"] == {"INSERT", "SELECT"}
    can_create = await conn.fetchrow(
        "SELECT has_database_privilege($1, current_database(), 'CREATE') AS db,"
        " has_database_privilege($1, current_database(), 'TEMPORARY') AS temp,"
        " has_schema_privilege($1, 'public', 'CREATE') AS schema,"
        " has_database_privilege($1, current_database(), 'CONNECT') AS connect,"
        " has_schema_privilege($1, 'public', 'USAGE') AS usage",
        role,
    )
    assert can_create is not None
    assert dict(can_create) == {
        "db": False,
        "temp": False,
        "schema": False,
        "connect": True,
        "usage": True,
    }


async def test_every_table_of_the_schema_is_declared(as_owner: asyncpg.Connection) -> None:
    """A migration that adds a table must say what the runtime role may do with it."""
    rows = await as_owner.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT relispartition"
    )
    tables = {r[0] for r in rows}
    assert tables == set(grants.RUNTIME_PRIVILEGES), (
        "declare the runtime role's privileges on new tables in service/db/grants.py"
    )


async def test_migrate_grants_exactly_what_is_declared(
    runtime: Runtime, as_owner: asyncpg.Connection
) -> None:
    await _assert_exactly_declared(as_owner, runtime.role)


async def test_every_statement_of_the_runtime_code_is_granted(
    as_runtime: asyncpg.Connection,
) -> None:
    """The declared privileges cover the SQL in service/db/*.py that serve and the CLI run.

    EXPLAIN checks the privileges of the statement it plans (without running it),
    so each module-level statement is planned as the runtime role.
    """
    statements = {}
    for module in pkgutil.iter_modules(service.db.__path__):
        if module.name in OWNER_ONLY_MODULES:
            continue
        loaded = importlib.import_module(f"service.db.{module.name}")
        for name, value in vars(loaded).items():
            sql = value if isinstance(value, str) else getattr(value, "sql", None)
            if isinstance(sql, str) and _SQL.match(sql) and not _TEMPLATE.search(sql):
                statements[f"{module.name}.{name}"] = sql
    assert len(statements) > 20  # the scan finds the statements
    assert "audit.INSERT_AUDIT" in statements
    refused = {}
    for name, sql in statements.items():
        prepared = await as_runtime.prepare("EXPLAIN " + sql)
        try:
            await prepared.fetch(*[None] * len(prepared.get_parameters()))
        except asyncpg.InsufficientPrivilegeError as exc:
            refused[name] = str(exc)
    assert refused == {}, "grant them in service/db/grants.py (or list an owner-only module)"
    # ...and the check is not vacuous: what the runtime role must not do fails the same way.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await (await as_runtime.prepare("EXPLAIN DELETE FROM audit_events WHERE id = $1")).fetch(
            None
        )


async def test_grants_revoke_anything_broader(
    runtime: Runtime, as_owner: asyncpg.Connection
) -> None:
    role = f'"{runtime.role}"'
    database = await as_owner.fetchval("SELECT quote_ident(current_database())")
    await as_owner.execute(
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};"
        f" GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};"
        " GRANT CREATE ON SCHEMA public TO PUBLIC;"
        f" GRANT CREATE, TEMPORARY ON DATABASE {database} TO {role}"
    )
    await grants.grant_runtime_privileges(runtime.owner_url, runtime.role)
    await _assert_exactly_declared(as_owner, runtime.role)
    sequences = await as_owner.fetch(
        "SELECT relname FROM pg_class"
        " WHERE CASE WHEN relkind = 'S' THEN has_sequence_privilege($1, oid, 'USAGE,SELECT,UPDATE')"
        " END",
        runtime.role,
    )
    assert sequences == []  # identity columns need none


async def test_grants_are_idempotent_and_safe_from_replicas_at_once(
    runtime: Runtime, as_owner: asyncpg.Connection
) -> None:
    # Concurrent GRANTs on one object fail with "tuple concurrently updated" unless
    # serialized: the migration lock serializes them.
    results = await asyncio.gather(
        *(grants.grant_runtime_privileges(runtime.owner_url, runtime.role) for _ in range(4))
    )
    assert {r.undeclared for r in results} == {()}
    await _assert_exactly_declared(as_owner, runtime.role)


async def test_a_role_that_inherits_more_is_refused(
    runtime: Runtime, as_owner: asyncpg.Connection
) -> None:
    helper = _role_name()
    await _admin_execute(f'CREATE ROLE "{helper}"')
    try:
        await as_owner.execute(f'GRANT DELETE ON audit_events TO "{helper}"')
        await _admin_execute(f'GRANT "{helper}" TO "{runtime.role}"')
        with pytest.raises(grants.GrantError, match="still has DELETE on audit_events"):
            await grants.grant_runtime_privileges(runtime.owner_url, runtime.role)
    finally:
        await as_owner.execute(f'REVOKE ALL ON audit_events FROM "{helper}"')
        await _admin_execute(f'DROP ROLE "{helper}"')


async def test_the_owner_or_a_superuser_is_refused_as_runtime_role(runtime: Runtime) -> None:
    admin = urlsplit(_admin_url()).username or "postgres"
    with pytest.raises(grants.GrantError, match="superuser"):
        await grants.check_role_at(runtime.owner_url, admin)
    owner, member = _role_name(), _role_name()
    name = f"pgw_lp_owned_{uuid.uuid4().hex[:8]}"
    await _admin_execute(f'CREATE ROLE "{owner}"; CREATE ROLE "{member}" IN ROLE "{owner}"')
    try:
        await _admin_execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        try:
            url = _with_database(_admin_url(), name)
            for role in (owner, member):
                with pytest.raises(grants.GrantError, match=r"owns .* the database"):
                    await grants.check_role_at(url, role)
        finally:
            await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await _admin_execute(f'DROP ROLE "{member}"; DROP ROLE "{owner}"')


# --- the service as the runtime role -----------------------------------------------------


@pytest.mark.timeout(60)
async def test_service_serves_and_audits_as_the_runtime_role(
    runtime: Runtime, as_owner: asyncpg.Connection, standin: Standin
) -> None:
    await seed_world(as_owner)
    token = await create_client_token(as_owner)
    settings = make_settings(runtime.url, standin.url, STRIPE_WEBHOOK_SECRETS=WEBHOOK_SECRET)
    app = create_app(settings, metrics=Metrics())
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()  # start-up: current_revision, record_mode
    try:
        db = app[keys.DB]
        whoami = await db.fetchrow("whoami", "SELECT current_user AS role")
        assert whoami is not None
        assert whoami["role"] == runtime.role
        ready = await client.get("/readyz")
        assert ready.status == 200, await ready.text()

        headers = {"Idempotency-Key": "lp-1"}
        resp = await post_session(client, {"user_id": "u_42"}, token, headers)
        body = await created(resp)
        request_id = resp.headers["X-Request-ID"]
        replay = await created(await post_session(client, {"user_id": "u_42"}, token, headers))
        assert replay["id"] == body["id"]

        event = subscription_event(
            "customer.subscription.updated", "sub_42a", "cus_42", items=[("si_42a", "price_b", 5)]
        )
        delivered = await deliver(client, event)
        assert delivered.status == 200, await delivered.text()
        # The housekeeping purge, as serve runs it.
        await resolve.purge_expired_idempotency_keys(db)
    finally:
        await client.close()

    row = await as_owner.fetchrow(
        "SELECT principal_type, user_id, outcome, http_status FROM audit_events"
        " WHERE request_id = $1",
        request_id,
    )
    assert row is not None
    assert (row["user_id"], row["http_status"]) == ("u_42", 201)
    quantity = await as_owner.fetchval(
        "SELECT quantity FROM subscriptions WHERE stripe_subscription_id = 'sub_42a'"
    )
    assert quantity == 5
    assert await as_owner.fetchval("SELECT livemode FROM deployment") is False


# --- the CLI: `migrate --grant-to` with MIGRATE_DATABASE_URL --------------------------------


@pytest.fixture
def new_database() -> Iterator[tuple[str, str, str]]:
    """A database that does not exist yet, and a runtime role: (owner URL, runtime URL, role)."""
    role, password = _role_name(), secrets.token_hex(16)
    name = f"pgw_lp_new_{uuid.uuid4().hex[:12]}"
    owner_url = _with_database(_admin_url(), name)
    asyncio.run(_create_role(role, password))
    try:
        yield owner_url, _with_role(owner_url, role, password), role
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        asyncio.run(_drop_role(role))


def _cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(PORTAL_GATEWAY), *args],
        cwd=REPO,
        env={"PATH": os.environ.get("PATH", ""), "LOG_FORMAT": "json", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def _query(url: str, sql: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_migrate_uses_migrate_database_url_and_grants_from_replicas_at_once(
    new_database: tuple[str, str, str],
) -> None:
    owner_url, runtime_url, role = new_database
    # DATABASE_URL is the runtime role's: it can create no database and run no DDL,
    # so migrating at all proves MIGRATE_DATABASE_URL is the one used.
    env = {"DATABASE_URL": runtime_url, "MIGRATE_DATABASE_URL": owner_url}
    procs = [
        _cli(env, "migrate", "--grant-to", role),
        _cli({**env, "DATABASE_RUNTIME_ROLE": role}, "migrate"),
    ]
    for proc in procs:
        code, _, err = _finish(proc)
        assert code == 0, err[-3000:]
        assert "Traceback" not in err
    assert _query(owner_url, "SELECT version_num FROM alembic_version") == (
        migrations.head_revision()
    )
    # Everything is owned by MIGRATE_DATABASE_URL's role, nothing by the runtime role.
    admin = urlsplit(_admin_url()).username or "postgres"
    assert (
        _query(
            owner_url,
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            f" AND relowner <> '{admin}'::regrole",
        )
        == 0
    )

    async def check() -> None:
        conn = await asyncpg.connect(owner_url)
        try:
            await _assert_exactly_declared(conn, role)
        finally:
            await conn.close()

    asyncio.run(check())
    # The runtime CLI commands run with DATABASE_URL: the runtime role suffices.
    code, token, err = _finish(_cli({"DATABASE_URL": runtime_url}, "clients", "create", "lp"))
    assert code == 0, err
    assert token.strip()


def test_migrate_refuses_a_role_that_does_not_exist_before_migrating(
    new_database: tuple[str, str, str],
) -> None:
    owner_url, _, _ = new_database
    missing = _role_name()
    code, _, err = _finish(_cli({"DATABASE_URL": owner_url}, "migrate", "--grant-to", missing))
    assert code == 2
    assert err.strip() == (
        f'configuration error: --grant-to: role "{missing}" does not exist:'
        f" create it first (CREATE ROLE {missing} LOGIN)"
    )
    # Nothing migrated (the database itself is created first, as always).
    assert _query(owner_url, "SELECT to_regclass('alembic_version') IS NULL") is True


@pytest.mark.parametrize("value", ["Portal", "bad-name", "x;DROP"])
def test_migrate_rejects_a_role_that_is_not_a_plain_name(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", "--grant-to", value])
    assert exited.value.code == 2
    assert "argument --grant-to: must be a plain lower-case Postgres role name" in (
        capsys.readouterr().err
    )
