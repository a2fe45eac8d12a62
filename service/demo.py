"""``portal-gateway demo`` (what ``make run`` starts): a working stack on one machine.

Creates and migrates the database, seeds a demo user, starts the Stripe
stand-in on 127.0.0.1:12111 (unless STRIPE_API_KEY is set, then the real
STRIPE_API_BASE is used) and the service, and prints a curl that opens a
portal session. Metadata linking is on (STRIPE_USER_METADATA_KEY=user_id
unless set), and the stand-in knows a second customer with a subscription:
the printed instructions link it to ``demo-user-2`` through the mapping API
(which backfills its subscription) and open its portal. With the stand-in,
``deploy/profiles.example.yaml`` is applied to it at start (its products and
prices seeded first) and the first printed session names its ``pro`` profile.
Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from service import http_server, logs, migrations, profiles, upstream_budget
from service.app import create_app
from service.auth import (
    SCOPE_CREATE_SESSIONS,
    SCOPE_MAPPINGS_READ,
    SCOPE_MAPPINGS_WRITE,
    generate_client_token,
    hash_token,
)
from service.config import Secret, Settings
from service.db import clients, deployment
from service.db import demo as demo_db
from service.db.pool import Database
from service.profiles_file import ProfilesFileError, load_profiles
from service.stripe import StripeClient

DEMO_ORIGIN = "https://app.example.com"
DEMO_RETURN_URL = f"{DEMO_ORIGIN}/account"
DEMO_CLIENT = "demo"
DEMO_KEY = "sk_test_demo_standin"
DEMO_METADATA_KEY = "user_id"
DEMO_SCOPES = [SCOPE_CREATE_SESSIONS, SCOPE_MAPPINGS_WRITE, SCOPE_MAPPINGS_READ]
# The second demo user: no mapping until the printed PUT links it.
DEMO_USER_2 = "demo-user-2"
DEMO_CUSTOMER_2 = "cus_demo0002"
# What the stand-in knows about the second customer: Stripe-side data only.
STANDIN_CUSTOMERS = [
    {
        "id": DEMO_CUSTOMER_2,
        "email": "demo-user-2@example.com",
        "name": "Demo User 2",
        "metadata": {DEMO_METADATA_KEY: DEMO_USER_2},
    }
]
STANDIN_SUBSCRIPTIONS = [
    {
        "id": "sub_demo0002",
        "customer": DEMO_CUSTOMER_2,
        "items": [{"id": "si_demo0002", "price": "price_basic_monthly", "quantity": 2}],
    }
]
# The products and prices deploy/profiles.example.yaml names (SPEC §12).
STANDIN_CATALOGUE = [
    {"id": "prod_demo_basic", "prices": ["price_basic_monthly"]},
    {"id": "prod_demo_pro", "prices": ["price_pro_yearly"]},
]
PROFILES_FILE = Path(__file__).resolve().parent.parent / "deploy" / "profiles.example.yaml"
# The example's profile the first printed session names: it offers pro-yearly.
DEMO_PROFILE = "pro"


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
    if settings.stripe_user_metadata_key is None:
        changes["stripe_user_metadata_key"] = DEMO_METADATA_KEY
    if args.port is not None:
        changes["port"] = args.port
    if settings.public_base_url is None:
        # Portal links (SPEC §13) on the address the demo prints.
        changes["public_base_url"] = _base_url(settings.host, args.port or settings.port)
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
        await clients.create_client(db, DEMO_CLIENT, hash_token(token), DEMO_SCOPES, 600)
        return token
    finally:
        await db.close()


async def _serve(settings: Settings, use_standin: bool, standin_port: int) -> None:
    token = await _prepare(settings)
    runners: list[web.AppRunner] = []
    portal: str | None = None
    try:
        if use_standin:
            from stripe_standin import STATE
            from stripe_standin import create_app as create_standin

            # Portal URLs on the stand-in itself: a browser can open what the demo prints.
            standin_app = create_standin(session_url_base=f"http://127.0.0.1:{standin_port}")
            standin_app[STATE].seed_customers(STANDIN_CUSTOMERS)
            standin_app[STATE].seed_subscriptions(STANDIN_SUBSCRIPTIONS)
            standin_app[STATE].seed_catalogue(STANDIN_CATALOGUE)
            standin = web.AppRunner(standin_app)
            await standin.setup()
            runners.append(standin)
            await web.TCPSite(standin, "127.0.0.1", standin_port).start()
            portal = await _apply_profiles(settings)
        service = http_server.AppRunner(
            create_app(settings), access_log=None, shutdown_timeout=settings.shutdown_timeout
        )
        await service.setup()
        runners.append(service)
        await web.TCPSite(service, settings.host, settings.port).start()
        link = await _portal_link(settings, token)
        print(_curl(settings, token, use_standin, portal, link), flush=True)
        await _until_signalled()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _apply_profiles(settings: Settings) -> str | None:
    """``profiles apply deploy/profiles.example.yaml`` against the stand-in; the profile
    the printed session names (None, with a warning, if the file could not be applied)."""
    log = structlog.get_logger("app")
    db = await Database.connect(settings.database_url.reveal(), min_size=1, max_size=2)
    session = StripeClient.new_session(settings)
    try:
        specs = await load_profiles(PROFILES_FILE, db, settings)
        async with upstream_budget.for_tool(settings) as budget:
            pace = budget.wait if budget is not None else None
            stripe = StripeClient(session, settings, None, pace=pace, background=True)
            applied = await profiles.apply(db, stripe, specs, prune=False)
    except (ProfilesFileError, profiles.ProfilesFailed) as exc:
        log.warning("demo_profiles_not_applied", file=str(PROFILES_FILE), error=str(exc))
        return None
    finally:
        await session.close()
        await db.close()
    names = [o.spec.name for o in applied.outcomes]
    log.info("demo_profiles_applied", file=str(PROFILES_FILE), profiles=names)
    return DEMO_PROFILE if DEMO_PROFILE in names else None


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _base_url(host: str, port: int) -> str:
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    return f"http://{host}:{port}"


# The printed link opens the demo user's portal home page.
LINK_BODY = {"user_id": "demo-user"}


async def _portal_link(settings: Settings, token: str) -> str | None:
    """A portal link made through the running service, to paste into a browser."""
    url = f"{_base_url(settings.host, settings.port)}/v1/portal-links"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=LINK_BODY, headers=headers) as resp,
        ):
            if resp.status == 201:
                link: str = (await resp.json())["url"]
                return link
            structlog.get_logger("app").warning("demo_link_not_made", status=resp.status)
    except aiohttp.ClientError as exc:
        structlog.get_logger("app").warning("demo_link_not_made", error=str(exc))
    return None


def _curl(
    settings: Settings,
    token: str,
    use_standin: bool = True,
    portal: str | None = None,
    link: str | None = None,
) -> str:
    base = _base_url(settings.host, settings.port)
    session: dict[str, object] = {
        "user_id": "demo-user",
        "flow": {"type": "subscription_update_confirm", "plan": "pro-yearly"},
    }
    intro = "\nportal-gateway is up. Open a portal session with:\n\n"
    if portal is not None:
        # A profile of deploy/profiles.example.yaml, applied to the stand-in at start.
        session["portal"] = portal
        intro = (
            f"\nportal-gateway is up. Open a portal session with the {portal!r} profile"
            f" of {PROFILES_FILE.relative_to(PROFILES_FILE.parent.parent)}\n"
            "(applied to the stand-in at start; `portal-gateway profiles plan FILE` shows"
            " what a change would do):\n\n"
        )
    text = intro + _command("POST", f"{base}/v1/portal-sessions", token, session)
    if use_standin:
        text += (
            f"Link {DEMO_USER_2} to the stand-in's customer {DEMO_CUSTOMER_2} through the"
            " mapping API\n(its subscription is backfilled from Stripe), then open its portal:\n\n"
            + _command(
                "PUT",
                f"{base}/v1/users/{DEMO_USER_2}/customer",
                token,
                {"stripe_customer_id": DEMO_CUSTOMER_2},
            )
            + _command("GET", f"{base}/v1/users/{DEMO_USER_2}", token, None)
            + _command(
                "POST",
                f"{base}/v1/portal-sessions",
                token,
                {"user_id": DEMO_USER_2, "flow": {"type": "subscription_cancel"}},
            )
        )
    if link is not None:
        minutes = settings.portal_link_ttl_seconds // 60
        text += (
            "Or paste this portal link into a browser: it opens the portal of demo-user, once,"
            f" within {minutes} minutes\n(SPEC §13; links are made with POST /v1/portal-links):"
            f"\n\n  {link}\n\n" + _command("POST", f"{base}/v1/portal-links", token, LINK_BODY)
        )
    return text + "Ctrl-C stops the service and the Stripe stand-in.\n"


def _command(method: str, url: str, token: str, body: Mapping[str, object] | None) -> str:
    """One ready-to-paste curl, followed by an empty line."""
    lines = [
        f"curl -sS -X {method} {url}",
        f"  -H {shlex.quote('Authorization: Bearer ' + token)}",
    ]
    if body is not None:
        lines += ["  -H 'Content-Type: application/json'", f"  -d {shlex.quote(json.dumps(body))}"]
    return " \\\n".join(lines) + "\n\n"
