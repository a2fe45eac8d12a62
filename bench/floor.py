"""The floor: the least an aiohttp service can do for ``POST /v1/portal-sessions``.

A bare pass-through on the same event loop implementation as the service
(asyncio's default): read the JSON body, compute the Stripe ids from the
benchmark's fixed id scheme (``scheme.py``, no database), make the same
upstream POST with the same form params and headers over one shared
``ClientSession`` (the same connection limit as the service's), and answer
201 with the same JSON fields. No auth, validation, audit, metrics or logs.

The only extra is an integer: ``GET /_count`` returns how many sessions it
answered and how many failed, so the benchmark divides CPU time by the
requests this process really finished.

    python bench/floor.py --port 18081 --upstream http://127.0.0.1:12112 --api-key sk_test_...
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scheme import (
    OFFERS,
    PLANS,
    PROFILE,
    customer_id,
    item_id,
    subscription_id,
    user_number,
)

STRIPE_VERSION = "2025-09-30.clover"
USER_AGENT = "portal-gateway/0.1.0"
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
COUNTS: web.AppKey[dict[str, int]] = web.AppKey("counts", dict)
UPSTREAM_URL = web.AppKey("upstream_url", str)
UPSTREAM_AUTH = web.AppKey("upstream_auth", str)


def _flatten(value: Any, prefix: str | None) -> Iterator[tuple[str, str]]:
    # Stripe's nested form encoding, as the SDKs (and the service) do it.
    if isinstance(value, Mapping):
        for key, sub in value.items():
            yield from _flatten(sub, key if prefix is None else f"{prefix}[{key}]")
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            yield from _flatten(sub, f"{prefix}[{index}]")
    elif value is not None:
        yield str(prefix), str(value)


def _flow_data(flow: dict[str, Any], n: int) -> dict[str, Any]:
    kind = flow["type"]
    data: dict[str, Any] = {"type": kind}
    after = flow.get("after_completion")
    if after is not None:  # the pool has redirects only (dataset.make_body)
        data["after_completion"] = {
            "type": "redirect",
            "redirect": {"return_url": after["return_url"]},
        }
    if kind == "subscription_cancel":
        cancel: dict[str, Any] = {"subscription": subscription_id(n)}
        if "retention_offer" in flow:
            coupon = OFFERS[flow["retention_offer"]][1]
            cancel["retention"] = {"type": "coupon_offer", "coupon_offer": {"coupon": coupon}}
        data[kind] = cancel
    elif kind == "subscription_update_confirm":
        item: dict[str, Any] = {"id": item_id(n)}
        if "plan" in flow:
            item["price"] = PLANS[flow["plan"]][0]
        if "quantity" in flow:
            item["quantity"] = flow["quantity"]
        confirm: dict[str, Any] = {"subscription": subscription_id(n), "items": [item]}
        if "discount" in flow:
            offer_kind, stripe_id = OFFERS[flow["discount"]]
            confirm["discounts"] = [{offer_kind: stripe_id}]
        data[kind] = confirm
    return data


async def create_portal_session(request: web.Request) -> web.Response:
    counts = request.app[COUNTS]
    body = orjson.loads(await request.read())
    uid = body["user_id"]
    n = user_number(uid)
    flow = body.get("flow")
    params: dict[str, Any] = {
        "customer": customer_id(n),
        "configuration": PROFILE[1],
        "locale": body.get("locale"),
        "return_url": body.get("return_url") or PROFILE[2],
    }
    if flow is not None:
        params["flow_data"] = _flow_data(flow, n)
    app = request.app
    async with app[SESSION].post(
        app[UPSTREAM_URL],
        data=list(_flatten(params, None)),
        headers={
            "Authorization": app[UPSTREAM_AUTH],
            "Stripe-Version": STRIPE_VERSION,
            "Idempotency-Key": str(uuid.uuid4()),
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        },
    ) as resp:
        raw = await resp.read()
        status = resp.status
    if status != 200:
        counts["failed"] += 1
        return web.Response(status=502, body=raw, content_type="application/json")
    session = orjson.loads(raw)
    counts["answered"] += 1
    return web.Response(
        status=201,
        body=orjson.dumps(
            {
                "id": session["id"],
                "url": session["url"],
                "created": session["created"],
                "user_id": uid,
                "flow": flow["type"] if flow else None,
                "locale": session["locale"],
                "return_url": session["return_url"],
                "livemode": session["livemode"],
            }
        ),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def count(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[COUNTS]), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app(upstream: str, api_key: str, max_connections: int) -> web.Application:
    app = web.Application()
    app[UPSTREAM_URL] = upstream.rstrip("/") + "/v1/billing_portal/sessions"
    app[UPSTREAM_AUTH] = f"Bearer {api_key}"
    app[COUNTS] = {"answered": 0, "failed": 0}

    async def session_ctx(app: web.Application) -> Any:
        connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=30)
        app[SESSION] = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=5)
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/portal-sessions", create_portal_session)
    app.router.add_get("/_count", count)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(
        create_app(args.upstream, args.api_key, args.max_connections),
        access_log=None,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor listening on http://{args.host}:{args.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="Stripe API base URL")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--max-connections", type=int, default=100)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
