"""Every typed key for application and request state, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from service.auth import Authenticator, Principal
    from service.backfiller import Backfiller
    from service.config import Settings
    from service.db.pool import Database
    from service.drift_gauge import DriftGauge
    from service.lifecycle import Lifecycle
    from service.mapping_api import MappingApiDeps
    from service.metrics import Metrics
    from service.portal import PortalDeps
    from service.ratelimit import SharedRateLimiter
    from service.readiness import Readiness
    from service.shared_redis import SharedRedis
    from service.stripe import StripeClient
    from service.upstream_budget import UpstreamBudget

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
DB: web.AppKey[Database] = web.AppKey("db")
STRIPE: web.AppKey[StripeClient] = web.AppKey("stripe")
AUTHENTICATOR: web.AppKey[Authenticator] = web.AppKey("authenticator")
RATE_LIMITER: web.AppKey[SharedRateLimiter] = web.AppKey("rate_limiter")
# The optional Redis of SPEC §14, and the Stripe budget shared through it (None: off).
SHARED_REDIS: web.AppKey[SharedRedis] = web.AppKey("shared_redis")
UPSTREAM_BUDGET: web.AppKey[UpstreamBudget | None] = web.AppKey("upstream_budget")
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
# portal_gateway_profile_drift, rebuilt from the database at scrape time (SPEC §12).
PROFILE_DRIFT: web.AppKey[DriftGauge] = web.AppKey("profile_drift")
PORTAL: web.AppKey[PortalDeps] = web.AppKey("portal")
MAPPING_API: web.AppKey[MappingApiDeps] = web.AppKey("mapping_api")
# Background backfills scheduled by webhooks (SPEC §11 backfill on link).
BACKFILLER: web.AppKey[Backfiller] = web.AppKey("backfiller")

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
CLIENT_IP: web.RequestKey[str | None] = web.RequestKey("client_ip")
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")
# Canonical-log fields a handler learns (flow, user, upstream request id, attempts).
LOG_FIELDS: web.RequestKey[dict[str, Any]] = web.RequestKey("log_fields")
