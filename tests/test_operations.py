"""Health, readiness and metrics as ops rely on them."""

from __future__ import annotations

import time
from typing import Any

import pytest

from service import keys
from service.readiness import MAX_AGE_SECONDS
from tests.helpers import created, post_session


async def test_healthz(service: Any) -> None:
    resp = await service.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_readyz_ok_then_not_at_head(service: Any, conn: Any) -> None:
    resp = await service.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"] == {"database": "ok", "migrations": "ok"}
    await conn.execute("UPDATE alembic_version SET version_num = 'older'")
    # /readyz answers from a check at most 1 s old: move its clock past that.
    readiness = service.app[keys.READINESS]
    readiness.clock = lambda: time.monotonic() + MAX_AGE_SECONDS
    resp = await service.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["checks"]["migrations"] == "not_at_head"


@pytest.mark.usefixtures("world")
async def test_metrics_count_requests_and_sessions(service: Any, token: str) -> None:
    await created(await post_session(service, {"user_id": "u_42"}, token))
    await created(
        await post_session(
            service, {"user_id": "u_42", "flow": {"type": "subscription_cancel"}}, token
        )
    )
    await service.get("/no/such/path/123")
    resp = await service.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    route = 'route="/v1/portal-sessions"'
    assert f'portal_gateway_http_requests_total{{method="POST",{route},status="201"}} 2.0' in text
    assert 'portal_gateway_sessions_created_total{flow="home",principal_type="client"} 1.0' in text
    cancel = 'flow="subscription_cancel",principal_type="client"'
    assert f"portal_gateway_sessions_created_total{{{cancel}}} 1.0" in text
    assert 'route="unmatched"' in text
    assert "/no/such/path" not in text
    assert 'portal_gateway_upstream_requests_total{outcome="success",status="200"} 2.0' in text
    assert 'portal_gateway_db_query_duration_seconds_count{query="resolve"} 2.0' in text
    assert 'portal_gateway_audit_events_total{outcome="created"} 2.0' in text
    assert "portal_gateway_build_info{version=" in text
    assert "process_cpu_seconds_total" in text
