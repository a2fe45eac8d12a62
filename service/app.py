"""The application factory: middlewares, resources, routes and the OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp_apigami
import aiohttp_cors
import asyncpg
import structlog
from aiohttp import web
from cryptography.exceptions import UnsupportedAlgorithm

from service import keys
from service.auth import Authenticator
from service.backfiller import Backfiller
from service.config import Settings
from service.db import deployment, events, resolve
from service.db import portal_links as links_table
from service.db.pool import Database
from service.drift_gauge import DriftGauge
from service.errors import DatabaseUnavailable
from service.handlers import health, openapi, portal_links, portal_sessions, users, webhooks
from service.jwt_keys import JwtKeys
from service.lifecycle import Budget, Lifecycle
from service.mapping_api import MappingApiDeps
from service.metrics import Metrics
from service.middlewares import (
    access_middleware,
    error_middleware,
    request_id_middleware,
    shed_middleware,
)
from service.migrations import head_revision
from service.portal import PortalDeps
from service.ratelimit import SharedRateLimiter
from service.readiness import Readiness
from service.shared_redis import SharedRedis
from service.stripe import StripeClient
from service.upstream_budget import UpstreamBudget
from service.version import VERSION

# Webhook payloads can be larger than API bodies; API routes enforce 16 KiB themselves.
CLIENT_MAX_SIZE = 1024 * 1024


class StartupError(Exception):
    """The service cannot start with this configuration and database."""


def create_app(settings: Settings, *, metrics: Metrics | None = None) -> web.Application:
    """Build the application. No I/O here: resources open in cleanup contexts."""
    app = web.Application(
        client_max_size=CLIENT_MAX_SIZE,
        middlewares=[
            request_id_middleware,
            access_middleware,
            error_middleware,
            shed_middleware,
        ],
    )
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = metrics or Metrics()
    lifecycle = Lifecycle(
        api=Budget(settings.max_in_flight), webhooks=Budget(settings.webhook_max_in_flight)
    )
    app[keys.LIFECYCLE] = lifecycle
    app[keys.READINESS] = Readiness(lifecycle, app[keys.METRICS])
    app[keys.PROFILE_DRIFT] = DriftGauge(app[keys.METRICS])
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_shared_limits)
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_backfills)
    app.cleanup_ctx.append(_housekeeping)
    app.on_shutdown.append(_start_draining)

    # Each route's in-flight budget is declared with it; undeclared ones share `api`.
    probes = [
        app.router.add_get("/healthz", health.healthz, allow_head=False),
        app.router.add_get("/readyz", health.readyz, allow_head=False),
    ]
    if settings.metrics_port is None:  # else only METRICS_PORT serves it (health.metrics_app)
        probes.append(app.router.add_get("/metrics", health.metrics, allow_head=False))
    lifecycle.declare(None, *probes)
    sessions = app.router.add_post("/v1/portal-sessions", portal_sessions.create_portal_session)
    links = app.router.add_post("/v1/portal-links", portal_links.create_portal_link)
    _setup_cors(app, settings.cors_allowed_origins, [sessions, links])
    # What a person's browser opens (SPEC §13): the token is the credential; no CORS.
    app.router.add_get("/v1/portal-links/{token}", portal_links.show_portal_link, allow_head=False)
    app.router.add_post("/v1/portal-links/{token}", portal_links.open_portal_link)
    # The mapping API (SPEC §11): service-to-service, so no CORS; the `api` budget.
    app.router.add_get("/v1/users/{user_id}", users.get_user, allow_head=False)
    app.router.add_put("/v1/users/{user_id}/customer", users.put_user_customer)
    app.router.add_delete("/v1/users/{user_id}/customer", users.delete_user_customer)
    # Stripe calls this one: signature-verified, no bearer auth, no CORS. Anyone can
    # reach it, so it has a budget of its own: it can't take our callers' slots.
    stripe_events = app.router.add_post("/v1/stripe/webhooks", webhooks.receive_stripe_event)
    lifecycle.declare(lifecycle.webhooks, stripe_events)
    _setup_openapi(app)
    return app


def _setup_cors(
    app: web.Application, origins: tuple[str, ...], routes: list[web.AbstractRoute]
) -> None:
    """Browser access for CORS_ALLOWED_ORIGINS only; nothing at all when it is empty."""
    if not origins:
        return
    # Bearer tokens, not cookies: credentials mode stays off.
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
        allow_credentials=False,
        allow_headers=("Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"),
        expose_headers=("X-Request-ID", "Retry-After"),
        allow_methods=("POST",),
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
    for route in routes:
        cors.add(route)


def _setup_openapi(app: web.Application) -> None:
    apispec = aiohttp_apigami.setup_aiohttp_apispec(
        app,
        title="portal-gateway",
        version=VERSION,
        url="/api/docs/swagger.json",
        swagger_path="/api/docs",
        openapi_version="3.0.3",
        info={"description": "Opens Stripe customer-portal sessions for our users."},
    )
    apispec.spec.components.security_scheme(
        "bearerAuth",
        {
            "type": "http",
            "scheme": "bearer",
            "description": "A service-client token (pgw_…) or an end user's JWT.",
        },
    )
    openapi.register_components(apispec.spec)


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    db = await Database.connect(
        settings.database_url.reveal(),
        metrics=app[keys.METRICS],
        query_timeout=settings.db_timeout_seconds,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
    )
    try:
        app[keys.LIFECYCLE].migrations_head = head_revision()
        revision = await deployment.current_revision(db)
        if revision is None:
            raise StartupError("the database is not migrated: run `portal-gateway migrate`")
        db_livemode = await deployment.record_mode(db, settings.livemode)
        if db_livemode != settings.livemode:
            mode = "live" if db_livemode else "test"
            raise StartupError(
                f"STRIPE_API_KEY: the database maps {mode}-mode Stripe ids; "
                f"refusing to start with a {'live' if settings.livemode else 'test'}-mode key"
            )
        app[keys.DB] = db
        yield
    finally:
        await db.close()


async def _shared_limits(app: web.Application) -> AsyncIterator[None]:
    """Rate limits and the Stripe budget, shared through Redis when REDIS_URL is set.

    Redis is optional (SPEC §14): one that does not answer at start is logged and
    the gauge reads 0, and the service starts anyway, deciding alone until it
    answers; readiness never depends on it.
    """
    settings, metrics = app[keys.SETTINGS], app[keys.METRICS]
    redis = SharedRedis.from_settings(settings, metrics)
    try:
        await redis.probe()
        app[keys.SHARED_REDIS] = redis
        app[keys.RATE_LIMITER] = SharedRateLimiter(redis, metrics)
        app[keys.UPSTREAM_BUDGET] = UpstreamBudget.from_settings(settings, redis, metrics)
        yield
    finally:
        await redis.close()


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    session = StripeClient.new_session(settings)
    try:
        try:
            jwt_keys = JwtKeys(settings, session) if settings.jwt_enabled else None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise StartupError(f"JWT_PUBLIC_KEY_FILE: not a usable public key ({exc})") from None
        budget = app[keys.UPSTREAM_BUDGET]
        stripe = StripeClient(
            session, settings, app[keys.METRICS], pace=budget.wait if budget else None
        )
        app[keys.STRIPE] = stripe
        app[keys.AUTHENTICATOR] = Authenticator(settings, app[keys.DB], jwt_keys)
        app[keys.PORTAL] = PortalDeps(settings, app[keys.DB], stripe, app[keys.METRICS])
        app[keys.MAPPING_API] = MappingApiDeps(settings, app[keys.DB], stripe, app[keys.METRICS])
        yield
    finally:
        await session.close()


# Backfills still running at shutdown get this long (within SHUTDOWN_TIMEOUT), then
# are cancelled: each is a rewrite in one transaction, so a cancelled one changes
# nothing, and the next event for the user, sync or resync does it again.
BACKFILL_GRACE_SECONDS = 5.0


async def _backfills(app: web.Application) -> AsyncIterator[None]:
    """The background backfiller; drained before the Stripe session and the pool close."""
    # Backfills yield to portal sessions in the upstream budget.
    backfiller = Backfiller(app[keys.DB], app[keys.STRIPE].for_background(), app[keys.METRICS])
    app[keys.BACKFILLER] = backfiller
    try:
        yield
    finally:
        await backfiller.close(min(BACKFILL_GRACE_SECONDS, app[keys.SETTINGS].shutdown_timeout))


IDEMPOTENCY_PURGE_INTERVAL = 600.0


async def _housekeeping(app: web.Application) -> AsyncIterator[None]:
    """Keep tables small: purge expired idempotency keys, old Stripe events and links.

    Idempotency keys go an hour past their TTL; Stripe events 30 days after
    their receipt (SPEC §6); portal links a day past their expiry. Each purge
    is bounded per round.
    """
    db = app[keys.DB]
    purges = {
        "idempotency_keys": resolve.purge_expired_idempotency_keys,
        "stripe_events": events.purge_old_events,
        "portal_links": links_table.purge_old_links,
    }

    async def purge_forever() -> None:
        while True:
            for table, purge in purges.items():
                try:
                    await purge(db)
                except DatabaseUnavailable:
                    pass  # the next round tries again; readiness reports the outage
                except asyncpg.PostgresError as exc:
                    # e.g. a runtime role without DELETE: say so; the other purges go on.
                    structlog.get_logger("app").warning(
                        "housekeeping_failed", table=table, error=type(exc).__name__
                    )
            await asyncio.sleep(IDEMPOTENCY_PURGE_INTERVAL)

    task = asyncio.create_task(purge_forever(), name="housekeeping")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _start_draining(app: web.Application) -> None:
    # Readiness turns 503 at once so the load balancer stops sending; requests
    # in flight get SHUTDOWN_TIMEOUT to finish before cleanup closes the pool.
    app[keys.LIFECYCLE].draining = True
