"""Stripe webhooks keep the mapping true (SPEC §4).

Signed events of each type change what the *next* portal request sends to
Stripe; unverified, replayed or older events change nothing; concurrent
deliveries for one subscription end with the newest state.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest

from tests.conftest import Standin
from tests.helpers import (
    WEBHOOK_PATH,
    WEBHOOK_SECRET,
    created,
    customer_deleted_event,
    deliver,
    metric_value,
    post_session,
    problem,
    stripe_signature,
    subscription_event,
)

pytestmark = pytest.mark.usefixtures("world")

OLD_SECRET = "whsec_test_previous_9876543210"
CREATED = "customer.subscription.created"
UPDATED = "customer.subscription.updated"
DELETED = "customer.subscription.deleted"
PAUSED = "customer.subscription.paused"
RESUMED = "customer.subscription.resumed"
EVENTS_TOTAL = "portal_gateway_webhook_events_total"


@pytest.fixture
async def service(make_service: Any) -> Any:
    """The service in the middle of a secret rotation: the new and the old secret."""
    return await make_service(STRIPE_WEBHOOK_SECRETS=f"{WEBHOOK_SECRET},{OLD_SECRET}")


async def _ok(resp: Any, result: str = "applied") -> dict[str, Any]:
    text = await resp.text()
    assert resp.status == 200, text
    body: dict[str, Any] = orjson.loads(text)
    assert body["received"] is True
    assert body["result"] == result, body
    return body


async def _sub(conn: asyncpg.Connection, sub_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT user_id, external_ref, status, item_id, price_id, quantity, last_event_at,"
        " deleted_at, stale_at, updated_at FROM subscriptions WHERE stripe_subscription_id = $1",
        sub_id,
    )
    return dict(row) if row else {}


def _sent(standin: Standin) -> Any:
    """The params of the one session request Stripe got since the last call."""
    (request,) = standin.requests()
    assert request.status == 200
    standin.state.clear_requests()
    return request.params


# --- each event type changes what the next session sends ----------------------------


async def test_updated_changes_the_item_the_next_request_sends_and_is_audited(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    event = subscription_event(
        UPDATED, "sub_42a", "cus_42", items=[("si_42new", "price_pro_yearly", 5)]
    )
    body = await _ok(await deliver(service, event))
    assert body["id"] == event["id"]
    row = await _sub(conn, "sub_42a")
    assert (row["item_id"], row["price_id"], row["quantity"]) == ("si_42new", "price_pro_yearly", 5)
    assert row["external_ref"] == "team-plan"  # our ref survives Stripe's update
    assert row["last_event_at"].timestamp() == event["created"]

    flow = {"type": "subscription_update_confirm", "subscription": "team-plan", "quantity": 6}
    await created(await post_session(service, {"user_id": "u_42", "flow": flow}, token))
    confirm = _sent(standin)["flow_data"]["subscription_update_confirm"]
    assert confirm == {"subscription": "sub_42a", "items": [{"id": "si_42new", "quantity": "6"}]}

    audit = await conn.fetchrow("SELECT * FROM audit_events WHERE principal_type = 'stripe'")
    assert audit is not None
    assert (audit["principal_id"], audit["action"], audit["outcome"]) == (
        event["id"],
        "mapping.update",
        "applied",
    )
    assert (audit["user_id"], audit["stripe_customer_id"]) == ("u_42", "cus_42")
    assert audit["stripe_request_id"] == "req_webhooktest"
    detail = orjson.loads(audit["detail"])
    assert (detail["subscription"], detail["item_id"]) == ("sub_42a", "si_42new")
    recorded = await conn.fetchrow("SELECT type, result, customer, object_id FROM stripe_events")
    assert dict(recorded) == {
        "type": UPDATED,
        "result": "applied",
        "customer": "cus_42",
        "object_id": "sub_42a",
    }
    assert await metric_value(service, EVENTS_TOTAL, type=UPDATED, result="applied") == 1

    # Several items: recorded as not updatable through the portal.
    two_items = [("si_42a", "price_basic", 3), ("si_42b", "price_addon", 1)]
    await _ok(
        await deliver(service, subscription_event(UPDATED, "sub_42a", "cus_42", items=two_items))
    )
    row = await _sub(conn, "sub_42a")
    assert (row["item_id"], row["price_id"], row["quantity"]) == (None, None, None)
    resp = await post_session(service, {"user_id": "u_42", "flow": flow}, token)
    await problem(resp, 409, "subscription_not_updatable")
    assert standin.requests() == []


async def test_created_paused_resumed_decide_the_default_subscription(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    items = [("si_new1", "price_basic", 1)]
    cancel = {"user_id": "u_none", "flow": {"type": "subscription_cancel"}}
    # u_none has a customer but no subscription yet.
    await problem(await post_session(service, cancel, token), 404, "no_open_subscription")

    event = subscription_event(CREATED, "sub_new1", "cus_none", items=items, created=t - 20)
    await _ok(await deliver(service, event))
    row = await _sub(conn, "sub_new1")
    assert (row["user_id"], row["external_ref"], row["status"]) == ("u_none", None, "active")
    audit = await conn.fetchval("SELECT action FROM audit_events WHERE principal_type = 'stripe'")
    assert audit == "mapping.create"
    await created(await post_session(service, cancel, token))
    assert _sent(standin)["flow_data"]["subscription_cancel"] == {"subscription": "sub_new1"}

    paused = subscription_event(
        PAUSED, "sub_new1", "cus_none", status="paused", items=items, created=t - 10
    )
    await _ok(await deliver(service, paused))
    await problem(await post_session(service, cancel, token), 404, "no_open_subscription")

    await _ok(
        await deliver(
            service, subscription_event(RESUMED, "sub_new1", "cus_none", items=items, created=t)
        )
    )
    await created(await post_session(service, cancel, token))
    assert _sent(standin)["flow_data"]["subscription_cancel"] == {"subscription": "sub_new1"}


async def test_deleted_subscription_is_no_longer_the_one_sent(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    # u_two has two open subscriptions: ambiguous until one of them ends.
    update = {"user_id": "u_two", "flow": {"type": "subscription_update"}}
    await problem(await post_session(service, update, token), 409, "subscription_ambiguous")
    event = subscription_event(
        DELETED, "sub_two1", "cus_two", status="canceled", items=[("si_two1", "price_basic", 1)]
    )
    await _ok(await deliver(service, event))
    row = await _sub(conn, "sub_two1")
    assert row["status"] == "canceled"
    assert row["deleted_at"] is not None

    await created(await post_session(service, update, token))
    assert _sent(standin)["flow_data"]["subscription_update"] == {"subscription": "sub_two2"}
    named = {"user_id": "u_two", "flow": {"type": "subscription_update", "subscription": "first"}}
    await problem(await post_session(service, named, token), 409, "subscription_not_open")


async def test_customer_deleted_removes_the_mapping(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    await _ok(await deliver(service, customer_deleted_event("cus_42")))
    assert await conn.fetchval("SELECT count(*) FROM customers WHERE user_id = 'u_42'") == 0
    assert await conn.fetchval("SELECT count(*) FROM subscriptions WHERE user_id = 'u_42'") == 0
    await problem(await post_session(service, {"user_id": "u_42"}, token), 404, "unknown_user")
    assert standin.requests() == []
    audit = await conn.fetchrow(
        "SELECT principal_type, user_id, detail FROM audit_events WHERE action = 'mapping.delete'"
    )
    assert audit is not None
    assert (audit["principal_type"], audit["user_id"]) == ("stripe", "u_42")
    assert orjson.loads(audit["detail"])["subscriptions"] == ["sub_42a", "sub_42old"]
    # A subscription event after the customer is gone: recorded, ignored.
    late = subscription_event(UPDATED, "sub_42a", "cus_42", items=[("si_42a", "price_basic", 3)])
    await _ok(await deliver(service, late), "unknown_customer")
    assert await _sub(conn, "sub_42a") == {}


# --- refused deliveries change nothing -----------------------------------------------


def _tampered(payload: bytes) -> tuple[bytes, str | None]:
    header = stripe_signature(payload)
    return payload.replace(b'"quantity":9', b'"quantity":99'), header


BAD_DELIVERIES: list[tuple[str, Callable[[bytes], tuple[bytes, str | None]]]] = [
    ("missing header", lambda p: (p, None)),
    ("empty header", lambda p: (p, "")),
    ("bad signature", lambda p: (p, f"t={int(time.time())},v1={'ab' * 32}")),
    ("old timestamp", lambda p: (p, stripe_signature(p, t=int(time.time()) - 301))),
    ("future timestamp", lambda p: (p, stripe_signature(p, t=int(time.time()) + 301))),
    ("wrong secret", lambda p: (p, stripe_signature(p, secret="whsec_someoneelse"))),
    ("tampered body", _tampered),
    ("no timestamp", lambda p: (p, stripe_signature(p).split(",")[1])),
    ("v0 scheme only", lambda p: (p, stripe_signature(p).replace("v1=", "v0="))),
]


async def test_unverified_deliveries_are_400_and_apply_nothing(
    service: Any, conn: asyncpg.Connection
) -> None:
    before = await _sub(conn, "sub_42a")
    for case, make in BAD_DELIVERIES:
        event = subscription_event(UPDATED, "sub_42a", "cus_42", items=[("si_x", "price_x", 9)])
        payload, header = make(orjson.dumps(event))
        headers = {"Content-Type": "application/json"}
        if header is not None:
            headers["Stripe-Signature"] = header
        resp = await service.post(WEBHOOK_PATH, data=payload, headers=headers)
        body = await problem(resp, 400, "invalid_signature")
        assert "whsec" not in str(body), case
        assert await _sub(conn, "sub_42a") == before, case
    assert await conn.fetchval("SELECT count(*) FROM stripe_events") == 0
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 0
    labels = {"type": "unverified", "result": "invalid_signature"}
    assert await metric_value(service, EVENTS_TOTAL, **labels) == len(BAD_DELIVERIES)


async def test_verified_body_that_is_not_an_event_or_too_large_is_refused(
    service: Any, conn: asyncpg.Connection
) -> None:
    await problem(await deliver(service, b"{not json"), 400, "malformed_json")
    await problem(await deliver(service, b'{"id": "evt_1"}'), 400, "invalid_event")
    payload = b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'
    headers = {"Stripe-Signature": stripe_signature(payload)}
    resp = await service.post(WEBHOOK_PATH, data=io.BytesIO(payload), headers=headers)
    await problem(resp, 413, "payload_too_large")
    assert await conn.fetchval("SELECT count(*) FROM stripe_events") == 0


async def test_no_bearer_auth_documented_and_no_secret_refuses_everything(
    make_service: Any, conn: asyncpg.Connection
) -> None:
    bare = await make_service()  # STRIPE_WEBHOOK_SECRETS unset
    event = subscription_event(UPDATED, "sub_42a", "cus_42", items=[("si_x", "price_x", 9)])
    await problem(await deliver(bare, event), 400, "invalid_signature")
    assert await conn.fetchval("SELECT count(*) FROM stripe_events") == 0

    doc = await (await bare.get("/api/docs/swagger.json")).json()
    op = doc["paths"][WEBHOOK_PATH]["post"]
    assert op["security"] == []
    assert {"200", "400", "413", "503"} <= set(op["responses"])
    assert set(op["responses"]["400"]["content"]) == {"application/problem+json"}
    assert "invalid_signature" in op["responses"]["400"]["description"]
    assert "Stripe-Signature" in {p["name"] for p in op["parameters"] if p["in"] == "header"}


async def test_rotation_accepts_the_old_and_the_new_secret(
    service: Any, make_service: Any, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    old = subscription_event(
        UPDATED, "sub_42a", "cus_42", items=[("si_o", "price_o", 1)], created=t - 2
    )
    new = subscription_event(
        UPDATED, "sub_42a", "cus_42", items=[("si_n", "price_n", 2)], created=t - 1
    )
    await _ok(await deliver(service, old, secret=OLD_SECRET))
    await _ok(await deliver(service, new, secret=WEBHOOK_SECRET))
    assert (await _sub(conn, "sub_42a"))["item_id"] == "si_n"

    # While Stripe rolls a secret it signs with both: any v1 may match.
    only_new = await make_service(STRIPE_WEBHOOK_SECRETS=WEBHOOK_SECRET)
    event = subscription_event(
        UPDATED, "sub_42a", "cus_42", items=[("si_m", "price_m", 3)], created=t
    )
    payload = orjson.dumps(event)
    old_v1 = stripe_signature(payload, OLD_SECRET, t).split(",")[1]
    new_v1 = stripe_signature(payload, WEBHOOK_SECRET, t).split(",")[1]
    await _ok(await deliver(only_new, payload, signature=f"t={t},{old_v1},{new_v1}"))
    assert (await _sub(conn, "sub_42a"))["item_id"] == "si_m"


# --- replays and ordering ----------------------------------------------------------


async def test_duplicate_event_changes_nothing(service: Any, conn: asyncpg.Connection) -> None:
    event = subscription_event(UPDATED, "sub_42a", "cus_42", items=[("si_d", "price_d", 4)])
    await _ok(await deliver(service, event))
    first = await _sub(conn, "sub_42a")
    await _ok(await deliver(service, event), "duplicate")
    assert await _sub(conn, "sub_42a") == first  # updated_at included
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 1
    assert await conn.fetchval("SELECT count(*) FROM stripe_events") == 1
    assert await metric_value(service, EVENTS_TOTAL, type=UPDATED, result="duplicate") == 1


async def test_older_updated_after_newer_is_ignored(service: Any, conn: asyncpg.Connection) -> None:
    t = int(time.time())
    newer = subscription_event(
        UPDATED, "sub_42a", "cus_42", items=[("si_n", "price_n", 9)], created=t
    )
    older = subscription_event(
        UPDATED,
        "sub_42a",
        "cus_42",
        status="past_due",
        items=[("si_o", "price_o", 1)],
        created=t - 5,
    )
    await _ok(await deliver(service, newer))
    await _ok(await deliver(service, older), "superseded")
    row = await _sub(conn, "sub_42a")
    assert (row["status"], row["item_id"], row["quantity"]) == ("active", "si_n", 9)
    assert row["last_event_at"].timestamp() == t
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 1


async def test_deleted_stays_deleted(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    items = [("si_42a", "price_basic", 3)]
    await _ok(
        await deliver(
            service, subscription_event(UPDATED, "sub_42a", "cus_42", items=items, created=t)
        )
    )
    # Deletion is final: it applies even when it is not the newest event seen...
    deleted = subscription_event(
        DELETED, "sub_42a", "cus_42", status="canceled", items=items, created=t - 1
    )
    await _ok(await deliver(service, deleted))
    # ...and no later delivery of an update, older or newer, brings it back.
    for offset in (-5, 0, 5):
        late = subscription_event(UPDATED, "sub_42a", "cus_42", items=items, created=t + offset)
        await _ok(await deliver(service, late), "superseded")
    row = await _sub(conn, "sub_42a")
    assert (row["status"], row["deleted_at"] is not None) == ("canceled", True)
    cancel = {"user_id": "u_42", "flow": {"type": "subscription_cancel"}}
    await problem(await post_session(service, cancel, token), 404, "no_open_subscription")
    assert standin.requests() == []


async def test_concurrent_deliveries_for_one_subscription_newest_wins(
    service: Any, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    for round_no in range(3):
        base = t - 100 + round_no * 20
        events = [
            subscription_event(
                UPDATED,
                "sub_42a",
                "cus_42",
                items=[(f"si_r{round_no}q{q}", "price_basic", q)],
                created=base + q,
            )
            for q in range(1, 9)
        ]
        random.shuffle(events)
        responses = await asyncio.gather(*(deliver(service, e) for e in events))
        results = [(await r.json())["result"] for r in responses]
        assert set(results) <= {"applied", "superseded"}, results
        row = await _sub(conn, "sub_42a")
        assert (row["item_id"], row["quantity"]) == (f"si_r{round_no}q8", 8)
        assert row["last_event_at"].timestamp() == base + 8


# --- recorded and ignored ---------------------------------------------------------


async def test_unknown_customer_unhandled_type_and_other_mode_are_recorded_and_ignored(
    service: Any, conn: asyncpg.Connection
) -> None:
    stranger = subscription_event(
        CREATED, "sub_stranger", "cus_stranger", items=[("si_s", "price_s", 1)]
    )
    await _ok(await deliver(service, stranger), "unknown_customer")
    assert await _sub(conn, "sub_stranger") == {}
    row = await conn.fetchrow(
        "SELECT result, customer, object_id FROM stripe_events WHERE id = $1", stranger["id"]
    )
    assert dict(row) == {
        "result": "unknown_customer",
        "customer": "cus_stranger",
        "object_id": "sub_stranger",
    }
    # Stripe's retry of it is a duplicate, not another error loop.
    await _ok(await deliver(service, stranger), "duplicate")
    await _ok(await deliver(service, customer_deleted_event("cus_stranger")), "unknown_customer")

    invoice = subscription_event("invoice.paid", "sub_42a", "cus_42")
    invoice["data"]["object"] = {"id": "in_1", "object": "invoice", "customer": "cus_42"}
    await _ok(await deliver(service, invoice), "unhandled")
    assert await metric_value(service, EVENTS_TOTAL, type="other", result="unhandled") == 1

    live = subscription_event(UPDATED, "sub_42a", "cus_42", items=[("si_live", "price_l", 1)])
    live["livemode"] = True
    await _ok(await deliver(service, live), "livemode_mismatch")

    assert (await _sub(conn, "sub_42a"))["item_id"] == "si_42a"
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 0
