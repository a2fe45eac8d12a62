"""``/healthz`` (alive), ``/readyz`` (can serve traffic) and ``/metrics``."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from aiohttp_apigami import response_schema
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import keys
from service.db import deployment
from service.errors import ServiceError
from service.handlers.openapi import docs
from service.schemas import HealthSchema


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@docs(tags=["operations"], summary="Liveness: the process is up")
@response_schema(HealthSchema, 200)
async def healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


@docs(
    tags=["operations"],
    summary="Readiness: database answers, migrations at head, not draining",
    responses={503: {"description": "Not ready", "schema": HealthSchema}},
)
@response_schema(HealthSchema, 200)
async def readyz(request: web.Request) -> web.Response:
    ready, checks = await _readiness(request.app)
    return _json(
        200 if ready else 503, {"status": "ready" if ready else "not_ready", "checks": checks}
    )


async def _readiness(app: web.Application) -> tuple[bool, dict[str, str]]:
    """The readiness verdict and its checks; also kept in ``portal_gateway_ready``."""
    lifecycle = app[keys.LIFECYCLE]
    checks: dict[str, str] = {}
    if lifecycle.draining:
        checks["draining"] = "yes"
    db = app[keys.DB]
    try:
        revision = await asyncio.wait_for(deployment.current_revision(db), timeout=db.timeout)
    except (ServiceError, TimeoutError):
        checks["database"] = "unavailable"
    else:
        checks["database"] = "ok"
        checks["migrations"] = "ok" if revision == lifecycle.migrations_head else "not_at_head"
    ready = not lifecycle.draining and checks.get("migrations") == "ok"
    app[keys.METRICS].ready.set(1 if ready else 0)
    return ready, checks


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this app's registry.

    Point-in-time gauges are refreshed here, at scrape time: the pool by state,
    and readiness (one bounded query, the same check as ``/readyz``), so the
    readiness alert works whether or not anything probes ``/readyz``.
    """
    m = request.app[keys.METRICS]
    db = request.app.get(keys.DB)
    if db is not None:
        for state, value in db.pool_stats().items():
            m.db_pool.labels(state=state).set(value)
        await _readiness(request.app)
    body = generate_latest(m.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
