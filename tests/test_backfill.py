"""Backfill (SPEC §11): a user's subscriptions read from Stripe, all pages, onto their rows.

Against a real Postgres and the stand-in over HTTP: the one implementation
``resync`` also runs, scheduled cancellations kept from backfill and webhook
events, ``Stripe-Account`` for a customer on a connected account (on backfill
and on the session call), and the app's background backfiller, which dedupes
per user, bounds its concurrency, survives Stripe's errors and is drained on
shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from service import keys
from service.backfill import Actor, NoCustomerMapping, NotListable, backfill
from service.backfiller import Backfiller
from service.db.pool import Database
from service.errors import ServiceError
from service.metrics import Metrics
from service.stripe import StripeClient
from tests.conftest import Standin, make_settings
from tests.helpers import WEBHOOK_SECRET, created, deliver, post_session, subscription_event, until

pytestmark = pytest.mark.usefixtures("world")

# Bounds for polling; never waited for in full when things work.
WAIT_SECONDS = 20.0
CANCEL_AT = 1_900_000_000  # 2030-03-17


@dataclass
class Parts:
    """The backfill's real collaborators: a pool, a Stripe client on the stand-in, metrics."""

    db: Database
    stripe: StripeClient
    metrics: Metrics


@pytest.fixture
async def parts(database_url: str, standin: Standin) -> AsyncIterator[Parts]:
    settings = make_settings(database_url, standin.url, STRIPE_MAX_RETRIES="0")
    db = await Database.connect(database_url, query_timeout=10, max_size=6)
    session = StripeClient.new_session(settings)
    metrics = Metrics()
    try:
        yield Parts(db, StripeClient(session, settings, metrics), metrics)
    finally:
        await session.close()
        await db.close()


def _item(si: str, price: str, quantity: int) -> dict[str, Any]:
    return {"id": si, "price": price, "quantity": quantity}


async def _subs(conn: asyncpg.Connection, user_id: str) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT stripe_subscription_id AS id, external_ref, status, item_id, quantity,"
        " cancel_at, cancel_at_period_end FROM subscriptions WHERE user_id = $1",
        user_id,
    )
    return {r["id"]: {k: v for k, v in r.items() if k != "id"} for r in rows}


def _at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def _in_flight(standin: Standin) -> int:
    return sum(1 for r in standin.requests("/v1/subscriptions") if r.status is None)


# --- the backfill itself ------------------------------------------------------------


async def test_backfill_reads_every_page_and_keeps_scheduled_cancellations(
    parts: Parts, standin: Standin, conn: asyncpg.Connection
) -> None:
    many = [
        {
            "id": f"sub_two{n:03d}",
            "customer": "cus_two",
            "created": 1_700_000_000 + n,
            "items": [_item(f"si_two{n:03d}", "price_basic", 1)],
        }
        for n in range(205)
    ]
    # Classic mode: cancel at period end (Stripe sets both); flexible mode: cancel_at alone.
    many[0] |= {"cancel_at": CANCEL_AT, "cancel_at_period_end": True}
    many[1] |= {"cancel_at": CANCEL_AT + 60}
    standin.state.seed_subscriptions(many)

    done = await backfill(parts.db, parts.stripe, parts.metrics, "u_two")

    pages = standin.requests("/v1/subscriptions")
    assert [p.params.get("starting_after") for p in pages] == [None, "sub_two105", "sub_two005"]
    assert all(p.params["customer"] == "cus_two" and p.params["status"] == "all" for p in pages)
    assert all("Stripe-Account" not in p.headers for p in pages)  # a platform customer
    assert (len(done.listed), len(done.written)) == (205, 205)
    assert done.removed == ["sub_two1", "sub_two2"]  # Stripe no longer lists the seeded ones
    rows = await _subs(conn, "u_two")
    assert len(rows) == 205
    assert (rows["sub_two000"]["cancel_at"], rows["sub_two000"]["cancel_at_period_end"]) == (
        _at(CANCEL_AT),
        True,
    )
    assert (rows["sub_two001"]["cancel_at"], rows["sub_two001"]["cancel_at_period_end"]) == (
        _at(CANCEL_AT + 60),
        False,
    )
    assert (rows["sub_two002"]["cancel_at"], rows["sub_two002"]["cancel_at_period_end"]) == (
        None,
        False,
    )
    audit = await conn.fetchrow("SELECT * FROM audit_events WHERE action = 'mapping.backfill'")
    assert audit is not None
    assert (audit["principal_type"], audit["principal_id"], audit["user_id"]) == (
        "system",
        "backfill",
        "u_two",
    )
    assert (audit["outcome"], audit["stripe_customer_id"]) == ("applied", "cus_two")
    detail = orjson.loads(audit["detail"])
    assert len(detail["listed"]) == 205
    assert detail["removed"] == ["sub_two1", "sub_two2"]

    # A cancellation Stripe has dropped again is cleared by the next backfill.
    standin.state.seed_subscriptions([{k: v for k, v in many[0].items() if "cancel" not in k}])
    await backfill(parts.db, parts.stripe, parts.metrics, "u_two")
    rows = await _subs(conn, "u_two")
    assert (rows["sub_two000"]["cancel_at"], rows["sub_two000"]["cancel_at_period_end"]) == (
        None,
        False,
    )


async def test_backfill_of_a_connected_customer_carries_stripe_account(
    parts: Parts, standin: Standin, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "UPDATE customers SET connected_account = 'acct_conn7' WHERE user_id = 'u_7'"
    )
    standin.state.seed_subscriptions(
        [
            {
                "id": "sub_7conn",
                "customer": "cus_7",
                "account": "acct_conn7",
                "items": [_item("si_7conn", "price_pro", 2)],
            }
        ]
    )
    done = await backfill(parts.db, parts.stripe, parts.metrics, "u_7")

    (listed,) = standin.requests("/v1/subscriptions")
    assert listed.headers["Stripe-Account"] == "acct_conn7"
    assert listed.params["customer"] == "cus_7"
    assert done.connected_account == "acct_conn7"
    assert set(await _subs(conn, "u_7")) == {"sub_7conn"}
    detail = await conn.fetchval(
        "SELECT detail FROM audit_events WHERE action = 'mapping.backfill' AND user_id = 'u_7'"
    )
    assert orjson.loads(detail)["stripe_account"] == "acct_conn7"


async def test_backfill_errors_name_what_went_wrong(
    parts: Parts, standin: Standin, conn: asyncpg.Connection
) -> None:
    with pytest.raises(NoCustomerMapping, match=r"^u_nobody: no customer is mapped"):
        await backfill(parts.db, parts.stripe, parts.metrics, "u_nobody")
    with pytest.raises(NotListable, match=r"^u_acct: mapped to an Accounts v2 account"):
        await backfill(parts.db, parts.stripe, parts.metrics, "u_acct")
    # Stripe's refusal propagates; a customer Stripe does not know is marked stale once.
    standin.state.declare_missing(["cus_42"])
    with pytest.raises(ServiceError) as refused:
        await backfill(parts.db, parts.stripe, parts.metrics, "u_42")
    assert refused.value.code == "upstream_rejected"
    assert await conn.fetchval("SELECT stale_at IS NOT NULL FROM customers WHERE user_id = 'u_42'")
    assert _sample(parts.metrics, "portal_gateway_stale_mappings_total", kind="customer") == 1
    # Nothing was rewritten or audited.
    assert set(await _subs(conn, "u_42")) == {"sub_42a", "sub_42old"}
    assert await conn.fetchval("SELECT count(*) FROM audit_events") == 0


# --- webhooks keep scheduled cancellations -------------------------------------------


async def test_cancel_at_and_cancel_at_period_end_are_kept_from_events(
    make_service: Callable[..., Any], conn: asyncpg.Connection
) -> None:
    service = await make_service(STRIPE_WEBHOOK_SECRETS=WEBHOOK_SECRET)

    async def send(created_at: int, **fields: Any) -> None:
        event = subscription_event(
            "customer.subscription.updated",
            "sub_42a",
            "cus_42",
            items=[("si_42a", "price_basic", 3)],
            created=created_at,
        )
        event["data"]["object"].update(fields)
        resp = await deliver(service, event)
        assert resp.status == 200, await resp.text()

    now = int(time.time())
    # Classic billing mode: "cancel at period end" sets the flag (and Stripe fills cancel_at).
    await send(now - 30, cancel_at=CANCEL_AT, cancel_at_period_end=True)
    row = (await _subs(conn, "u_42"))["sub_42a"]
    assert (row["cancel_at"], row["cancel_at_period_end"]) == (_at(CANCEL_AT), True)
    # Flexible billing mode: only cancel_at.
    await send(now - 20, cancel_at=CANCEL_AT + 3600, cancel_at_period_end=False)
    row = (await _subs(conn, "u_42"))["sub_42a"]
    assert (row["cancel_at"], row["cancel_at_period_end"]) == (_at(CANCEL_AT + 3600), False)
    # An older event does not bring an old schedule back.
    await send(now - 25, cancel_at=CANCEL_AT, cancel_at_period_end=True)
    row = (await _subs(conn, "u_42"))["sub_42a"]
    assert row["cancel_at"] == _at(CANCEL_AT + 3600)
    # The customer renews: Stripe sends null and false.
    await send(now - 10, cancel_at=None, cancel_at_period_end=False)
    row = (await _subs(conn, "u_42"))["sub_42a"]
    assert (row["cancel_at"], row["cancel_at_period_end"]) == (None, False)


# --- Connect on the request path -------------------------------------------------------


async def test_session_for_a_connected_customer_carries_stripe_account(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "UPDATE customers SET connected_account = 'acct_conn42' WHERE user_id = 'u_42'"
    )
    await created(await post_session(service, {"user_id": "u_42"}, token))
    await created(await post_session(service, {"user_id": "u_none"}, token))
    connected, platform = standin.requests()
    assert connected.params["customer"] == "cus_42"
    assert connected.headers["Stripe-Account"] == "acct_conn42"
    assert platform.params["customer"] == "cus_none"
    assert "Stripe-Account" not in platform.headers


# --- the background backfiller -----------------------------------------------------------


async def test_backfiller_dedupes_per_user_and_reruns_after_a_running_one(
    parts: Parts, standin: Standin, conn: asyncpg.Connection
) -> None:
    standin.state.seed_subscriptions(
        [{"id": "sub_42new", "customer": "cus_42", "items": [_item("si_42n", "price_pro", 1)]}]
    )
    standin.state.set_latency(150)
    backfiller = Backfiller(parts.db, parts.stripe, parts.metrics)
    try:
        # Not started yet: one run covers every link scheduled before it reads the mapping.
        assert backfiller.schedule("u_42") is True
        assert backfiller.schedule("u_42") is False
        async with asyncio.timeout(WAIT_SECONDS):
            await backfiller.wait_idle()
        assert len(standin.requests("/v1/subscriptions")) == 1
        assert set(await _subs(conn, "u_42")) == {"sub_42new"}

        # Running: the mapping may have changed after it was read, so once more after it.
        assert backfiller.schedule("u_42") is True
        await until(lambda: _in_flight(standin) == 1, "the backfill to reach Stripe", WAIT_SECONDS)
        assert backfiller.schedule("u_42") is True
        assert backfiller.schedule("u_42") is False
        async with asyncio.timeout(WAIT_SECONDS):
            await backfiller.wait_idle()
        assert len(standin.requests("/v1/subscriptions")) == 3
        assert (backfiller.succeeded, backfiller.failed, backfiller.pending) == (3, 0, 0)
    finally:
        await backfiller.close(0)


async def test_backfiller_bounds_concurrency(parts: Parts, standin: Standin) -> None:
    standin.state.set_latency(100)
    backfiller = Backfiller(parts.db, parts.stripe, parts.metrics, concurrency=2)
    users = ["u_42", "u_7", "u_none", "u_two", "u_multi"]
    try:
        for user in users:
            assert backfiller.schedule(user)
        most = 0
        deadline = time.monotonic() + WAIT_SECONDS
        while backfiller.pending:
            assert time.monotonic() < deadline, "backfills did not finish"
            most = max(most, _in_flight(standin))
            await asyncio.sleep(0.005)
        # Sampled: it can miss a peak but never see one that was not there.
        assert 1 <= most <= 2
        assert backfiller.succeeded == len(users)
        assert len(standin.requests("/v1/subscriptions")) == len(users)
    finally:
        await backfiller.close(0)


async def test_backfiller_survives_a_stripe_error_and_records_it(
    parts: Parts, standin: Standin, conn: asyncpg.Connection
) -> None:
    standin.state.queue_faults([{"status": 500}])
    backfiller = Backfiller(parts.db, parts.stripe, parts.metrics)
    try:
        actor = Actor("stripe", "evt_link42", "req_link42")
        assert backfiller.schedule("u_42", actor=actor)
        async with asyncio.timeout(WAIT_SECONDS):
            await backfiller.wait_idle()
        assert (backfiller.succeeded, backfiller.failed) == (0, 1)
        failed = await conn.fetchrow(
            "SELECT * FROM audit_events WHERE action = 'mapping.backfill' AND user_id = 'u_42'"
        )
        assert failed is not None
        assert (failed["outcome"], failed["error_code"]) == ("failed", "upstream_unavailable")
        assert (failed["principal_type"], failed["principal_id"], failed["request_id"]) == (
            "stripe",
            "evt_link42",
            "req_link42",
        )
        assert _sample(parts.metrics, "portal_gateway_audit_events_total", outcome="failed") == 1
        assert set(await _subs(conn, "u_42")) == {"sub_42a", "sub_42old"}  # untouched

        # It goes on: the next schedule (the same user too) runs.
        standin.state.seed_subscriptions(
            [{"id": "sub_42new", "customer": "cus_42", "items": [_item("si_42n", "price_a", 1)]}]
        )
        assert backfiller.schedule("u_42")
        async with asyncio.timeout(WAIT_SECONDS):
            await backfiller.wait_idle()
        assert (backfiller.succeeded, backfiller.failed) == (1, 1)
        assert set(await _subs(conn, "u_42")) == {"sub_42new"}
    finally:
        await backfiller.close(0)


async def test_backfiller_skips_a_user_unlinked_before_its_turn(
    parts: Parts, standin: Standin
) -> None:
    backfiller = Backfiller(parts.db, parts.stripe, parts.metrics)
    try:
        assert backfiller.schedule("u_nobody")
        async with asyncio.timeout(WAIT_SECONDS):
            await backfiller.wait_idle()
        assert (backfiller.succeeded, backfiller.failed) == (0, 0)
        assert standin.requests("/v1/subscriptions") == []
    finally:
        await backfiller.close(0)


async def test_app_backfiller_is_cancelled_on_shutdown_without_a_partial_write(
    make_service: Callable[..., Any], standin: Standin, conn: asyncpg.Connection
) -> None:
    client = await make_service(STRIPE_MAX_RETRIES="0")
    backfiller = client.server.app[keys.BACKFILLER]
    standin.state.seed_subscriptions(
        [{"id": "sub_42new", "customer": "cus_42", "items": [_item("si_42n", "price_a", 1)]}]
    )
    standin.state.set_latency(30_000)  # still at Stripe when the app shuts down
    assert backfiller.schedule("u_42")
    await until(lambda: _in_flight(standin) == 1, "the backfill to reach Stripe", WAIT_SECONDS)
    started = time.monotonic()
    await client.close()
    # Cancelled within its grace period, not after Stripe's 30 s.
    assert time.monotonic() - started < 15
    assert backfiller.pending == 0
    assert backfiller.schedule("u_7") is False  # closed: nothing new starts
    assert set(await _subs(conn, "u_42")) == {"sub_42a", "sub_42old"}
