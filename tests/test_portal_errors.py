"""Every documented refusal of §2: the right status and code, and Stripe is never asked."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from service.logs import tee
from tests.conftest import Standin, create_client_token
from tests.helpers import PATH, post_session, problem

pytestmark = pytest.mark.usefixtures("world")


@pytest.fixture(autouse=True)
def _stripe_untouched(standin: Standin) -> Any:
    """None of these requests may reach Stripe."""
    yield
    assert standin.requests() == []


@pytest.mark.parametrize(
    ("req", "code"),
    [
        ({"user_id": "nobody"}, "unknown_user"),
        ({"user_id": "u_42", "portal": "nope"}, "unknown_portal"),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_cancel", "subscription": "nope"}},
            "unknown_subscription",
        ),
        (  # another user's ref: same answer as a made-up one
            {"user_id": "u_7", "flow": {"type": "subscription_cancel", "subscription": "old-plan"}},
            "unknown_subscription",
        ),
        (  # another user's Stripe id
            {"user_id": "u_7", "flow": {"type": "subscription_update", "subscription": "sub_42a"}},
            "unknown_subscription",
        ),
        ({"user_id": "u_none", "flow": {"type": "subscription_cancel"}}, "no_open_subscription"),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_update_confirm", "plan": "nope"}},
            "unknown_plan",
        ),
        (  # inactive plan
            {"user_id": "u_42", "flow": {"type": "subscription_update_confirm", "plan": "legacy"}},
            "unknown_plan",
        ),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_cancel", "retention_offer": "x"}},
            "unknown_offer",
        ),
        (
            {
                "user_id": "u_42",
                "flow": {"type": "subscription_update_confirm", "quantity": 2, "discount": "x"},
            },
            "unknown_offer",
        ),
    ],
)
async def test_not_found(service: Any, token: str, req: dict[str, Any], code: str) -> None:
    await problem(await post_session(service, req, token), 404, code)


async def test_ambiguous_lists_candidates(service: Any, token: str) -> None:
    body = await problem(
        await post_session(
            service, {"user_id": "u_two", "flow": {"type": "subscription_update"}}, token
        ),
        409,
        "subscription_ambiguous",
    )
    assert sorted(body["subscriptions"]) == ["first", "second"]


async def test_canceled_subscription_named_is_not_open(service: Any, token: str) -> None:
    req = {"user_id": "u_42", "flow": {"type": "subscription_cancel", "subscription": "old-plan"}}
    await problem(await post_session(service, req, token), 409, "subscription_not_open")


async def test_multi_item_subscription_not_updatable(service: Any, token: str) -> None:
    req = {"user_id": "u_multi", "flow": {"type": "subscription_update_confirm", "quantity": 2}}
    await problem(await post_session(service, req, token), 409, "subscription_not_updatable")


async def test_retention_offer_must_be_a_coupon(service: Any, token: str) -> None:
    req = {
        "user_id": "u_42",
        "flow": {"type": "subscription_cancel", "retention_offer": "spring-promo"},
    }
    body = await problem(await post_session(service, req, token), 422, "validation_failed")
    assert list(body["errors"]) == ["flow.retention_offer"]


@pytest.mark.parametrize(
    ("req", "field"),
    [
        ({"user_id": "u_42", "extra": 1}, "extra"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "x" * 129}, "user_id"),
        ({"user_id": 42}, "user_id"),
        ({}, "user_id"),  # required for service clients
        ({"user_id": "u_42", "locale": "xx"}, "locale"),
        ({"user_id": "u_42", "locale": None}, "locale"),
        ({"user_id": "u_42", "flow": {"type": "nope"}}, "flow.type"),
        ({"user_id": "u_42", "flow": {}}, "flow.type"),
        ({"user_id": "u_42", "flow": {"type": "subscription_cancel", "bogus": 1}}, "flow.bogus"),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_update_confirm", "quantity": "5"}},
            "flow.quantity",
        ),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_update_confirm", "quantity": True}},
            "flow.quantity",
        ),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_update_confirm", "quantity": 0}},
            "flow.quantity",
        ),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_update_confirm", "quantity": 10001}},
            "flow.quantity",
        ),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_update_confirm", "quantity": 2.5}},
            "flow.quantity",
        ),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_cancel", "plan": "pro-yearly"}},
            "flow.plan",
        ),
        (
            {"user_id": "u_42", "flow": {"type": "payment_method_update", "subscription": "x"}},
            "flow.subscription",
        ),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_update", "retention_offer": "x"}},
            "flow.retention_offer",
        ),
        (
            {"user_id": "u_42", "flow": {"type": "subscription_cancel", "discount": "x"}},
            "flow.discount",
        ),
        ({"user_id": "u_42", "flow": {"type": "subscription_update_confirm"}}, "flow"),
        (
            {
                "user_id": "u_42",
                "flow": {"type": "payment_method_update", "after_completion": {"type": "redirect"}},
            },
            "flow.after_completion.return_url",
        ),
        (
            {
                "user_id": "u_42",
                "flow": {
                    "type": "payment_method_update",
                    "after_completion": {"type": "hosted_confirmation", "message": "x" * 501},
                },
            },
            "flow.after_completion.message",
        ),
        (
            {
                "user_id": "u_42",
                "flow": {
                    "type": "payment_method_update",
                    "after_completion": {"type": "portal_homepage", "message": "hi"},
                },
            },
            "flow.after_completion.message",
        ),
        ({"user_id": "u_42", "return_url": "not a url"}, "return_url"),
        ({"user_id": "u_42", "return_url": "/relative/path"}, "return_url"),
        (["not", "an", "object"], "body"),
    ],
)
async def test_validation(service: Any, token: str, req: Any, field: str) -> None:
    body = await problem(await post_session(service, req, token), 422, "validation_failed")
    assert field in body["errors"], body["errors"]
    assert all(isinstance(m, str) for msgs in body["errors"].values() for m in msgs)


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.net/account",
        "https://app.example.com.evil.com/",
        "https://app.example.com@evil.com/",
        "http://app.example.com/account",
        "//evil.example.net/",
        "https://app.example.com:444/",
    ],
)
async def test_return_url_not_allowed(service: Any, token: str, url: str) -> None:
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
        body = await problem(await post_session(service, req, token), 403, "return_url_not_allowed")
        assert url not in body["detail"]


async def test_unknown_token_is_401_without_detail(service: Any) -> None:
    bodies = []
    for header in (None, "Bearer", "Bearer ", "Basic abc", "Bearer pgw_nope", "Bearer garbage"):
        headers = {"Content-Type": "application/json"}
        if header is not None:
            headers["Authorization"] = header
        resp = await service.post(PATH, data=b'{"user_id": "u_42"}', headers=headers)
        body = await problem(resp, 401, "unauthenticated")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        bodies.append({k: v for k, v in body.items() if k != "request_id"})
    assert all(b == bodies[0] for b in bodies)  # never says which check failed


async def test_insufficient_scope(service: Any, conn: Any) -> None:
    other = await create_client_token(conn, "reporting", scopes=("reports:read",))
    await problem(
        await post_session(service, {"user_id": "u_42"}, other), 403, "insufficient_scope"
    )


async def test_wrong_media_type(service: Any, token: str) -> None:
    resp = await service.post(
        PATH,
        data="user_id=u_42",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    await problem(resp, 415, "unsupported_media_type")


async def test_body_too_large(service: Any, token: str) -> None:
    big = b'{"user_id": "' + b"x" * (17 * 1024) + b'"}'
    await problem(await post_session(service, big, token), 413, "payload_too_large")


async def test_body_too_large_chunked(service: Any, token: str) -> None:
    async def chunks() -> Any:
        for _ in range(20):
            yield b" " * 1024

    resp = await service.post(
        PATH,
        data=chunks(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    await problem(resp, 413, "payload_too_large")


@pytest.mark.parametrize("raw", [b"{", b"", b"nul", b'{"user_id": "u_42",}', b"\xff\xfe"])
async def test_malformed_json(service: Any, token: str, raw: bytes) -> None:
    await problem(await post_session(service, raw, token), 400, "malformed_json")


async def test_deeply_nested_json_refused_cleanly(service: Any, token: str) -> None:
    raw = b'{"user_id": "u_42", "flow": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    resp = await post_session(service, raw, token)
    assert resp.status in (400, 422)
    assert resp.headers["Content-Type"].startswith("application/problem+json")


# An invalid X-Request-ID is replaced, not refused (SPEC §2): tests/test_headers.py.
@pytest.mark.parametrize("headers", [{"Idempotency-Key": "é"}])
async def test_invalid_headers(service: Any, token: str, headers: dict[str, str]) -> None:
    await problem(
        await post_session(service, {"user_id": "u_42"}, token, headers), 400, "invalid_header"
    )


async def test_request_id_is_echoed_or_generated(service: Any, token: str) -> None:
    resp = await post_session(
        service, {"user_id": "nobody"}, token, {"X-Request-ID": "abc-123:x.y"}
    )
    body = await problem(resp, 404, "unknown_user")
    assert body["request_id"] == "abc-123:x.y"
    resp = await service.get("/nope")
    body = await problem(resp, 404, "not_found")
    assert len(resp.headers["X-Request-ID"]) >= 16


async def test_wrong_method_is_problem_json(service: Any) -> None:
    resp = await service.get(PATH)
    await problem(resp, 405, "method_not_allowed")
    assert "POST" in resp.headers["Allow"]


async def _metric(service: Any, needle: str) -> bool:
    return needle in await (await service.get("/metrics")).text()


async def _send_partial_body(service: Any, token: str) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_connection(service.host, service.port)
    writer.write(
        (
            f"POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            '{"user_id": "u_'
        ).encode()
    )
    await writer.drain()
    return writer


async def test_caller_hanging_up_mid_body_is_decided_not_crashed(
    service: Any, token: str, conn: Any
) -> None:
    with tee(io.StringIO()) as log:
        writer = await _send_partial_body(service, token)
        # Once the token lookup has run, the service is waiting for the rest of the body.
        needle = 'portal_gateway_db_query_duration_seconds_count{query="find_client"} 1.0'
        for _ in range(200):
            if await _metric(service, needle):
                break
            await asyncio.sleep(0.01)
        writer.transport.abort()  # RST, not a clean close
        row = None
        for _ in range(200):  # bounded poll: the row is written after the hang-up
            row = await conn.fetchrow("SELECT http_status, error_code FROM audit_events")
            if row is not None:
                break
            await asyncio.sleep(0.01)
    assert row is not None, log.getvalue()
    # aiohttp either cancels the handler or fails the read: a 499 either way, recorded.
    assert (row["http_status"], row["error_code"]) == (499, "client_closed_request")
    assert "unhandled_exception" not in log.getvalue()


async def test_caller_hanging_up_at_once_is_logged_as_499(service: Any, token: str) -> None:
    with tee(io.StringIO()) as log:
        writer = await _send_partial_body(service, token)
        writer.transport.abort()
        needle = 'status="499"'
        for _ in range(200):
            if await _metric(service, needle) or '"status":400' in log.getvalue():
                break
            await asyncio.sleep(0.01)
    text = log.getvalue()
    assert '"status":500' not in text
    assert "unhandled_exception" not in text
