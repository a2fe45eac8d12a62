"""Shared fixtures: a real Postgres (template database cloned per test), the
Stripe stand-in over real HTTP, and the service itself over real HTTP.

The server is found by the rule of SPEC §9: ``make test`` exports
``PG_ADMIN_URL`` from ``scripts/postgres.sh url``; without it, DATABASE_URL or
the local server is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from service import http_server, logs, migrations
from service.app import create_app
from service.auth import generate_client_token, hash_token
from service.config import Settings
from service.metrics import Metrics
from stripe_standin import STATE, StandinState
from stripe_standin import create_app as create_standin
from tests.redis_server import RedisServer

ALLOWED_ORIGIN = "https://app.example.com"
STRIPE_TEST_KEY = "sk_test_portalgatewaytests0123456789"


# What must never appear in any log line the suite produces.
LEAK_PATTERNS = re.compile(
    r"sk_test_portalgatewaytests|pgw_[A-Za-z0-9_-]{20,}|billing\.stripe\.com/p/session"
    r"|/p/session/"  # a portal session URL on any host (custom portal domains)
    r"|/portal-links/[A-Za-z0-9_-]{43}"  # a portal link's token (SPEC §13)
    r"|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"
)


@pytest.fixture(scope="session", autouse=True)
def suite_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every log line of the whole suite, as the service writes them in production (JSON).

    At the end of the run the file is scanned: no Stripe key, bearer token, JWT
    or portal URL may appear in any of it.
    """
    path = tmp_path_factory.mktemp("logs") / "suite.jsonl"
    with path.open("w", encoding="utf-8") as stream:
        logs.configure("DEBUG", "json", stream=stream)
        yield path
        stream.flush()
    leaks = [line for line in path.read_text().splitlines() if LEAK_PATTERNS.search(line)]
    assert leaks == [], f"secrets in logs: {leaks[:3]}"


def _admin_url() -> str:
    url = os.environ.get("PG_ADMIN_URL") or os.environ.get("DATABASE_URL")
    return url or "postgresql://postgres@127.0.0.1:5432/postgres"


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _with_role(url: str, role: str, password: str) -> str:
    """``url`` as another role (a runtime role of SPEC §5), same server and database."""
    parts = urlsplit(url)
    server = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{server}"))


async def _admin_execute(sql: str) -> None:
    conn = await asyncpg.connect(_with_database(_admin_url(), "postgres"), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# RAM on Linux; a folder of our own in it (mode 0700, named for this process).
RAM_DIRECTORY = Path("/dev/shm")  # noqa: S108


async def _data_directory() -> str | None:
    try:
        conn = await asyncpg.connect(_with_database(_admin_url(), "postgres"), timeout=10)
    except (OSError, asyncpg.PostgresError):
        return None
    try:
        directory: str = await conn.fetchval("SELECT current_setting('data_directory')")
        return directory
    finally:
        await conn.close()


def _ram_tablespace(name: str) -> str | None:
    """A tablespace in RAM for this run's databases, or None where there is none.

    Each test clones the template: on disk that is ~0.3 s of fsyncs per test,
    a third of the suite's wall time; in RAM, ~0.1 s. Only for a server on this
    machine whose data directory we can hand a folder to (we run as root);
    anywhere else the databases stay in the default tablespace.
    """
    if not RAM_DIRECTORY.is_dir() or os.geteuid() != 0:
        return None
    if urlsplit(_admin_url()).hostname not in (None, "", "127.0.0.1", "localhost", "::1"):
        return None
    data_directory = asyncio.run(_data_directory())
    if data_directory is None:
        return None
    location = RAM_DIRECTORY / name
    try:
        owner = Path(data_directory).stat()
        location.mkdir(mode=0o700)
        os.chown(location, owner.st_uid, owner.st_gid)
        asyncio.run(_admin_execute(f"CREATE TABLESPACE \"{name}\" LOCATION '{location}'"))
    except (OSError, asyncpg.PostgresError):
        shutil.rmtree(location, ignore_errors=True)
        return None
    return name


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    """A database migrated once per run (in RAM where it can be); each test gets a copy."""
    name = f"pgw_template_{os.getpid()}"
    asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}"'))
    tablespace = _ram_tablespace(f"pgw_ram_{os.getpid()}")
    placed = f' TABLESPACE "{tablespace}"' if tablespace else ""
    asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"{placed}'))
    migrations.upgrade(_with_database(_admin_url(), name))
    try:
        yield name
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if tablespace:
            # Every clone is dropped by its test; a leftover one keeps the tablespace.
            with contextlib.suppress(asyncpg.PostgresError):
                asyncio.run(_admin_execute(f'DROP TABLESPACE "{tablespace}"'))
            shutil.rmtree(RAM_DIRECTORY / tablespace, ignore_errors=True)


@pytest.fixture
async def database_url(template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated, empty database for this test."""
    name = f"pgw_test_{uuid.uuid4().hex[:12]}"
    await _admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    try:
        yield _with_database(_admin_url(), name)
    finally:
        await _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database, for seeding and asserting."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


@dataclass
class Standin:
    """The Stripe stand-in running on a real port."""

    url: str
    state: StandinState
    server: TestServer

    def requests(self, path: str = "/v1/billing_portal/sessions") -> list[Any]:
        return [r for r in self.state.requests if r.path == path]


@pytest.fixture
async def standin() -> AsyncIterator[Standin]:
    app = create_standin()
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Standin(str(server.make_url("")).rstrip("/"), app[STATE], server)
    finally:
        await server.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (SPEC §14), stopped at the end."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_settings(database_url: str, standin_url: str, **env: str) -> Settings:
    """Settings as the service would build them from its environment."""
    base = {
        "DATABASE_URL": database_url,
        "STRIPE_API_KEY": STRIPE_TEST_KEY,
        "STRIPE_API_BASE": standin_url,
        "RETURN_URL_ALLOWLIST": f"{ALLOWED_ORIGIN},https://billing.example.org:8443",
        "STRIPE_TIMEOUT_SECONDS": "3",
        "REQUEST_DEADLINE_SECONDS": "6",
        "LOG_LEVEL": "DEBUG",
    }
    base.update(env)
    return Settings.from_env(base)


@pytest.fixture
def settings(database_url: str, standin: Standin) -> Settings:
    return make_settings(database_url, standin.url)


class ServiceTestServer(TestServer):
    """aiohttp's TestServer on the service's own runner, as ``portal-gateway serve`` runs it.

    ``handler_cancellation``: aiohttp's TestServer cancels a handler whose caller
    hung up; ``serve`` does not (aiohttp's default), its handler sees the body
    read fail instead. Tests of hang-ups choose.
    """

    def __init__(self, app: web.Application, *, handler_cancellation: bool = True) -> None:
        super().__init__(app, host="127.0.0.1")
        self.handler_cancellation = handler_cancellation

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs["handler_cancellation"] = self.handler_cancellation
        return http_server.AppRunner(self.app, **kwargs)


@pytest.fixture
async def make_service(database_url: str, standin: Standin) -> AsyncIterator[Callable[..., Any]]:
    """Start the service (real HTTP) with extra environment variables."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(**env: str) -> TestClient[web.Request, web.Application]:
        app = create_app(make_settings(database_url, standin.url, **env), metrics=Metrics())
        client = TestClient(ServiceTestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    try:
        yield start
    finally:
        for c in clients:
            await c.close()


@pytest.fixture
async def service(
    make_service: Callable[..., Any],
) -> TestClient[web.Request, web.Application]:
    client: TestClient[web.Request, web.Application] = await make_service()
    return client


async def create_client_token(
    conn: asyncpg.Connection,
    name: str = "billing-frontend",
    scopes: tuple[str, ...] = ("portal_sessions:create",),
    rate_limit: int = 600,
) -> str:
    token = generate_client_token()
    await conn.execute(
        "INSERT INTO api_clients (name, token_hash, scopes, rate_limit_per_minute)"
        " VALUES ($1, $2, $3, $4)",
        name,
        hash_token(token),
        list(scopes),
        rate_limit,
    )
    return token


@pytest.fixture
async def token(conn: asyncpg.Connection) -> str:
    """A service-client token with portal_sessions:create."""
    return await create_client_token(conn)


async def seed_world(conn: asyncpg.Connection) -> None:
    """A small, realistic mapping: users with customers, subscriptions, plans, offers."""
    await conn.execute(
        """
        INSERT INTO portal_profiles (name, configuration_id, on_behalf_of, default_return_url,
                                     is_default) VALUES
            ('default', 'bpc_default1', NULL, 'https://app.example.com/account', true),
            ('connect', 'bpc_connect1', 'acct_platform1', NULL, false);
        INSERT INTO customers (user_id, stripe_customer_id, stripe_account_id, portal, locale)
        VALUES
            ('u_42', 'cus_42', NULL, NULL, 'fr'),
            ('u_7', 'cus_7', NULL, 'connect', NULL),
            ('u_acct', NULL, 'acct_user1', NULL, NULL),
            ('u_none', 'cus_none', NULL, NULL, NULL),
            ('u_two', 'cus_two', NULL, NULL, NULL),
            ('u_multi', 'cus_multi', NULL, NULL, NULL);
        INSERT INTO subscriptions (stripe_subscription_id, user_id, external_ref, status, item_id,
                                   price_id, quantity) VALUES
            ('sub_42a', 'u_42', 'team-plan', 'active', 'si_42a', 'price_basic', 3),
            ('sub_42old', 'u_42', 'old-plan', 'canceled', 'si_42old', 'price_basic', 1),
            ('sub_7a', 'u_7', 'team-plan', 'trialing', 'si_7a', 'price_basic', 1),
            ('sub_acct', 'u_acct', NULL, 'past_due', 'si_acct', 'price_basic', 1),
            ('sub_two1', 'u_two', 'first', 'active', 'si_two1', 'price_basic', 1),
            ('sub_two2', 'u_two', 'second', 'active', 'si_two2', 'price_basic', 1),
            ('sub_multi', 'u_multi', 'multi', 'active', NULL, NULL, NULL);
        INSERT INTO plans (plan, stripe_price_id, active) VALUES
            ('pro-yearly', 'price_pro_yearly', true),
            ('legacy', 'price_legacy', false);
        INSERT INTO offers (name, kind, stripe_id) VALUES
            ('stay-20', 'coupon', 'coupon_stay20'),
            ('spring-promo', 'promotion_code', 'promo_spring');
        """
    )


@pytest.fixture
async def world(conn: asyncpg.Connection) -> None:
    await seed_world(conn)
