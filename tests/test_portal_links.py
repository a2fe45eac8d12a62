"""Portal links (SPEC §13) over real HTTP: made now, opened once at the click.

The browser's side (the page submitting itself, scripts off, the CSP) is in
tests/test_portal_links_browser.py; here every answer is checked as bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import jwt
import orjson
import pytest
from aiohttp import ClientResponse

from service.link_pages import CONTENT_SECURITY_POLICY
from service.schemas import PortalLinkSchema
from tests.conftest import Standin, create_client_token
from tests.helpers import metric_value, problem

pytestmark = pytest.mark.usefixtures("world")

LINKS = "/v1/portal-links"
PUBLIC = "https://billing-gw.example.com/edge"
TOKEN_IN_URL = re.compile(rf"^{re.escape(PUBLIC)}/v1/portal-links/([A-Za-z0-9_-]{{43}})$")
ISSUER, AUDIENCE = "https://id.example.com/", "portal-gateway"
JWT_SECRET = "portal-links-test-secret-0123456789abcdef"
JWT_ENV = {
    "JWT_HS256_SECRET": JWT_SECRET,
    "JWT_ISSUER": ISSUER,
    "JWT_AUDIENCE": AUDIENCE,
    "JWT_ALGORITHMS": "HS256",
}


def user_token(sub: str) -> str:
    now = int(time.time())
    claims = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


@pytest.fixture
async def gateway(make_service: Any) -> Any:
    return await make_service(PUBLIC_BASE_URL=PUBLIC, **JWT_ENV)


async def make_link(client: Any, body: Any, token: str | None, **headers: str) -> ClientResponse:
    all_headers = {"Content-Type": "application/json", **headers}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    return await client.post(LINKS, data=orjson.dumps(body), headers=all_headers)


async def new_link(client: Any, body: Any, token: str) -> str:
    """Make a link; assert the documented 201; return the path a browser opens."""
    resp = await make_link(client, body, token)
    text = await resp.text()
    assert resp.status == 201, text
    assert resp.headers["Cache-Control"] == "no-store"
    answer = orjson.loads(text)
    assert PortalLinkSchema().validate(answer) == {}, answer
    assert TOKEN_IN_URL.match(answer["url"]), answer["url"]
    return urlsplit(answer["url"]).path.removeprefix("/edge")


def page_headers_hold(resp: ClientResponse) -> None:
    assert resp.headers["Content-Type"].startswith("text/html")
    assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def click(client: Any, path: str, **headers: str) -> ClientResponse:
    return await client.post(path, allow_redirects=False, headers=headers)


def sessions(standin: Standin) -> list[Any]:
    return [r for r in standin.requests() if r.status == 200]


# --- creation ------------------------------------------------------------------------


async def test_a_link_is_made_without_calling_stripe_and_stored_hashed(
    gateway: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    before = time.time()
    resp = await make_link(
        gateway, {"user_id": "u_42", "flow": {"type": "subscription_cancel"}}, token
    )
    answer = await resp.json()
    assert resp.status == 201
    assert before + 600 - 5 <= answer["expires_at"] <= time.time() + 600 + 1
    secret = TOKEN_IN_URL.match(answer["url"]).group(1)  # type: ignore[union-attr]
    assert standin.state.requests == []
    row = await conn.fetchrow("SELECT * FROM portal_links")
    assert row is not None
    assert bytes(row["token_hash"]) == hashlib.sha256(secret.encode()).digest()
    assert secret not in str(dict(row))
    assert (row["principal_type"], row["principal_id"], row["user_id"]) == (
        "client",
        "billing-frontend",
        "u_42",
    )
    assert row["return_url"] == "https://app.example.com/account"
    audit = await conn.fetchrow("SELECT * FROM audit_events")
    assert audit is not None
    assert (audit["action"], audit["outcome"], audit["user_id"], audit["flow"]) == (
        "portal_link_create",
        "created",
        "u_42",
        "subscription_cancel",
    )
    assert orjson.loads(audit["detail"])["link_id"] == row["id"]
    assert secret not in str(dict(audit))
    assert await metric_value(gateway, "portal_gateway_portal_links_total", event="created") == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"user_id": "u_nobody"}, 404, "unknown_user"),
        (
            {"user_id": "u_42", "return_url": "https://evil.example.net/"},
            403,
            "return_url_not_allowed",
        ),
        ({"user_id": "u_42", "flow": {"type": "nope"}}, 422, "validation_failed"),
        (
            {"user_id": "u_two", "flow": {"type": "subscription_cancel"}},
            409,
            "subscription_ambiguous",
        ),
        ({"user_id": "u_42", "portal": "no-such-portal"}, 404, "unknown_portal"),
    ],
)
async def test_errors_come_at_creation_and_leave_no_link(
    gateway: Any, token: str, conn: asyncpg.Connection, body: Any, status: int, code: str
) -> None:
    await problem(await make_link(gateway, body, token), status, code)
    assert await conn.fetchval("SELECT count(*) FROM portal_links") == 0


async def test_creation_needs_the_session_scope_and_a_token(
    gateway: Any, token: str, conn: asyncpg.Connection
) -> None:
    reader = await create_client_token(conn, "reader", scopes=("mappings:read",))
    await problem(await make_link(gateway, {"user_id": "u_42"}, None), 401, "unauthenticated")
    await problem(await make_link(gateway, {"user_id": "u_42"}, reader), 403, "insufficient_scope")
    await problem(
        await make_link(gateway, {"user_id": "u_42"}, token, **{"Idempotency-Key": "k" * 256}),
        400,
        "invalid_header",
    )
    assert await conn.fetchval("SELECT count(*) FROM portal_links") == 0


async def test_without_public_base_url_links_are_off(
    make_service: Any, token: str, conn: asyncpg.Connection
) -> None:
    service = await make_service()
    body = await problem(
        await make_link(service, {"user_id": "u_42"}, token), 501, "portal_links_disabled"
    )
    assert "PUBLIC_BASE_URL" in body["detail"]
    assert await conn.fetchval("SELECT count(*) FROM portal_links") == 0


async def test_an_end_user_makes_links_for_itself_only(gateway: Any, standin: Standin) -> None:
    await problem(
        await make_link(gateway, {"user_id": "u_7"}, user_token("u_42")), 403, "forbidden_user"
    )
    path = await new_link(gateway, {}, user_token("u_42"))
    resp = await click(gateway, path)
    assert resp.status == 303, await resp.text()
    (sent,) = sessions(standin)
    assert sent.params["customer"] == "cus_42"


# --- the page --------------------------------------------------------------------------


async def test_the_page_changes_nothing_and_submits_itself(
    gateway: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    path = await new_link(gateway, {"user_id": "u_42"}, token)
    for _ in range(3):  # a scanner, a chat preview, the person
        resp = await gateway.get(path)
        page = await resp.text()
        assert resp.status == 200, page
        page_headers_hold(resp)
    assert '<form id="open-form" method="post" action="">' in page
    assert '<button id="open" type="submit">' in page
    assert "<script>" in page
    # Nothing from anywhere: no src, no href, no url() in the page.
    assert not re.search(r"\b(src|href)=|url\(", page)
    assert standin.state.requests == []
    assert await conn.fetchval("SELECT opened_at FROM portal_links") is None
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 1  # the creation only
    assert await metric_value(gateway, "portal_gateway_portal_links_total", event="viewed") == 3
    assert (await click(gateway, path)).status == 303


# --- the click --------------------------------------------------------------------------


async def test_the_click_opens_the_session_and_redirects_once(
    gateway: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    body = {"user_id": "u_42", "flow": {"type": "subscription_cancel"}, "locale": "de"}
    path = await new_link(gateway, body, token)
    resp = await click(gateway, path, **{"User-Agent": "Mozilla/5.0 (clicker)"})
    assert resp.status == 303, await resp.text()
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    (sent,) = sessions(standin)
    assert resp.headers["Location"].startswith("https://billing.stripe.com/p/session/")
    # Exactly what POST /v1/portal-sessions would have sent for this body.
    assert sent.params == {
        "customer": "cus_42",
        "configuration": "bpc_default1",
        "locale": "de",
        "return_url": "https://app.example.com/account",
        "flow_data": {
            "type": "subscription_cancel",
            "subscription_cancel": {"subscription": "sub_42a"},
        },
    }
    opened = await conn.fetchrow("SELECT * FROM audit_events WHERE action = 'portal_link_open'")
    assert opened is not None
    assert (opened["principal_type"], opened["principal_id"], opened["user_id"]) == (
        "client",
        "billing-frontend",
        "u_42",
    )
    assert (opened["outcome"], opened["http_status"], opened["flow"]) == (
        "created",
        303,
        "subscription_cancel",
    )
    assert opened["stripe_session_id"].startswith("bps_")
    assert opened["user_agent"] == "Mozilla/5.0 (clicker)"
    assert str(opened["client_ip"]) == "127.0.0.1"

    again = await click(gateway, path)
    assert again.status == 410
    page_headers_hold(again)
    text = await again.text()
    assert "used already" in text
    assert 'id="back" href="https://app.example.com/account"' in text
    viewed = await gateway.get(path)
    assert viewed.status == 410
    assert "used already" in await viewed.text()
    as_json = await problem(
        await click(gateway, path, Accept="application/json"), 410, "portal_link_used"
    )
    assert as_json["return_url"] == "https://app.example.com/account"
    assert len(sessions(standin)) == 1
    # One row for the creation, one for the open: the refused clicks are anonymous.
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 2
    assert await metric_value(gateway, "portal_gateway_portal_links_total", event="opened") == 1
    assert await metric_value(gateway, "portal_gateway_portal_links_total", event="used") == 3


async def test_concurrent_clicks_open_one_session(
    gateway: Any, token: str, standin: Standin
) -> None:
    path = await new_link(gateway, {"user_id": "u_42"}, token)
    answers = await asyncio.gather(*(click(gateway, path) for _ in range(12)))
    assert sorted(r.status for r in answers) == [303] + [410] * 11
    assert len(sessions(standin)) == 1


async def test_unknown_and_malformed_tokens_are_404(gateway: Any) -> None:
    for path in (f"{LINKS}/{'A' * 43}", f"{LINKS}/short", f"{LINKS}/{'%E2%80%AE' * 15}"):
        for method in ("GET", "POST"):
            resp = await gateway.request(method, path, allow_redirects=False)
            assert resp.status == 404, (method, path)
            page_headers_hold(resp)
            assert 'id="back"' not in await resp.text()
        await problem(
            await click(gateway, path, Accept="application/json"), 404, "portal_link_not_found"
        )


async def test_an_expired_link_is_410(
    gateway: Any, token: str, conn: asyncpg.Connection, standin: Standin
) -> None:
    path = await new_link(gateway, {"user_id": "u_42"}, token)
    await conn.execute(
        "UPDATE portal_links SET created_at = now() - interval '2 hours',"
        " expires_at = now() - interval '1 second'"
    )
    await problem(await click(gateway, path, Accept="application/json"), 410, "portal_link_expired")
    page = await gateway.get(path)
    assert page.status == 410
    assert "expired" in await page.text()
    assert sessions(standin) == []


async def test_a_revoked_client_takes_its_links_with_it(
    gateway: Any, token: str, conn: asyncpg.Connection, standin: Standin
) -> None:
    path = await new_link(gateway, {"user_id": "u_42"}, token)
    await conn.execute("UPDATE api_clients SET revoked_at = now()")
    await problem(await click(gateway, path, Accept="application/json"), 410, "portal_link_revoked")
    assert sessions(standin) == []


async def test_the_click_resolves_again(
    gateway: Any, token: str, conn: asyncpg.Connection, standin: Standin
) -> None:
    path = await new_link(gateway, {"user_id": "u_42"}, token)
    await conn.execute(
        "UPDATE customers SET stripe_customer_id = 'cus_42new' WHERE user_id = 'u_42'"
    )
    assert (await click(gateway, path)).status == 303
    (sent,) = sessions(standin)
    assert sent.params["customer"] == "cus_42new"


async def test_a_failed_click_gives_the_link_back(
    gateway: Any, token: str, conn: asyncpg.Connection, standin: Standin
) -> None:
    path = await new_link(gateway, {"user_id": "u_42"}, token)
    # The mapping went away between creation and click: a page, not a session.
    saved = await conn.fetchrow("SELECT * FROM customers WHERE user_id = 'u_42'")
    await conn.execute("DELETE FROM subscriptions WHERE user_id = 'u_42'")
    await conn.execute("DELETE FROM customers WHERE user_id = 'u_42'")
    gone = await click(gateway, path)
    assert gone.status == 404
    page_headers_hold(gone)
    assert 'id="back" href="https://app.example.com/account"' in await gone.text()
    await conn.execute(
        "INSERT INTO customers (user_id, stripe_customer_id, locale) VALUES ($1, $2, $3)",
        saved["user_id"],
        saved["stripe_customer_id"],
        saved["locale"],
    )
    # Stripe fails every attempt: the link is given back again.
    standin.state.queue_faults([{"status": 500, "headers": {"Stripe-Should-Retry": "false"}}])
    failed = await click(gateway, path)
    assert failed.status == 503
    assert "try again" in await failed.text()
    assert await conn.fetchval("SELECT opened_at FROM portal_links") is None
    assert (await click(gateway, path)).status == 303
    outcomes = await conn.fetch(
        "SELECT http_status, error_code FROM audit_events WHERE action = 'portal_link_open'"
        " ORDER BY occurred_at"
    )
    assert [(r["http_status"], r["error_code"]) for r in outcomes] == [
        (404, "unknown_user"),
        (503, "upstream_unavailable"),
        (303, None),
    ]
    assert await metric_value(gateway, "portal_gateway_portal_links_total", event="failed") == 2


async def test_views_and_clicks_are_rate_limited_per_client_ip(
    make_service: Any, token: str, standin: Standin
) -> None:
    service = await make_service(PUBLIC_BASE_URL=PUBLIC, PORTAL_LINK_OPENS_PER_MINUTE="3")
    path = await new_link(service, {"user_id": "u_42"}, token)
    assert [(await service.get(path)).status for _ in range(3)] == [200, 200, 200]
    limited = await click(service, path)
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    page_headers_hold(limited)
    await problem(
        await service.get(path, headers={"Accept": "application/json"}), 429, "rate_limited"
    )
    assert sessions(standin) == []
    # Creating links is the caller's own limit, not the clicker's.
    await new_link(service, {"user_id": "u_42"}, token)


def test_public_base_url_is_validated() -> None:
    from service.config import ConfigError, Settings

    base = {"STRIPE_API_KEY": "sk_test_x"}
    for bad in (
        "ftp://x.example.com",
        "http://gw.example.com",
        "https://user:pw@gw.example.com",
        "https://gw.example.com/?a=1",
        "https://gw.example.com/#x",
        "https://gw.example.com:99999",
        "gw.example.com",
    ):
        with pytest.raises(ConfigError, match="PUBLIC_BASE_URL"):
            Settings.from_env({**base, "PUBLIC_BASE_URL": bad})
    for good, kept in (
        ("https://gw.example.com/", "https://gw.example.com"),
        ("https://[2001:db8::1]:8443/billing", "https://[2001:db8::1]:8443/billing"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
    ):
        assert Settings.from_env({**base, "PUBLIC_BASE_URL": good}).public_base_url == kept
    with pytest.raises(ConfigError, match="PORTAL_LINK_TTL_SECONDS"):
        Settings.from_env({**base, "PORTAL_LINK_TTL_SECONDS": "86401"})


@pytest.mark.parametrize(
    ("url", "from_stripe", "from_loopback"),
    [
        ("https://billing.stripe.com/p/session/test_abc", True, True),
        ("http://127.0.0.1:4242/p/session/test_abc", False, True),
        ("http://[::1]:4242/p/session/test_abc", False, True),
        ("http://billing.stripe.com/p/session/test_abc", False, False),
        ("http://127.0.0.1:80@evil.example/p/session/x", False, False),
        ("http://127.0.0.1.evil.example/p/session/x", False, False),
        ("javascript:alert(1)", False, False),
        ("http://[::1/p", False, False),
    ],
)
def test_the_redirect_goes_to_https_or_a_stand_in_on_this_machine(
    url: str, from_stripe: bool, from_loopback: bool
) -> None:
    """The 303 goes where the upstream's session says: an https URL; plain http to
    loopback only when the upstream itself is on loopback (a stand-in), never Stripe."""
    from service.stripe.client import _is_session

    body = {"id": "bps_1", "url": url, "created": 1}
    assert _is_session(body) is from_stripe
    assert _is_session(body, loopback_upstream=True) is from_loopback
