"""Prometheus metrics: the catalogue of SPEC §7, one registry per application.

A registry per app (not the global default) keeps tests that build many apps
in one process from colliding, and lets ``/metrics`` show exactly this app.

Label values are bounded: routes are templates, methods outside the standard
set are ``other``, codes and reasons come from fixed lists. The label values
alerts watch (``upstream_auth_failed``, ``write_failed``, ...) are created at 0
when the app starts, so the first occurrence is an increase Prometheus sees
(a series that appears at 1 has no ``increase()``).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client import (
    gc_collector as _gc,
)
from prometheus_client import (
    platform_collector as _platform,
)
from prometheus_client import (
    process_collector as _process,
)

from service.domain import MAPPING_SOURCES
from service.errors import CODES_BY_STATUS
from service.version import VERSION

# Request latency is dominated by Stripe (100 ms - 2 s); keep resolution there.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
UPSTREAM_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
# Index lookups are sub-millisecond.
DB_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5)
# Callers per grouped statement (service/db/grouping.py): 1 when idle, up to 256.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Waits for the Stripe budget: none at all, up to a second's queue, up to a deadline.
BUDGET_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
# portal_gateway_upstream_budget_waits_total{outcome}: a slot at once, after a
# wait, or none within the call's deadline (503 upstream_unavailable).
BUDGET_OUTCOMES = ("immediate", "waited", "refused")
# Where a limit was decided: in Redis for the fleet, or by this replica alone.
LIMIT_BACKENDS = ("redis", "local")
REDIS_ERROR_REASONS = ("timeout", "connection", "error")

# A client can send any token as a method; only these become label values.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Every `code` of SPEC §2 (plus internal_error): pre-created at 0 so rates and
# increases see the first one.
PORTAL_LINK_EVENTS = (
    "created",
    "viewed",
    "opened",
    "used",
    "expired",
    "revoked",
    "unknown",
    "failed",
    "rate_limited",
)
SESSION_ERROR_CODES = tuple(code for codes in CODES_BY_STATUS.values() for code in codes)
AUDIT_OUTCOMES = ("created", "refused", "failed", "abandoned", "unauthenticated", "write_failed")
# Where a customer mapping comes from (SPEC §11; the `customers.source` column),
# and what a source's fact did to it.
MAPPING_CHANGES = ("linked", "relinked", "unlinked", "unchanged")


def method_label(method: str) -> str:
    """The request method as a bounded label value."""
    return method if method in HTTP_METHODS else "other"


class _Children(dict[Any, Any]):
    """A labelled metric's children by their label values, looked up in a plain dict.

    ``labels()`` takes a lock, checks its arguments and builds a key on every
    call: on the request path, a measurable share of the CPU. The key is the
    label value (a tuple of them for several labels). This holds exactly the
    children the metric itself keeps (prometheus drops one only on
    ``remove()``/``clear()``, never called for these metrics): no series of its
    own, and no bound needed beyond the labels' own.
    """

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self._labels = metric.labels

    def __missing__(self, key: Any) -> Any:
        child = self._labels(*key) if isinstance(key, tuple) else self._labels(key)
        self[key] = child
        return child


class Metrics:
    """Every metric the service exports, registered in its own registry.

    What the request path counts goes through the methods below (cached label
    children); elsewhere ``metric.labels(...)`` is fine.
    """

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        # (method, route, status) -> label children; bounded like the labels themselves.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        _process.ProcessCollector(registry=r)
        _platform.PlatformCollector(registry=r)
        _gc.GCCollector(registry=r)
        p = "portal_gateway_"
        self.http_requests = Counter(
            p + "http_requests_total",
            "HTTP requests answered.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            p + "http_request_duration_seconds",
            "Time to answer an HTTP request.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.http_in_flight = Gauge(
            p + "http_requests_in_flight", "HTTP requests being handled.", registry=r
        )
        self.sessions_created = Counter(
            p + "sessions_created_total",
            "Portal sessions handed out.",
            ["flow", "principal_type"],
            registry=r,
        )
        self.session_errors = Counter(
            p + "session_errors_total",
            "Portal-session requests refused or failed, by code.",
            ["code"],
            registry=r,
        )
        self.upstream_requests = Counter(
            p + "upstream_requests_total",
            "Attempts against Stripe, by outcome and status.",
            ["outcome", "status"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            p + "upstream_request_duration_seconds",
            "Duration of one attempt against Stripe.",
            ["outcome"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.upstream_retries = Counter(
            p + "upstream_retries_total",
            "Retries against Stripe, by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_circuit_open = Gauge(
            p + "upstream_circuit_open",
            "1 while the Stripe circuit breaker is open.",
            registry=r,
        )
        self.db_duration = Histogram(
            p + "db_query_duration_seconds",
            "Duration of a named database query.",
            ["query"],
            buckets=DB_BUCKETS,
            registry=r,
        )
        self.db_batch_rows = Histogram(
            p + "db_batch_rows",
            "Callers answered by one grouped statement (audit rows per commit, RESOLVE lookups).",
            ["query"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.db_pool = Gauge(
            p + "db_pool_connections",
            "Database pool connections by state.",
            ["state"],
            registry=r,
        )
        self.auth_failures = Counter(
            p + "auth_failures_total",
            "Requests refused authentication, by reason.",
            ["reason"],
            registry=r,
        )
        self.audit_events = Counter(
            p + "audit_events_total", "Audit events, by outcome.", ["outcome"], registry=r
        )
        self.webhook_events = Counter(
            p + "webhook_events_total",
            "Stripe webhook events, by type and result.",
            ["type", "result"],
            registry=r,
        )
        self.stale_mappings = Counter(
            p + "stale_mappings_total",
            "Mappings Stripe no longer knows, by kind.",
            ["kind"],
            registry=r,
        )
        self.mapping_conflicts = Counter(
            p + "mapping_conflicts_total",
            "Facts that would re-point or remove a mapping its precedence protects, by source.",
            ["source"],
            registry=r,
        )
        self.mapping_changes = Counter(
            p + "mapping_changes_total",
            "Customer mappings linked, re-linked, unlinked or confirmed, by source.",
            ["source", "change"],
            registry=r,
        )
        self.portal_links = Counter(
            p + "portal_links_total",
            "Portal links (SPEC §13), by event: created, viewed (the page), opened (a "
            "portal URL handed out), used, expired, revoked, unknown, failed, rate_limited.",
            ["event"],
            registry=r,
        )
        self.build_info = Gauge(
            p + "build_info", "Build information; always 1.", ["version"], registry=r
        )
        # Set at scrape time from the database (service/drift_gauge.py): every replica agrees.
        self.profile_drift = Gauge(
            p + "profile_drift",
            "1 while a managed portal profile's configuration differs at Stripe from what "
            "the profiles file applied, else 0 (profiles with an applied body and a snapshot).",
            ["profile"],
            registry=r,
        )
        self.ready = Gauge(
            p + "ready",
            "1 while this instance is ready (what /readyz answers); updated at every scrape.",
            registry=r,
        )
        # SPEC §14: limits shared through Redis, and the upstream budget.
        self.redis_up = Gauge(
            p + "redis_up",
            "1 while this replica shares its limits through Redis (REDIS_URL answers), "
            "0 while it decides alone (Redis failing, or REDIS_URL unset).",
            registry=r,
        )
        self.redis_errors = Counter(
            p + "redis_errors_total",
            "Redis calls that failed or timed out (each decided alone instead), by reason.",
            ["reason"],
            registry=r,
        )
        self.rate_limit_decisions = Counter(
            p + "rate_limit_decisions_total",
            "Rate-limit decisions, by where they were made (redis, local) and result.",
            ["backend", "result"],
            registry=r,
        )
        self.budget_waits = Counter(
            p + "upstream_budget_waits_total",
            "Stripe calls admitted by the upstream budget, by outcome "
            "(immediate, waited, refused).",
            ["outcome"],
            registry=r,
        )
        self.budget_wait = Histogram(
            p + "upstream_budget_wait_seconds",
            "Time a Stripe call waited for the upstream budget (admitted calls).",
            ["backend"],
            buckets=BUDGET_WAIT_BUCKETS,
            registry=r,
        )
        self._sessions_created = _Children(self.sessions_created)
        self._session_errors = _Children(self.session_errors)
        self._audit_events = _Children(self.audit_events)
        self._upstream_requests = _Children(self.upstream_requests)
        self._upstream_duration = _Children(self.upstream_duration)
        self._db_duration = _Children(self.db_duration)
        self._portal_links = _Children(self.portal_links)
        self.build_info.labels(version=VERSION).set(1)
        for reason in REDIS_ERROR_REASONS:
            self.redis_errors.labels(reason=reason)
        for backend in LIMIT_BACKENDS:
            for result in ("allowed", "refused"):
                self.rate_limit_decisions.labels(backend=backend, result=result)
        for outcome in BUDGET_OUTCOMES:
            self.budget_waits.labels(outcome=outcome)
        self.upstream_circuit_open.set(0)
        for code in SESSION_ERROR_CODES:
            self.session_errors.labels(code=code)
        for outcome in AUDIT_OUTCOMES:
            self.audit_events.labels(outcome=outcome)
        for event in PORTAL_LINK_EVENTS:
            self.portal_links.labels(event=event)
        for kind in ("customer", "subscription"):
            self.stale_mappings.labels(kind=kind)
        for source in MAPPING_SOURCES:
            self.mapping_conflicts.labels(source=source)
            for change in MAPPING_CHANGES:
                self.mapping_changes.labels(source=source, change=change)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count and time one answered HTTP request.

        The label children are cached: ``labels()`` takes a lock and builds a
        key on every call, a measurable share of a request's CPU.
        """
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.http_requests.labels(method, route, str(status)),
                self.http_duration.labels(method, route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def session_created(self, flow: str, principal_type: str) -> None:
        """Count one portal session handed out."""
        self._sessions_created[flow, principal_type].inc()

    def session_error(self, code: str) -> None:
        """Count one request refused or failed with this code."""
        self._session_errors[code].inc()

    def audit_event(self, outcome: str) -> None:
        """Count one audit event by outcome."""
        self._audit_events[outcome].inc()

    def upstream_attempt(self, outcome: str, status: int | None, seconds: float) -> None:
        """Count and time one attempt against Stripe (status None: no answer)."""
        # prometheus makes the label value str(); "none" when nothing answered.
        self._upstream_requests[outcome, status or "none"].inc()
        self._upstream_duration[outcome].observe(seconds)

    def portal_link(self, event: str) -> None:
        """Count one portal-link event (one of PORTAL_LINK_EVENTS)."""
        self._portal_links[event].inc()

    def db_query(self, name: str, seconds: float) -> None:
        """Time one named database query."""
        self._db_duration[name].observe(seconds)
