"""Every flow end to end: what the caller gets and exactly what Stripe received."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import STRIPE_TEST_KEY, Standin
from tests.helpers import created, post_session

pytestmark = pytest.mark.usefixtures("world")


def _only_request(standin: Standin) -> Any:
    received = standin.requests()
    assert len(received) == 1, received
    assert received[0].status == 200
    return received[0]


async def test_home_page_uses_stored_locale_default_profile_and_its_return_url(
    service: Any, token: str, standin: Standin
) -> None:
    body = await created(await post_session(service, {"user_id": "u_42"}, token))
    assert body["flow"] is None
    assert body["user_id"] == "u_42"
    assert body["locale"] == "fr"
    assert body["return_url"] == "https://app.example.com/account"
    assert body["livemode"] is False
    sent = _only_request(standin)
    assert sent.params == {
        "customer": "cus_42",
        "configuration": "bpc_default1",
        "locale": "fr",
        "return_url": "https://app.example.com/account",
    }


async def test_upstream_headers(service: Any, token: str, standin: Standin) -> None:
    await created(await post_session(service, {"user_id": "u_42"}, token))
    headers = _only_request(standin).headers
    assert headers["Stripe-Version"] == "2025-09-30.clover"
    assert headers["User-Agent"].startswith("portal-gateway/")
    assert len(headers["Idempotency-Key"]) >= 32
    assert STRIPE_TEST_KEY not in str(headers)  # the stand-in redacts what it records
    assert headers["Content-Type"].startswith("application/x-www-form-urlencoded")


async def test_payment_method_update_with_redirect(
    service: Any, token: str, standin: Standin
) -> None:
    req = {
        "user_id": "u_42",
        "return_url": "https://app.example.com/billing?tab=1#top",
        "locale": "de",
        "flow": {
            "type": "payment_method_update",
            "after_completion": {"type": "redirect", "return_url": "https://app.example.com/done"},
        },
    }
    body = await created(await post_session(service, req, token))
    assert body["flow"] == "payment_method_update"
    assert body["locale"] == "de"
    assert _only_request(standin).params == {
        "customer": "cus_42",
        "configuration": "bpc_default1",
        "locale": "de",
        "return_url": "https://app.example.com/billing?tab=1#top",
        "flow_data": {
            "type": "payment_method_update",
            "after_completion": {
                "type": "redirect",
                "redirect": {"return_url": "https://app.example.com/done"},
            },
        },
    }


async def test_cancel_with_retention_coupon_and_hosted_confirmation(
    service: Any, token: str, standin: Standin
) -> None:
    req = {
        "user_id": "u_42",
        "flow": {
            "type": "subscription_cancel",
            "retention_offer": "stay-20",
            "after_completion": {"type": "hosted_confirmation", "message": "Sorry to see you go"},
        },
    }
    await created(await post_session(service, req, token))
    assert _only_request(standin).params["flow_data"] == {
        "type": "subscription_cancel",
        "subscription_cancel": {
            "subscription": "sub_42a",
            "retention": {"type": "coupon_offer", "coupon_offer": {"coupon": "coupon_stay20"}},
        },
        "after_completion": {
            "type": "hosted_confirmation",
            "hosted_confirmation": {"custom_message": "Sorry to see you go"},
        },
    }


async def test_subscription_update_by_ref_with_portal_homepage(
    service: Any, token: str, standin: Standin
) -> None:
    req = {
        "user_id": "u_42",
        "flow": {
            "type": "subscription_update",
            "subscription": "team-plan",
            "after_completion": {"type": "portal_homepage"},
        },
    }
    await created(await post_session(service, req, token))
    assert _only_request(standin).params["flow_data"] == {
        "type": "subscription_update",
        "subscription_update": {"subscription": "sub_42a"},
        "after_completion": {"type": "portal_homepage"},
    }


async def test_subscription_by_stripe_id_of_own_subscription(
    service: Any, token: str, standin: Standin
) -> None:
    req = {"user_id": "u_42", "flow": {"type": "subscription_update", "subscription": "sub_42a"}}
    await created(await post_session(service, req, token))
    flow = _only_request(standin).params["flow_data"]
    assert flow["subscription_update"] == {"subscription": "sub_42a"}


async def test_update_confirm_with_plan_quantity_and_promotion_code(
    service: Any, token: str, standin: Standin
) -> None:
    req = {
        "user_id": "u_42",
        "flow": {
            "type": "subscription_update_confirm",
            "plan": "pro-yearly",
            "quantity": 5,
            "discount": "spring-promo",
        },
    }
    body = await created(await post_session(service, req, token))
    assert body["flow"] == "subscription_update_confirm"
    sent = _only_request(standin)
    assert sent.params["flow_data"] == {
        "type": "subscription_update_confirm",
        "subscription_update_confirm": {
            "subscription": "sub_42a",
            "items": [{"id": "si_42a", "price": "price_pro_yearly", "quantity": "5"}],
            "discounts": [{"promotion_code": "promo_spring"}],
        },
    }
    # Nested params are encoded the way Stripe's SDKs encode them.
    assert (
        "flow_data[subscription_update_confirm][items][0][id]",
        "si_42a",
    ) in [tuple(pair) for pair in sent.raw]


async def test_update_confirm_quantity_only_with_coupon(
    service: Any, token: str, standin: Standin
) -> None:
    req = {
        "user_id": "u_42",
        "flow": {"type": "subscription_update_confirm", "quantity": 2, "discount": "stay-20"},
    }
    await created(await post_session(service, req, token))
    confirm = _only_request(standin).params["flow_data"]["subscription_update_confirm"]
    assert confirm["items"] == [{"id": "si_42a", "quantity": "2"}]
    assert confirm["discounts"] == [{"coupon": "coupon_stay20"}]


async def test_user_profile_gives_configuration_and_on_behalf_of(
    service: Any, token: str, standin: Standin
) -> None:
    await created(await post_session(service, {"user_id": "u_7"}, token))
    params = _only_request(standin).params
    assert params["configuration"] == "bpc_connect1"
    assert params["on_behalf_of"] == "acct_platform1"
    assert "locale" not in params
    assert "return_url" not in params  # no request, profile or DEFAULT_RETURN_URL value


async def test_named_portal_overrides_user_default(
    service: Any, token: str, standin: Standin
) -> None:
    await created(await post_session(service, {"user_id": "u_42", "portal": "connect"}, token))
    params = _only_request(standin).params
    assert params["configuration"] == "bpc_connect1"
    assert params["on_behalf_of"] == "acct_platform1"


async def test_accounts_v2_user_sends_customer_account(
    service: Any, token: str, standin: Standin
) -> None:
    req = {"user_id": "u_acct", "flow": {"type": "subscription_cancel"}}
    await created(await post_session(service, req, token))
    params = _only_request(standin).params
    assert params["customer_account"] == "acct_user1"
    assert "customer" not in params
    assert params["flow_data"]["subscription_cancel"] == {"subscription": "sub_acct"}


async def test_default_return_url_from_settings_when_profile_has_none(
    make_service: Any, token: str, standin: Standin
) -> None:
    service = await make_service(DEFAULT_RETURN_URL="https://app.example.com/home")
    await created(await post_session(service, {"user_id": "u_7"}, token))
    assert _only_request(standin).params["return_url"] == "https://app.example.com/home"


async def test_no_profile_at_all_sends_neither(
    service: Any, token: str, standin: Standin, conn: Any
) -> None:
    await conn.execute("UPDATE portal_profiles SET is_default = false")
    await created(await post_session(service, {"user_id": "u_42"}, token))
    params = _only_request(standin).params
    assert "configuration" not in params
    assert "on_behalf_of" not in params
