"""The request path's metric methods (cached label children) export exactly what
``metric.labels(...)`` would: the same series, the same values."""

from __future__ import annotations

from prometheus_client import generate_latest

from service.metrics import Metrics


def _exported(metrics: Metrics) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    # This app's own series, without the creation timestamps (``*_created``).
    return sorted(
        line
        for line in text.splitlines()
        if line.startswith("portal_gateway_")
        and not line.split("{")[0].split(" ")[0].endswith("_created")
    )


def _by_methods(metrics: Metrics) -> None:
    for _ in range(2):  # the second time through the cache
        metrics.session_created("home", "client")
        metrics.session_created("subscription_cancel", "end_user")
        metrics.session_error("unknown_user")
        metrics.session_error("a_code_not_precreated")
        metrics.audit_event("created")
        metrics.upstream_attempt("ok", 200, 0.03)
        metrics.upstream_attempt("timeout", None, 2.0)
        metrics.db_query("resolve", 0.0004)
        metrics.portal_link("created")


def _by_labels(metrics: Metrics) -> None:
    for _ in range(2):
        metrics.sessions_created.labels(flow="home", principal_type="client").inc()
        metrics.sessions_created.labels(flow="subscription_cancel", principal_type="end_user").inc()
        metrics.session_errors.labels(code="unknown_user").inc()
        metrics.session_errors.labels(code="a_code_not_precreated").inc()
        metrics.audit_events.labels(outcome="created").inc()
        metrics.upstream_requests.labels(outcome="ok", status="200").inc()
        metrics.upstream_duration.labels(outcome="ok").observe(0.03)
        metrics.upstream_requests.labels(outcome="timeout", status="none").inc()
        metrics.upstream_duration.labels(outcome="timeout").observe(2.0)
        metrics.db_duration.labels(query="resolve").observe(0.0004)
        metrics.portal_links.labels(event="created").inc()


def test_cached_children_export_what_labels_would() -> None:
    cached, plain = Metrics(), Metrics()
    _by_methods(cached)
    _by_labels(plain)
    exported = _exported(cached)
    assert exported == _exported(plain)
    assert 'portal_gateway_upstream_requests_total{outcome="timeout",status="none"} 2.0' in exported
    assert 'portal_gateway_session_errors_total{code="a_code_not_precreated"} 2.0' in exported
    # One child per label set: the cache hands out the metric's own child.
    assert (
        cached.session_errors.labels(code="unknown_user") is cached._session_errors["unknown_user"]
    )
