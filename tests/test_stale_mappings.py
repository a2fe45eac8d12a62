"""When Stripe answers ``resource_missing`` for an id we mapped, the mapping is
marked stale, counted and audited, and a stale subscription is no longer picked
(SPEC §4); the next webhook for it heals it.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest

from tests.conftest import Standin
from tests.helpers import (
    WEBHOOK_SECRET,
    created,
    deliver,
    metric_value,
    post_session,
    problem,
    subscription_event,
)

pytestmark = pytest.mark.usefixtures("world")

STALE_TOTAL = "portal_gateway_stale_mappings_total"


@pytest.fixture
async def service(make_service: Any) -> Any:
    return await make_service(STRIPE_WEBHOOK_SECRETS=WEBHOOK_SECRET)


async def _last_audit_detail(conn: asyncpg.Connection) -> dict[str, Any]:
    raw = await conn.fetchval(
        "SELECT detail FROM audit_events WHERE action = 'portal_session.create'"
        " ORDER BY id DESC LIMIT 1"
    )
    detail: dict[str, Any] = orjson.loads(raw) if raw else {}
    return detail


async def test_missing_customer_is_marked_stale_counted_once_and_audited(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    standin.state.declare_missing(["cus_42"])
    for _ in range(2):
        resp = await post_session(service, {"user_id": "u_42"}, token)
        body = await problem(resp, 502, "upstream_rejected")
        assert (body["upstream"]["code"], body["upstream"]["param"]) == (
            "resource_missing",
            "customer",
        )
        assert "stale" in body["detail"]
        assert "cus_42" not in body["detail"]
    assert await conn.fetchval("SELECT stale_at FROM customers WHERE user_id = 'u_42'")
    # The mapping went stale once, however many requests run into it.
    assert await metric_value(service, STALE_TOTAL, kind="customer") == 1
    detail = await _last_audit_detail(conn)
    assert detail["upstream_code"] == "resource_missing"
    assert detail["stale"]["kind"] == "customer"
    assert detail["stale"]["id"] == "cus_42"
    rows = await conn.fetch("SELECT error_code, detail FROM audit_events ORDER BY id")
    assert [orjson.loads(r["detail"])["stale"]["newly_marked"] for r in rows] == [True, False]


async def test_missing_subscription_goes_stale_is_not_picked_and_a_webhook_heals_it(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    cancel = {"user_id": "u_42", "flow": {"type": "subscription_cancel"}}
    standin.state.declare_missing(["sub_42a"])
    body = await problem(await post_session(service, cancel, token), 502, "upstream_rejected")
    assert body["upstream"]["code"] == "resource_missing"
    assert body["upstream"]["param"] == "flow_data[subscription_cancel][subscription]"
    stale_at = await conn.fetchval(
        "SELECT stale_at FROM subscriptions WHERE stripe_subscription_id = 'sub_42a'"
    )
    assert stale_at is not None
    assert await metric_value(service, STALE_TOTAL, kind="subscription") == 1
    assert (await _last_audit_detail(conn))["stale"]["kind"] == "subscription"

    # Not the default any more, and named explicitly it is not open: Stripe is not asked.
    standin.state.clear_requests()
    await problem(await post_session(service, cancel, token), 404, "no_open_subscription")
    named = {
        "user_id": "u_42",
        "flow": {"type": "subscription_cancel", "subscription": "team-plan"},
    }
    await problem(await post_session(service, named, token), 409, "subscription_not_open")
    assert standin.requests() == []

    # Stripe tells us about the subscription again: the mark is gone, it is used again.
    standin.state.clear_missing()
    event = subscription_event(
        "customer.subscription.updated", "sub_42a", "cus_42", items=[("si_42a", "price_basic", 3)]
    )
    resp = await deliver(service, event)
    assert resp.status == 200, await resp.text()
    await created(await post_session(service, cancel, token))
    (sent,) = standin.requests()
    assert sent.params["flow_data"]["subscription_cancel"] == {"subscription": "sub_42a"}


async def test_missing_item_marks_its_subscription_and_other_ids_mark_nothing(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    standin.state.declare_missing(["si_42a", "coupon_stay20"])
    confirm = {"user_id": "u_42", "flow": {"type": "subscription_update_confirm", "quantity": 4}}
    body = await problem(await post_session(service, confirm, token), 502, "upstream_rejected")
    assert body["upstream"]["param"].endswith("[items][0][id]")
    assert await conn.fetchval(
        "SELECT stale_at FROM subscriptions WHERE stripe_subscription_id = 'sub_42a'"
    )

    # A coupon Stripe does not know is not a customer or subscription mapping.
    retention = {
        "user_id": "u_7",
        "flow": {"type": "subscription_cancel", "retention_offer": "stay-20"},
    }
    body = await problem(await post_session(service, retention, token), 502, "upstream_rejected")
    assert body["upstream"]["code"] == "resource_missing"
    assert "stale" not in await _last_audit_detail(conn)
    stale = await conn.fetchval(
        "SELECT count(*) FROM subscriptions WHERE stale_at IS NOT NULL AND user_id = 'u_7'"
    )
    assert stale == 0
    assert await conn.fetchval("SELECT count(*) FROM customers WHERE stale_at IS NOT NULL") == 0
    assert await metric_value(service, STALE_TOTAL, kind="subscription") == 1
