"""Checked before Stripe (SPEC §12): a profile with a snapshot refuses, without calling
Stripe, the sessions its configuration would refuse; without a snapshot nothing changes.

Each refusal is a 409 with its code, an audit row naming the profile and its
configuration, and a count in ``portal_gateway_session_errors_total``; the
Stripe stand-in receives nothing.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest

from tests.conftest import Standin
from tests.helpers import created, metric_value, post_session, problem
from tests.profile_rows import APPLIED, configuration, seed_profile

pytestmark = pytest.mark.usefixtures("world")

ERRORS = "portal_gateway_session_errors_total"
CONFIRM_PRO = {"type": "subscription_update_confirm", "plan": "pro-yearly"}


async def _snapshot(
    conn: asyncpg.Connection, edit: dict[str, Any] | None = None, **kwargs: Any
) -> None:
    """Give the seeded default profile (bpc_default1) Stripe's snapshot, edited."""
    await seed_profile(
        conn,
        "default",
        "bpc_default1",
        snapshot=configuration("bpc_default1", edit=edit),
        is_default=True,
        **kwargs,
    )


async def _refused(
    service: Any,
    token: str,
    standin: Standin,
    conn: asyncpg.Connection,
    body: dict[str, Any],
    code: str,
    field: str,
) -> dict[str, Any]:
    """Assert the 409, that Stripe heard nothing, the count, and the audit row; its detail."""
    answer = await problem(await post_session(service, body, token), 409, code)
    assert answer["field"] == field
    assert standin.requests() == []
    assert await metric_value(service, ERRORS, code=code) == 1
    row = await conn.fetchrow(
        "SELECT action, outcome, http_status, error_code, user_id, detail::text"
        " FROM audit_events WHERE error_code = $1",
        code,
    )
    assert row is not None
    assert (row["action"], row["outcome"], row["http_status"], row["user_id"]) == (
        "portal_session.create",
        "refused",
        409,
        body["user_id"],
    )
    detail: dict[str, Any] = orjson.loads(row["detail"])
    assert (detail["profile"], detail["configuration"]) == ("default", "bpc_default1")
    return detail


async def test_inactive_configuration(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    await _snapshot(conn, {"active": False})
    await _refused(service, token, standin, conn, {"user_id": "u_42"}, "portal_inactive", "portal")


@pytest.mark.parametrize(
    ("flow", "feature"),
    [
        ({"type": "payment_method_update"}, "payment_method_update"),
        ({"type": "subscription_cancel"}, "subscription_cancel"),
        ({"type": "subscription_update"}, "subscription_update"),
        (CONFIRM_PRO, "subscription_update"),
    ],
)
async def test_flow_whose_feature_is_disabled(
    service: Any,
    token: str,
    standin: Standin,
    conn: asyncpg.Connection,
    flow: dict[str, Any],
    feature: str,
) -> None:
    await _snapshot(conn, {"features": {feature: {"enabled": False}}})
    detail = await _refused(
        service,
        token,
        standin,
        conn,
        {"user_id": "u_42", "flow": flow},
        "portal_feature_disabled",
        "flow.type",
    )
    assert detail["feature"] == feature


async def test_confirm_to_a_price_the_configuration_does_not_offer(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    products = [{"product": "prod_pro", "prices": ["price_basic"]}]
    edit = {"features": {"subscription_update": {"products": products}}}
    await _snapshot(conn, edit)
    body = {"user_id": "u_42", "flow": CONFIRM_PRO}
    detail = await _refused(service, token, standin, conn, body, "plan_not_offered", "flow.plan")
    assert detail["price"] == "price_pro_yearly"
    # A quantity change names no price: Stripe is asked.
    quantity = {"type": "subscription_update_confirm", "quantity": 4}
    await created(await post_session(service, {"user_id": "u_42", "flow": quantity}, token))
    assert len(standin.requests()) == 1


async def test_profile_on_another_connected_account_than_the_customer(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    await _snapshot(conn, connected_account="acct_conn1")
    detail = await _refused(
        service, token, standin, conn, {"user_id": "u_42"}, "portal_account_mismatch", "portal"
    )
    assert (detail["profile_account"], detail["customer_account"]) == ("acct_conn1", None)

    # The customer on that account: the session goes to Stripe, on that account.
    await conn.execute(
        "UPDATE customers SET connected_account = 'acct_conn1' WHERE user_id = 'u_42'"
    )
    await created(await post_session(service, {"user_id": "u_42"}, token))
    (request,) = standin.requests()
    assert request.params["configuration"] == "bpc_default1"
    assert request.stripe_account == "acct_conn1"


async def test_a_configuration_that_allows_everything_goes_to_stripe(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    await _snapshot(conn)
    flows: list[dict[str, Any] | None] = [
        None,
        {"type": "payment_method_update"},
        {"type": "subscription_cancel"},
        {"type": "subscription_update"},
        CONFIRM_PRO,
    ]
    for flow in flows:
        body = {"user_id": "u_42", **({"flow": flow} if flow else {})}
        await created(await post_session(service, body, token))
    assert len(standin.requests()) == len(flows)
    assert standin.requests()[-1].params["flow_data"]["subscription_update_confirm"]["items"] == [
        {"id": "si_42a", "price": "price_pro_yearly"}
    ]


async def test_without_a_snapshot_the_call_goes_to_stripe_as_before(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    """No snapshot (never applied, or made by hand): no check, even where one would refuse."""
    await seed_profile(
        conn,
        "default",
        "bpc_default1",
        applied=APPLIED,
        snapshot=None,
        is_default=True,
        connected_account="acct_conn1",
    )
    for flow in ({"type": "payment_method_update"}, CONFIRM_PRO):
        await created(await post_session(service, {"user_id": "u_42", "flow": flow}, token))
    assert len(standin.requests()) == 2
    assert all(r.params["configuration"] == "bpc_default1" for r in standin.requests())


async def test_a_profile_named_in_the_request_is_checked_too(
    service: Any, token: str, standin: Standin, conn: asyncpg.Connection
) -> None:
    inactive = configuration("bpc_connect1", edit={"active": False})
    await seed_profile(conn, "connect", "bpc_connect1", snapshot=inactive)
    body = {"user_id": "u_42", "portal": "connect"}
    await problem(await post_session(service, body, token), 409, "portal_inactive")
    # The default profile has no snapshot: unchanged.
    await created(await post_session(service, {"user_id": "u_42"}, token))
    (request,) = standin.requests()
    assert request.params["configuration"] == "bpc_default1"
