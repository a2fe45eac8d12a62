"""§6: one audit row per decided request, written before the response; never a URL or token."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from tests.conftest import STRIPE_TEST_KEY, Standin
from tests.helpers import created, post_session, problem

pytestmark = pytest.mark.usefixtures("world")


async def _rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM audit_events ORDER BY id")


async def test_created_session_is_audited(
    service: Any, token: str, conn: Any, standin: Standin
) -> None:
    resp = await post_session(
        service,
        {"user_id": "u_42", "flow": {"type": "subscription_cancel"}},
        token,
        {"X-Request-ID": "req-audit-1", "User-Agent": "billing-ui/1.0"},
    )
    body = await created(resp)
    (row,) = await _rows(conn)
    stripe_request = standin.requests()[0]
    assert row["request_id"] == "req-audit-1"
    assert (row["principal_type"], row["principal_id"]) == ("client", "billing-frontend")
    assert row["user_id"] == "u_42"
    assert row["action"] == "portal_session.create"
    assert row["flow"] == "subscription_cancel"
    assert (row["outcome"], row["http_status"], row["error_code"]) == ("created", 201, None)
    assert row["stripe_customer_id"] == "cus_42"
    assert row["stripe_session_id"] == body["id"]
    assert row["stripe_request_id"] == stripe_request.request_id
    assert str(row["client_ip"]) == "127.0.0.1"
    assert row["user_agent"] == "billing-ui/1.0"
    assert row["duration_ms"] > 0
    flat = " ".join(str(v) for v in row.values())
    assert body["url"] not in flat
    assert token not in flat
    assert STRIPE_TEST_KEY not in flat


@pytest.mark.parametrize(
    ("req", "status", "code"),
    [
        ({"user_id": "nobody"}, 404, "unknown_user"),
        ({"user_id": "u_42", "locale": "xx"}, 422, "validation_failed"),
        (
            {"user_id": "u_two", "flow": {"type": "subscription_cancel"}},
            409,
            "subscription_ambiguous",
        ),
        (
            {"user_id": "u_42", "return_url": "https://evil.example.net/"},
            403,
            "return_url_not_allowed",
        ),
    ],
)
async def test_refused_request_is_audited(
    service: Any, token: str, conn: Any, req: dict[str, Any], status: int, code: str
) -> None:
    await problem(await post_session(service, req, token), status, code)
    (row,) = await _rows(conn)
    assert (row["outcome"], row["http_status"], row["error_code"]) == ("refused", status, code)
    assert row["principal_id"] == "billing-frontend"


async def test_upstream_failure_is_audited_with_stripe_request_id(
    service: Any, token: str, conn: Any, standin: Standin
) -> None:
    standin.state.missing_ids.add("cus_42")
    body = await problem(
        await post_session(service, {"user_id": "u_42"}, token), 502, "upstream_rejected"
    )
    assert body["upstream"]["code"] == "resource_missing"
    (row,) = await _rows(conn)
    assert (row["outcome"], row["http_status"], row["error_code"]) == (
        "failed",
        502,
        "upstream_rejected",
    )
    assert row["stripe_request_id"] == standin.requests()[0].request_id
    assert row["stripe_request_id"] == body["upstream"]["request_id"]


async def test_unauthenticated_gets_no_row(service: Any, conn: Any) -> None:
    await problem(
        await post_session(service, {"user_id": "u_42"}, "pgw_unknown"), 401, "unauthenticated"
    )
    assert await _rows(conn) == []


async def test_rows_are_append_only(service: Any, token: str, conn: Any) -> None:
    await created(await post_session(service, {"user_id": "u_42"}, token))
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await conn.execute("UPDATE audit_events SET http_status = 200")
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await conn.execute("DELETE FROM audit_events")
    assert len(await _rows(conn)) == 1


async def test_no_url_without_audit_row(
    service: Any, token: str, conn: Any, standin: Standin
) -> None:
    # Make the audit insert fail while everything else works.
    await conn.execute("REVOKE INSERT ON audit_events FROM PUBLIC")
    await conn.execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'disk full' USING ERRCODE = 'disk_full'; END $$"
    )
    await conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION refuse()"
    )
    resp = await post_session(service, {"user_id": "u_42"}, token)
    text = await resp.text()
    assert "billing.stripe.com" not in text
    assert resp.status == 503, text
    assert (await resp.json())["code"] == "database_unavailable"
    assert len(standin.requests()) == 1  # Stripe was called; its URL was withheld
