"""What the runtime role may do in the database: the grants ``migrate --grant-to ROLE`` applies.

SPEC §5, least privilege: ``migrate`` runs as the schema owner
(MIGRATE_DATABASE_URL); ``serve`` and the CLI commands that use DATABASE_URL
(clients, import, resync) run as a role that owns nothing, can create nothing,
and may only INSERT and SELECT on ``audit_events``. Only a table's owner can
``ALTER TABLE ... DISABLE TRIGGER``, so even a compromised service can neither
switch the append-only trigger off nor delete, update or truncate a row.

The privileges are declared per table in ``RUNTIME_PRIVILEGES``, derived from
the SQL in ``service/db/*.py`` (tests/test_least_privilege.py checks both that
every statement there is covered and that every table of the schema is
declared). They are applied after every upgrade, in one transaction under the
migration advisory lock (concurrent GRANTs on one object fail with "tuple
concurrently updated"), so they always match the schema, tables added later
included: everything the role had is revoked, what is declared is granted, and
the outcome is read back from Postgres and checked, which also catches a role
that inherits more (a member of the owner, a superuser) and an owner URL that
cannot grant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import asyncpg

from service.migrations import MIGRATION_LOCK_ID

_READ = frozenset({"SELECT"})
_APPEND = frozenset({"SELECT", "INSERT"})
_UPSERT = frozenset({"SELECT", "INSERT", "UPDATE"})
_ALL_DML = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})

# Table → privileges of the runtime role, and the SQL that needs them. A
# partition is reached through its parent (Postgres checks only the parent's
# privileges then), so partitions get nothing of their own. TRUNCATE,
# REFERENCES and TRIGGER are never needed.
RUNTIME_PRIVILEGES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        # current_revision(): start-up and /readyz.
        "alembic_version": _READ,
        # record_mode(): INSERT ... ON CONFLICT DO NOTHING RETURNING.
        "deployment": _APPEND,
        # Token lookups; `clients create|list|revoke` (revoke deletes an older
        # revoked row of the same name).
        "api_clients": _ALL_DML,
        # Lookups; imports and webhooks upsert; webhooks delete a customer,
        # mark it stale, lock it FOR UPDATE (which needs UPDATE) during resync.
        "customers": _ALL_DML,
        # Lookups; imports, webhooks and resync upsert; resync deletes.
        "subscriptions": _ALL_DML,
        # Lookups; imports upsert (and move the default profile).
        "plans": _UPSERT,
        # Also `profiles apply` upserts and, with --prune, deletes managed profiles.
        "portal_profiles": _ALL_DML,
        "offers": _UPSERT,
        # Claimed per request (upsert); the housekeeping task purges expired keys.
        "idempotency_keys": _ALL_DML,
        # Deduplication (upsert), the result update, the purge of old events.
        "stripe_events": _ALL_DML,
        # Created per request, consumed and released by clicks, purged by housekeeping.
        "portal_links": _ALL_DML,
        # `sync --from-stripe` stores and clears its cursor.
        "sync_cursors": _ALL_DML,
        # Append-only: a row is written, never changed or removed (SPEC §6).
        "audit_events": _APPEND,
    }
)

TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


class GrantError(Exception):
    """The role cannot be made the runtime role as asked; the message is one line."""


@dataclass(frozen=True, slots=True)
class Granted:
    """What ``grant_runtime_privileges`` did."""

    role: str
    tables: tuple[str, ...]
    # Tables of the schema that RUNTIME_PRIVILEGES does not declare: the role
    # gets nothing on them (the caller warns; the test suite fails on them).
    undeclared: tuple[str, ...]


ROLE = """
SELECT r.rolsuper, r.rolcreaterole,
       pg_has_role(r.oid, d.datdba, 'MEMBER') AS owns_database,
       pg_has_role(r.oid, n.nspowner, 'MEMBER') AS owns_schema,
       (SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c
        WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
          AND pg_has_role(r.oid, c.relowner, 'MEMBER')) AS owned
FROM pg_roles r, pg_database d, pg_namespace n
WHERE r.rolname = $1 AND d.datname = current_database() AND n.nspname = current_schema()
"""

# Every relation of the schema, quoted by Postgres itself. A sequence comes
# with the table whose column owns it and how: 'a' for serial (nextval() runs
# with the inserting role's privileges), 'i' for identity (it needs none).
RELATIONS = """
SELECT c.oid, c.relname, c.relkind::text AS relkind, c.relispartition,
       format('%I.%I', n.nspname, c.relname) AS qualified,
       owner.relname AS owning_table, dep.deptype::text AS deptype
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_depend dep ON c.relkind = 'S' AND dep.classid = 'pg_class'::regclass
    AND dep.objid = c.oid AND dep.refclassid = 'pg_class'::regclass AND dep.deptype IN ('a', 'i')
LEFT JOIN pg_class owner ON owner.oid = dep.refobjid
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
ORDER BY c.relname
"""

NAMES = "SELECT quote_ident($1), quote_ident(current_database()), quote_ident(current_schema())"

TABLE_PRIVILEGES_HELD = """
SELECT p.privilege FROM unnest($2::text[]) AS p(privilege)
WHERE has_table_privilege($1, $3::oid, p.privilege)
"""

DATABASE_AND_SCHEMA_CREATE = """
SELECT has_database_privilege($1, current_database(), 'CREATE')
    OR has_schema_privilege($1, current_schema(), 'CREATE')
"""


async def check_role(conn: asyncpg.Connection, role: str) -> None:
    """Raise GrantError unless ``role`` exists and owns nothing here: no superuser, no owner."""
    row = await conn.fetchrow(ROLE, role)
    if row is None:
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        if exists is None:
            raise GrantError(
                f'role "{role}" does not exist: create it first (CREATE ROLE {role} LOGIN)'
            )
        raise GrantError("the database has no current schema (search_path)")
    if row["rolsuper"]:
        raise GrantError(f'role "{role}" is a superuser; the runtime role must be an ordinary one')
    if row["rolcreaterole"]:
        raise GrantError(f'role "{role}" has CREATEROLE: it could make itself the owner')
    owned = row["owned"] or ("the database" if row["owns_database"] else None)
    if owned is None and row["owns_schema"]:
        owned = "the schema"
    if owned is not None:
        raise GrantError(
            f'role "{role}" owns (or is a member of the owner of) {owned}; the runtime role'
            " must be another role than MIGRATE_DATABASE_URL's"
        )


async def check_role_at(url: str, role: str) -> None:
    """``check_role`` over a connection of its own (before anything is migrated)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await check_role(conn, role)
    finally:
        await conn.close()


async def grant_runtime_privileges(url: str, role: str) -> Granted:
    """Give ``role`` exactly RUNTIME_PRIVILEGES on the database at ``url``; idempotent."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction():
            # The lock env.py takes around the upgrade: one migrate at a time, grants included.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
            await check_role(conn, role)
            try:
                return await _apply(conn, role)
            except asyncpg.InsufficientPrivilegeError as exc:
                raise GrantError(
                    f"the migrating role may not grant on this database ({exc}); is"
                    " MIGRATE_DATABASE_URL the schema owner's?"
                ) from None
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, role: str) -> Granted:
    names = await conn.fetchrow(NAMES, role)
    assert names is not None
    grantee, database, schema = names[0], names[1], names[2]
    relations = await conn.fetch(RELATIONS)
    declared = {
        r["relname"]: RUNTIME_PRIVILEGES.get(r["relname"], frozenset())
        for r in relations
        if r["relkind"] != "S" and not r["relispartition"]
    }
    # The role connects and finds the schema; it creates nothing, not even a
    # temporary table, and neither does anyone through PUBLIC (TEMPORARY only
    # if we own the database: else Postgres only warns, and nothing depends on it).
    statements = [
        f"REVOKE ALL ON DATABASE {database} FROM {grantee}",
        f"GRANT CONNECT ON DATABASE {database} TO {grantee}",
        f"REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC",
        f"REVOKE ALL ON SCHEMA {schema} FROM {grantee}",
        f"REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA {schema} TO {grantee}",
    ]
    expected: dict[int, frozenset[str]] = {}
    for r in relations:
        qualified = r["qualified"]
        if r["relkind"] == "S":
            statements.append(f"REVOKE ALL ON SEQUENCE {qualified} FROM PUBLIC, {grantee}")
            # serial, not identity: the role's INSERT calls nextval() itself.
            table_privileges = declared.get(r["owning_table"], frozenset())
            if r["deptype"] == "a" and "INSERT" in table_privileges:
                statements.append(f"GRANT USAGE ON SEQUENCE {qualified} TO {grantee}")
            continue
        privileges = frozenset() if r["relispartition"] else declared[r["relname"]]
        expected[r["oid"]] = privileges
        statements.append(f"REVOKE ALL ON TABLE {qualified} FROM PUBLIC, {grantee}")
        if privileges:
            listed = ", ".join(sorted(privileges))
            statements.append(f"GRANT {listed} ON TABLE {qualified} TO {grantee}")
    for statement in statements:
        await conn.execute(statement)
    await _verify(conn, role, relations, expected)
    undeclared = sorted(name for name in declared if name not in RUNTIME_PRIVILEGES)
    return Granted(role, tuple(sorted(declared)), tuple(undeclared))


async def _verify(
    conn: asyncpg.Connection,
    role: str,
    relations: list[asyncpg.Record],
    expected: Mapping[int, frozenset[str]],
) -> None:
    """Read back what the role can do: exactly what was declared, nothing inherited."""
    if await conn.fetchval(DATABASE_AND_SCHEMA_CREATE, role):
        raise GrantError(f'role "{role}" can still CREATE in the database or its schema')
    for r in relations:
        if r["oid"] not in expected:
            continue
        rows = await conn.fetch(TABLE_PRIVILEGES_HELD, role, list(TABLE_PRIVILEGES), r["oid"])
        held = frozenset(row["privilege"] for row in rows)
        want = expected[r["oid"]]
        if held - want:
            extra = ", ".join(sorted(held - want))
            raise GrantError(
                f'role "{role}" still has {extra} on {r["relname"]} after the grants'
                " (through membership of another role, or a grant by another grantor)"
            )
        if want - held:
            missing = ", ".join(sorted(want - held))
            raise GrantError(
                f'could not grant {missing} on {r["relname"]} to role "{role}": is'
                " MIGRATE_DATABASE_URL the schema owner's?"
            )
