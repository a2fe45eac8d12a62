"""``portal-gateway demo`` (what ``make run`` starts): a working stack on one machine.

Creates and migrates the database, seeds a demo user, starts the Stripe
stand-in on 127.0.0.1:12111 (unless STRIPE_API_KEY is set, then the real
STRIPE_API_BASE is used) and the service, and prints a curl that opens a
portal session. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal

from aiohttp import web

from service import http_server, logs, migrations
from service.app import create_app
from service.auth import generate_client_token, hash_token
from service.config import Secret, Settings
from service.db import clients, deployment
from service.db import demo as demo_db
from service.db.pool import Database

DEMO_ORIGIN = "https://app.example.com"
DEMO_RETURN_URL = f"{DEMO_ORIGIN}/account"
DEMO_CLIENT = "demo"
DEMO_KEY = "sk_test_demo_standin"


def run(args: argparse.Namespace) -> int:
    """Set up and serve until interrupted."""
    settings = Settings.from_os_env(serving=False)
    use_standin = settings.stripe_api_key is None
    changes: dict[str, object] = {}
    if use_standin:
        changes.update(
            stripe_api_key=Secret(DEMO_KEY),
            stripe_api_base=f"http://127.0.0.1:{args.standin_port}",
        )
    if not settings.return_url_allowlist:
        changes["return_url_allowlist"] = (DEMO_ORIGIN,)
    if args.port is not None:
        changes["port"] = args.port
    settings = settings.replace(**changes)
    logs.configure(settings.log_level, settings.log_format)

    url = settings.database_url.reveal()
    asyncio.run(deployment.ensure_database(url))
    migrations.upgrade(url)
    asyncio.run(_serve(settings, use_standin, args.standin_port))
    return 0


async def _prepare(settings: Settings) -> str:
    db = await Database.connect(settings.database_url.reveal(), min_size=1, max_size=2)
    try:
        await demo_db.seed_demo(db, DEMO_RETURN_URL)
        await clients.revoke_client(db, DEMO_CLIENT)
        await clients.forget_revoked_client(db, DEMO_CLIENT)
        token = generate_client_token()
        await clients.create_client(
            db, DEMO_CLIENT, hash_token(token), ["portal_sessions:create"], 600
        )
        return token
    finally:
        await db.close()


async def _serve(settings: Settings, use_standin: bool, standin_port: int) -> None:
    token = await _prepare(settings)
    runners: list[web.AppRunner] = []
    try:
        if use_standin:
            from stripe_standin import create_app as create_standin

            standin = web.AppRunner(create_standin())
            await standin.setup()
            runners.append(standin)
            await web.TCPSite(standin, "127.0.0.1", standin_port).start()
        service = http_server.AppRunner(
            create_app(settings), access_log=None, shutdown_timeout=settings.shutdown_timeout
        )
        await service.setup()
        runners.append(service)
        await web.TCPSite(service, settings.host, settings.port).start()
        print(_curl(settings, token), flush=True)
        await _until_signalled()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _curl(settings: Settings, token: str) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    body = json.dumps(
        {
            "user_id": "demo-user",
            "flow": {"type": "subscription_update_confirm", "plan": "pro-yearly"},
        }
    )
    return (
        "\nportal-gateway is up. Open a portal session with:\n\n"
        f"curl -sS -X POST http://{host}:{settings.port}/v1/portal-sessions \\\n"
        f"  -H {shlex.quote('Authorization: Bearer ' + token)} \\\n"
        "  -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(body)}\n\n"
        "Ctrl-C stops the service and the Stripe stand-in.\n"
    )
