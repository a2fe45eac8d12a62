"""Linking by Stripe metadata (SPEC §11): customer events link, re-link and unlink users.

Signed ``customer.created`` / ``customer.updated`` events go over real HTTP to
the service (STRIPE_USER_METADATA_KEY=user_id) on a real Postgres; the linked
user's subscriptions come from the stand-in's ``GET /v1/subscriptions`` by the
backfill the link schedules. Asserted: the rows (source, time of the fact,
Connect account), the audit rows, the metrics, the order of facts (out of
order, duplicated, concurrent, after an unlink), the precedence of explicit
mappings in both directions, and that Connect events touch only their account.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from tests.conftest import Standin
from tests.helpers import (
    WEBHOOK_SECRET,
    created,
    customer_deleted_event,
    customer_event,
    deliver,
    metric_value,
    post_session,
    problem,
    subscription_event,
    until,
)

pytestmark = pytest.mark.usefixtures("world")

KEY = "user_id"
CREATED = "customer.created"
UPDATED = "customer.updated"
CHANGES = "portal_gateway_mapping_changes_total"
CONFLICTS = "portal_gateway_mapping_conflicts_total"
EVENTS = "portal_gateway_webhook_events_total"
METADATA = "stripe_metadata"
# A bound for polling; never waited for in full when things work.
WAIT_SECONDS = 20.0


@pytest.fixture
async def service(make_service: Any) -> Any:
    """The service with metadata linking on."""
    return await make_service(STRIPE_USER_METADATA_KEY=KEY, STRIPE_WEBHOOK_SECRETS=WEBHOOK_SECRET)


def _customer(customer_id: str, user: str | None = None, **metadata: str) -> dict[str, Any]:
    """A Stripe customer object whose metadata names ``user`` (or nobody)."""
    if user is not None:
        metadata[KEY] = user
    return {
        "id": customer_id,
        "object": "customer",
        "email": f"{customer_id}@example.com",
        "metadata": metadata,
        "livemode": False,
    }


def _removed(user: str) -> dict[str, Any]:
    """``previous_attributes`` of an update that removed the key naming ``user``."""
    return {"metadata": {KEY: user}}


async def _result(resp: Any) -> str:
    text = await resp.text()
    assert resp.status == 200, text
    result: str = orjson.loads(text)["result"]
    return result


async def _send(service: Any, event: dict[str, Any], expected: str) -> None:
    assert await _result(await deliver(service, event)) == expected, event


async def _mapping(conn: asyncpg.Connection, user_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT stripe_customer_id, source, source_at, connected_account FROM customers"
        " WHERE user_id = $1",
        user_id,
    )
    return dict(row) if row else None


async def _sub_ids(conn: asyncpg.Connection, user_id: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT stripe_subscription_id FROM subscriptions WHERE user_id = $1", user_id
    )
    return {r["stripe_subscription_id"] for r in rows}


async def _subs_become(conn: asyncpg.Connection, user_id: str, want: set[str]) -> None:
    async def check() -> bool:
        return await _sub_ids(conn, user_id) == want

    await until(check, f"{user_id}'s subscriptions to be {want}", WAIT_SECONDS)


async def _audit(conn: asyncpg.Connection, action: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT principal_type, principal_id, user_id, outcome, stripe_customer_id, detail"
        " FROM audit_events WHERE action = $1 ORDER BY occurred_at, id",
        action,
    )
    return [dict(r) | {"detail": orjson.loads(r["detail"])} for r in rows]


def _at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def _seed(standin: Standin, sub_id: str, customer: str, account: str | None = None) -> None:
    seed: dict[str, Any] = {
        "id": sub_id,
        "customer": customer,
        "items": [{"id": "si_" + sub_id.removeprefix("sub_"), "price": "price_basic"}],
    }
    if account is not None:
        seed["account"] = account
    standin.state.seed_subscriptions([seed])


# --- link, re-link, unlink ---------------------------------------------------------


async def test_a_user_linked_by_event_can_open_a_subscription_flow_at_once(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    cancel = {"user_id": "u_new", "flow": {"type": "subscription_cancel"}}
    await problem(await post_session(service, cancel, token), 404, "unknown_user")
    # The app created the customer with our user id, then its subscription.
    _seed(standin, "sub_new1", "cus_new")
    t = int(time.time())
    event = customer_event(CREATED, _customer("cus_new", "u_new"), t)
    await _send(service, event, "applied")

    assert await _mapping(conn, "u_new") == {
        "stripe_customer_id": "cus_new",
        "source": METADATA,
        "source_at": _at(t),
        "connected_account": None,
    }
    (link,) = await _audit(conn, "mapping.link")
    assert (link["principal_type"], link["principal_id"]) == ("stripe", event["id"])
    assert (link["user_id"], link["stripe_customer_id"], link["outcome"]) == (
        "u_new",
        "cus_new",
        "applied",
    )
    assert link["detail"]["change"] == "linked"
    assert link["detail"]["source"] == METADATA
    assert link["detail"]["event_type"] == CREATED
    assert await metric_value(service, CHANGES, source=METADATA, change="linked") == 1
    assert await metric_value(service, EVENTS, type=CREATED, result="applied") == 1

    # The backfill the link scheduled brings the subscription the first portal call needs.
    await _subs_become(conn, "u_new", {"sub_new1"})
    await created(await post_session(service, cancel, token))
    (session,) = standin.requests()
    assert session.params["customer"] == "cus_new"
    assert session.params["flow_data"]["subscription_cancel"] == {"subscription": "sub_new1"}
    (listing,) = standin.requests("/v1/subscriptions")
    assert (listing.params["customer"], listing.params["status"]) == ("cus_new", "all")
    assert "Stripe-Account" not in listing.headers
    (backfill,) = await _audit(conn, "mapping.backfill")
    assert (backfill["principal_type"], backfill["principal_id"]) == ("stripe", event["id"])


async def test_relink_and_unlink_follow_the_newest_fact(
    service: Any, standin: Standin, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    _seed(standin, "sub_ma1", "cus_ma")
    _seed(standin, "sub_mb1", "cus_mb")
    await _send(service, customer_event(CREATED, _customer("cus_ma", "u_meta"), t - 30), "applied")
    await _subs_become(conn, "u_meta", {"sub_ma1"})

    # The user's id moved to another customer: re-pointed, the old subscriptions go.
    moved = customer_event(UPDATED, _customer("cus_mb", "u_meta"), t - 20)
    await _send(service, moved, "applied")
    mapping = await _mapping(conn, "u_meta")
    assert mapping is not None
    assert (mapping["stripe_customer_id"], mapping["source_at"]) == ("cus_mb", _at(t - 20))
    (relink,) = [a for a in await _audit(conn, "mapping.link") if a["principal_id"] == moved["id"]]
    assert relink["detail"]["change"] == "relinked"
    assert relink["detail"]["previous_customer"] == "cus_ma"
    assert relink["detail"]["subscriptions_removed"] == ["sub_ma1"]
    await _subs_become(conn, "u_meta", {"sub_mb1"})

    # The old customer loses the key: it maps nobody any more, nothing to do.
    gone = customer_event(
        UPDATED, _customer("cus_ma"), t - 10, previous_attributes=_removed("u_meta")
    )
    await _send(service, gone, "unchanged")
    # The key removed from the current customer: unlinked, its subscriptions too.
    unlink = customer_event(
        UPDATED, _customer("cus_mb"), t - 5, previous_attributes=_removed("u_meta")
    )
    await _send(service, unlink, "applied")
    assert await _mapping(conn, "u_meta") is None
    assert await _sub_ids(conn, "u_meta") == set()
    (unlinked,) = await _audit(conn, "mapping.unlink")
    assert (unlinked["user_id"], unlinked["stripe_customer_id"]) == ("u_meta", "cus_mb")
    assert unlinked["detail"]["subscriptions_removed"] == ["sub_mb1"]

    # Emptying the key says the same.
    await _send(service, customer_event(UPDATED, _customer("cus_mc", "u_meta2"), t - 5), "applied")
    await _send(service, customer_event(UPDATED, _customer("cus_mc", ""), t - 4), "applied")
    assert await _mapping(conn, "u_meta2") is None

    for change, count in (("linked", 2), ("relinked", 1), ("unlinked", 2)):
        assert await metric_value(service, CHANGES, source=METADATA, change=change) == count


async def test_out_of_order_and_duplicated_events_change_nothing(
    service: Any, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    link = customer_event(UPDATED, _customer("cus_oo", "u_oo"), t - 10)
    unlink = customer_event(
        UPDATED, _customer("cus_oo"), t - 5, previous_attributes=_removed("u_oo")
    )
    await _send(service, link, "applied")
    await _send(service, unlink, "applied")
    assert await _mapping(conn, "u_oo") is None
    # Stripe's retries of both: duplicates.
    await _send(service, link, "duplicate")
    await _send(service, unlink, "duplicate")
    # Older facts than the unlink arrive late; the row is gone, stripe_events orders them.
    await _send(service, customer_event(CREATED, _customer("cus_oo", "u_oo"), t - 20), "superseded")
    await _send(service, customer_event(UPDATED, _customer("cus_oo", "u_x"), t - 6), "superseded")
    assert await _mapping(conn, "u_oo") is None
    assert await _mapping(conn, "u_x") is None

    # A newer link, then an older one naming someone else: the newer stays.
    await _send(service, customer_event(UPDATED, _customer("cus_oo", "u_oo"), t), "applied")
    await _send(service, customer_event(UPDATED, _customer("cus_oo", "u_x"), t - 1), "superseded")
    mapping = await _mapping(conn, "u_oo")
    assert mapping is not None
    assert (mapping["stripe_customer_id"], mapping["source_at"]) == ("cus_oo", _at(t))
    # The user's own newer link to another customer is not undone by an older fact.
    await _send(service, customer_event(UPDATED, _customer("cus_o2", "u_oo"), t - 3), "superseded")
    # The same fact again, later: unchanged, and the row keeps the latest time.
    await _send(service, customer_event(UPDATED, _customer("cus_oo", "u_oo"), t + 5), "unchanged")
    mapping = await _mapping(conn, "u_oo")
    assert mapping is not None
    assert mapping["source_at"] == _at(t + 5)
    assert await metric_value(service, CHANGES, source=METADATA, change="unchanged") == 1

    # After a customer.deleted no fact about the customer links anyone.
    await _send(service, customer_deleted_event("cus_oo", t + 6), "applied")
    assert await _mapping(conn, "u_oo") is None
    await _send(service, customer_event(UPDATED, _customer("cus_oo", "u_oo"), t + 7), "superseded")
    assert await _mapping(conn, "u_oo") is None
    links = await conn.fetchval("SELECT count(*) FROM audit_events WHERE action = 'mapping.link'")
    assert links == 2


async def test_concurrent_facts_about_one_customer_end_with_the_newest(
    service: Any, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    for round_no in range(3):
        base = t - 100 + round_no * 20
        users = ["u_r1", "u_r2", None]
        events = [
            customer_event(UPDATED, _customer("cus_race", users[(q + round_no) % 3]), base + q)
            for q in range(8)
        ]
        random.shuffle(events)
        responses = await asyncio.gather(*(deliver(service, e) for e in events))
        results = {await _result(r) for r in responses}
        assert results <= {"applied", "superseded", "unchanged"}, results
        newest = users[(7 + round_no) % 3]
        holders = await conn.fetch(
            "SELECT user_id, source_at FROM customers WHERE stripe_customer_id = 'cus_race'"
        )
        if newest is None:
            assert holders == []
        else:
            assert [(h["user_id"], h["source_at"]) for h in holders] == [(newest, _at(base + 7))]


async def test_concurrent_facts_naming_one_user_end_with_the_newest_customer(
    service: Any, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    events = [
        customer_event(UPDATED, _customer(f"cus_same{q}", "u_same"), t - 10 + q) for q in range(8)
    ]
    random.shuffle(events)
    responses = await asyncio.gather(*(deliver(service, e) for e in events))
    results = {await _result(r) for r in responses}
    assert results <= {"applied", "superseded"}, results
    mapping = await _mapping(conn, "u_same")
    assert mapping is not None
    assert (mapping["stripe_customer_id"], mapping["source_at"]) == ("cus_same7", _at(t - 3))
    holders = await conn.fetchval(
        "SELECT count(*) FROM customers WHERE stripe_customer_id LIKE 'cus\\_same%'"
    )
    assert holders == 1


# --- precedence: explicit mappings win -------------------------------------------------


async def test_metadata_never_repoints_or_removes_an_explicit_mapping(
    service: Any, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    imported = await _mapping(conn, "u_42")
    assert imported is not None
    assert imported["source"] == "import"

    # Another customer names u_42: u_42 keeps its imported customer.
    elsewhere = customer_event(UPDATED, _customer("cus_other", "u_42"), t - 10)
    await _send(service, elsewhere, "conflict")
    # u_42's customer names someone else: it stays u_42's, nobody else gets it.
    await _send(service, customer_event(UPDATED, _customer("cus_42", "u_new"), t - 9), "conflict")
    # The key removed from u_42's customer: a conflict too, nothing removed.
    removed = customer_event(
        UPDATED, _customer("cus_42"), t - 8, previous_attributes=_removed("u_42")
    )
    await _send(service, removed, "conflict")
    assert await _mapping(conn, "u_42") == imported
    assert await _mapping(conn, "u_new") is None
    assert await _sub_ids(conn, "u_42") == {"sub_42a", "sub_42old"}

    conflicts = await _audit(conn, "mapping_conflict")
    assert [(c["user_id"], c["stripe_customer_id"], c["outcome"]) for c in conflicts] == [
        ("u_42", "cus_other", "conflict"),
        ("u_new", "cus_42", "conflict"),
        ("u_42", "cus_42", "conflict"),
    ]
    first = conflicts[0]
    assert (first["principal_type"], first["principal_id"]) == ("stripe", elsewhere["id"])
    assert first["detail"]["reason"] == "explicit_mapping"
    assert (first["detail"]["mapped_customer"], first["detail"]["mapped_source"]) == (
        "cus_42",
        "import",
    )
    assert await metric_value(service, CONFLICTS, source=METADATA) == 3
    assert await metric_value(service, EVENTS, type=UPDATED, result="conflict") == 3

    # Metadata that agrees, or never had the key, is no conflict; the source stays.
    await _send(service, customer_event(UPDATED, _customer("cus_42", "u_42"), t - 5), "unchanged")
    await _send(service, customer_event(UPDATED, _customer("cus_7"), t - 5), "unchanged")
    assert await _mapping(conn, "u_42") == imported
    assert await metric_value(service, CONFLICTS, source=METADATA) == 3
    assert await _audit(conn, "mapping.link") == []


async def test_a_metadata_mapping_made_explicit_is_no_longer_repointed(
    service: Any, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    await _send(service, customer_event(UPDATED, _customer("cus_e1", "u_e"), t - 30), "applied")
    # A newer fact re-points a metadata mapping...
    await _send(service, customer_event(UPDATED, _customer("cus_e2", "u_e"), t - 20), "applied")
    mapping = await _mapping(conn, "u_e")
    assert mapping is not None
    assert mapping["stripe_customer_id"] == "cus_e2"
    # ...until someone states it explicitly (as PUT /v1/users/u_e/customer writes it).
    await conn.execute(
        "UPDATE customers SET source = 'api', source_at = now() WHERE user_id = 'u_e'"
    )
    await _send(service, customer_event(UPDATED, _customer("cus_e3", "u_e"), t - 10), "conflict")
    await _send(
        service,
        customer_event(UPDATED, _customer("cus_e2"), t - 5, previous_attributes=_removed("u_e")),
        "conflict",
    )
    mapping = await _mapping(conn, "u_e")
    assert mapping is not None
    assert (mapping["stripe_customer_id"], mapping["source"]) == ("cus_e2", "api")


async def test_an_invalid_user_id_in_metadata_links_nobody(
    service: Any, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    for value in ("u" * 129, "u_\x00nul"):
        await _send(
            service, customer_event(UPDATED, _customer("cus_bad", value), t - 9), "unchanged"
        )
    assert (
        await conn.fetchval("SELECT count(*) FROM customers WHERE stripe_customer_id = 'cus_bad'")
        == 0
    )
    # A user linked before, then the value is replaced by garbage: unlinked.
    await _send(service, customer_event(UPDATED, _customer("cus_bad", "u_ok"), t - 5), "applied")
    await _send(service, customer_event(UPDATED, _customer("cus_bad", "x" * 200), t), "applied")
    assert await _mapping(conn, "u_ok") is None


async def test_without_the_key_customer_events_are_unhandled(
    make_service: Any, conn: asyncpg.Connection
) -> None:
    service = await make_service(STRIPE_WEBHOOK_SECRETS=WEBHOOK_SECRET)  # no metadata key
    event = customer_event(CREATED, _customer("cus_off", "u_off"), int(time.time()))
    await _send(service, event, "unhandled")
    assert await _mapping(conn, "u_off") is None
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 0
    assert await metric_value(service, CHANGES, source=METADATA, change="linked") == 0


# --- Connect -------------------------------------------------------------------------


async def test_connect_events_touch_only_their_account(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    t = int(time.time())
    _seed(standin, "sub_c1", "cus_c1", account="acct_one")
    # Linked from acct_one: the mapping lives there; the backfill asks that account.
    linked = customer_event(CREATED, _customer("cus_c1", "u_conn"), t - 30, account="acct_one")
    await _send(service, linked, "applied")
    mapping = await _mapping(conn, "u_conn")
    assert mapping is not None
    assert (mapping["stripe_customer_id"], mapping["connected_account"]) == ("cus_c1", "acct_one")
    await _subs_become(conn, "u_conn", {"sub_c1"})
    (listing,) = standin.requests("/v1/subscriptions")
    assert listing.headers.get("Stripe-Account") == "acct_one"
    (link,) = await _audit(conn, "mapping.link")
    assert link["detail"]["connected_account"] == "acct_one"
    before = await conn.fetch("SELECT * FROM customers ORDER BY user_id")
    subs_before = await conn.fetch("SELECT * FROM subscriptions ORDER BY stripe_subscription_id")

    # Metadata from acct_two naming u_conn, or naming someone for its customer: conflicts.
    await _send(
        service,
        customer_event(UPDATED, _customer("cus_c9", "u_conn"), t - 25, account="acct_two"),
        "conflict",
    )
    await _send(
        service,
        customer_event(UPDATED, _customer("cus_c1", "u_other"), t - 24, account="acct_two"),
        "conflict",
    )
    # ...or removing the key there: not that account's mapping to remove.
    removed = customer_event(
        UPDATED,
        _customer("cus_c1"),
        t - 23,
        account="acct_two",
        previous_attributes=_removed("u_conn"),
    )
    await _send(service, removed, "unchanged")
    # Subscription events and deletions from another account, or from the platform.
    # (Newer than the backfill's read, which wrote the row.)
    update = subscription_event(
        "customer.subscription.updated",
        "sub_c1",
        "cus_c1",
        items=[("si_x", "price_x", 9)],
        created=t + 5,
    )
    await _send(service, update, "unknown_customer")
    elsewhere = update | {"id": update["id"] + "b", "account": "acct_two"}
    await _send(service, elsewhere, "unknown_customer")
    platform_sub = subscription_event(
        "customer.subscription.updated", "sub_42a", "cus_42", items=[("si_y", "price_y", 9)]
    )
    await _send(service, platform_sub | {"account": "acct_two"}, "unknown_customer")
    await _send(service, customer_deleted_event("cus_c1", t - 20), "unknown_customer")
    deleted_elsewhere = customer_deleted_event("cus_42", t - 20) | {"account": "acct_two"}
    await _send(service, deleted_elsewhere, "unknown_customer")
    assert await conn.fetch("SELECT * FROM customers ORDER BY user_id") == before
    assert (
        await conn.fetch("SELECT * FROM subscriptions ORDER BY stripe_subscription_id")
        == subs_before
    )
    reasons = [c["detail"]["reason"] for c in await _audit(conn, "mapping_conflict")]
    assert reasons == ["other_account", "other_account"]

    # From its own account, everything applies.
    await _send(service, update | {"id": update["id"] + "c", "account": "acct_one"}, "applied")
    standin.state.clear_requests()
    flow = {"user_id": "u_conn", "flow": {"type": "subscription_cancel"}}
    await created(await post_session(service, flow, token))
    (session,) = standin.requests()
    assert session.headers.get("Stripe-Account") == "acct_one"
    deleted = customer_deleted_event("cus_c1", t - 10) | {"account": "acct_one"}
    await _send(service, deleted, "applied")
    assert await _mapping(conn, "u_conn") is None


async def test_an_account_that_is_not_an_acct_id_is_refused(service: Any) -> None:
    event = customer_event(UPDATED, _customer("cus_bad_acct", "u_x"), int(time.time()))
    for account in ("cus_123", "acct_", 42):
        resp = await deliver(service, event | {"account": account})
        await problem(resp, 400, "invalid_event")
