"""The metric catalogue of SPEC §7: names, types, labels, buckets, and where each is updated.

Dashboards and alerts are written against these names, so they are asserted
exactly as the table spells them, from the text ``/metrics`` serves.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service import keys
from service.readiness import MAX_AGE_SECONDS
from tests.conftest import Standin, create_client_token
from tests.helpers import PATH, created, post_session, problem

# SPEC §7, verbatim: name → (type, label names).
CATALOGUE: dict[str, tuple[str, frozenset[str]]] = {
    "portal_gateway_http_requests_total": ("counter", frozenset({"method", "route", "status"})),
    "portal_gateway_http_request_duration_seconds": ("histogram", frozenset({"method", "route"})),
    "portal_gateway_http_requests_in_flight": ("gauge", frozenset()),
    "portal_gateway_sessions_created_total": ("counter", frozenset({"flow", "principal_type"})),
    "portal_gateway_session_errors_total": ("counter", frozenset({"code"})),
    "portal_gateway_upstream_requests_total": ("counter", frozenset({"outcome", "status"})),
    "portal_gateway_upstream_request_duration_seconds": ("histogram", frozenset({"outcome"})),
    "portal_gateway_upstream_retries_total": ("counter", frozenset({"reason"})),
    "portal_gateway_upstream_circuit_open": ("gauge", frozenset()),
    "portal_gateway_db_query_duration_seconds": ("histogram", frozenset({"query"})),
    "portal_gateway_db_pool_connections": ("gauge", frozenset({"state"})),
    "portal_gateway_auth_failures_total": ("counter", frozenset({"reason"})),
    "portal_gateway_audit_events_total": ("counter", frozenset({"outcome"})),
    "portal_gateway_webhook_events_total": ("counter", frozenset({"type", "result"})),
    "portal_gateway_stale_mappings_total": ("counter", frozenset({"kind"})),
    "portal_gateway_build_info": ("gauge", frozenset({"version"})),
    "portal_gateway_mapping_conflicts_total": ("counter", frozenset({"source"})),
    "portal_gateway_mapping_changes_total": ("counter", frozenset({"source", "change"})),
    "portal_gateway_profile_drift": ("gauge", frozenset({"profile"})),
    "portal_gateway_redis_up": ("gauge", frozenset()),
    "portal_gateway_upstream_budget_waits_total": ("counter", frozenset({"outcome"})),
    # Not in the table; added for the readiness alert (README, runbook).
    "portal_gateway_ready": ("gauge", frozenset()),
    # Not in the table either: the dashboard's fleet-limits row (SPEC §14).
    "portal_gateway_redis_errors_total": ("counter", frozenset({"reason"})),
    "portal_gateway_rate_limit_decisions_total": ("counter", frozenset({"backend", "result"})),
    "portal_gateway_upstream_budget_wait_seconds": ("histogram", frozenset({"backend"})),
    # Not in the table; rows per group-committed audit insert (docs/observability.md).
    "portal_gateway_db_batch_rows": ("histogram", frozenset({"query"})),
}

# Suffix → the label a histogram's sample adds to its own.
_SAMPLE_EXTRA_LABELS = {"_bucket": {"le"}}


class Scrape:
    """One /metrics exposition, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def family(self, name: str) -> Any:
        # The parser names a counter's family without its `_total`.
        return self.families.get(name) or self.families[name.removesuffix("_total")]

    def value(self, name: str, **labels: str) -> float:
        """The value of one sample; 0 when the series does not exist (yet)."""
        for s in self.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
        return 0.0

    def series(self) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {(s.name, tuple(sorted(s.labels.items()))) for s in self.samples}


async def scrape(client: Any) -> Scrape:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    return Scrape(await resp.text())


def _help_and_type(text: str, name: str, kind: str) -> None:
    # prometheus-client writes a counter's family with or without `_total` by version.
    names = {name, name.removesuffix("_total")}
    lines = text.splitlines()
    helps = [line for line in lines if any(line.startswith(f"# HELP {n} ") for n in names)]
    assert len(helps) == 1, f"no HELP for {name}"
    assert len(helps[0].split(" ", 3)[3]) > 5, f"empty HELP for {name}"
    assert any(f"# TYPE {n} {kind}" in lines for n in names), f"no TYPE {kind} for {name}"


async def test_fresh_service_exposes_the_whole_catalogue(service: Any) -> None:
    """Every metric has HELP and TYPE from the first scrape, with the table's labels."""
    m = service.server.app[keys.METRICS]
    page = await scrape(service)
    for name, (kind, labels) in CATALOGUE.items():
        _help_and_type(page.text, name, kind)
        family = page.family(name)
        assert family.type == kind, name
        for sample in family.samples:
            extra = next(
                (v for k, v in _SAMPLE_EXTRA_LABELS.items() if sample.name.endswith(k)), set()
            )
            assert set(sample.labels) == labels | extra, (name, sample)
    # Label names of the metrics that have no sample yet, from the collectors themselves.
    declared = {
        c._name: frozenset(c._labelnames)  # type: ignore[attr-defined]
        for c in vars(m).values()
        if hasattr(c, "_labelnames")
    }
    for name, (_kind, labels) in CATALOGUE.items():
        assert declared[name.removesuffix("_total")] == labels, name


async def test_alerted_series_start_at_zero(service: Any) -> None:
    """A series that first appears at 1 has no increase(): alerted ones exist from the start."""
    page = await scrape(service)
    zero = page.text.splitlines()
    for line in (
        'portal_gateway_session_errors_total{code="upstream_auth_failed"} 0.0',
        'portal_gateway_session_errors_total{code="upstream_unavailable"} 0.0',
        'portal_gateway_session_errors_total{code="overloaded"} 0.0',
        'portal_gateway_session_errors_total{code="rate_limited"} 0.0',
        'portal_gateway_audit_events_total{outcome="write_failed"} 0.0',
        "portal_gateway_upstream_circuit_open 0.0",
        'portal_gateway_upstream_budget_waits_total{outcome="refused"} 0.0',
        'portal_gateway_redis_errors_total{reason="timeout"} 0.0',
        "portal_gateway_redis_up 0.0",  # no REDIS_URL here: each replica decides alone
        "portal_gateway_http_requests_in_flight 1.0",  # the scrape itself
    ):
        assert line in zero, line
    assert page.value("portal_gateway_ready") == 1.0
    assert page.value("portal_gateway_build_info", version=_version()) == 1.0


async def test_mapping_series_exist_for_every_source_and_change(service: Any) -> None:
    """Each source's conflicts and changes are 0 from the start, so a first one is an increase."""
    page = await scrape(service)
    sources = ("import", "api", "stripe_metadata")
    for source in sources:
        assert ("portal_gateway_mapping_conflicts_total", (("source", source),)) in page.series()
        for change in ("linked", "relinked", "unlinked", "unchanged"):
            labels = {"source": source, "change": change}
            series = ("portal_gateway_mapping_changes_total", tuple(sorted(labels.items())))
            assert series in page.series(), labels
            assert page.value("portal_gateway_mapping_changes_total", **labels) == 0


def _version() -> str:
    from service.version import VERSION

    return VERSION


async def test_process_and_gc_metrics(service: Any) -> None:
    page = await scrape(service)
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_gc_objects_collected_total",
        "python_gc_collections_total",
        "python_info",
    ):
        assert any(s.name == name for s in page.samples), name


def _bounds(page: Scrape, bucket: str, **labels: str) -> list[float]:
    return sorted(
        float(s.labels["le"])
        for s in page.samples
        if s.name == bucket
        and s.labels["le"] != "+Inf"
        and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.usefixtures("world")
async def test_buckets_suit_the_service(service: Any, token: str) -> None:
    """Sub-millisecond resolution for DB lookups; fine steps from 100 ms to 2 s upstream."""
    await created(await post_session(service, {"user_id": "u_42"}, token))
    page = await scrape(service)
    db = _bounds(page, "portal_gateway_db_query_duration_seconds_bucket", query="resolve")
    assert len([b for b in db if b < 0.001]) >= 2, db
    assert max(db) >= 1  # and the 2 s query timeout is still visible
    upstream = _bounds(
        page, "portal_gateway_upstream_request_duration_seconds_bucket", outcome="success"
    )
    assert len([b for b in upstream if 0.1 <= b <= 2]) >= 6, upstream
    assert max(upstream) >= 5  # the per-attempt timeout
    http = _bounds(
        page, "portal_gateway_http_request_duration_seconds_bucket", route="/v1/portal-sessions"
    )
    assert min(http) <= 0.01, http
    assert max(http) >= 10, http  # up to the request deadline


async def _many(coros: Iterable[Any], batch: int = 50) -> list[Any]:
    pending = list(coros)
    out: list[Any] = []
    for i in range(0, len(pending), batch):
        out += await asyncio.gather(*pending[i : i + batch])
    return out


async def _hit(service: Any, method: str, path: str) -> int:
    async with service.session.request(method, service.make_url(path)) as resp:
        await resp.read()
        return int(resp.status)


async def test_labels_stay_bounded_under_junk_paths_and_methods(service: Any) -> None:
    """1,000 distinct unknown paths and odd methods add no series: routes are templates."""
    # WebDAV and cache methods reach the app; made-up ones (BREW) are refused by
    # aiohttp's parser with a 400 before any middleware, so they count nowhere.
    odd_methods = [
        "PURGE",
        "PROPFIND",
        "MKCOL",
        "LOCK",
        "BREW",
        "X-" + uuid.uuid4().hex[:8].upper(),
    ]

    async def junk(n: int, tag: str) -> None:
        calls = [_hit(service, "GET", f"/{tag}/{uuid.uuid4().hex}/{i}?u=u_{i}") for i in range(n)]
        calls += [_hit(service, m, f"/{tag}/{uuid.uuid4().hex}") for m in odd_methods]
        calls += [_hit(service, m, PATH) for m in odd_methods]
        calls += [_hit(service, "DELETE", PATH), _hit(service, "GET", "/readyz")]
        statuses = await _many(calls)
        assert set(statuses) <= {200, 400, 404, 405}, set(statuses)

    # Warm up: every kind of junk once, so each bounded series exists already.
    await junk(2, "warm")
    await scrape(service)
    before = await scrape(service)
    await junk(1000, "junk")
    after = await scrape(service)

    assert after.series() == before.series(), after.series() ^ before.series()
    assert "/junk/" not in after.text
    assert "u_1" not in after.text
    assert not any(m in after.text for m in odd_methods)
    routes = {s.labels["route"] for s in after.samples if "route" in s.labels}
    assert routes <= {"unmatched", "/v1/portal-sessions", "/readyz", "/metrics"}, routes
    methods = {s.labels["method"] for s in after.samples if "method" in s.labels}
    assert methods == {"GET", "DELETE", "other"}, methods
    unmatched = after.value(
        "portal_gateway_http_requests_total", method="GET", route="unmatched", status="404"
    )
    assert unmatched >= 1002


async def test_pool_gauge_is_current_at_scrape_time(make_service: Any) -> None:
    service = await make_service(DB_POOL_MIN_SIZE="1", DB_POOL_MAX_SIZE="7")
    db = service.server.app[keys.DB]
    page = await scrape(service)
    assert page.value("portal_gateway_db_pool_connections", state="max") == 7
    async with db.pool.acquire(), db.pool.acquire():
        busy = await scrape(service)
        assert busy.value("portal_gateway_db_pool_connections", state="in_use") >= 2
    # A scrape runs queries of its own (readiness, profile drift), and the pool
    # takes a connection back in the background (db/pool.py _give_back): poll a
    # bounded number of scrapes rather than expect the very first to show it.
    for _ in range(50):
        idle = await scrape(service)
        if idle.value("portal_gateway_db_pool_connections", state="in_use") == 0:
            break
        await asyncio.sleep(0.02)
    assert idle.value("portal_gateway_db_pool_connections", state="in_use") == 0
    assert idle.value("portal_gateway_db_pool_connections", state="idle") >= 2


async def test_ready_gauge_follows_readiness(service: Any, conn: Any) -> None:
    assert (await scrape(service)).value("portal_gateway_ready") == 1
    await conn.execute("UPDATE alembic_version SET version_num = 'older'")
    # Kept current at every scrape, whether or not anything probes /readyz, from a
    # check at most 1 s old: move the readiness clock past that.
    service.app[keys.READINESS].clock = lambda: time.monotonic() + MAX_AGE_SECONDS
    assert (await scrape(service)).value("portal_gateway_ready") == 0
    assert (await service.get("/readyz")).status == 503


@pytest.mark.usefixtures("world")
async def test_sessions_errors_auth_and_audit_counted(
    service: Any, token: str, conn: Any, standin: Standin
) -> None:
    await created(await post_session(service, {"user_id": "u_42"}, token))
    await created(
        await post_session(
            service, {"user_id": "u_42", "flow": {"type": "payment_method_update"}}, token
        )
    )
    await problem(await post_session(service, {"user_id": "u_42"}, None), 401, "unauthenticated")
    await problem(await post_session(service, {"user_id": "u_42"}, ""), 401, "unauthenticated")
    await problem(
        await post_session(service, {"user_id": "u_42"}, "pgw_" + "x" * 43), 401, "unauthenticated"
    )
    await problem(await post_session(service, {"user_id": "nobody"}, token), 404, "unknown_user")
    await problem(
        await post_session(service, {"user_id": "u_42", "locale": "xx"}, token),
        422,
        "validation_failed",
    )
    standin.state.queue_faults([{"status": 401}])
    await problem(
        await post_session(service, {"user_id": "u_42"}, token), 502, "upstream_auth_failed"
    )
    tiny = await create_client_token(conn, name="tiny", rate_limit=1)
    await created(await post_session(service, {"user_id": "u_42"}, tiny))
    await problem(await post_session(service, {"user_id": "u_42"}, tiny), 429, "rate_limited")

    page = await scrape(service)
    v = page.value
    assert v("portal_gateway_sessions_created_total", flow="home", principal_type="client") == 2
    assert (
        v(
            "portal_gateway_sessions_created_total",
            flow="payment_method_update",
            principal_type="client",
        )
        == 1
    )
    errors = "portal_gateway_session_errors_total"
    assert v(errors, code="unauthenticated") == 3
    assert v(errors, code="unknown_user") == 1
    assert v(errors, code="validation_failed") == 1
    assert v(errors, code="upstream_auth_failed") == 1
    assert v(errors, code="rate_limited") == 1
    assert v("portal_gateway_auth_failures_total", reason="missing") == 1
    assert v("portal_gateway_auth_failures_total", reason="malformed") == 1
    assert v("portal_gateway_auth_failures_total", reason="unknown_token") == 1
    audit = "portal_gateway_audit_events_total"
    assert v(audit, outcome="created") == 3
    assert v(audit, outcome="refused") == 3  # 404, 422, 429
    assert v(audit, outcome="failed") == 1  # Stripe refused our key
    assert v(audit, outcome="unauthenticated") == 3
    assert v(audit, outcome="write_failed") == 0
    status = {
        s.labels["status"]: s.value
        for s in page.samples
        if s.name == "portal_gateway_http_requests_total"
        and s.labels["route"] == "/v1/portal-sessions"
    }
    assert status == {"201": 3, "401": 3, "404": 1, "422": 1, "502": 1, "429": 1}
    assert v("portal_gateway_upstream_requests_total", outcome="client_error", status="401") == 1
    queries = {
        s.labels["query"]
        for s in page.samples
        if s.name == "portal_gateway_db_query_duration_seconds_count"
    }
    assert {"find_client", "resolve", "insert_audit", "current_revision"} <= queries, queries


@pytest.mark.usefixtures("world")
async def test_upstream_metrics_per_attempt_and_retries(
    service: Any, token: str, standin: Standin
) -> None:
    standin.state.queue_faults([{"status": 500}, {"status": 429, "headers": {"Retry-After": "0"}}])
    await created(await post_session(service, {"user_id": "u_42"}, token))
    page = await scrape(service)
    v = page.value
    up = "portal_gateway_upstream_requests_total"
    assert v(up, outcome="server_error", status="500") == 1
    assert v(up, outcome="rate_limited", status="429") == 1
    assert v(up, outcome="success", status="200") == 1
    duration = "portal_gateway_upstream_request_duration_seconds_count"
    assert v(duration, outcome="server_error") == 1
    assert v(duration, outcome="rate_limited") == 1
    assert v(duration, outcome="success") == 1
    assert v("portal_gateway_upstream_retries_total", reason="server_error") == 1
    assert v("portal_gateway_upstream_retries_total", reason="rate_limited") == 1


@pytest.mark.usefixtures("world")
async def test_circuit_gauge_opens_with_the_breaker(
    make_service: Any, token: str, standin: Standin
) -> None:
    service = await make_service(BREAKER_FAILURE_THRESHOLD="1", STRIPE_MAX_RETRIES="0")
    standin.state.queue_faults([{"status": 500}])
    await problem(
        await post_session(service, {"user_id": "u_42"}, token), 503, "upstream_unavailable"
    )
    await problem(
        await post_session(service, {"user_id": "u_42"}, token), 503, "upstream_unavailable"
    )
    page = await scrape(service)
    assert page.value("portal_gateway_upstream_circuit_open") == 1
    assert page.value("portal_gateway_session_errors_total", code="upstream_unavailable") == 2
    # The fast-failed request never reached Stripe.
    assert (
        page.value("portal_gateway_upstream_requests_total", outcome="server_error", status="500")
        == 1
    )


@pytest.mark.usefixtures("world")
async def test_shed_requests_are_counted(make_service: Any, token: str, standin: Standin) -> None:
    service = await make_service(MAX_IN_FLIGHT="1")
    standin.state.set_latency(300)
    try:
        responses = await asyncio.gather(
            *(post_session(service, {"user_id": "u_42"}, token) for _ in range(4))
        )
    finally:
        standin.state.set_latency(0)
    statuses = sorted(r.status for r in responses)
    assert statuses.count(503) >= 1, statuses
    assert statuses.count(201) >= 1, statuses
    page = await scrape(service)
    shed = page.value("portal_gateway_session_errors_total", code="overloaded")
    assert shed == statuses.count(503)


@pytest.mark.usefixtures("world")
async def test_audit_write_failure_counted(service: Any, token: str, conn: Any) -> None:
    await conn.execute("ALTER TABLE audit_events RENAME TO audit_events_gone")
    await problem(
        await post_session(service, {"user_id": "u_42"}, token), 503, "database_unavailable"
    )
    page = await scrape(service)
    assert page.value("portal_gateway_audit_events_total", outcome="write_failed") == 1
    assert page.value("portal_gateway_session_errors_total", code="database_unavailable") == 1
