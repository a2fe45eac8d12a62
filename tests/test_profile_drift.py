"""Snapshots and drift (SPEC §12): Stripe's webhooks keep each profile's snapshot, and
``portal_gateway_profile_drift{profile}`` says whether it still matches what was applied.

Profiles are seeded as ``profiles apply`` leaves them (applied body + Stripe's
answer as the snapshot); edits "in the Dashboard" arrive as signed
``billing_portal.configuration.updated`` events carrying the edited object.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from service import keys
from service.drift_gauge import MAX_AGE_SECONDS
from service.profile_drift import drifted_fields
from tests.helpers import configuration_event, deliver, metric_value
from tests.profile_rows import APPLIED, T0, configuration, seed_profile, stored_snapshot

DRIFT = "portal_gateway_profile_drift"
EVENTS_TOTAL = "portal_gateway_webhook_events_total"
UPDATED = "billing_portal.configuration.updated"
CREATED = "billing_portal.configuration.created"
PAYMENT_METHODS_OFF = {"features": {"payment_method_update": {"enabled": False}}}


@pytest.fixture
async def service(make_service: Any) -> Any:
    return await make_service(STRIPE_WEBHOOK_SECRETS="whsec_test_current_0123456789")


async def _result(resp: Any) -> str:
    text = await resp.text()
    assert resp.status == 200, text
    result: str = orjson.loads(text)["result"]
    return result


async def _profile_audit(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT principal_type, principal_id, action, outcome, user_id, detail::text"
        " FROM audit_events WHERE action = 'profile_snapshot' ORDER BY occurred_at"
    )
    return [dict(r) | {"detail": orjson.loads(r["detail"])} for r in rows]


# --- the comparison (pure) -----------------------------------------------------------


def test_stripes_answer_to_what_was_applied_is_no_drift() -> None:
    assert drifted_fields(APPLIED, configuration("bpc_a")) == []


def test_order_of_prices_and_allowed_updates_is_not_drift() -> None:
    edit = {
        "features": {
            "subscription_update": {
                "default_allowed_updates": ["quantity", "price"],
                "products": [
                    {
                        "product": "prod_pro",
                        "prices": ["price_basic", "price_pro_yearly"],
                        "adjustable_quantity": {"enabled": False, "maximum": None, "minimum": 1},
                    }
                ],
            }
        }
    }
    assert drifted_fields(APPLIED, configuration("bpc_a", edit=edit)) == []


def test_each_edited_field_is_named() -> None:
    edit = {
        "business_profile": {"headline": "Something else"},
        "features": {"payment_method_update": {"enabled": False}},
    }
    assert drifted_fields(APPLIED, configuration("bpc_a", edit=edit)) == [
        "business_profile.headline",
        "features.payment_method_update.enabled",
    ]


def test_a_price_removed_from_the_product_is_drift() -> None:
    snapshot = configuration("bpc_a")
    snapshot["features"]["subscription_update"]["products"][0]["prices"] = ["price_basic"]
    assert drifted_fields(APPLIED, snapshot) == ["features.subscription_update.products[0].prices"]


def test_a_field_the_file_does_not_declare_is_nobodys() -> None:
    """The file does not mention customer_update: enabling it in the Dashboard is not
    drift (apply would not put it back either, as `plan` says)."""
    edit = {"features": {"customer_update": {"enabled": True}}}
    assert drifted_fields(APPLIED, configuration("bpc_a", edit=edit)) == []


def test_deactivated_in_the_dashboard_is_drift_metadata_is_not() -> None:
    assert drifted_fields(APPLIED, configuration("bpc_a", edit={"active": False})) == ["active"]
    edit = {"metadata": {"content_hash": "edited", "note": "x"}}
    assert drifted_fields(APPLIED, configuration("bpc_a", edit=edit)) == []


# --- webhooks store snapshots; the gauge follows ---------------------------------------


async def test_a_dashboard_edit_arriving_by_webhook_sets_the_gauge_and_is_audited(
    service: Any, conn: asyncpg.Connection
) -> None:
    await seed_profile(conn, "pro", "bpc_pro1", snapshot=configuration("bpc_pro1"))
    assert await metric_value(service, DRIFT, profile="pro") == 0
    assert f'{DRIFT}{{profile="pro"}} 0.0' in await (await service.get("/metrics")).text()

    edited = configuration("bpc_pro1", updated=T0 + 60, edit=PAYMENT_METHODS_OFF)
    event = configuration_event(
        UPDATED,
        edited,
        previous_attributes={"features": {"payment_method_update": {"enabled": True}}},
    )
    assert await _result(await deliver(service, event)) == "applied"

    assert await metric_value(service, DRIFT, profile="pro") == 1
    snapshot, at = await stored_snapshot(conn, "pro")
    assert snapshot == edited
    assert at == datetime.fromtimestamp(T0 + 60, UTC)
    (audit,) = await _profile_audit(conn)
    assert (audit["principal_type"], audit["principal_id"], audit["outcome"]) == (
        "stripe",
        event["id"],
        "applied",
    )
    assert audit["user_id"] is None
    assert audit["detail"]["configuration"] == "bpc_pro1"
    assert audit["detail"]["profiles"] == {"pro": ["features.payment_method_update.enabled"]}
    assert await metric_value(service, EVENTS_TOTAL, type=UPDATED, result="applied") == 1

    # Put back as applied (as `profiles apply` would): the gauge returns to 0.
    fixed = configuration("bpc_pro1", updated=T0 + 120)
    assert await _result(await deliver(service, configuration_event(UPDATED, fixed))) == "applied"
    assert await metric_value(service, DRIFT, profile="pro") == 0


async def test_an_older_or_same_time_report_is_superseded_and_changes_nothing(
    service: Any, conn: asyncpg.Connection
) -> None:
    current = configuration("bpc_pro1")
    await seed_profile(conn, "pro", "bpc_pro1", snapshot=current)
    for updated in (T0 - 60, T0):
        older = configuration("bpc_pro1", updated=updated, edit=PAYMENT_METHODS_OFF)
        event = configuration_event(UPDATED, older)
        assert await _result(await deliver(service, event)) == "superseded"
    assert await stored_snapshot(conn, "pro") == (current, datetime.fromtimestamp(T0, UTC))
    assert await _profile_audit(conn) == []
    assert await metric_value(service, DRIFT, profile="pro") == 0
    assert await metric_value(service, EVENTS_TOTAL, type=UPDATED, result="superseded") == 2


async def test_another_accounts_event_changes_nothing(
    service: Any, conn: asyncpg.Connection
) -> None:
    """Connect: a configuration id is looked up on the event's account only."""
    platform = configuration("bpc_shared1")
    connected = configuration("bpc_conn1")
    await seed_profile(conn, "platform", "bpc_shared1", snapshot=platform)
    await seed_profile(
        conn, "connected", "bpc_conn1", snapshot=connected, connected_account="acct_conn1"
    )
    edit = PAYMENT_METHODS_OFF
    for event in (
        # Another account's configuration with our platform profile's id …
        configuration_event(
            UPDATED, configuration("bpc_shared1", updated=T0 + 60, edit=edit), account="acct_x1"
        ),
        # … a platform event for the connected profile's id, and another account's.
        configuration_event(UPDATED, configuration("bpc_conn1", updated=T0 + 60, edit=edit)),
        configuration_event(
            UPDATED, configuration("bpc_conn1", updated=T0 + 60, edit=edit), account="acct_x1"
        ),
    ):
        assert await _result(await deliver(service, event)) == "unknown_configuration"
    assert (await stored_snapshot(conn, "platform"))[0] == platform
    assert (await stored_snapshot(conn, "connected"))[0] == connected
    assert await metric_value(service, DRIFT, profile="platform") == 0
    assert await metric_value(service, DRIFT, profile="connected") == 0
    assert await _profile_audit(conn) == []

    # The connected account's own event is applied.
    own = configuration_event(
        UPDATED, configuration("bpc_conn1", updated=T0 + 60, edit=edit), account="acct_conn1"
    )
    assert await _result(await deliver(service, own)) == "applied"
    assert await metric_value(service, DRIFT, profile="connected") == 1
    assert await metric_value(service, DRIFT, profile="platform") == 0


async def test_created_event_gives_a_profile_its_first_snapshot(
    service: Any, conn: asyncpg.Connection
) -> None:
    """A profile without a snapshot has no series; the created event brings one."""
    await seed_profile(conn, "fresh", "bpc_fresh1", snapshot=None)
    page = await (await service.get("/metrics")).text()
    assert f'{DRIFT}{{profile="fresh"}}' not in page
    event = configuration_event(CREATED, configuration("bpc_fresh1"))
    assert await _result(await deliver(service, event)) == "applied"
    assert await metric_value(service, DRIFT, profile="fresh") == 0
    assert f'{DRIFT}{{profile="fresh"}} 0.0' in await (await service.get("/metrics")).text()
    assert (await _profile_audit(conn))[0]["detail"]["profiles"] == {"fresh": []}


async def test_a_configuration_no_profile_uses_and_an_unreadable_object(
    service: Any, conn: asyncpg.Connection
) -> None:
    event = configuration_event(UPDATED, configuration("bpc_nobody1"))
    assert await _result(await deliver(service, event)) == "unknown_configuration"
    broken = configuration_event(UPDATED, configuration("bpc_nobody1"))
    del broken["data"]["object"]["updated"]
    assert await _result(await deliver(service, broken)) == "invalid_object"
    assert await _profile_audit(conn) == []


async def test_every_replica_reports_the_same_drift_from_the_database(
    make_service: Any, conn: asyncpg.Connection
) -> None:
    """The gauge is read from the rows at scrape time, not kept by whoever got the webhook;
    profiles not managed by the file, and removed ones, have no series."""
    drifted = configuration("bpc_pro1", edit=PAYMENT_METHODS_OFF)
    await seed_profile(conn, "pro", "bpc_pro1", snapshot=drifted)
    await seed_profile(conn, "same", "bpc_same1", snapshot=configuration("bpc_same1"))
    await seed_profile(conn, "by-hand", "bpc_hand1", applied=None, snapshot=drifted)
    one = await make_service()
    other = await make_service()
    for replica in (one, other):
        assert await metric_value(replica, DRIFT, profile="pro") == 1
        assert await metric_value(replica, DRIFT, profile="same") == 0
        assert 'profile="by-hand"' not in await (await replica.get("/metrics")).text()

    await conn.execute("DELETE FROM portal_profiles WHERE name = 'pro'")
    # Asked at most once a second: move this replica's clock past that.
    one.server.app[keys.PROFILE_DRIFT].clock = lambda: time.monotonic() + MAX_AGE_SECONDS
    page = await (await one.get("/metrics")).text()
    assert 'profile="pro"' not in page
    assert f'{DRIFT}{{profile="same"}} 0.0' in page
