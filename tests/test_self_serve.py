"""Issue 12, items 2 and 5: what an end user may name, and what a 429 costs the database.

SPEC §5: plans, offers and portal profiles carry ``self_serve``. For an end user
an item that is not self-serve does not exist: the same 404, with the same body,
as a made-up name. Their own profile and the default profile stay theirs, and
service clients are not restricted. SPEC §6: a principal hammering past its rate
limit writes at most one ``rate_limited`` row per minute per replica, while
every refusal keeps its ``audit`` log line and metrics.
"""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import orjson
import pytest
from aiohttp import ClientResponse

from service import keys
from service.config import Settings
from service.db.pool import Database
from service.importer import ImportFailed, import_csv
from service.logs import tee
from service.ratelimit import REFUSAL_ROW_WINDOW_SECONDS, RateLimiter
from tests.conftest import Standin, create_client_token
from tests.helpers import created, metric_value, post_session, problem

pytestmark = pytest.mark.usefixtures("world")

ISSUER = "https://id.example.com/"
AUDIENCE = "portal-gateway"
JWT_SECRET = "self-serve-test-secret-0123456789abcdef"
MADE_UP = "no-such-name"


def user_token(sub: str) -> str:
    """An end-user JWT for ``sub``, as our identity provider would sign it."""
    now = int(time.time())
    claims = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


@pytest.fixture
async def gateway(make_service: Callable[..., Any]) -> Any:
    """The service accepting both service-client tokens and end-user JWTs."""
    return await make_service(
        JWT_HS256_SECRET=JWT_SECRET,
        JWT_ISSUER=ISSUER,
        JWT_AUDIENCE=AUDIENCE,
        JWT_ALGORITHMS="HS256",
    )


# --- the matrix: principal, kind, self-serve or not, known or not ---------------


@dataclass(frozen=True)
class Kind:
    """One kind of item a request may name, and how the name reaches Stripe."""

    code: str  # the 404 for a name that does not exist
    field: str  # the `field` of that 404
    stripe_id: object  # what Stripe receives when the item is allowed

    def request(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = {"user_id": "u_42"}
        if self.field == "portal":
            body["portal"] = name
        elif self.field == "flow.retention_offer":
            body["flow"] = {"type": "subscription_cancel", "retention_offer": name}
        else:
            item = self.field.removeprefix("flow.")
            body["flow"] = {"type": "subscription_update_confirm", "quantity": 2, item: name}
        return body

    def sent(self, params: dict[str, Any]) -> Any:
        """The value Stripe received for the item."""
        flow = params.get("flow_data", {})
        if self.field == "portal":
            return (params["configuration"], params["on_behalf_of"])
        if self.field == "flow.retention_offer":
            return flow["subscription_cancel"]["retention"]["coupon_offer"]["coupon"]
        confirm = flow["subscription_update_confirm"]
        if self.field == "flow.plan":
            return confirm["items"][0]["price"]
        return confirm["discounts"][0]["coupon"]


KINDS = {
    "plan": Kind("unknown_plan", "flow.plan", "price_picked"),
    "discount": Kind("unknown_offer", "flow.discount", "coupon_picked"),
    "retention_offer": Kind("unknown_offer", "flow.retention_offer", "coupon_picked"),
    "profile": Kind("unknown_portal", "portal", ("bpc_picked", "acct_picked")),
}


async def seed_items(conn: asyncpg.Connection, self_serve: bool) -> None:
    """A plan, a coupon and a profile (another brand's), all named "picked"."""
    await conn.execute(
        "INSERT INTO plans (plan, stripe_price_id, active, self_serve)"
        " VALUES ('picked', 'price_picked', true, $1)",
        self_serve,
    )
    await conn.execute(
        "INSERT INTO offers (name, kind, stripe_id, self_serve)"
        " VALUES ('picked', 'coupon', 'coupon_picked', $1)",
        self_serve,
    )
    await conn.execute(
        "INSERT INTO portal_profiles"
        " (name, configuration_id, on_behalf_of, default_return_url, is_default, self_serve)"
        " VALUES ('picked', 'bpc_picked', 'acct_picked', NULL, false, $1)",
        self_serve,
    )


def without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "request_id"}


@pytest.mark.parametrize("known", [True, False], ids=["known", "unknown"])
@pytest.mark.parametrize("self_serve", [True, False], ids=["self_serve", "not_self_serve"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("principal", ["client", "user"])
async def test_matrix(
    gateway: Any,
    token: str,
    conn: asyncpg.Connection,
    standin: Standin,
    principal: str,
    kind: str,
    self_serve: bool,
    known: bool,
) -> None:
    spec = KINDS[kind]
    await seed_items(conn, self_serve)
    bearer = token if principal == "client" else user_token("u_42")
    resp = await post_session(gateway, spec.request("picked" if known else MADE_UP), bearer)

    if known and (principal == "client" or self_serve):
        await created(resp)
        (sent,) = standin.requests()
        assert spec.sent(sent.params) == spec.stripe_id
        return
    body = await problem(resp, 404, spec.code)
    assert body["field"] == spec.field
    assert standin.requests() == []
    # Word for word what a service client gets for a name that does not exist:
    # nothing tells a non-self-serve item from an unknown one.
    reference = await problem(
        await post_session(gateway, spec.request(MADE_UP), token), 404, spec.code
    )
    assert without_request_id(body) == without_request_id(reference)
    assert body["request_id"] != reference["request_id"]


async def test_the_issue_report_is_refused(
    gateway: Any, token: str, conn: asyncpg.Connection, standin: Standin
) -> None:
    """The report of issue 12: a staff coupon and another brand's profile, by name."""
    await conn.execute(
        """
        INSERT INTO offers (name, kind, stripe_id) VALUES ('staff-100-off', 'coupon', 'staff100');
        INSERT INTO portal_profiles (name, configuration_id, on_behalf_of, is_default)
        VALUES ('internal-staff', 'bpc_staff', 'acct_otherbrand', false);
        """
    )
    user = user_token("u_42")
    staff = {"type": "subscription_update_confirm", "quantity": 1, "discount": "staff-100-off"}
    await problem(await post_session(gateway, {"flow": staff}, user), 404, "unknown_offer")
    await problem(
        await post_session(gateway, {"portal": "internal-staff"}, user), 404, "unknown_portal"
    )
    assert standin.requests() == []
    # A service client still may.
    await created(await post_session(gateway, {"user_id": "u_42", "flow": staff}, token))
    assert standin.requests()[0].params["flow_data"]["subscription_update_confirm"][
        "discounts"
    ] == [{"coupon": "staff100"}]


# --- own and default profiles ---------------------------------------------------


async def test_own_and_default_profiles_stay_the_users(
    gateway: Any, token: str, standin: Standin
) -> None:
    """None of the world's profiles is self-serve; u_7's own is `connect`, u_42 has none."""
    cases = [
        ("u_42", {}, ("bpc_default1", None)),  # the default profile, by default
        ("u_42", {"portal": "default"}, ("bpc_default1", None)),  # ... and by name
        ("u_7", {}, ("bpc_connect1", "acct_platform1")),  # their own, by default
        ("u_7", {"portal": "connect"}, ("bpc_connect1", "acct_platform1")),  # ... and by name
        ("u_7", {"portal": "default"}, ("bpc_default1", None)),  # the default one, named
    ]
    for user, body, expected in cases:
        await created(await post_session(gateway, body, user_token(user)))
        params = standin.requests()[-1].params
        assert (params.get("configuration"), params.get("on_behalf_of")) == expected, (user, body)

    # Someone else's profile that is not self-serve is as unknown as a made-up name.
    refused = await problem(
        await post_session(gateway, {"portal": "connect"}, user_token("u_42")),
        404,
        "unknown_portal",
    )
    unknown = await problem(
        await post_session(gateway, {"portal": MADE_UP}, user_token("u_42")), 404, "unknown_portal"
    )
    assert without_request_id(refused) == without_request_id(unknown)
    assert len(standin.requests()) == len(cases)


# --- import: the optional self_serve column ---------------------------------------


@pytest.fixture
async def run_import(database_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """Import ``text`` as ``<kind>.csv``; returns the row count or raises ImportFailed."""
    settings = Settings.from_env(
        {"DATABASE_URL": database_url, "RETURN_URL_ALLOWLIST": "https://app.example.com"},
        serving=False,
    )
    db = await Database.connect(database_url)

    async def run(kind: str, text: str) -> int:
        path = tmp_path / f"{kind}.csv"
        path.write_text(text)
        return await import_csv(db, kind, path, settings)

    try:
        yield run
    finally:
        await db.close()


async def flags(conn: asyncpg.Connection, table: str, key: str) -> dict[str, bool]:
    rows = await conn.fetch(f"SELECT {key} AS name, self_serve FROM {table}")
    return {r["name"]: r["self_serve"] for r in rows}


async def test_import_reads_the_optional_self_serve_column(
    run_import: Any, conn: asyncpg.Connection
) -> None:
    plans = "plan,stripe_price_id,active,self_serve\nyes,price_y,true,true\nno,price_n,true,false\n"
    assert await run_import("plans", plans + "empty,price_e,true,\n") == 3
    assert await flags(conn, "plans", "plan") == {
        "yes": True,
        "no": False,
        "empty": False,
        "pro-yearly": False,
        "legacy": False,
    }
    offers = "name,kind,stripe_id,self_serve\nstay-20,coupon,coupon_stay20,true\n"
    assert await run_import("offers", offers) == 1
    profiles = (
        "name,configuration_id,on_behalf_of,default_return_url,is_default,self_serve\n"
        "brand,bpc_brand,,,false,true\n"
    )
    assert await run_import("profiles", profiles) == 1
    assert (await flags(conn, "offers", "name"))["stay-20"] is True
    assert (await flags(conn, "portal_profiles", "name"))["brand"] is True
    # A file without the column marks its rows not self-serve (the safe default).
    assert await run_import("offers", "name,kind,stripe_id\nstay-20,coupon,coupon_stay20\n") == 1
    assert (await flags(conn, "offers", "name"))["stay-20"] is False


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        (
            "plans",
            "plan,stripe_price_id,active,self_serve\npro,price_pro,true,false\nb,price_b,true,yes\n",
            "plans.csv line 3, column self_serve: must be true or false (got 'yes')",
        ),
        (
            "offers",
            "name,kind,stripe_id,self_serve\no,coupon,c1,TRUE\n",
            "offers.csv line 2, column self_serve: must be true or false (got 'TRUE')",
        ),
        (
            "profiles",
            "name,configuration_id,on_behalf_of,default_return_url,is_default,self_serve\n"
            "p,bpc_p,,,false\n",
            "profiles.csv line 2, column self_serve: missing: the line has 5 fields, the header 6",
        ),
        (
            "plans",
            "plan,stripe_price_id,active,self_serv\npro,price_pro,true,true\n",
            "plans.csv line 1, column 4: expected self_serve, got 'self_serv'",
        ),
        (
            "offers",
            "name,kind,stripe_id,self_serve,extra\no,coupon,c1,true,x\n",
            "offers.csv line 1, column 5: unexpected extra column 'extra'",
        ),
    ],
    ids=["bad value", "upper case", "short row", "misspelt header", "extra column"],
)
async def test_import_errors_name_line_and_column(
    run_import: Any, conn: asyncpg.Connection, kind: str, text: str, message: str
) -> None:
    before = await flags(conn, "plans", "plan")
    with pytest.raises(ImportFailed) as failed:
        await run_import(kind, text)
    assert str(failed.value).startswith(message), str(failed.value)
    assert await flags(conn, "plans", "plan") == before


# --- rate-limited refusals: one row a minute, every one logged and counted --------


class Clock:
    """A monotonic clock that moves only when told: no refill, no sleeps."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    with tee(buffer):
        yield buffer


def audit_lines(buffer: io.StringIO, principal_id: str) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in buffer.getvalue().splitlines()]
    return [
        line
        for line in lines
        if line.get("logger") == "audit" and line.get("principal_id") == principal_id
    ]


async def refused(resp: ClientResponse) -> None:
    await problem(resp, 429, "rate_limited")
    assert int(resp.headers["Retry-After"]) >= 1


async def test_hammering_past_the_limit_writes_one_row_per_window(
    service: Any, conn: asyncpg.Connection, token: str, captured: io.StringIO
) -> None:
    limit, hammering = 3, 40
    clock = Clock()
    service.app[keys.RATE_LIMITER].local._clock = clock
    tiny = await create_client_token(conn, "tiny", rate_limit=limit)
    body = {"user_id": "u_42"}

    for _ in range(limit):
        await created(await post_session(service, body, tiny))
    for _ in range(hammering):
        await refused(await post_session(service, body, tiny))
    # Other principals are neither limited nor counted against it.
    await created(await post_session(service, body, token))

    query = "SELECT request_id FROM audit_events WHERE principal_id = 'tiny' AND http_status = 429"
    rows = await conn.fetch(query)
    assert len(rows) == 1
    lines = audit_lines(captured, "tiny")
    limited = [line for line in lines if line["error_code"] == "rate_limited"]
    assert len(limited) == hammering
    assert all(line["outcome"] == "refused" and line["http_status"] == 429 for line in limited)
    # The stored one is the first refusal; every other line says it has no row.
    assert limited[0]["request_id"] == rows[0]["request_id"]
    assert "stored" not in limited[0]
    assert [line["stored"] for line in limited[1:]] == [False] * (hammering - 1)
    errors = "portal_gateway_session_errors_total"
    assert await metric_value(service, errors, code="rate_limited") == hammering
    audit = "portal_gateway_audit_events_total"
    assert await metric_value(service, audit, outcome="refused") == hammering

    # A minute later the bucket is full again and the next window has its one row.
    clock.now += REFUSAL_ROW_WINDOW_SECONDS + 1
    for _ in range(limit):
        await created(await post_session(service, body, tiny))
    for _ in range(5):
        await refused(await post_session(service, body, tiny))
    assert len(await conn.fetch(query)) == 2
    assert await metric_value(service, errors, code="rate_limited") == hammering + 5


def test_refusal_windows_are_per_principal_and_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    assert limiter.first_refusal_of_window("client:a")
    assert not limiter.first_refusal_of_window("client:a")
    assert limiter.first_refusal_of_window("user:b")  # its own window
    clock.now += REFUSAL_ROW_WINDOW_SECONDS - 0.001
    assert not limiter.first_refusal_of_window("client:a")
    clock.now += 0.001
    assert limiter.first_refusal_of_window("client:a")
    # Closed windows are dropped with idle buckets: memory follows the active principals.
    clock.now += 3600
    for i in range(2048):
        limiter.try_acquire(f"client:{i % 2}", 600)
    assert set(limiter._refusal_windows) == set()
