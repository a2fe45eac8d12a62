"""``/healthz`` (alive), ``/readyz`` (can serve traffic) and ``/metrics``."""

from __future__ import annotations

import orjson
from aiohttp import web
from aiohttp_apigami import response_schema
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import keys
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
    """Answered from a database check at most a second old (``service/readiness.py``)."""
    app = request.app
    ready, checks = await app[keys.READINESS].verdict(app[keys.DB])
    return _json(
        200 if ready else 503, {"status": "ready" if ready else "not_ready", "checks": checks}
    )


async def metrics(request: web.Request) -> web.Response:
    return await _exposition(request.app)


def metrics_app(api: web.Application) -> web.Application:
    """``/metrics`` alone, for METRICS_PORT: the API's registry, pool and readiness.

    No middlewares: a scrape is neither logged, counted nor shed, and this port
    answers nothing else (404).
    """

    async def scrape(request: web.Request) -> web.Response:
        return await _exposition(api)

    app = web.Application()
    app.router.add_get("/metrics", scrape, allow_head=False)
    return app


async def _exposition(app: web.Application) -> web.Response:
    """Prometheus text exposition of the API app's registry.

    Point-in-time gauges are refreshed here, at scrape time: the pool by state,
    readiness (the same cached check as ``/readyz``), so the readiness
    alert works whether or not anything probes ``/readyz``, and profile drift
    (from the database, so every replica reports the same; ``drift_gauge.py``).
    """
    m = app[keys.METRICS]
    db = app.get(keys.DB)
    if db is not None:
        for state, value in db.pool_stats().items():
            m.db_pool.labels(state=state).set(value)
        await app[keys.READINESS].verdict(db)
        await app[keys.PROFILE_DRIFT].refresh(db)
    body = generate_latest(m.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
