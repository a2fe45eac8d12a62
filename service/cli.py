"""``portal-gateway``: serve, migrate, clients, import, resync, sync, profiles, audit, demo.

Exit codes: 0 success, 1 an operation failed (bad CSV, unknown client, database
down), 2 bad configuration or usage — and for ``profiles plan``, 2 when apply
would change something. Errors are one line on stderr (a profiles file's
problems: one line each).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import asyncpg
import structlog
import uvloop
from aiohttp import web

from service import http_server, keys, logs
from service.app import StartupError, create_app
from service.auth import KNOWN_SCOPES, SCOPE_CREATE_SESSIONS, generate_client_token, hash_token
from service.config import ConfigError, Settings
from service.db import clients, deployment
from service.db.pool import UNAVAILABLE_ERRORS, Database
from service.errors import DatabaseUnavailable
from service.handlers import health

T = TypeVar("T")
DEFAULT_CLIENT_RATE_LIMIT = 600


class CliError(Exception):
    """An operation failed; the message is the one line to print."""


class UsageError(Exception):
    """Bad arguments argparse can't judge alone (exit 2); the message is the one line."""


def _settings(serving: bool = False) -> Settings:
    return Settings.from_os_env(serving=serving)


def _run(coro_factory: Callable[[], Awaitable[T]]) -> T:
    async def runner() -> T:
        return await coro_factory()

    return asyncio.run(runner())


async def _with_db(
    settings: Settings, work: Callable[[Database], Awaitable[T]], url: str | None = None
) -> T:
    db = await Database.connect(
        url or settings.database_url.reveal(), query_timeout=10, min_size=1, max_size=2
    )
    try:
        return await work(db)
    finally:
        await db.close()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(serving=True)
    logs.configure(settings.log_level, settings.log_format)
    with asyncio.Runner(loop_factory=_LOOPS[settings.event_loop]) as runner:
        runner.run(_serve(create_app(settings), settings))
    return 0


# EVENT_LOOP: uvloop's loop costs ~15 % fewer instructions per request than the
# standard library's (make bench-instr); `asyncio` is the way back without a release.
_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


# After the drain, what is still in flight (a probe, a late 503 draining) gets this
# long before aiohttp cancels it.
_FINAL_GRACE_SECONDS = 1.0


async def _serve(app: web.Application, settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully.

    Not ``web.run_app``: it stops listening before anything else, so readiness
    could never answer 503. Here, on the signal: draining starts (``/readyz``
    503, new work 503 ``draining``) while requests in flight finish, bounded by
    SHUTDOWN_TIMEOUT; then the listener closes (new connections are refused),
    and the cleanup contexts close the Stripe session and the database pool.
    """
    log = structlog.get_logger("app")
    runner = http_server.AppRunner(  # parser errors answered as problem+json too
        app,
        access_log=None,  # our canonical access line replaces aiohttp's
        handle_signals=False,
        shutdown_timeout=min(_FINAL_GRACE_SECONDS, settings.shutdown_timeout),
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    metrics_runner: web.AppRunner | None = None
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        metrics_runner = await _start_metrics_site(app, settings)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # What start-up made (modules, schemas, the app, the pool) lives as long as the
        # process: out of the collector's sight, a full collection walks only what
        # requests left behind, a few ms instead of 60-90 ms of a paused loop (the
        # p99 of an open-loop bench was those pauses).
        gc.freeze()
        log.info(
            "serving",
            host=settings.host,
            port=settings.port,
            metrics_port=settings.metrics_port,
            event_loop=type(loop).__module__.partition(".")[0],
        )
        await stop.wait()
        lifecycle = app[keys.LIFECYCLE]
        lifecycle.draining = True
        log.info("draining", in_flight=lifecycle.in_flight, timeout=settings.shutdown_timeout)
        try:
            async with asyncio.timeout(settings.shutdown_timeout):
                await lifecycle.wait_idle()
        except TimeoutError:
            log.warning("drain_timeout", in_flight=lifecycle.in_flight)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if metrics_runner is not None:  # scraped through the drain; closed before the pool
            await metrics_runner.cleanup()
        await runner.cleanup()
    log.info("stopped")


async def _start_metrics_site(app: web.Application, settings: Settings) -> web.AppRunner | None:
    """With METRICS_PORT, ``/metrics`` listens there alone (the API port has no route for it)."""
    if settings.metrics_port is None:
        return None
    runner = web.AppRunner(
        health.metrics_app(app),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=min(_FINAL_GRACE_SECONDS, settings.shutdown_timeout),
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.metrics_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def cmd_migrate(args: argparse.Namespace) -> int:
    from service import migrations
    from service.db import grants

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    # As the schema owner (SPEC §5); the runtime role is granted only what serve needs.
    owner = settings.migrate_database_url or settings.database_url
    variable = "MIGRATE_DATABASE_URL" if settings.migrate_database_url else "DATABASE_URL"
    role: str | None = args.grant_to or settings.database_runtime_role
    source = "--grant-to" if args.grant_to else "DATABASE_RUNTIME_ROLE"
    url = owner.reveal()
    granted: grants.Granted | None = None
    try:
        _run(lambda: _ensure_database(url))
        if role is not None:  # a role that can't be granted to stops us before the upgrade
            _run(lambda: grants.check_role_at(url, role))
        migrations.upgrade(url, args.revision)
        _prepare_audit_partitions(settings, url)
        if role is not None:
            granted = _run(lambda: grants.grant_runtime_privileges(url, role))
    except grants.GrantError as exc:
        raise ConfigError(source, str(exc)) from None
    except DatabaseUnavailable as exc:
        raise CliError(f"{variable}: {exc.detail}") from None
    except (asyncpg.InvalidCatalogNameError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise ConfigError(variable, str(exc)) from None
    if granted is not None:
        log = structlog.get_logger("app")
        log.info("runtime_role_granted", role=granted.role, tables=list(granted.tables))
        if granted.undeclared:
            # Not in db/grants.py's RUNTIME_PRIVILEGES: the runtime role can't touch them.
            log.warning("tables_without_runtime_grants", tables=list(granted.undeclared))
    return 0


def _prepare_audit_partitions(settings: Settings, url: str) -> None:
    """This month's audit partition and the next ones, made ahead (SPEC §5: serve has no DDL)."""
    from service import audit_retention

    log = structlog.get_logger("app")
    try:
        prepared = _run(lambda: _with_db(settings, audit_retention.prepare_partitions_at, url=url))
    except audit_retention.RetentionFailed as exc:
        # The schema is migrated; the default partition takes rows until `audit prune`.
        log.warning("audit_partitions_not_prepared", error=str(exc))
        return
    if prepared.created:
        log.info("audit_partitions_created", partitions=prepared.created)
    if prepared.left_in_default:
        log.warning("audit_months_in_default_partition", partitions=prepared.left_in_default)


async def _ensure_database(url: str) -> None:
    try:
        await deployment.ensure_database(url)
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Another replica's `migrate` created it between our check and our CREATE
        # (Postgres reports that race as a unique violation on pg_database).
        pass
    except UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot connect to the database: {type(exc).__name__}") from exc


def _client_scopes(given: list[str] | None) -> list[str]:
    """``--scope`` values, checked: a misspelt one would make a client every route refuses."""
    for scope in given or ():
        if scope not in KNOWN_SCOPES:
            raise UsageError(f"--scope: unknown scope {scope!r} (known: {', '.join(KNOWN_SCOPES)})")
    return given or [SCOPE_CREATE_SESSIONS]


def cmd_clients(args: argparse.Namespace) -> int:
    scopes = _client_scopes(args.scope) if args.clients_command == "create" else []
    settings = _settings()
    if args.clients_command == "create":
        token = generate_client_token()
        created = _run(
            lambda: _with_db(
                settings,
                lambda db: clients.create_client(
                    db, args.name, hash_token(token), scopes, args.rate_limit
                ),
            )
        )
        if not created:
            raise CliError(f"a client named {args.name!r} already exists")
        # The token alone on stdout, once: only its hash is stored.
        print(token)
        return 0
    if args.clients_command == "list":
        found = _run(lambda: _with_db(settings, clients.list_clients))
        for c in found:
            state = f"revoked {c.revoked_at.isoformat()}" if c.revoked_at else "active"
            print(f"{c.name}\t{','.join(c.scopes)}\t{c.rate_limit_per_minute}/min\t{state}")
        return 0
    revoked = _run(lambda: _with_db(settings, lambda db: clients.revoke_client(db, args.name)))
    if not revoked:
        raise CliError(f"no active client named {args.name!r}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from service import importer

    settings = _settings()
    path = Path(args.file)
    try:
        count = _run(
            lambda: _with_db(
                settings, lambda db: importer.import_csv(db, args.kind, path, settings)
            )
        )
    except importer.ImportFailed as exc:
        raise CliError(str(exc)) from None
    print(f"imported {count} {args.kind} rows from {path}", file=sys.stderr)
    if args.kind == "customers" and count:
        # An import is explicit data, often followed by its subscriptions file: it
        # does not read Stripe itself (SPEC §11's backfill on link is one command away).
        print(
            "their subscriptions were not read from Stripe: import subscriptions, or run "
            "`portal-gateway resync --all`",
            file=sys.stderr,
        )
    return 0


def cmd_resync(args: argparse.Namespace) -> int:
    from service import resync

    settings = _settings(serving=True)  # it calls Stripe: STRIPE_API_KEY is required

    def report(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        summary = _run(lambda: resync.run(settings, args.user, report))
    except resync.ResyncFailed as exc:
        raise CliError(str(exc)) from None
    if args.user is None:
        counts = f"{summary.resynced} resynced, {summary.skipped} skipped (no cus_ id)"
        if summary.failed:
            raise CliError(f"resync failed for {summary.failed} users ({counts})")
        print(f"resync: {counts}", file=sys.stderr)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from service import stripe_sync, sync_progress

    settings = _settings(serving=True)  # it calls Stripe: STRIPE_API_KEY is required
    # Log lines (the audit line of every change, SPEC §6) on stdout; progress on stderr.
    logs.configure(settings.log_level, settings.log_format)
    options = stripe_sync.Options(dry_run=args.dry_run, restart=args.restart)
    progress = sync_progress.progress_for(sys.stderr)
    try:
        tally = _run(lambda: stripe_sync.run(settings, options, progress))
    except stripe_sync.SyncStopped as exc:
        print(sync_progress.summary(exc.tally), file=sys.stderr)
        raise CliError(f"sync stopped: {exc}") from None
    for failure in tally.backfill_failures:
        print(f"backfill failed: {failure}", file=sys.stderr)
    print(sync_progress.summary(tally), file=sys.stderr)
    if tally.backfill_failures:
        raise CliError(
            f"{len(tally.backfill_failures)} backfills failed; the mappings are linked:"
            " `portal-gateway resync --user ID` retries one"
        )
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    """``profiles plan FILE`` (exit 2: changes), ``apply FILE [--prune]``, ``sync``."""
    from service import profiles, profiles_file

    def report(line: str) -> None:
        print(line)

    try:
        if args.profiles_command == "plan":
            plan = _run(lambda: profiles.run_plan(_settings(), Path(args.file)))
            for line in plan.lines():
                print(line)
            return 2 if plan.would_change(prune=args.prune) else 0
        settings = _settings(serving=True)  # it calls Stripe: STRIPE_API_KEY is required
        # The audit line (SPEC §6) and other logs on stderr; stdout is what was done.
        logs.configure(settings.log_level, settings.log_format, stream=sys.stderr)
        if args.profiles_command == "apply":
            applied = _run(lambda: profiles.run_apply(settings, Path(args.file), prune=args.prune))
            for line in applied.lines():
                print(line)
            return 0
        synced = _run(lambda: profiles.run_sync(settings, report))
    except profiles_file.ProfilesFileError as exc:
        raise CliError(str(exc)) from None
    except profiles.ProfilesFailed as exc:
        raise CliError(str(exc)) from None
    print(
        f"profiles sync: {synced.stored} snapshots stored, {synced.drifted} drifted,"
        f" {synced.failed} failed",
        file=sys.stderr,
    )
    if synced.failed:
        raise CliError(f"{synced.failed} configurations could not be retrieved")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    if args.audit_command == "export":
        return _audit_export(args)
    return _audit_prune(args)


def _audit_time(option: str, raw: str) -> datetime:
    from service import audit_retention

    try:
        return audit_retention.parse_time(raw)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _audit_export(args: argparse.Namespace) -> int:
    from service import audit_retention

    since = _audit_time("--since", args.since)
    until = None if args.until is None else _audit_time("--until", args.until)
    if until is not None and until <= since:
        raise UsageError("--until must be later than --since")
    settings = _settings()
    out = sys.stdout.buffer
    try:
        count = _run(
            lambda: _with_db(
                settings, lambda db: audit_retention.export(db, since, until, out.write)
            )
        )
        out.flush()
    except audit_retention.RetentionFailed as exc:
        raise CliError(str(exc)) from None
    except (audit_retention.OutputClosed, BrokenPipeError):
        # The reader went away (`| head`): nothing more to say to it, or at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise CliError("the export's output was closed before the end") from None
    print(f"audit export: {count} rows", file=sys.stderr)
    return 0


def _audit_prune(args: argparse.Namespace) -> int:
    from service import audit_retention

    if args.older_than < audit_retention.MIN_PRUNE_DAYS:
        raise UsageError(f"--older-than must be at least {audit_retention.MIN_PRUNE_DAYS}")
    settings = _settings()
    # As the schema owner (SPEC §6): only the owner may drop or create a partition.
    owner = settings.migrate_database_url or settings.database_url
    variable = "MIGRATE_DATABASE_URL" if settings.migrate_database_url else "DATABASE_URL"
    try:
        pruned = _run(
            lambda: _with_db(
                settings,
                lambda db: audit_retention.prune(db, args.older_than),
                url=owner.reveal(),
            )
        )
    except audit_retention.RetentionFailed as exc:
        raise CliError(str(exc)) from None
    except DatabaseUnavailable as exc:
        raise CliError(f"{variable}: {exc.detail}") from None
    except (asyncpg.InvalidCatalogNameError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise ConfigError(variable, str(exc)) from None
    for name in pruned.dropped:
        print(f"dropped {name}")
    for name in pruned.prepared.created:
        print(f"created {name}", file=sys.stderr)
    for name in pruned.prepared.left_in_default:
        print(
            f"warning: not created {name}: its month has rows in the default partition",
            file=sys.stderr,
        )
    if pruned.default_rows:
        print(
            f"warning: {pruned.default_rows} rows are in the default partition (newest"
            f" {pruned.default_newest}); it is dropped once they are all older than the cutoff",
            file=sys.stderr,
        )
    print(
        f"audit prune: {len(pruned.dropped)} partitions older than"
        f" {pruned.cutoff.isoformat()} dropped",
        file=sys.stderr,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from service import demo

    return demo.run(args)


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _role_name(raw: str) -> str:
    # DATABASE_RUNTIME_ROLE's own rule (config.py), for the flag that overrides it.
    try:
        role = Settings.from_env({"DATABASE_RUNTIME_ROLE": raw}, serving=False)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).partition("DATABASE_RUNTIME_ROLE: ")[2]) from None
    assert role.database_runtime_role is not None
    return role.database_runtime_role


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portal-gateway", description="Stripe customer-portal sessions for our users."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the HTTP service").set_defaults(func=cmd_serve)

    migrate = sub.add_parser(
        "migrate",
        help="create the database if missing and migrate it (as MIGRATE_DATABASE_URL's owner)",
    )
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument(
        "--grant-to",
        metavar="ROLE",
        type=_role_name,
        help="then grant ROLE only what serve needs (default DATABASE_RUNTIME_ROLE)",
    )
    migrate.set_defaults(func=cmd_migrate)

    clients = sub.add_parser("clients", help="manage service clients")
    csub = clients.add_subparsers(dest="clients_command", required=True)
    create = csub.add_parser("create", help="create a client; prints its token once")
    create.add_argument("name")
    create.add_argument(
        "--scope",
        action="append",
        help=f"repeatable, one of {', '.join(KNOWN_SCOPES)}; default {SCOPE_CREATE_SESSIONS}",
    )
    create.add_argument(
        "--rate-limit",
        type=_positive_int,
        default=DEFAULT_CLIENT_RATE_LIMIT,
        help="requests per minute (default 600)",
    )
    csub.add_parser("list", help="list clients")
    revoke = csub.add_parser("revoke", help="revoke a client's token")
    revoke.add_argument("name")
    clients.set_defaults(func=cmd_clients)

    imp = sub.add_parser("import", help="upsert mappings from a CSV file (all or nothing)")
    imp.add_argument("kind", choices=["customers", "subscriptions", "plans", "profiles", "offers"])
    imp.add_argument("file")
    imp.set_defaults(func=cmd_import)

    resync = sub.add_parser(
        "resync", help="rewrite subscription mappings from Stripe (after a webhook outage)"
    )
    who = resync.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="ID", help="one user")
    who.add_argument("--all", action="store_true", help="every user with a customer mapping")
    resync.set_defaults(func=cmd_resync)

    sync = sub.add_parser(
        "sync",
        help="link every Stripe customer whose metadata names a user, then backfill (resumable)",
    )
    sync.add_argument(
        "--from-stripe",
        action="store_true",
        required=True,
        help="page through GET /v1/customers (needs STRIPE_USER_METADATA_KEY)",
    )
    sync.add_argument("--dry-run", action="store_true", help="write nothing; say what it would do")
    sync.add_argument(
        "--restart", action="store_true", help="start over instead of resuming at the stored cursor"
    )
    sync.set_defaults(func=cmd_sync)

    profiles = sub.add_parser(
        "profiles", help="portal configurations as code: plan, apply, sync (SPEC §12)"
    )
    psub = profiles.add_subparsers(dest="profiles_command", required=True)
    plan = psub.add_parser(
        "plan", help="say what apply would change (no Stripe call); exit 0 nothing, 2 something"
    )
    plan.add_argument("file", help="the profiles file (YAML; see deploy/profiles.example.yaml)")
    plan.add_argument(
        "--prune", action="store_true", help="count prune candidates as changes (as apply --prune)"
    )
    apply = psub.add_parser("apply", help="make Stripe and the profile rows match the file")
    apply.add_argument("file", help="the profiles file (YAML)")
    apply.add_argument(
        "--prune",
        action="store_true",
        help="deactivate the configurations of managed profiles the file dropped; remove them",
    )
    psub.add_parser("sync", help="fetch each managed profile's configuration; store the snapshot")
    profiles.set_defaults(func=cmd_profiles)

    audit = sub.add_parser("audit", help="export audit rows; drop old audit partitions")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    export = asub.add_parser(
        "export", help="write rows of [--since, --until) to stdout as JSON lines (streamed)"
    )
    export.add_argument("--since", required=True, metavar="T", help="ISO-8601; no offset: UTC")
    export.add_argument("--until", metavar="T", help="ISO-8601, exclusive (default: now on)")
    prune = asub.add_parser(
        "prune", help="drop monthly partitions older than DAYS (as MIGRATE_DATABASE_URL's owner)"
    )
    prune.add_argument("--older-than", type=int, required=True, metavar="DAYS")
    audit.set_defaults(func=cmd_audit)

    demo = sub.add_parser("demo", help="migrate, seed demo data, run the stand-in and the service")
    demo.add_argument("--port", type=int, default=None, help="service port (default PORT or 8080)")
    demo.add_argument("--standin-port", type=int, default=12111)
    demo.set_defaults(func=cmd_demo)
    return parser


# How each failure ends the process: the one line it prints, and the exit code.
# The server refusing the database or role named in DATABASE_URL is a
# configuration error; its message names them, never the password.
_Failure: TypeAlias = tuple[
    type[Exception] | tuple[type[Exception], ...], Callable[[Any], str], int
]
_FAILURES: tuple[_Failure, ...] = (
    (ConfigError, str, 2),
    (StartupError, lambda exc: f"startup error: {exc}", 2),
    (DatabaseUnavailable, lambda exc: f"error: DATABASE_URL: {exc.detail}", 1),
    (
        (asyncpg.InvalidCatalogNameError, asyncpg.InvalidAuthorizationSpecificationError),
        lambda exc: f"configuration error: DATABASE_URL: {exc}",
        2,
    ),
    (CliError, lambda exc: f"error: {exc}", 1),
    (UsageError, lambda exc: f"usage error: {exc}", 2),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``portal-gateway`` and ``python -m service``."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        for kinds, line, code in _FAILURES:
            if isinstance(exc, kinds):
                print(line(exc), file=sys.stderr)
                return code
        raise
