"""Bounded growth: audit_events partitioned by month; stripe_events indexed by receipt.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

SPEC §6: ``audit prune`` drops whole monthly partitions, never rows.

* ``audit_events`` becomes ``PARTITION BY RANGE (occurred_at)``, one partition
  per calendar month in UTC named ``audit_events_pYYYY_MM``, plus
  ``audit_events_default``, the safety net that takes any row no month
  partition covers, so an insert never fails for want of a partition.
* The runtime role has no DDL (SPEC §5), so partitions are made ahead of time by
  the owner: this migration covers every month that holds a row and the next
  ``MONTHS_AHEAD``; ``migrate`` and ``audit prune`` (a monthly CronJob) top that
  up through ``audit_events_create_partition(date)``. It is not SECURITY
  DEFINER: only the owner of audit_events can use it.
* The primary key must include the partition key: ``(id, occurred_at)``; ids stay
  unique by the identity sequence (GENERATED ALWAYS). Existing rows are copied
  with their ids, and the sequence goes on after the largest.
* Append-only as before: the row trigger on the parent is cloned onto every
  partition, but a TRUNCATE trigger is not, so each partition gets its own.
* ``ix__stripe_events__received_at``: the housekeeping purge of events older than
  30 days finds them without scanning the table.

The copy holds an exclusive lock on audit_events: serving replicas' audit writes
wait (and may answer 503 ``database_unavailable``) until the migration commits.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONTHS_AHEAD = 6

_COLUMNS = (
    "id, occurred_at, request_id, principal_type, principal_id, user_id, action, flow,"
    " outcome, http_status, error_code, stripe_customer_id, stripe_session_id,"
    " stripe_request_id, client_ip, user_agent, duration_ms, detail"
)

_COLUMN_DEFINITIONS = """
    id bigint GENERATED ALWAYS AS IDENTITY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    request_id text NOT NULL,
    principal_type text NOT NULL,
    principal_id text NOT NULL,
    user_id text,
    action text NOT NULL,
    flow text,
    outcome text NOT NULL,
    http_status smallint NOT NULL,
    error_code text,
    stripe_customer_id text,
    stripe_session_id text,
    stripe_request_id text,
    client_ip inet,
    user_agent text,
    duration_ms double precision NOT NULL,
    detail jsonb
"""

# One month's partition (UTC month of ``month``), with its TRUNCATE trigger; the
# name of the partition created, NULL if it already exists. Identifiers and bounds
# are formatted with %I and %L.
_CREATE_PARTITION_FUNCTION = """
CREATE FUNCTION audit_events_create_partition(month date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    first_day date := date_trunc('month', month)::date;
    partition_name text := 'audit_events_p' || to_char(first_day, 'YYYY_MM');
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class
               WHERE relname = partition_name AND relnamespace = 'public'::regnamespace) THEN
        RETURN NULL;
    END IF;
    EXECUTE format(
        'CREATE TABLE public.%I PARTITION OF public.audit_events FOR VALUES FROM (%L) TO (%L)',
        partition_name,
        first_day::timestamp AT TIME ZONE 'UTC',
        (first_day + interval '1 month')::timestamp AT TIME ZONE 'UTC');
    EXECUTE format(
        'CREATE TRIGGER tr__audit_events__no_truncate BEFORE TRUNCATE ON public.%I'
        ' FOR EACH STATEMENT EXECUTE FUNCTION public.audit_events_append_only()',
        partition_name);
    RETURN partition_name;
END
$$
"""


def _append_only_triggers(table: str) -> None:
    op.execute(
        f"CREATE TRIGGER tr__audit_events__append_only BEFORE UPDATE OR DELETE ON {table}"
        " FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
    )
    op.execute(
        f"CREATE TRIGGER tr__audit_events__no_truncate BEFORE TRUNCATE ON {table}"
        " FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()"
    )


def _set_up_indexes() -> None:
    op.execute("CREATE INDEX ix__audit_events__occurred_at ON audit_events (occurred_at)")
    op.execute("CREATE INDEX ix__audit_events__user_id ON audit_events (user_id)")


def _set_aside(old_name: str) -> None:
    """Rename the current table and free the names the new one takes."""
    op.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
    op.execute(f"ALTER TABLE audit_events RENAME TO {old_name}")
    op.execute(f"ALTER TABLE {old_name} DROP CONSTRAINT pk__audit_events")
    op.execute("DROP INDEX ix__audit_events__occurred_at")
    op.execute("DROP INDEX ix__audit_events__user_id")
    op.execute(f"ALTER TABLE {old_name} ALTER COLUMN id DROP IDENTITY")


def _copy_from(old_name: str) -> None:
    op.execute(
        f"INSERT INTO audit_events ({_COLUMNS}) OVERRIDING SYSTEM VALUE"
        f" SELECT {_COLUMNS} FROM {old_name}"
    )
    op.execute(
        "SELECT setval(pg_get_serial_sequence('audit_events', 'id'),"
        " coalesce(max(id), 0) + 1, false) FROM audit_events"
    )
    op.execute(f"DROP TABLE {old_name}")


def upgrade() -> None:
    _set_aside("audit_events_0003")
    op.execute(
        f"""
        CREATE TABLE audit_events ({_COLUMN_DEFINITIONS},
            CONSTRAINT pk__audit_events PRIMARY KEY (id, occurred_at)
        ) PARTITION BY RANGE (occurred_at)
        """
    )
    _set_up_indexes()
    _append_only_triggers("audit_events")
    op.execute(_CREATE_PARTITION_FUNCTION)
    # Not SECURITY DEFINER, so only the owner could use it anyway; no one else needs it.
    op.execute("REVOKE EXECUTE ON FUNCTION audit_events_create_partition(date) FROM PUBLIC")
    # Every month from the oldest row's to MONTHS_AHEAD after this one (UTC).
    op.execute(
        f"""
        SELECT audit_events_create_partition(month::date)
        FROM generate_series(
            date_trunc('month', coalesce(
                (SELECT min(occurred_at) FROM audit_events_0003), now()) AT TIME ZONE 'UTC'),
            date_trunc('month', now() AT TIME ZONE 'UTC') + interval '{MONTHS_AHEAD} months',
            interval '1 month') AS month
        """
    )
    op.execute("CREATE TABLE audit_events_default PARTITION OF audit_events DEFAULT")
    op.execute(
        "CREATE TRIGGER tr__audit_events__no_truncate BEFORE TRUNCATE ON audit_events_default"
        " FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()"
    )
    _copy_from("audit_events_0003")
    op.execute("CREATE INDEX ix__stripe_events__received_at ON stripe_events (received_at)")


def downgrade() -> None:
    op.execute("DROP INDEX ix__stripe_events__received_at")
    _set_aside("audit_events_0004")
    op.execute(
        f"""
        CREATE TABLE audit_events ({_COLUMN_DEFINITIONS},
            CONSTRAINT pk__audit_events PRIMARY KEY (id)
        )
        """
    )
    _set_up_indexes()
    _append_only_triggers("audit_events")
    _copy_from("audit_events_0004")  # the partitions go with their parent
    op.execute("DROP FUNCTION audit_events_create_partition(date)")
