"""The attack matrix of §5: open redirects, other users' subscriptions, rate limits, CORS."""

from __future__ import annotations

from typing import Any

import pytest

from service.return_urls import ReturnUrlMalformed, ReturnUrlNotAllowed, check_return_url
from tests.conftest import Standin, create_client_token
from tests.helpers import PATH, created, post_session, problem

pytestmark = pytest.mark.usefixtures("world")
ALLOW = ("https://app.example.com", "https://billing.example.org:8443")

# Each of these must never become a redirect target. Some are malformed (422),
# the rest well-formed URLs of the wrong origin (403).
OPEN_REDIRECTS = [
    "//evil.example.net/",
    "///evil.example.net/",
    "https:evil.example.net",
    "https:/evil.example.net/",
    "https://evil.example.net/app.example.com",
    "https://app.example.com.evil.com/",
    "https://app.example.com@evil.com/",
    "https://user:pass@app.example.com/",
    "https://app.example.com%40evil.com/",
    "https://evil.com#@app.example.com/",
    "https://evil.com?@app.example.com/",
    "https://evil.com\\@app.example.com/",
    "https://app.example.com\\@evil.com/",
    "https:\\\\evil.example.net",
    "https://app.example.com\t.evil.com/",
    "https://app.exam\nple.com/",
    " https://app.example.com/",
    "javascript:alert(1)",
    "javascript://app.example.com/%0aalert(1)",
    "JaVaScRiPt:alert(document.domain)",
    "data:text/html,<script>alert(1)</script>",
    "vbscript:msgbox(1)",
    # Brackets and ports: urlsplit raises on some of these; each must be a 4xx.
    "https://[::1/",
    "https://[::1]evil.com:8443/x",
    "https://[::1]:8443@evil.com/",
    "https://app.example.com]/",
    "https://[app.example.com]/",
    "https://[fe80::1%25eth0]/",
    "https://app.example.com:99999/",
    "https://app.example.com:8443x/",
    "https://billing.example.org:08443x/",
    "http://app.example.com/",
    "ftp://app.example.com/",
    "https://app.example.com:8443/",
    "https://app.example.com:0/",
    "https://app.example.com:99999/",
    "https://app.example.com./",
    "https://APP.EXAMPLE.COM.evil.com/",
    "https://\u0430pp.example.com/",  # Cyrillic a, a look-alike
    "https://app.ex\u0430mple.com/",
    "https://xn--pp-8cd.example.com/",  # punycode look-alike
    "https://app%2eexample%2ecom/",
    "https://app.example.com%2f@evil.com/",
    "https://0x7f000001/",
    "https://127.0.0.1/",
    "https://[::1]/",
    "https://billing.example.org/",  # allowed only on :8443
    "/account",
    "app.example.com/account",
    "",
    "https://",
    "https:///app.example.com",
]

LEGIT = [
    "https://app.example.com",
    "https://app.example.com/",
    "https://app.example.com/account?tab=billing&x=%20y#plan",
    "https://APP.example.com/Account",
    "https://app.example.com:443/account",
    "https://billing.example.org:8443/return?from=portal",
]


@pytest.mark.parametrize("url", OPEN_REDIRECTS)
def test_checker_refuses(url: str) -> None:
    with pytest.raises((ReturnUrlMalformed, ReturnUrlNotAllowed)):
        check_return_url(url, ALLOW, allow_http_localhost=False)


@pytest.mark.parametrize("url", LEGIT)
def test_checker_accepts(url: str) -> None:
    assert check_return_url(url, ALLOW, allow_http_localhost=False) == url


def test_http_localhost_only_when_enabled() -> None:
    allow = ("http://localhost:3000",)
    with pytest.raises(ReturnUrlNotAllowed):
        check_return_url("http://localhost:3000/x", allow, allow_http_localhost=False)
    assert check_return_url("http://localhost:3000/x", allow, allow_http_localhost=True)
    with pytest.raises(ReturnUrlNotAllowed):
        check_return_url("http://evil.com/", ("http://evil.com",), allow_http_localhost=True)


async def test_open_redirects_refused_by_the_service_for_both_fields(
    service: Any, token: str, standin: Standin
) -> None:
    for url in OPEN_REDIRECTS:
        for req in (
            {"user_id": "u_42", "return_url": url},
            {
                "user_id": "u_42",
                "flow": {
                    "type": "payment_method_update",
                    "after_completion": {"type": "redirect", "return_url": url},
                },
            },
        ):
            resp = await post_session(service, req, token)
            assert resp.status in (403, 422), (url, resp.status, await resp.text())
            code = (await resp.json())["code"]
            assert code in ("return_url_not_allowed", "validation_failed"), (url, code)
    assert standin.requests() == []


async def test_legit_return_urls_accepted(service: Any, token: str, standin: Standin) -> None:
    for url in LEGIT:
        req = {
            "user_id": "u_42",
            "return_url": url,
            "flow": {
                "type": "payment_method_update",
                "after_completion": {"type": "redirect", "return_url": url},
            },
        }
        await created(await post_session(service, req, token))
    sent = standin.requests()
    assert [r.params["return_url"] for r in sent] == LEGIT


@pytest.mark.parametrize(
    "flow",
    [
        {"type": "subscription_cancel"},
        {"type": "subscription_update"},
        {"type": "subscription_update_confirm", "quantity": 2},
    ],
)
@pytest.mark.parametrize("victim_sub", ["sub_7a", "team-plan-of-u7"])
async def test_user_a_cannot_reach_user_b_subscription(
    service: Any, token: str, standin: Standin, conn: Any, flow: dict[str, Any], victim_sub: str
) -> None:
    # u_none has no subscriptions of its own; u_7 owns sub_7a (ref "team-plan").
    await conn.execute(
        "UPDATE subscriptions SET external_ref = 'team-plan-of-u7'"
        " WHERE stripe_subscription_id = 'sub_7a'"
    )
    req = {"user_id": "u_none", "flow": {**flow, "subscription": victim_sub}}
    await problem(await post_session(service, req, token), 404, "unknown_subscription")
    assert standin.requests() == []


async def test_rate_limit_per_principal(service: Any, conn: Any, token: str) -> None:
    limited = await create_client_token(conn, "tiny", rate_limit=3)
    for _ in range(3):
        await created(await post_session(service, {"user_id": "u_42"}, limited))
    resp = await post_session(service, {"user_id": "u_42"}, limited)
    await problem(resp, 429, "rate_limited")
    assert int(resp.headers["Retry-After"]) >= 1
    # Other principals are unaffected.
    await created(await post_session(service, {"user_id": "u_42"}, token))
    row = await conn.fetchrow("SELECT * FROM audit_events WHERE http_status = 429")
    assert (row["principal_id"], row["error_code"]) == ("tiny", "rate_limited")


async def test_cors_off_by_default(service: Any) -> None:
    resp = await service.options(
        PATH,
        headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
    )
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_only_for_configured_origins(make_service: Any, token: str) -> None:
    service = await make_service(CORS_ALLOWED_ORIGINS="https://app.example.com")
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    }
    ok = await service.options(PATH, headers={"Origin": "https://app.example.com", **preflight})
    assert ok.status == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "AUTHORIZATION" in ok.headers["Access-Control-Allow-Headers"].upper()
    assert "Access-Control-Allow-Credentials" not in ok.headers
    bad = await service.options(PATH, headers={"Origin": "https://evil.example.net", **preflight})
    assert "Access-Control-Allow-Origin" not in bad.headers
    resp = await post_session(
        service, {"user_id": "u_42"}, token, {"Origin": "https://app.example.com"}
    )
    await created(resp)
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "X-Request-ID" in resp.headers["Access-Control-Expose-Headers"]


async def test_oversized_headers_refused(service: Any, token: str) -> None:
    resp = await post_session(service, {"user_id": "u_42"}, token, {"X-Padding": "x" * 20000})
    assert resp.status in (400, 431)
