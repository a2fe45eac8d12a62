"""Tests for the Stripe stand-in (``stripe_standin``), over real HTTP.

The stand-in is the Stripe our other tests and the demo talk to, so these pin
what they rely on: Stripe's strictness on ``POST /v1/billing_portal/sessions``,
its error shapes, auth, idempotency, the recordings, every fault kind, the
subscription list's pagination, and the portal configuration endpoints (their
parameter rules, update merging, Connect scoping, the catalogue, what sessions
refuse because of a configuration, and Dashboard edits).
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpClient

from stripe_standin import (
    LOCALES,
    REDACTED,
    STATE,
    ControlError,
    StandinState,
    StripeError,
    create_app,
    decode_form,
    mask_api_key,
)
from tests.helpers import configuration_event, customer_event

Client = TestClient[web.Request, web.Application]
Pairs = list[tuple[str, str]]

KEY = "sk_test_51StandinTestKey000000000001"
AUTH = {"Authorization": f"Bearer {KEY}"}
SESSIONS = "/v1/billing_portal/sessions"
# The keys of Stripe's reference response, plus flow's own keys.
SESSION_KEYS = {
    "id",
    "object",
    "configuration",
    "created",
    "customer",
    "flow",
    "livemode",
    "locale",
    "on_behalf_of",
    "return_url",
    "url",
}
FLOW_KEYS = {
    "after_completion",
    "subscription_cancel",
    "subscription_update",
    "subscription_update_confirm",
    "type",
}
SUC = "flow_data[subscription_update_confirm]"


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(create_app())


def state_of(client: Client) -> StandinState:
    return client.app[STATE]


async def post_session(
    client: Client, pairs: Pairs, headers: dict[str, str] | None = None
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with client.post(SESSIONS, data=pairs, headers={**AUTH, **(headers or {})}) as resp:
        return resp.status, await resp.json(), resp.headers


async def control(client: Client, method: str, path: str, body: object = None) -> Any:
    async with client.request(method, f"/_standin/{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


BASE: Pairs = [("customer", "cus_NciAYcXfLnqBoz"), ("return_url", "https://example.com/account")]


# --------------------------------------------------------------------------- success

FLOW_CASES: list[tuple[str, Pairs, dict[str, Any]]] = [
    (
        "payment_method_update+portal_homepage",
        [
            ("flow_data[type]", "payment_method_update"),
            ("flow_data[after_completion][type]", "portal_homepage"),
        ],
        {"type": "payment_method_update", "after_completion": {"type": "portal_homepage"}},
    ),
    (
        "subscription_cancel+retention+redirect",
        [
            ("flow_data[type]", "subscription_cancel"),
            ("flow_data[subscription_cancel][subscription]", "sub_1"),
            ("flow_data[subscription_cancel][retention][type]", "coupon_offer"),
            ("flow_data[subscription_cancel][retention][coupon_offer][coupon]", "STAY20"),
            ("flow_data[after_completion][type]", "redirect"),
            ("flow_data[after_completion][redirect][return_url]", "https://example.com/done"),
        ],
        {
            "type": "subscription_cancel",
            "subscription_cancel": {
                "subscription": "sub_1",
                "retention": {"type": "coupon_offer", "coupon_offer": {"coupon": "STAY20"}},
            },
            "after_completion": {
                "type": "redirect",
                "redirect": {"return_url": "https://example.com/done"},
            },
        },
    ),
    (
        "subscription_update+hosted_confirmation",
        [
            ("flow_data[type]", "subscription_update"),
            ("flow_data[subscription_update][subscription]", "sub_2"),
            ("flow_data[after_completion][type]", "hosted_confirmation"),
            ("flow_data[after_completion][hosted_confirmation][custom_message]", "Merci !"),
        ],
        {
            "type": "subscription_update",
            "subscription_update": {"subscription": "sub_2"},
            "after_completion": {
                "type": "hosted_confirmation",
                "hosted_confirmation": {"custom_message": "Merci !"},
            },
        },
    ),
    (
        "subscription_update_confirm",
        [
            ("flow_data[type]", "subscription_update_confirm"),
            (f"{SUC}[subscription]", "sub_3"),
            (f"{SUC}[items][0][id]", "si_1"),
            (f"{SUC}[items][0][price]", "price_pro"),
            (f"{SUC}[items][0][quantity]", "5"),
            (f"{SUC}[discounts][0][promotion_code]", "promo_spring"),
        ],
        {
            "type": "subscription_update_confirm",
            "subscription_update_confirm": {
                "subscription": "sub_3",
                "items": [{"id": "si_1", "price": "price_pro", "quantity": "5"}],
                "discounts": [{"promotion_code": "promo_spring"}],
            },
        },
    ),
]


@pytest.mark.parametrize(
    ("pairs", "flow_data"), [c[1:] for c in FLOW_CASES], ids=[c[0] for c in FLOW_CASES]
)
async def test_every_flow_and_after_completion_succeeds(
    client: Client, pairs: Pairs, flow_data: dict[str, Any]
) -> None:
    status, body, headers = await post_session(client, [*BASE, *pairs])

    assert status == 200, body
    assert set(body) == SESSION_KEYS
    assert set(body["flow"]) == FLOW_KEYS
    assert body["flow"]["type"] == flow_data["type"]
    after = flow_data.get("after_completion", {"type": "portal_homepage"})
    assert body["flow"]["after_completion"]["type"] == after["type"]
    recorded = state_of(client).requests[-1]
    assert recorded.params == {**dict(BASE), "flow_data": flow_data}
    assert recorded.raw == [*BASE, *pairs]
    assert recorded.status == 200
    assert recorded.request_id == headers["Request-Id"]


async def test_flow_is_echoed_like_stripe(client: Client) -> None:
    _, body, _ = await post_session(client, [*BASE, *FLOW_CASES[3][1]])

    assert body["flow"] == {
        "after_completion": {
            "hosted_confirmation": None,
            "redirect": None,
            "type": "portal_homepage",
        },
        "subscription_cancel": None,
        "subscription_update": None,
        "subscription_update_confirm": {
            "discounts": [{"coupon": None, "promotion_code": "promo_spring"}],
            "items": [{"id": "si_1", "price": "price_pro", "quantity": 5}],
            "subscription": "sub_3",
        },
        "type": "subscription_update_confirm",
    }

    _, body, _ = await post_session(client, [*BASE, *FLOW_CASES[1][1]])
    assert body["flow"]["subscription_cancel"] == {
        "retention": {"coupon_offer": {"coupon": "STAY20"}, "type": "coupon_offer"},
        "subscription": "sub_1",
    }
    assert body["flow"]["after_completion"]["redirect"] == {
        "return_url": "https://example.com/done"
    }


async def test_session_object_matches_the_reference_shape(client: Client) -> None:
    status, body, headers = await post_session(client, list(BASE))

    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body["id"].startswith("bps_")
    assert body["object"] == "billing_portal.session"
    assert body["configuration"].startswith("bpc_")
    assert abs(body["created"] - time.time()) < 5
    assert body["customer"] == "cus_NciAYcXfLnqBoz"
    assert body["flow"] is None
    assert body["livemode"] is False
    assert body["locale"] is None
    assert body["on_behalf_of"] is None
    assert body["return_url"] == "https://example.com/account"
    assert body["url"].startswith("https://billing.stripe.com/p/session/test_")
    assert "customer_account" not in body


async def test_optional_params_are_echoed(client: Client) -> None:
    pairs = [
        ("customer_account", "acct_1Nv0FGQ9RKHgCVdK"),
        ("configuration", "bpc_1MAhNDLkdIwHu7ix"),
        ("on_behalf_of", "acct_1Platform"),
        ("locale", "fr-CA"),
    ]
    status, body, _ = await post_session(client, pairs)

    assert status == 200, body
    assert set(body) == SESSION_KEYS | {"customer_account"}
    assert body["customer"] is None
    assert body["customer_account"] == "acct_1Nv0FGQ9RKHgCVdK"
    assert body["configuration"] == "bpc_1MAhNDLkdIwHu7ix"
    assert body["on_behalf_of"] == "acct_1Platform"
    assert body["locale"] == "fr-CA"
    assert body["return_url"] is None


async def test_every_spec_locale_is_accepted(client: Client) -> None:
    for locale in LOCALES:
        status, body, _ = await post_session(client, [*BASE, ("locale", locale)])
        assert (status, body["locale"]) == (200, locale)


# --------------------------------------------------------------------------- strictness

CONFIRM: Pairs = [
    ("flow_data[type]", "subscription_update_confirm"),
    (f"{SUC}[subscription]", "sub_3"),
    (f"{SUC}[items][0][id]", "si_1"),
]
CUS = [("customer", "cus_1")]
REJECTIONS: list[tuple[str, Pairs, str, str]] = [
    ("unknown top-level", [*CUS, ("colour", "red")], "parameter_unknown", "colour"),
    (
        "unknown nested",
        [*CUS, *CONFIRM, (f"{SUC}[items][0][colour]", "red")],
        "parameter_unknown",
        f"{SUC}[items][0][colour]",
    ),
    ("empty value", [*CUS, ("return_url", "")], "parameter_invalid_empty", "return_url"),
    (
        "empty nested value",
        [
            *CUS,
            ("flow_data[type]", "payment_method_update"),
            ("flow_data[after_completion][type]", "hosted_confirmation"),
            ("flow_data[after_completion][hosted_confirmation][custom_message]", ""),
        ],
        "parameter_invalid_empty",
        "flow_data[after_completion][hosted_confirmation][custom_message]",
    ),
    (
        "missing flow type",
        [*CUS, ("flow_data[after_completion][type]", "portal_homepage")],
        "parameter_missing",
        "flow_data[type]",
    ),
    (
        "missing conditional flow object",
        [*CUS, ("flow_data[type]", "subscription_cancel")],
        "parameter_missing",
        "flow_data[subscription_cancel]",
    ),
    (
        "flow object of another type",
        [
            *CUS,
            ("flow_data[type]", "subscription_update"),
            ("flow_data[subscription_update][subscription]", "sub_1"),
            ("flow_data[subscription_cancel][subscription]", "sub_1"),
        ],
        "parameter_unknown",
        "flow_data[subscription_cancel]",
    ),
    (
        "redirect without its object",
        [
            *CUS,
            ("flow_data[type]", "payment_method_update"),
            ("flow_data[after_completion][type]", "redirect"),
        ],
        "parameter_missing",
        "flow_data[after_completion][redirect]",
    ),
    (
        "redirect object with another type",
        [
            *CUS,
            ("flow_data[type]", "payment_method_update"),
            ("flow_data[after_completion][type]", "portal_homepage"),
            ("flow_data[after_completion][redirect][return_url]", "https://example.com"),
        ],
        "parameter_unknown",
        "flow_data[after_completion][redirect]",
    ),
    (
        "hosted_confirmation object with another type",
        [
            *CUS,
            ("flow_data[type]", "payment_method_update"),
            ("flow_data[after_completion][type]", "redirect"),
            ("flow_data[after_completion][redirect][return_url]", "https://example.com"),
            ("flow_data[after_completion][hosted_confirmation][custom_message]", "hi"),
        ],
        "parameter_unknown",
        "flow_data[after_completion][hosted_confirmation]",
    ),
    (
        "coupon offer without its object",
        [
            *CUS,
            ("flow_data[type]", "subscription_cancel"),
            ("flow_data[subscription_cancel][subscription]", "sub_1"),
            ("flow_data[subscription_cancel][retention][type]", "coupon_offer"),
        ],
        "parameter_missing",
        "flow_data[subscription_cancel][retention][coupon_offer]",
    ),
    (
        "two items",
        [*CUS, *CONFIRM, (f"{SUC}[items][1][id]", "si_2")],
        "parameter_invalid_array",
        f"{SUC}[items]",
    ),
    ("no items", [*CUS, *CONFIRM[:2]], "parameter_missing", f"{SUC}[items]"),
    (
        "item without id",
        [*CUS, *CONFIRM[:2], (f"{SUC}[items][0][quantity]", "2")],
        "parameter_missing",
        f"{SUC}[items][0][id]",
    ),
    (
        "items not an array",
        [*CUS, *CONFIRM[:2], (f"{SUC}[items][id]", "si_1")],
        "parameter_invalid_array",
        f"{SUC}[items]",
    ),
    (
        "quantity not an integer",
        [*CUS, *CONFIRM, (f"{SUC}[items][0][quantity]", "2.5")],
        "parameter_invalid_integer",
        f"{SUC}[items][0][quantity]",
    ),
    (
        "quantity zero",
        [*CUS, *CONFIRM, (f"{SUC}[items][0][quantity]", "0")],
        "parameter_invalid_integer",
        f"{SUC}[items][0][quantity]",
    ),
    (
        "two discounts",
        [
            *CUS,
            *CONFIRM,
            (f"{SUC}[discounts][0][coupon]", "A"),
            (f"{SUC}[discounts][1][coupon]", "B"),
        ],
        "parameter_invalid_array",
        f"{SUC}[discounts]",
    ),
    (
        "coupon and promotion code",
        [
            *CUS,
            *CONFIRM,
            (f"{SUC}[discounts][0][coupon]", "A"),
            (f"{SUC}[discounts][0][promotion_code]", "promo_B"),
        ],
        "parameters_exclusive",
        f"{SUC}[discounts][0][promotion_code]",
    ),
    (
        "customer and customer_account",
        [*CUS, ("customer_account", "acct_1")],
        "parameters_exclusive",
        "customer_account",
    ),
    ("neither customer nor account", [("locale", "fr")], "parameter_missing", "customer"),
    ("bad locale", [*CUS, ("locale", "fr-FR")], "parameter_invalid_string", "locale"),
    (
        "bad flow type",
        [*CUS, ("flow_data[type]", "subscription_pause")],
        "parameter_invalid_string",
        "flow_data[type]",
    ),
    (
        "bad after_completion type",
        [
            *CUS,
            ("flow_data[type]", "payment_method_update"),
            ("flow_data[after_completion][type]", "close"),
        ],
        "parameter_invalid_string",
        "flow_data[after_completion][type]",
    ),
    (
        "bad retention type",
        [
            *CUS,
            ("flow_data[type]", "subscription_cancel"),
            ("flow_data[subscription_cancel][subscription]", "sub_1"),
            ("flow_data[subscription_cancel][retention][type]", "discount"),
        ],
        "parameter_invalid_string",
        "flow_data[subscription_cancel][retention][type]",
    ),
    ("return_url not a URL", [*CUS, ("return_url", "example.com/x")], "url_invalid", "return_url"),
    (
        "redirect return_url not a URL",
        [
            *CUS,
            ("flow_data[type]", "payment_method_update"),
            ("flow_data[after_completion][type]", "redirect"),
            ("flow_data[after_completion][redirect][return_url]", "javascript:alert(1)"),
        ],
        "url_invalid",
        "flow_data[after_completion][redirect][return_url]",
    ),
    (
        "flow_data not an object",
        [*CUS, ("flow_data", "x")],
        "parameter_invalid_object",
        "flow_data",
    ),
    ("customer id prefix", [("customer", "usr_1")], "resource_missing", "customer"),
    ("account id prefix", [("customer_account", "cus_1")], "resource_missing", "customer_account"),
    (
        "configuration id prefix",
        [*CUS, ("configuration", "cfg_1")],
        "resource_missing",
        "configuration",
    ),
    (
        "on_behalf_of id prefix",
        [*CUS, ("on_behalf_of", "cus_1")],
        "resource_missing",
        "on_behalf_of",
    ),
    (
        "subscription id prefix",
        [
            *CUS,
            ("flow_data[type]", "subscription_update"),
            ("flow_data[subscription_update][subscription]", "si_1"),
        ],
        "resource_missing",
        "flow_data[subscription_update][subscription]",
    ),
    (
        "item id prefix",
        [*CUS, *CONFIRM[:2], (f"{SUC}[items][0][id]", "sub_1")],
        "resource_missing",
        f"{SUC}[items][0][id]",
    ),
    (
        "price id prefix",
        [*CUS, *CONFIRM, (f"{SUC}[items][0][price]", "plan_1")],
        "resource_missing",
        f"{SUC}[items][0][price]",
    ),
    (
        "promotion code id prefix",
        [*CUS, *CONFIRM, (f"{SUC}[discounts][0][promotion_code]", "SPRING")],
        "resource_missing",
        f"{SUC}[discounts][0][promotion_code]",
    ),
    ("malformed name", [*CUS, ("flow_data[type", "x")], "parameter_unknown", "flow_data[type"),
]


@pytest.mark.parametrize(
    ("pairs", "code", "param"), [c[1:] for c in REJECTIONS], ids=[c[0] for c in REJECTIONS]
)
async def test_strict_rejections(client: Client, pairs: Pairs, code: str, param: str) -> None:
    status, body, headers = await post_session(client, pairs)

    assert status == 400, body
    error = body["error"]
    assert set(error) == {"type", "code", "param", "message", "request_log_url", "doc_url"}
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert error["message"]
    assert headers["Request-Id"] in error["request_log_url"]
    assert error["doc_url"] == "https://stripe.com/docs/error-codes/" + code.replace("_", "-")
    assert state_of(client).requests[-1].status == 400


async def test_unknown_param_beats_a_missing_one(client: Client) -> None:
    # Stripe names the stray parameter even when something else is missing too.
    _, body, _ = await post_session(client, [("flow_data[tpye]", "subscription_cancel")])
    assert (body["error"]["code"], body["error"]["param"]) == (
        "parameter_unknown",
        "flow_data[tpye]",
    )


async def test_declared_missing_ids_answer_resource_missing(client: Client) -> None:
    await control(client, "POST", "missing", {"ids": ["cus_gone", "sub_gone"]})

    status, body, _ = await post_session(client, [("customer", "cus_gone")])
    assert status == 400
    assert body["error"]["code"] == "resource_missing"
    assert body["error"]["param"] == "customer"
    assert body["error"]["message"] == "No such customer: 'cus_gone'"

    pairs = [
        ("customer", "cus_1"),
        ("flow_data[type]", "subscription_cancel"),
        ("flow_data[subscription_cancel][subscription]", "sub_gone"),
    ]
    status, body, _ = await post_session(client, pairs)
    assert (status, body["error"]["code"]) == (400, "resource_missing")
    assert body["error"]["param"] == "flow_data[subscription_cancel][subscription]"

    assert await control(client, "GET", "missing") == {"ids": ["cus_gone", "sub_gone"]}
    await control(client, "DELETE", "missing")
    status, _, _ = await post_session(client, [("customer", "cus_gone")])
    assert status == 200


async def test_json_body_is_refused(client: Client) -> None:
    async with client.post(SESSIONS, json={"customer": "cus_1"}, headers=AUTH) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert "Content-Type" in body["error"]["message"]


async def test_bad_stripe_version_is_refused(client: Client) -> None:
    status, body, _ = await post_session(client, list(BASE), {"Stripe-Version": "clover"})
    assert status == 400
    assert body["error"]["message"] == "Invalid Stripe API version: clover"

    status, _, headers = await post_session(
        client, list(BASE), {"Stripe-Version": "2025-09-30.clover"}
    )
    assert (status, headers["Stripe-Version"]) == (200, "2025-09-30.clover")


async def test_unknown_route_is_a_stripe_404(client: Client) -> None:
    async with client.delete("/v1/billing_portal/sessions", headers=AUTH) as resp:
        body = await resp.json()
    assert resp.status == 404
    assert body["error"]["type"] == "invalid_request_error"
    assert (
        "Unrecognized request URL (DELETE: /v1/billing_portal/sessions)" in body["error"]["message"]
    )
    assert state_of(client).requests[-1].status == 404


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("headers", "message_start"),
    [
        ({}, "You did not provide an API key."),
        ({"Authorization": "Bearer "}, "You did not provide an API key."),
        (
            {"Authorization": "Bearer sk_live_FAKE_not_a_real_key_7890"},
            "Invalid API Key provided: ",
        ),
        (
            {"Authorization": "Bearer pk_test_51PublishableKey123456789"},
            "Invalid API Key provided: ",
        ),
        ({"Authorization": "Token sk_test_51Whatever"}, "Invalid API Key provided: "),
    ],
)
async def test_bad_or_missing_key_is_401(
    client: Client, headers: dict[str, str], message_start: str
) -> None:
    async with client.post(SESSIONS, data=BASE, headers=headers) as resp:
        body = await resp.json()
        text = json.dumps(body)

    assert resp.status == 401
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(message_start)
    assert "Request-Id" in resp.headers
    for header in headers.values():
        key = header.partition(" ")[2]
        assert len(key) < 8 or key not in text  # never echoed whole
    assert state_of(client).requests[-1].status == 401


def test_keys_are_masked_like_stripe() -> None:
    assert mask_api_key("sk_live_FAKE_not_a_real_key_7890") == "sk_live_" + "*" * 20 + "7890"
    assert mask_api_key("sk_live_short") == "sk_live_*****"
    assert mask_api_key("whatever") == "********"


async def test_restricted_and_basic_auth_keys_are_accepted(client: Client) -> None:
    status, _, _ = await post_session(
        client, list(BASE), {"Authorization": "Bearer rk_test_abc123"}
    )
    assert status == 200
    # What `curl -u sk_test_...:` sends.
    basic = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    status, _, _ = await post_session(client, list(BASE), {"Authorization": basic})
    assert status == 200


async def test_key_prefixes_are_configurable(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(api_key_prefixes=("sk_live_",)))
    live = {"Authorization": "Bearer sk_live_123"}
    assert (await post_session(client, list(BASE), live))[0] == 200
    assert (await post_session(client, list(BASE)))[0] == 401


# --------------------------------------------------------------------------- recordings


async def test_requests_are_recorded_with_the_key_redacted(client: Client) -> None:
    await post_session(client, list(BASE), {"Idempotency-Key": "idem-1"})
    await post_session(client, [("colour", "red")])
    async with client.get("/v1/subscriptions", params={"customer": "cus_1"}, headers=AUTH):
        pass

    recorded = await control(client, "GET", "requests")

    assert [r["status"] for r in recorded] == [200, 400, 200]
    first = recorded[0]
    assert first["method"] == "POST"
    assert first["path"] == SESSIONS
    assert first["headers"]["Authorization"] == REDACTED
    assert first["params"] == dict(BASE)
    assert first["raw"] == [list(pair) for pair in BASE]
    assert first["idempotency_key"] == "idem-1"
    assert recorded[2]["params"] == {"customer": "cus_1"}
    assert KEY not in json.dumps(recorded)

    assert await control(client, "DELETE", "requests") == {"deleted": 3}
    assert await control(client, "GET", "requests") == []


async def test_every_response_has_a_request_id(client: Client) -> None:
    await control(client, "POST", "faults", {"faults": [{"status": 500}]})
    responses = [
        client.post(SESSIONS, data=BASE, headers=AUTH),  # fault
        client.post(SESSIONS, data=BASE, headers=AUTH),
        client.post(SESSIONS, data=BASE),
        client.get("/_standin/health"),
        client.get("/_standin/nowhere"),
    ]
    seen = set()
    for pending in responses:
        async with pending as resp:
            request_id = resp.headers["Request-Id"]
            assert request_id.startswith("req_")
            seen.add(request_id)
    assert len(seen) == len(responses)


# --------------------------------------------------------------------------- idempotency


async def test_idempotent_replay_returns_the_same_session(client: Client) -> None:
    key = {"Idempotency-Key": "portal-1"}
    status1, first, headers1 = await post_session(client, list(BASE), key)
    # Same params in another order are the same request.
    status2, second, headers2 = await post_session(client, list(reversed(BASE)), key)

    assert (status1, status2) == (200, 200)
    assert second == first
    assert "Idempotent-Replayed" not in headers1
    assert headers2["Idempotent-Replayed"] == "true"
    assert headers2["Original-Request"] == headers1["Request-Id"]
    assert headers2["Request-Id"] != headers1["Request-Id"]

    status3, third, _ = await post_session(client, [*BASE, ("locale", "fr")], key)
    assert status3 == 400
    assert third["error"]["type"] == "idempotency_error"
    assert "portal-1" in third["error"]["message"]


async def test_idempotency_keys_are_scoped_per_api_key(client: Client) -> None:
    key = {"Idempotency-Key": "shared"}
    _, first, _ = await post_session(client, list(BASE), key)
    other = {**key, "Authorization": "Bearer sk_test_another"}
    _, second, headers = await post_session(client, list(BASE), other)
    assert second["id"] != first["id"]
    assert "Idempotent-Replayed" not in headers


async def test_a_rejected_request_does_not_claim_its_key(client: Client) -> None:
    key = {"Idempotency-Key": "retry-after-fix"}
    assert (await post_session(client, [("customer", "")], key))[0] == 400
    status, _, headers = await post_session(client, list(BASE), key)
    assert status == 200
    assert "Idempotent-Replayed" not in headers


# --------------------------------------------------------------------------- faults


async def test_status_fault_with_headers_then_normal(client: Client) -> None:
    fault = {"status": 503, "headers": {"Stripe-Should-Retry": "false", "Retry-After": "1"}}
    assert await control(client, "POST", "faults", {"faults": [fault]}) == {
        "queued": 1,
        "pending": 1,
    }

    status, body, headers = await post_session(client, list(BASE))
    assert status == 503
    assert body["error"]["type"] == "api_error"
    assert headers["Stripe-Should-Retry"] == "false"
    assert headers["Retry-After"] == "1"
    assert state_of(client).requests[-1].fault == "status"

    assert (await post_session(client, list(BASE)))[0] == 200


async def test_rate_limit_and_lock_timeout_bodies(client: Client) -> None:
    faults = [
        {"status": 429},
        {"status": 429, "code": "lock_timeout"},
        {"status": 500, "body": {"x": 1}},
    ]
    await control(client, "POST", "faults", {"faults": faults})

    status, body, _ = await post_session(client, list(BASE))
    assert (status, body["error"]["type"], body["error"]["code"]) == (
        429,
        "invalid_request_error",
        "rate_limit",
    )
    status, body, _ = await post_session(client, list(BASE))
    assert (status, body["error"]["code"]) == (429, "lock_timeout")
    status, body, _ = await post_session(client, list(BASE))
    assert (status, body) == (500, {"x": 1})


async def test_repeat_and_order(client: Client) -> None:
    faults = [{"status": 502, "repeat": 2}, {"status": 500}]
    await control(client, "POST", "faults", {"faults": faults})
    assert len((await control(client, "GET", "faults"))["faults"]) == 3

    statuses = [(await post_session(client, list(BASE)))[0] for _ in range(4)]
    assert statuses == [502, 502, 500, 200]


async def test_faults_apply_to_every_api_route_and_can_be_cleared(client: Client) -> None:
    await control(client, "POST", "faults", {"faults": [{"status": 500, "repeat": 3}]})
    async with client.get("/v1/subscriptions", headers=AUTH) as resp:
        assert resp.status == 500
    assert await control(client, "DELETE", "faults") == {"deleted": 2}
    assert (await post_session(client, list(BASE)))[0] == 200


async def test_latency_fault_and_standing_latency(client: Client) -> None:
    await control(client, "POST", "faults", {"faults": [{"latency_ms": 120}]})
    started = time.monotonic()
    status, _, _ = await post_session(client, list(BASE))
    assert status == 200
    assert time.monotonic() - started >= 0.12

    assert await control(client, "POST", "latency", {"ms": 80}) == {"ms": 80.0}
    started = time.monotonic()
    assert (await post_session(client, list(BASE)))[0] == 200
    assert time.monotonic() - started >= 0.08
    assert await control(client, "POST", "latency", {"ms": 0}) == {"ms": 0.0}


async def test_hang_never_answers(client: Client) -> None:
    await control(client, "POST", "faults", {"faults": [{"hang": True}]})
    with pytest.raises(TimeoutError):
        async with client.post(
            SESSIONS, data=BASE, headers=AUTH, timeout=aiohttp.ClientTimeout(total=0.2)
        ):
            pass
    recorded = state_of(client).requests[-1]
    assert (recorded.fault, recorded.status) == ("hang", None)
    assert (await post_session(client, list(BASE)))[0] == 200


async def test_reset_drops_the_connection(client: Client) -> None:
    await control(client, "POST", "faults", {"faults": [{"reset": True}]})
    with pytest.raises(aiohttp.ClientConnectionError):
        async with client.post(SESSIONS, data=BASE, headers=AUTH) as resp:
            await resp.read()
    assert state_of(client).requests[-1].status is None
    assert (await post_session(client, list(BASE)))[0] == 200


async def test_truncated_body_is_a_short_read(client: Client) -> None:
    await control(client, "POST", "faults", {"faults": [{"truncated": True}]})
    async with client.post(SESSIONS, data=BASE, headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.content_length is not None
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert (await post_session(client, list(BASE)))[0] == 200


async def test_truncated_json_is_cut_off(client: Client) -> None:
    await control(client, "POST", "faults", {"faults": [{"truncated": "json"}]})
    async with client.post(SESSIONS, data=BASE, headers=AUTH) as resp:
        text = await resp.text()
    assert resp.status == 200
    assert resp.content_type == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


async def test_non_json_body(client: Client) -> None:
    await control(client, "POST", "faults", {"faults": [{"non_json": True}]})
    async with client.post(SESSIONS, data=BASE, headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        with pytest.raises(aiohttp.ContentTypeError):
            await resp.json()


async def test_wrong_object(client: Client) -> None:
    faults = [{"wrong_object": True}, {"wrong_object": "invoice"}]
    await control(client, "POST", "faults", {"faults": faults})
    _, body, _ = await post_session(client, list(BASE))
    assert body["object"] == "billing_portal.configuration"
    assert body["url"].startswith("https://")
    _, body, _ = await post_session(client, list(BASE))
    assert body["object"] == "invoice"


@pytest.mark.parametrize(
    "fault",
    [
        {"stauts": 500},
        {"hang": True, "reset": True},
        {"hang": True, "status": 500},
        {"status": 99},
        {"status": True},
        {"status": 200},
        {"latency_ms": -1},
        {"repeat": 0},
        {"truncated": "half"},
        {"headers": {"X": ["a"]}},
        "500",
    ],
)
async def test_bad_fault_specs_are_refused(client: Client, fault: object) -> None:
    async with client.post("/_standin/faults", json={"faults": [{"status": 500}, fault]}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]
    assert state_of(client).faults == type(state_of(client).faults)()  # all or nothing


# --------------------------------------------------------------------------- subscriptions

SUBS = [
    {
        "id": f"sub_{n}",
        "customer": "cus_A",
        "status": "active",
        "created": 1_700_000_000 + n,
        "items": [{"id": f"si_{n}", "price": "price_basic", "quantity": n}],
    }
    for n in range(1, 6)
] + [
    {"id": "sub_old", "customer": "cus_A", "status": "canceled", "created": 1_600_000_000},
    {"id": "sub_b", "customer": "cus_B", "items": [{"id": "si_b", "price": "price_pro"}]},
]


async def list_subscriptions(client: Client, **params: str) -> tuple[int, Any]:
    async with client.get("/v1/subscriptions", params=params, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_subscription_list_paginates(client: Client) -> None:
    assert await control(client, "POST", "subscriptions", {"subscriptions": SUBS}) == {
        "seeded": 7,
        "total": 7,
    }

    status, page = await list_subscriptions(client, customer="cus_A", limit="2")
    assert status == 200
    assert (page["object"], page["url"], page["has_more"]) == ("list", "/v1/subscriptions", True)
    assert [s["id"] for s in page["data"]] == ["sub_5", "sub_4"]
    first = page["data"][0]
    assert first["object"] == "subscription"
    assert first["customer"] == "cus_A"
    assert first["status"] == "active"
    assert first["created"] == 1_700_000_005
    assert first["items"]["object"] == "list"
    item = first["items"]["data"][0]
    assert (item["id"], item["price"]["id"], item["quantity"]) == ("si_5", "price_basic", 5)

    ids: list[str] = []
    cursor: dict[str, str] = {}
    while True:
        _, page = await list_subscriptions(client, customer="cus_A", limit="2", **cursor)
        ids += [s["id"] for s in page["data"]]
        if not page["has_more"]:
            break
        cursor = {"starting_after": page["data"][-1]["id"]}
    assert ids == ["sub_5", "sub_4", "sub_3", "sub_2", "sub_1"]  # canceled hidden by default

    _, page = await list_subscriptions(client, customer="cus_A", status="all")
    assert [s["id"] for s in page["data"]][-1] == "sub_old"
    _, page = await list_subscriptions(client, customer="cus_A", ending_before="sub_2", limit="2")
    assert ([s["id"] for s in page["data"]], page["has_more"]) == (["sub_4", "sub_3"], True)
    _, page = await list_subscriptions(client, price="price_pro")
    assert [s["id"] for s in page["data"]] == ["sub_b"]
    _, page = await list_subscriptions(client)
    assert len(page["data"]) == 6  # default limit 10, canceled hidden


async def test_subscription_seeds_replace_by_id_and_clear(client: Client) -> None:
    await control(client, "POST", "subscriptions", {"subscriptions": SUBS[:2]})
    replaced = {**SUBS[0], "status": "past_due"}
    assert (await control(client, "POST", "subscriptions", {"subscriptions": [replaced]}))[
        "total"
    ] == 2
    _, page = await list_subscriptions(client, status="past_due")
    assert [s["id"] for s in page["data"]] == ["sub_1"]
    await control(client, "DELETE", "subscriptions")
    assert (await list_subscriptions(client))[1]["data"] == []


@pytest.mark.parametrize(
    ("params", "code", "param"),
    [
        ({"limit": "0"}, "parameter_invalid_integer", "limit"),
        ({"limit": "101"}, "parameter_invalid_integer", "limit"),
        ({"status": "alive"}, "parameter_invalid_string", "status"),
        ({"customer": "cus_A", "colour": "red"}, "parameter_unknown", "colour"),
        ({"customer": ""}, "parameter_invalid_empty", "customer"),
        ({"starting_after": "sub_nope"}, "resource_missing", "starting_after"),
        (
            {"starting_after": "sub_1", "ending_before": "sub_2"},
            "parameters_exclusive",
            "ending_before",
        ),
    ],
)
async def test_subscription_list_rejections(
    client: Client, params: dict[str, str], code: str, param: str
) -> None:
    await control(client, "POST", "subscriptions", {"subscriptions": SUBS[:2]})
    status, body = await list_subscriptions(client, **params)
    assert status == 400
    assert (body["error"]["code"], body["error"]["param"]) == (code, param)


async def test_subscription_list_needs_a_key(client: Client) -> None:
    async with client.get("/v1/subscriptions") as resp:
        assert resp.status == 401


@pytest.mark.parametrize(
    "seed",
    [
        {"id": "si_1", "customer": "cus_A"},
        {"id": "sub_1", "customer": "acct_A"},
        {"id": "sub_1", "customer": "cus_A", "status": "alive"},
        {"id": "sub_1", "customer": "cus_A", "items": [{"id": "si_1", "price": "plan_1"}]},
    ],
)
async def test_bad_seeds_are_refused(client: Client, seed: dict[str, Any]) -> None:
    async with client.post("/_standin/subscriptions", json={"subscriptions": [seed]}) as resp:
        assert resp.status == 400
    assert state_of(client).subscriptions == {}


# --------------------------------------------------------------------------- control API


async def test_health_and_reset(client: Client) -> None:
    assert await control(client, "GET", "health") == {"status": "ok"}
    state = state_of(client)
    await control(client, "POST", "faults", {"faults": [{"status": 500}]})
    await control(client, "POST", "latency", {"ms": 5})
    await control(client, "POST", "missing", {"ids": ["cus_x"]})
    await control(client, "POST", "subscriptions", {"subscriptions": SUBS[:1]})
    await post_session(client, list(BASE), {"Idempotency-Key": "k"})

    assert await control(client, "POST", "reset") == {"reset": True}

    assert (state.requests, list(state.faults), state.latency_ms) == ([], [], 0.0)
    assert (state.missing_ids, state.subscriptions, state.idempotency) == (set(), {}, {})


async def test_control_api_refuses_bad_json(client: Client) -> None:
    async with client.post("/_standin/missing", data="not json") as resp:
        assert resp.status == 400
    async with client.post("/_standin/latency", json={"ms": "fast"}) as resp:
        assert resp.status == 400


def test_state_can_be_scripted_in_process() -> None:
    state = StandinState()
    assert state.queue_faults([{"status": 500, "repeat": 2}, {"reset": True}]) == 3
    assert [f.kind for f in state.faults] == ["status", "status", "reset"]
    with pytest.raises(ControlError):
        state.declare_missing([""])
    assert state.seed_subscriptions([{"id": "sub_1", "customer": "cus_1"}]) == 1
    assert state.subscriptions["sub_1"]["status"] == "active"


def test_create_app_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="prefixes"):
        create_app(api_key_prefixes=())
    with pytest.raises(ValueError, match="latency"):
        create_app(latency_ms=-1)


# --------------------------------------------------------------------------- decoding


def test_decode_form_builds_nested_structures() -> None:
    pairs = [
        ("flow_data[items][1][id]", "si_2"),
        ("flow_data[items][0][id]", "si_1"),
        ("flow_data[items][0][quantity]", "3"),
        ("expand[]", "a"),
        ("expand[]", "b"),
        ("customer", "cus_1"),
    ]
    assert decode_form(pairs) == {
        "flow_data": {"items": [{"id": "si_1", "quantity": "3"}, {"id": "si_2"}]},
        "expand": ["a", "b"],
        "customer": "cus_1",
    }


@pytest.mark.parametrize(
    "pairs",
    [[("a", "1"), ("a[b]", "2")], [("a[b]", "2"), ("a", "1")], [("[a]", "1")], [("a]", "1")]],
)
def test_decode_form_refuses_malformed_names(pairs: Pairs) -> None:
    with pytest.raises(StripeError) as caught:
        decode_form(pairs)
    assert caught.value.status == 400


# --------------------------------------------------------------------------- command line


REPO_ROOT = Path(__file__).resolve().parents[1]


async def test_module_serves_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stripe_standin",
        "--port",
        "0",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=10)).decode()
        assert line.startswith("stripe-standin listening on http://127.0.0.1:")
        base = line.rsplit(" ", 1)[1].strip()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/_standin/health") as resp,
        ):
            assert resp.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
        assert process.stderr is not None
        assert await process.stderr.read() == b""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --------------------------------------------------------------------------- customers (issue 13)

CUSTOMERS = "/v1/customers"
# Keys a Stripe customer object (2025-09-30.clover) has that the service or a
# reader might look at; the stand-in's customers carry at least these.
CUSTOMER_KEYS = {
    "id",
    "object",
    "address",
    "balance",
    "created",
    "currency",
    "default_source",
    "delinquent",
    "description",
    "email",
    "invoice_prefix",
    "invoice_settings",
    "livemode",
    "metadata",
    "name",
    "phone",
    "preferred_locales",
    "shipping",
    "tax_exempt",
}


async def stripe_get(
    client: Client, path: str, account: str | None = None, **params: str
) -> tuple[int, Any]:
    headers = {**AUTH, **({"Stripe-Account": account} if account is not None else {})}
    async with client.get(path, params=params, headers=headers) as resp:
        return resp.status, await resp.json()


async def seed_customers(client: Client, *seeds: dict[str, Any]) -> list[str]:
    answer = await control(client, "POST", "customers", {"customers": list(seeds)})
    ids: list[str] = answer["ids"]
    return ids


async def all_customer_ids(client: Client, account: str | None = None, **params: str) -> list[str]:
    """Page through GET /v1/customers with starting_after, as sync does."""
    ids: list[str] = []
    cursor: dict[str, str] = {}
    for _ in range(1000):  # bounded: a cursor bug must fail, not hang
        status, page = await stripe_get(client, CUSTOMERS, account, **params, **cursor)
        assert status == 200, page
        ids += [customer["id"] for customer in page["data"]]
        if not page["has_more"]:
            return ids
        cursor = {"starting_after": page["data"][-1]["id"]}
    raise AssertionError("pagination did not end")


async def test_customer_list_pages_through_250_newest_first(client: Client) -> None:
    # Ten customers share each creation second, so the id tie-break matters.
    seeds = [
        {
            "id": f"cus_T{n:03d}",
            "created": 1_700_000_000 + n // 10,
            "metadata": {"user_id": f"u{n}"},
        }
        for n in range(250)
    ]
    assert await seed_customers(client, *seeds) == [seed["id"] for seed in seeds]

    status, page = await stripe_get(client, CUSTOMERS, limit="100")
    assert status == 200
    assert (page["object"], page["url"], page["has_more"]) == ("list", "/v1/customers", True)
    assert len(page["data"]) == 100
    first = page["data"][0]
    assert first.keys() >= CUSTOMER_KEYS
    assert (first["id"], first["object"], first["livemode"]) == ("cus_T249", "customer", False)
    assert first["metadata"] == {"user_id": "u249"}
    assert first["created"] == 1_700_000_024

    ids = await all_customer_ids(client, limit="100")
    expected = sorted(seeds, key=lambda seed: (seed["created"], seed["id"]), reverse=True)
    assert ids == [seed["id"] for seed in expected]
    assert len(set(ids)) == 250

    status, page = await stripe_get(client, CUSTOMERS)
    assert (len(page["data"]), page["has_more"]) == (10, True)  # Stripe's default limit
    status, page = await stripe_get(client, CUSTOMERS, ending_before="cus_T239", limit="3")
    assert [c["id"] for c in page["data"]] == ["cus_T242", "cus_T241", "cus_T240"]
    assert page["has_more"] is True
    status, page = await stripe_get(client, CUSTOMERS, ending_before="cus_T249")
    assert (page["data"], page["has_more"]) == ([], False)


async def test_customer_seeds_generate_ids_and_filter_by_email(client: Client) -> None:
    ids = await seed_customers(
        client,
        {"email": "ada@example.com", "name": "Ada"},
        {"email": "Ada@example.com"},
        {},
    )
    assert len(set(ids)) == 3
    assert all(customer_id.startswith("cus_") for customer_id in ids)
    status, page = await stripe_get(client, CUSTOMERS, email="ada@example.com")
    assert status == 200
    # Stripe's email filter is exact and case-sensitive.
    assert [(c["id"], c["name"]) for c in page["data"]] == [(ids[0], "Ada")]
    status, customer = await stripe_get(client, f"{CUSTOMERS}/{ids[2]}")
    assert (status, customer["email"], customer["metadata"]) == (200, None, {})


async def test_deleted_customer_is_not_listed_and_retrieves_as_deleted(client: Client) -> None:
    await seed_customers(
        client,
        {"id": "cus_live", "created": 2, "metadata": {"user_id": "u1"}},
        {"id": "cus_gone", "created": 1, "deleted": True},
    )
    assert await all_customer_ids(client) == ["cus_live"]
    status, body = await stripe_get(client, f"{CUSTOMERS}/cus_gone")
    assert (status, body) == (200, {"id": "cus_gone", "object": "customer", "deleted": True})
    status, body = await stripe_get(client, f"{CUSTOMERS}/cus_live")
    assert (status, body["id"], body["metadata"]) == (200, "cus_live", {"user_id": "u1"})
    assert "deleted" not in body
    # A customer deleted after a page was read still works as that page's cursor.
    status, page = await stripe_get(client, CUSTOMERS, starting_after="cus_gone")
    assert (status, page["data"]) == (200, [])
    # Deleting is re-seeding the same id with deleted: true.
    await seed_customers(client, {"id": "cus_live", "deleted": True})
    assert await all_customer_ids(client) == []


async def test_unknown_customer_is_a_stripe_404(client: Client) -> None:
    await seed_customers(client, {"id": "cus_known"})
    for customer_id in ("cus_nope", "sub_1", "cus_"):
        status, body = await stripe_get(client, f"{CUSTOMERS}/{customer_id}")
        assert status == 404
        error = body["error"]
        assert error["type"] == "invalid_request_error"
        assert (error["code"], error["param"]) == ("resource_missing", "id")
        assert error["message"] == f"No such customer: '{customer_id}'"
        assert error["doc_url"] == "https://stripe.com/docs/error-codes/resource-missing"
    # An id declared missing is missing even when seeded.
    await control(client, "POST", "missing", {"ids": ["cus_known"]})
    assert (await stripe_get(client, f"{CUSTOMERS}/cus_known"))[0] == 404


@pytest.mark.parametrize(
    ("path", "params", "code", "param"),
    [
        (CUSTOMERS, {"colour": "red"}, "parameter_unknown", "colour"),
        (CUSTOMERS, {"created[gt]": "1"}, "parameter_unknown", "created"),
        (CUSTOMERS, {"limit": "0"}, "parameter_invalid_integer", "limit"),
        (CUSTOMERS, {"limit": "101"}, "parameter_invalid_integer", "limit"),
        (CUSTOMERS, {"limit": "ten"}, "parameter_invalid_integer", "limit"),
        (CUSTOMERS, {"email": ""}, "parameter_invalid_empty", "email"),
        (CUSTOMERS, {"limit": ""}, "parameter_invalid_empty", "limit"),
        (CUSTOMERS, {"starting_after": "cus_nope"}, "resource_missing", "starting_after"),
        (CUSTOMERS, {"ending_before": "sub_1"}, "resource_missing", "ending_before"),
        (
            CUSTOMERS,
            {"starting_after": "cus_1", "ending_before": "cus_1"},
            "parameters_exclusive",
            "ending_before",
        ),
        (f"{CUSTOMERS}/cus_1", {"colour": "red"}, "parameter_unknown", "colour"),
        (f"{CUSTOMERS}/cus_1", {"expand[]": ""}, "parameter_invalid_empty", "expand[0]"),
    ],
)
async def test_customer_rejections(
    client: Client, path: str, params: dict[str, str], code: str, param: str
) -> None:
    await seed_customers(client, {"id": "cus_1"})
    status, body = await stripe_get(client, path, **params)
    assert status == 400, body
    assert (body["error"]["code"], body["error"]["param"]) == (code, param)


async def test_customer_endpoints_need_a_key_and_only_get(client: Client) -> None:
    async with client.get(CUSTOMERS) as resp:
        assert resp.status == 401
    async with client.get(f"{CUSTOMERS}/cus_1") as resp:
        assert resp.status == 401
    async with client.post(CUSTOMERS, data={"email": "a@example.com"}, headers=AUTH) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"].startswith("Unrecognized request URL")


async def test_customer_seeds_replace_by_id_list_and_clear(client: Client) -> None:
    await seed_customers(client, {"id": "cus_1", "email": "old@example.com", "account": "acct_A"})
    answer = await control(
        client, "POST", "customers", {"customers": [{"id": "cus_1", "email": "new@example.com"}]}
    )
    assert answer == {"seeded": 1, "ids": ["cus_1"], "total": 1}
    listed = (await control(client, "GET", "customers"))["customers"]
    assert [(c["id"], c["email"], c["account"]) for c in listed] == [
        ("cus_1", "new@example.com", None)
    ]
    assert await all_customer_ids(client) == ["cus_1"]  # moved back to the platform
    assert await control(client, "DELETE", "customers") == {"deleted": 1}
    assert await all_customer_ids(client) == []
    assert state_of(client).accounts == {}


@pytest.mark.parametrize(
    "seed",
    [
        "cus_1",
        {"id": "sub_1"},
        {"id": "cus_"},
        {"id": "cus_1", "created": "now"},
        {"id": "cus_1", "email": 5},
        {"id": "cus_1", "metadata": {"user_id": 7}},
        {"id": "cus_1", "metadata": ["user_id"]},
        {"id": "cus_1", "metadata": {"k" * 41: "v"}},
        {"id": "cus_1", "deleted": "yes"},
        {"id": "cus_1", "livemode": 1},
        {"id": "cus_1", "account": "acct_"},
        {"id": "cus_1", "account": "platform"},
    ],
)
async def test_bad_customer_seeds_are_refused(client: Client, seed: object) -> None:
    # All or none: the good seed before the bad one is not kept either.
    body = {"customers": [{"id": "cus_ok"}, seed]}
    async with client.post("/_standin/customers", json=body) as resp:
        assert resp.status == 400, await resp.text()
        assert "error" in await resp.json()
    assert state_of(client).customers == {}


async def test_ten_thousand_customers_seed_in_one_call_and_page_quickly(client: Client) -> None:
    # A guard against quadratic seeding or paging (sync's figures use 10,000 customers),
    # with a bound loose enough for a loaded machine.
    started = time.monotonic()
    seeds = [
        {"metadata": {"user_id": f"u{n}"}, "created": 1_700_000_000 + n} for n in range(10_000)
    ]
    ids = await seed_customers(client, *seeds)
    assert len(set(ids)) == 10_000
    listed = await all_customer_ids(client, limit="100")
    assert listed == ids[::-1]
    assert time.monotonic() - started < 30


def test_customers_can_be_seeded_in_process() -> None:
    state = StandinState()
    ids = state.seed_customers([{"email": "a@example.com"}, {"id": "cus_2", "account": "acct_X"}])
    assert ids[1] == "cus_2"
    assert state.customers[ids[0]]["email"] == "a@example.com"
    assert (state.account_of(ids[0]), state.account_of("cus_2")) == (None, "acct_X")
    with pytest.raises(ControlError):
        state.seed_customers([{"id": "nope"}])
    state.reset()
    assert (state.customers, state.accounts) == ({}, {})


# ------------------------------------------------------------------------ Connect (Stripe-Account)

CONNECT_CUSTOMERS = [
    {"id": "cus_platform", "created": 3},
    {"id": "cus_onA", "created": 2, "account": "acct_A"},
    {"id": "cus_onB", "created": 1, "account": "acct_B"},
]


async def test_stripe_account_scopes_customers(client: Client) -> None:
    await seed_customers(client, *CONNECT_CUSTOMERS)
    assert await all_customer_ids(client) == ["cus_platform"]
    assert await all_customer_ids(client, "acct_A") == ["cus_onA"]
    assert await all_customer_ids(client, "acct_B") == ["cus_onB"]
    assert await all_customer_ids(client, "acct_C") == []

    status, body = await stripe_get(client, f"{CUSTOMERS}/cus_onA", "acct_A")
    assert (status, body["id"]) == (200, "cus_onA")
    for account in (None, "acct_B"):
        status, body = await stripe_get(client, f"{CUSTOMERS}/cus_onA", account)
        assert (status, body["error"]["code"], body["error"]["param"]) == (
            404,
            "resource_missing",
            "id",
        )
    # Another account's customer is no cursor either.
    status, body = await stripe_get(client, CUSTOMERS, "acct_A", starting_after="cus_platform")
    assert (status, body["error"]["code"]) == (400, "resource_missing")

    recorded = state_of(client).requests[-1]
    assert recorded.stripe_account == "acct_A"
    assert recorded.headers["Stripe-Account"] == "acct_A"
    assert recorded.to_json()["stripe_account"] == "acct_A"
    assert state_of(client).requests[0].stripe_account is None


async def test_stripe_account_scopes_subscriptions(client: Client) -> None:
    await control(
        client,
        "POST",
        "subscriptions",
        {
            "subscriptions": [
                {"id": "sub_platform", "customer": "cus_platform", "created": 3},
                {"id": "sub_onA", "customer": "cus_onA", "created": 2, "account": "acct_A"},
            ]
        },
    )
    _, page = await stripe_get(client, "/v1/subscriptions", status="all")
    assert [s["id"] for s in page["data"]] == ["sub_platform"]
    _, page = await stripe_get(client, "/v1/subscriptions", "acct_A", customer="cus_onA")
    assert [s["id"] for s in page["data"]] == ["sub_onA"]
    assert "account" not in page["data"][0]  # not a field of Stripe's object
    _, page = await stripe_get(client, "/v1/subscriptions", "acct_B")
    assert page["data"] == []
    # A customer seeded on another account is "no such customer" as a filter.
    await seed_customers(client, *CONNECT_CUSTOMERS)
    status, body = await stripe_get(client, "/v1/subscriptions", customer="cus_onA")
    assert (status, body["error"]["code"], body["error"]["param"]) == (
        400,
        "resource_missing",
        "customer",
    )


async def test_stripe_account_scopes_portal_sessions(client: Client) -> None:
    await seed_customers(client, *CONNECT_CUSTOMERS)
    await control(
        client,
        "POST",
        "subscriptions",
        {"subscriptions": [{"id": "sub_onA", "customer": "cus_onA", "account": "acct_A"}]},
    )
    cancel = [
        ("flow_data[type]", "subscription_cancel"),
        ("flow_data[subscription_cancel][subscription]", "sub_onA"),
    ]
    status, body, _ = await post_session(
        client, [("customer", "cus_onA"), *cancel], {"Stripe-Account": "acct_A"}
    )
    assert (status, body["customer"]) == (200, "cus_onA")
    assert state_of(client).requests[-1].stripe_account == "acct_A"

    for headers in ({}, {"Stripe-Account": "acct_B"}):
        status, body, _ = await post_session(client, [("customer", "cus_onA")], headers)
        assert status == 400
        assert (body["error"]["code"], body["error"]["param"]) == ("resource_missing", "customer")
        assert body["error"]["message"] == "No such customer: 'cus_onA'"
    # The platform's customer is unknown on a connected account, and vice versa.
    status, body, _ = await post_session(
        client, [("customer", "cus_platform")], {"Stripe-Account": "acct_A"}
    )
    assert (status, body["error"]["param"]) == (400, "customer")
    status, body, _ = await post_session(client, [("customer", "cus_platform"), *cancel])
    assert (status, body["error"]["param"]) == (400, "flow_data[subscription_cancel][subscription]")
    # A deleted customer gets no session; a customer never seeded still does.
    await seed_customers(client, {"id": "cus_platform", "deleted": True})
    assert (await post_session(client, [("customer", "cus_platform")]))[0] == 400
    assert (await post_session(client, [("customer", "cus_unseeded")]))[0] == 200


async def test_idempotency_keys_are_scoped_per_account(client: Client) -> None:
    key = {"Idempotency-Key": "same-key"}
    first = await post_session(client, list(BASE), {**key, "Stripe-Account": "acct_A"})
    other = await post_session(client, list(BASE), {**key, "Stripe-Account": "acct_B"})
    replay = await post_session(client, list(BASE), {**key, "Stripe-Account": "acct_A"})
    assert first[0] == other[0] == replay[0] == 200
    assert first[1]["id"] != other[1]["id"]
    assert (replay[1]["id"], replay[2]["Idempotent-Replayed"]) == (first[1]["id"], "true")
    assert "Idempotent-Replayed" not in other[2]


@pytest.mark.parametrize("account", ["acct_", "bogus", "cus_1", " ", "acct_gone"])
async def test_unusable_stripe_account_is_refused(client: Client, account: str) -> None:
    await control(client, "POST", "missing", {"ids": ["acct_gone"]})
    status, body = await stripe_get(client, CUSTOMERS, account)
    assert status == 403
    error = body["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "account_invalid")
    assert error["message"] == (
        f"The provided key '{mask_api_key(KEY)}' does not have access to "
        f"account '{account.strip()}' (or that account does not exist). "
        "Application access may have been revoked."
    )
    # The key is checked first: no key, 401 whatever the account.
    async with client.get(CUSTOMERS, headers={"Stripe-Account": account}) as resp:
        assert resp.status == 401


# ------------------------------------------------------------------------ scheduled cancellations


async def test_subscriptions_carry_cancel_at_and_cancel_at_period_end(client: Client) -> None:
    await control(
        client,
        "POST",
        "subscriptions",
        {
            "subscriptions": [
                {"id": "sub_plain", "customer": "cus_A", "created": 3},
                # Flexible billing mode: "cancel at period end" sets only cancel_at.
                {"id": "sub_flex", "customer": "cus_A", "created": 2, "cancel_at": 1_800_000_000},
                {
                    "id": "sub_classic",
                    "customer": "cus_A",
                    "created": 1,
                    "cancel_at_period_end": True,
                },
            ]
        },
    )
    _, page = await stripe_get(client, "/v1/subscriptions", customer="cus_A", status="all")
    assert [(s["id"], s["cancel_at"], s["cancel_at_period_end"]) for s in page["data"]] == [
        ("sub_plain", None, False),
        ("sub_flex", 1_800_000_000, False),
        ("sub_classic", None, True),
    ]


@pytest.mark.parametrize(
    "seed",
    [
        {"id": "sub_1", "customer": "cus_A", "cancel_at": "soon"},
        {"id": "sub_1", "customer": "cus_A", "cancel_at": True},
        {"id": "sub_1", "customer": "cus_A", "cancel_at_period_end": "true"},
        {"id": "sub_1", "customer": "cus_A", "account": "acct_"},
    ],
)
async def test_bad_cancellation_or_account_seeds_are_refused(
    client: Client, seed: dict[str, Any]
) -> None:
    async with client.post("/_standin/subscriptions", json={"subscriptions": [seed]}) as resp:
        assert resp.status == 400
    assert state_of(client).subscriptions == {}


# --------------------------------------------------------------------------- customer events


def test_customer_event_helper_builds_connect_events() -> None:
    state = StandinState()
    (customer_id,) = state.seed_customers([{"metadata": {"user_id": "u1"}, "account": "acct_A"}])
    customer = state.customers[customer_id]
    event = customer_event(
        "customer.updated",
        customer,
        1_700_000_000,
        account="acct_A",
        previous_attributes={"metadata": {"user_id": None}},
    )
    assert (event["object"], event["type"], event["created"]) == (
        "event",
        "customer.updated",
        1_700_000_000,
    )
    assert event["account"] == "acct_A"
    assert event["data"] == {
        "object": customer,
        "previous_attributes": {"metadata": {"user_id": None}},
    }
    platform = customer_event("customer.created", customer, 1_700_000_001)
    assert "account" not in platform
    assert "previous_attributes" not in platform["data"]
    assert platform["id"] != event["id"]


# --------------------------------------------------------------------------- portal configurations

CONFIGS = "/v1/billing_portal/configurations"
SU = "features[subscription_update]"
SC = "features[subscription_cancel]"
# The keys of Stripe's reference object (2025-09-30.clover).
CONFIGURATION_KEYS = {
    "id",
    "object",
    "active",
    "application",
    "business_profile",
    "created",
    "default_return_url",
    "features",
    "is_default",
    "livemode",
    "login_page",
    "metadata",
    "name",
    "updated",
}
MINIMAL: Pairs = [("features[invoice_history][enabled]", "true")]
# The reference page's example, against a seeded catalogue.
EXAMPLE: Pairs = [
    ("business_profile[headline]", "Manage your plan"),
    ("features[payment_method_update][enabled]", "true"),
    (f"{SC}[enabled]", "true"),
    (f"{SC}[mode]", "at_period_end"),
    (f"{SU}[enabled]", "true"),
    (f"{SU}[default_allowed_updates][0]", "price"),
    (f"{SU}[products][0][product]", "prod_Pro"),
    (f"{SU}[products][0][prices][0]", "price_ProYearly"),
    ("metadata[content_hash]", "3f2a9c"),
]
CATALOGUE = [
    {"id": "prod_Pro", "prices": ["price_ProMonthly", "price_ProYearly"]},
    {"id": "prod_Team", "prices": ["price_TeamMonthly"]},
]


async def stripe_post(
    client: Client,
    path: str,
    pairs: Pairs,
    account: str | None = None,
    key: str | None = None,
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    headers = {**AUTH}
    if account is not None:
        headers["Stripe-Account"] = account
    if key is not None:
        headers["Idempotency-Key"] = key
    async with client.post(path, data=pairs, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def create_configuration(
    client: Client, pairs: Pairs = MINIMAL, account: str | None = None
) -> dict[str, Any]:
    status, body, _ = await stripe_post(client, CONFIGS, pairs, account)
    assert status == 200, body
    config: dict[str, Any] = body
    return config


def error_of(status: int, body: Any) -> tuple[int, str | None, str | None]:
    error = body["error"]
    return status, error.get("code"), error.get("param")


async def test_configuration_create_has_the_reference_shape_and_defaults(client: Client) -> None:
    before = int(time.time())
    config = await create_configuration(client)

    assert set(config) == CONFIGURATION_KEYS
    assert config["id"].startswith("bpc_")
    assert config["object"] == "billing_portal.configuration"
    assert (config["active"], config["is_default"], config["livemode"]) == (True, False, False)
    assert config["application"] is None
    assert before <= config["created"] == config["updated"] <= int(time.time())
    assert config["business_profile"] == {
        "headline": None,
        "privacy_policy_url": None,
        "terms_of_service_url": None,
    }
    assert (config["default_return_url"], config["name"], config["metadata"]) == (None, None, {})
    assert config["login_page"] == {"enabled": False, "url": None}
    assert config["features"] == {
        "customer_update": {"allowed_updates": [], "enabled": False},
        "invoice_history": {"enabled": True},
        "payment_method_update": {"enabled": False},
        "subscription_cancel": {
            "cancellation_reason": {"enabled": False, "options": []},
            "enabled": False,
            "mode": "at_period_end",
            "proration_behavior": "none",
        },
        "subscription_update": {
            "default_allowed_updates": [],
            "enabled": False,
            "products": None,
            "proration_behavior": "none",
            "schedule_at_period_end": {"conditions": []},
            "trial_update_behavior": "end_trial",
        },
    }


async def test_configuration_create_takes_every_parameter(client: Client) -> None:
    await control(client, "POST", "catalogue", {"products": CATALOGUE})
    config = await create_configuration(
        client,
        [
            *EXAMPLE,
            ("business_profile[privacy_policy_url]", "https://example.com/privacy"),
            ("business_profile[terms_of_service_url]", "https://example.com/terms"),
            ("default_return_url", "https://example.com/account"),
            ("name", "pro"),
            ("login_page[enabled]", "true"),
            ("features[customer_update][enabled]", "true"),
            ("features[customer_update][allowed_updates][0]", "email"),
            ("features[customer_update][allowed_updates][1]", "tax_id"),
            (f"{SC}[mode]", "immediately"),
            (f"{SC}[proration_behavior]", "create_prorations"),
            (f"{SC}[cancellation_reason][enabled]", "true"),
            (f"{SC}[cancellation_reason][options][0]", "too_expensive"),
            (f"{SU}[products][0][prices][1]", "price_ProMonthly"),
            (f"{SU}[products][0][adjustable_quantity][enabled]", "true"),
            (f"{SU}[products][0][adjustable_quantity][maximum]", "5"),
            (f"{SU}[products][1][product]", "prod_Team"),
            (f"{SU}[products][1][prices][0]", "price_TeamMonthly"),
            (f"{SU}[proration_behavior]", "always_invoice"),
            (f"{SU}[schedule_at_period_end][conditions][0][type]", "shortening_interval"),
            (f"{SU}[trial_update_behavior]", "continue_trial"),
            ("expand[0]", "application"),
        ],
    )

    assert config["business_profile"] == {
        "headline": "Manage your plan",
        "privacy_policy_url": "https://example.com/privacy",
        "terms_of_service_url": "https://example.com/terms",
    }
    assert (config["default_return_url"], config["name"]) == ("https://example.com/account", "pro")
    assert config["login_page"]["enabled"] is True
    assert config["login_page"]["url"].startswith("https://billing.stripe.com/p/login/")
    assert config["metadata"] == {"content_hash": "3f2a9c"}
    features = config["features"]
    assert features["customer_update"] == {"allowed_updates": ["email", "tax_id"], "enabled": True}
    assert features["payment_method_update"] == {"enabled": True}
    assert features["subscription_cancel"] == {
        "cancellation_reason": {"enabled": True, "options": ["too_expensive"]},
        "enabled": True,
        "mode": "immediately",
        "proration_behavior": "create_prorations",
    }
    assert features["subscription_update"] == {
        "default_allowed_updates": ["price"],
        "enabled": True,
        "products": [
            {
                "adjustable_quantity": {"enabled": True, "maximum": 5, "minimum": 1},
                "prices": ["price_ProYearly", "price_ProMonthly"],
                "product": "prod_Pro",
            },
            {
                "adjustable_quantity": {"enabled": False, "maximum": None, "minimum": 1},
                "prices": ["price_TeamMonthly"],
                "product": "prod_Team",
            },
        ],
        "proration_behavior": "always_invoice",
        "schedule_at_period_end": {"conditions": [{"type": "shortening_interval"}]},
        "trial_update_behavior": "continue_trial",
    }


async def test_configuration_create_takes_empty_strings_only_where_they_mean_none(
    client: Client,
) -> None:
    config = await create_configuration(
        client,
        [*MINIMAL, ("business_profile[headline]", ""), ("name", ""), ("default_return_url", "")],
    )
    assert (config["business_profile"]["headline"], config["name"]) == (None, None)
    assert config["default_return_url"] is None


ELEVEN_PRODUCTS: Pairs = [
    pair
    for index in range(11)
    for pair in (
        (f"{SU}[products][{index}][product]", f"prod_{index}"),
        (f"{SU}[products][{index}][prices][0]", f"price_{index}"),
    )
]

CONFIGURATION_REJECTIONS: list[tuple[str, Pairs, str, str]] = [
    ("features missing", [("name", "x")], "parameter_missing", "features"),
    ("unknown top level", [*MINIMAL, ("color", "red")], "parameter_unknown", "color"),
    ("active is update-only", [*MINIMAL, ("active", "true")], "parameter_unknown", "active"),
    (
        "subscription_pause came later",
        [("features[subscription_pause][enabled]", "true")],
        "parameter_unknown",
        "features[subscription_pause]",
    ),
    (
        "payment_method_configuration came later",
        [
            ("features[payment_method_update][enabled]", "true"),
            ("features[payment_method_update][payment_method_configuration]", "pmc_1"),
        ],
        "parameter_unknown",
        "features[payment_method_update][payment_method_configuration]",
    ),
    (
        "feedback_options came later",
        [
            (f"{SC}[enabled]", "true"),
            (f"{SC}[cancellation_reason][enabled]", "true"),
            (f"{SC}[cancellation_reason][options][0]", "other"),
            (f"{SC}[cancellation_reason][feedback_options][0]", "other"),
        ],
        "parameter_unknown",
        f"{SC}[cancellation_reason][feedback_options]",
    ),
    (
        "billing_cycle_anchor came later",
        [(f"{SU}[enabled]", "true"), (f"{SU}[billing_cycle_anchor]", "now")],
        "parameter_unknown",
        f"{SU}[billing_cycle_anchor]",
    ),
    (
        "enabled missing",
        [("features[customer_update][allowed_updates][0]", "email")],
        "parameter_missing",
        "features[customer_update][enabled]",
    ),
    (
        "cancellation_reason without options",
        [(f"{SC}[enabled]", "true"), (f"{SC}[cancellation_reason][enabled]", "true")],
        "parameter_missing",
        f"{SC}[cancellation_reason][options]",
    ),
    (
        "product without prices",
        [(f"{SU}[enabled]", "true"), (f"{SU}[products][0][product]", "prod_Pro")],
        "parameter_missing",
        f"{SU}[products][0][prices]",
    ),
    (
        "price without product",
        [(f"{SU}[enabled]", "true"), (f"{SU}[products][0][prices][0]", "price_ProYearly")],
        "parameter_missing",
        f"{SU}[products][0][product]",
    ),
    (
        "login_page without enabled",
        [*MINIMAL, ("login_page[url]", "https://x.example")],
        "parameter_unknown",
        "login_page[url]",
    ),
    (
        "empty enabled",
        [("features[invoice_history][enabled]", "")],
        "parameter_invalid_empty",
        "features[invoice_history][enabled]",
    ),
    (
        "empty metadata value on create",
        [*MINIMAL, ("metadata[k]", "")],
        "parameter_invalid_empty",
        "metadata[k]",
    ),
    (
        "empty list on create",
        [
            ("features[customer_update][enabled]", "true"),
            ("features[customer_update][allowed_updates]", ""),
        ],
        "parameter_invalid_empty",
        "features[customer_update][allowed_updates]",
    ),
    (
        "boolean",
        [("features[invoice_history][enabled]", "yes")],
        "parameter_invalid_boolean",
        "features[invoice_history][enabled]",
    ),
    (
        "cancel mode",
        [(f"{SC}[enabled]", "true"), (f"{SC}[mode]", "later")],
        "parameter_invalid_string",
        f"{SC}[mode]",
    ),
    (
        "allowed update",
        [
            ("features[customer_update][enabled]", "true"),
            ("features[customer_update][allowed_updates][0]", "color"),
        ],
        "parameter_invalid_string",
        "features[customer_update][allowed_updates][0]",
    ),
    (
        "cancellation reason",
        [
            (f"{SC}[enabled]", "true"),
            (f"{SC}[cancellation_reason][enabled]", "true"),
            (f"{SC}[cancellation_reason][options][0]", "bored"),
        ],
        "parameter_invalid_string",
        f"{SC}[cancellation_reason][options][0]",
    ),
    (
        "condition type",
        [(f"{SU}[enabled]", "true"), (f"{SU}[schedule_at_period_end][conditions][0][type]", "x")],
        "parameter_invalid_string",
        f"{SU}[schedule_at_period_end][conditions][0][type]",
    ),
    (
        "trial update behavior",
        [(f"{SU}[enabled]", "true"), (f"{SU}[trial_update_behavior]", "pause")],
        "parameter_invalid_string",
        f"{SU}[trial_update_behavior]",
    ),
    (
        "headline over 60",
        [*MINIMAL, ("business_profile[headline]", "x" * 61)],
        "parameter_invalid_string",
        "business_profile[headline]",
    ),
    (
        "more than 10 products",
        [(f"{SU}[enabled]", "true"), *ELEVEN_PRODUCTS],
        "parameter_invalid_array",
        f"{SU}[products]",
    ),
    (
        "return url",
        [*MINIMAL, ("default_return_url", "not a url")],
        "url_invalid",
        "default_return_url",
    ),
    (
        "privacy url",
        [*MINIMAL, ("business_profile[privacy_policy_url]", "ftp://example.com/p")],
        "url_invalid",
        "business_profile[privacy_policy_url]",
    ),
    (
        "cancel always_invoice",
        [
            (f"{SC}[enabled]", "true"),
            (f"{SC}[mode]", "immediately"),
            (f"{SC}[proration_behavior]", "always_invoice"),
        ],
        "parameter_invalid_string",
        f"{SC}[proration_behavior]",
    ),
    (
        "cancel create_prorations at period end",
        [(f"{SC}[enabled]", "true"), (f"{SC}[proration_behavior]", "create_prorations")],
        "parameter_invalid_string",
        f"{SC}[proration_behavior]",
    ),
    ("expand", [*MINIMAL, ("expand[0]", "features")], "parameter_invalid_string", "expand[0]"),
    (
        "metadata key over 40",
        [*MINIMAL, ("metadata[" + "k" * 41 + "]", "v")],
        "parameter_invalid_object",
        "metadata[" + "k" * 41 + "]",
    ),
    (
        "metadata over 50 keys",
        [*MINIMAL, *[(f"metadata[k{index}]", "v") for index in range(51)]],
        "parameter_invalid_object",
        "metadata",
    ),
    (
        "malformed price id",
        [
            (f"{SU}[enabled]", "true"),
            (f"{SU}[products][0][product]", "prod_Pro"),
            (f"{SU}[products][0][prices][0]", "plan_pro"),
        ],
        "resource_missing",
        f"{SU}[products][0][prices][0]",
    ),
]


@pytest.mark.parametrize(
    ("pairs", "code", "param"),
    [case[1:] for case in CONFIGURATION_REJECTIONS],
    ids=[case[0] for case in CONFIGURATION_REJECTIONS],
)
async def test_configuration_create_rejections(
    client: Client, pairs: Pairs, code: str, param: str
) -> None:
    status, body, _ = await stripe_post(client, CONFIGS, pairs)

    assert error_of(status, body) == (400, code, param), body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]
    assert state_of(client).configurations == {}


async def test_configuration_cancellation_prorations_need_immediate_mode(client: Client) -> None:
    config = await create_configuration(
        client,
        [
            (f"{SC}[enabled]", "true"),
            (f"{SC}[mode]", "immediately"),
            (f"{SC}[proration_behavior]", "create_prorations"),
        ],
    )
    assert config["features"]["subscription_cancel"]["proration_behavior"] == "create_prorations"
    # Moving back to at_period_end while create_prorations stays is refused, and changes nothing.
    status, body, _ = await stripe_post(
        client, f"{CONFIGS}/{config['id']}", [(f"{SC}[mode]", "at_period_end")]
    )
    assert error_of(status, body) == (400, "parameter_invalid_string", f"{SC}[proration_behavior]")
    assert state_of(client).configurations[config["id"]] == config


def products_pairs(*products: tuple[str, list[str]]) -> Pairs:
    pairs: Pairs = [(f"{SU}[enabled]", "true")]
    for index, (product, prices) in enumerate(products):
        pairs.append((f"{SU}[products][{index}][product]", product))
        pairs += [
            (f"{SU}[products][{index}][prices][{position}]", price)
            for position, price in enumerate(prices)
        ]
    return pairs


@pytest.mark.parametrize(
    ("products", "code", "param"),
    [
        (
            [("prod_Pro", ["price_ProMonthly", "price_Nope"])],
            "resource_missing",
            f"{SU}[products][0][prices][1]",
        ),
        (
            [("prod_Pro", ["price_ProMonthly"]), ("prod_Nope", ["price_TeamMonthly"])],
            "resource_missing",
            f"{SU}[products][1][product]",
        ),
        (
            [("prod_Pro", ["price_ProYearly"]), ("prod_Team", ["price_ProMonthly"])],
            "parameter_invalid_string",
            f"{SU}[products][1][prices][0]",
        ),
        ([("prod_Gone", ["price_ProMonthly"])], "resource_missing", f"{SU}[products][0][product]"),
    ],
    ids=["unknown price", "unknown product", "price of another product", "declared missing"],
)
async def test_configuration_products_must_be_in_the_catalogue(
    client: Client, products: list[tuple[str, list[str]]], code: str, param: str
) -> None:
    await control(client, "POST", "catalogue", {"products": CATALOGUE})
    await control(client, "POST", "missing", {"ids": ["prod_Gone"]})

    for path in (CONFIGS, f"{CONFIGS}/{(await create_configuration(client))['id']}"):
        status, body, _ = await stripe_post(client, path, products_pairs(*products))
        assert error_of(status, body) == (400, code, param), body
        if code == "resource_missing":
            assert "No such" in body["error"]["message"]


async def test_configuration_products_pass_until_a_catalogue_is_seeded(client: Client) -> None:
    # Backward compatible: nothing seeded, any well-formed prod_/price_ id is taken.
    config = await create_configuration(client, products_pairs(("prod_Any", ["price_Any"])))
    assert config["features"]["subscription_update"]["products"][0]["prices"] == ["price_Any"]

    # Once any product is seeded, also on another account, unknown ids are missing ...
    await control(
        client,
        "POST",
        "catalogue",
        {"products": [{"id": "prod_Pro", "prices": ["price_ProYearly"], "account": "acct_A"}]},
    )
    status, body, _ = await stripe_post(
        client, CONFIGS, products_pairs(("prod_Any", ["price_Any"]))
    )
    assert error_of(status, body) == (400, "resource_missing", f"{SU}[products][0][product]")
    # ... and a product of another account is missing here.
    status, body, _ = await stripe_post(
        client, CONFIGS, products_pairs(("prod_Pro", ["price_ProYearly"]))
    )
    assert error_of(status, body) == (400, "resource_missing", f"{SU}[products][0][product]")
    await create_configuration(client, products_pairs(("prod_Pro", ["price_ProYearly"])), "acct_A")

    listed = await control(client, "GET", "catalogue")
    assert listed == {
        "products": [{"id": "prod_Pro", "prices": ["price_ProYearly"], "account": "acct_A"}]
    }
    assert await control(client, "DELETE", "catalogue") == {"deleted": 1}
    await create_configuration(client, products_pairs(("prod_Any", ["price_Any"])))


@pytest.mark.parametrize(
    "seed",
    [
        "prod_x",
        {"id": "price_x"},
        {"id": "prod_x", "prices": "price_a"},
        {"id": "prod_x", "prices": ["prod_y"]},
        {"id": "prod_x", "account": "cus_1"},
        {"id": "prod_x", "name": "Pro"},
    ],
)
async def test_bad_catalogue_seeds_are_refused(client: Client, seed: object) -> None:
    async with client.post("/_standin/catalogue", json={"products": [seed]}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]
    assert state_of(client).catalogue.products == {}


async def test_configuration_update_merges_and_clears(client: Client) -> None:
    await control(client, "POST", "catalogue", {"products": CATALOGUE})
    config = await create_configuration(
        client,
        [
            *EXAMPLE,
            ("name", "pro"),
            ("default_return_url", "https://example.com/account"),
            ("business_profile[privacy_policy_url]", "https://example.com/privacy"),
            ("metadata[keep]", "1"),
            ("features[customer_update][enabled]", "true"),
            ("features[customer_update][allowed_updates][0]", "email"),
            (f"{SU}[schedule_at_period_end][conditions][0][type]", "decreasing_item_amount"),
            ("login_page[enabled]", "true"),
        ],
    )
    login_url = config["login_page"]["url"]

    # `enabled` may be left out here; nested objects merge; a list sent replaces.
    status, updated, _ = await stripe_post(
        client,
        f"{CONFIGS}/{config['id']}",
        [
            (f"{SC}[mode]", "immediately"),
            (f"{SU}[default_allowed_updates][0]", "quantity"),
            (f"{SU}[default_allowed_updates][1]", "promotion_code"),
            (f"{SU}[products][0][product]", "prod_Team"),
            (f"{SU}[products][0][prices][0]", "price_TeamMonthly"),
            ("business_profile[headline]", "New"),
            ("metadata[content_hash]", "ffff"),
        ],
    )
    assert status == 200, updated
    assert updated["id"] == config["id"]
    assert updated["created"] == config["created"]
    assert updated["updated"] > config["updated"]
    features = updated["features"]
    assert features["subscription_cancel"]["enabled"] is True
    assert features["subscription_cancel"]["mode"] == "immediately"
    assert features["subscription_update"]["default_allowed_updates"] == [
        "quantity",
        "promotion_code",
    ]
    assert [p["product"] for p in features["subscription_update"]["products"]] == ["prod_Team"]
    assert features["subscription_update"]["enabled"] is True
    assert updated["business_profile"] == {
        "headline": "New",
        "privacy_policy_url": "https://example.com/privacy",
        "terms_of_service_url": None,
    }
    assert updated["metadata"] == {"content_hash": "ffff", "keep": "1"}
    assert updated["login_page"] == {"enabled": True, "url": login_url}

    # "" clears: strings to null, lists to [], products to null, one key or all metadata.
    status, cleared, _ = await stripe_post(
        client,
        f"{CONFIGS}/{config['id']}",
        [
            ("business_profile[headline]", ""),
            ("business_profile[privacy_policy_url]", ""),
            ("default_return_url", ""),
            ("name", ""),
            ("features[customer_update][allowed_updates]", ""),
            (f"{SU}[default_allowed_updates]", ""),
            (f"{SU}[products]", ""),
            (f"{SU}[schedule_at_period_end][conditions]", ""),
            ("metadata[keep]", ""),
            ("login_page[enabled]", "false"),
        ],
    )
    assert status == 200, cleared
    assert cleared["business_profile"]["headline"] is None
    assert cleared["business_profile"]["privacy_policy_url"] is None
    assert (cleared["default_return_url"], cleared["name"]) == (None, None)
    assert cleared["features"]["customer_update"] == {"allowed_updates": [], "enabled": True}
    subscription_update = cleared["features"]["subscription_update"]
    assert subscription_update["default_allowed_updates"] == []
    assert subscription_update["products"] is None
    assert subscription_update["schedule_at_period_end"] == {"conditions": []}
    assert cleared["metadata"] == {"content_hash": "ffff"}
    assert cleared["login_page"] == {"enabled": False, "url": None}
    assert cleared["updated"] > updated["updated"]

    status, emptied, _ = await stripe_post(client, f"{CONFIGS}/{config['id']}", [("metadata", "")])
    assert (status, emptied["metadata"]) == (200, {})
    status, retrieved = await stripe_get(client, f"{CONFIGS}/{config['id']}")
    assert (status, retrieved) == (200, emptied)


async def test_configuration_update_deactivates_and_keeps_update_rules(client: Client) -> None:
    config = await create_configuration(client)
    path = f"{CONFIGS}/{config['id']}"

    status, body, _ = await stripe_post(client, path, [("active", "false")])
    assert (status, body["active"]) == (200, False)
    status, body, _ = await stripe_post(client, path, [("active", "true")])
    assert (status, body["active"]) == (200, True)

    rejections = [
        ([("features[invoice_history][allowed]", "true")], "parameter_unknown"),
        ([("features[payment_method_update][enabled]", "")], "parameter_invalid_empty"),
        ([("features[invoice_history][enabled]", "")], "parameter_invalid_empty"),
        ([("active", "")], "parameter_invalid_empty"),
        ([("active", "no")], "parameter_invalid_boolean"),
        ([("business_profile[headline]", "y" * 61)], "parameter_invalid_string"),
        ([(f"{SC}[cancellation_reason][options][0]", "other")], "parameter_missing"),
    ]
    for pairs, code in rejections:
        status, body, _ = await stripe_post(client, path, pairs)
        assert (status, body["error"]["code"]) == (400, code), (pairs, body)
    # invoice_history still needs its enabled in an update.
    status, body, _ = await stripe_post(client, path, [("features[invoice_history][x]", "1")])
    assert error_of(status, body) == (400, "parameter_unknown", "features[invoice_history][x]")
    status, body, _ = await stripe_post(
        client, path, [("name", "x"), ("features[invoice_history]", "")]
    )
    assert status == 400
    assert state_of(client).configurations[config["id"]]["name"] is None


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_unknown_configuration_is_a_stripe_404(client: Client, method: str) -> None:
    async with client.request(method, f"{CONFIGS}/bpc_1Nope", headers=AUTH) as resp:
        body = await resp.json()
        assert error_of(resp.status, body) == (404, "resource_missing", "id")
        assert body["error"]["message"] == "No such configuration: 'bpc_1Nope'"


async def test_configuration_retrieve_takes_only_expand(client: Client) -> None:
    config = await create_configuration(client)
    status, body = await stripe_get(
        client, f"{CONFIGS}/{config['id']}", **{"expand[0]": "application"}
    )
    assert (status, body) == (200, config)
    status, body = await stripe_get(client, f"{CONFIGS}/{config['id']}", active="true")
    assert error_of(status, body) == (400, "parameter_unknown", "active")


async def test_configuration_idempotency_replays_and_refuses_other_params(client: Client) -> None:
    status, first, _ = await stripe_post(client, CONFIGS, MINIMAL, key="profile-pro-1")
    assert status == 200
    status, again, headers = await stripe_post(client, CONFIGS, MINIMAL, key="profile-pro-1")
    assert (status, again) == (200, first)
    assert headers["Idempotent-Replayed"] == "true"
    assert list(state_of(client).configurations) == [first["id"]]

    other = [("features[invoice_history][enabled]", "false")]
    status, body, _ = await stripe_post(client, CONFIGS, other, key="profile-pro-1")
    assert (status, body["error"]["type"]) == (400, "idempotency_error")
    assert len(state_of(client).configurations) == 1

    # Updates replay too: the same answer, `updated` not moved again.
    path = f"{CONFIGS}/{first['id']}"
    status, updated, _ = await stripe_post(client, path, [("name", "a")], key="profile-pro-u")
    status, replayed, headers = await stripe_post(
        client, path, [("name", "a")], key="profile-pro-u"
    )
    assert (status, replayed, headers["Idempotent-Replayed"]) == (200, updated, "true")
    assert state_of(client).configurations[first["id"]]["updated"] == updated["updated"]
    status, body, _ = await stripe_post(client, path, [("name", "b")], key="profile-pro-u")
    assert (status, body["error"]["type"]) == (400, "idempotency_error")
    # A key is per account: the same key on a connected account creates there.
    status, there, _ = await stripe_post(client, CONFIGS, MINIMAL, "acct_A", key="profile-pro-1")
    assert status == 200
    assert there["id"] != first["id"]


async def test_stripe_account_scopes_configurations(client: Client) -> None:
    platform = await create_configuration(client)
    on_a = await create_configuration(client, account="acct_A")

    for account, visible, hidden in ((None, platform, on_a), ("acct_A", on_a, platform)):
        status, body = await stripe_get(client, f"{CONFIGS}/{visible['id']}", account)
        assert (status, body["id"]) == (200, visible["id"])
        status, body = await stripe_get(client, f"{CONFIGS}/{hidden['id']}", account)
        assert error_of(status, body) == (404, "resource_missing", "id")
        status, body, _ = await stripe_post(
            client, f"{CONFIGS}/{hidden['id']}", [("name", "x")], account
        )
        assert error_of(status, body) == (404, "resource_missing", "id")
        status, page = await stripe_get(client, CONFIGS, account)
        assert [config["id"] for config in page["data"]] == [visible["id"]]
    status, page = await stripe_get(client, CONFIGS, "acct_B")
    assert page["data"] == []
    assert state_of(client).configurations[on_a["id"]]["name"] is None
    shown = await control(client, "GET", "billing_portal/configurations")
    assert {c["id"]: c["account"] for c in shown["configurations"]} == {
        platform["id"]: None,
        on_a["id"]: "acct_A",
    }


async def test_configuration_list_filters_and_pages_newest_first(client: Client) -> None:
    ids = [(await create_configuration(client))["id"] for _ in range(5)]
    state = state_of(client)
    for index, config_id in enumerate(ids):  # distinct seconds, oldest first
        state.configurations[config_id]["created"] = 1_700_000_000 + index
    await stripe_post(client, f"{CONFIGS}/{ids[1]}", [("active", "false")])
    newest_first = ids[::-1]

    status, page = await stripe_get(client, CONFIGS)
    assert status == 200
    assert (page["object"], page["url"], page["has_more"]) == ("list", CONFIGS, False)
    assert [c["id"] for c in page["data"]] == newest_first

    status, page = await stripe_get(client, CONFIGS, limit="2")
    assert ([c["id"] for c in page["data"]], page["has_more"]) == (newest_first[:2], True)
    status, page = await stripe_get(client, CONFIGS, limit="2", starting_after=newest_first[1])
    assert [c["id"] for c in page["data"]] == newest_first[2:4]
    status, page = await stripe_get(client, CONFIGS, limit="2", ending_before=newest_first[4])
    assert [c["id"] for c in page["data"]] == newest_first[2:4]

    status, page = await stripe_get(client, CONFIGS, active="false")
    assert [c["id"] for c in page["data"]] == [ids[1]]
    status, page = await stripe_get(client, CONFIGS, active="true")
    assert [c["id"] for c in page["data"]] == [i for i in newest_first if i != ids[1]]
    status, page = await stripe_get(client, CONFIGS, is_default="true")
    assert page["data"] == []
    status, page = await stripe_get(client, CONFIGS, is_default="false", limit="1")
    assert ([c["id"] for c in page["data"]], page["has_more"]) == (newest_first[:1], True)


async def test_configurations_made_in_one_second_list_latest_first(client: Client) -> None:
    ids = [(await create_configuration(client))["id"] for _ in range(3)]
    for config_id in ids:
        state_of(client).configurations[config_id]["created"] = 1_700_000_000
    _, page = await stripe_get(client, CONFIGS)
    assert [c["id"] for c in page["data"]] == ids[::-1]


@pytest.mark.parametrize(
    ("params", "code", "param"),
    [
        ({"active": "yes"}, "parameter_invalid_boolean", "active"),
        ({"is_default": ""}, "parameter_invalid_empty", "is_default"),
        ({"limit": "0"}, "parameter_invalid_integer", "limit"),
        ({"limit": "101"}, "parameter_invalid_integer", "limit"),
        ({"name": "x"}, "parameter_unknown", "name"),
        ({"starting_after": "bpc_1Nope"}, "resource_missing", "starting_after"),
        (
            {"starting_after": "bpc_1", "ending_before": "bpc_2"},
            "parameters_exclusive",
            "ending_before",
        ),
    ],
)
async def test_configuration_list_rejections(
    client: Client, params: dict[str, str], code: str, param: str
) -> None:
    status, body = await stripe_get(client, CONFIGS, **params)
    assert error_of(status, body) == (400, code, param)


async def test_configuration_routes_need_a_key(client: Client) -> None:
    async with client.post(CONFIGS, data=MINIMAL) as resp:
        assert resp.status == 401
    async with client.get(CONFIGS) as resp:
        assert resp.status == 401
    assert state_of(client).configurations == {}


async def test_faults_apply_to_configuration_routes(client: Client) -> None:
    faults = [{"status": 500}, {"wrong_object": "invoice"}]
    await control(client, "POST", "faults", {"faults": faults})
    status, body, _ = await stripe_post(client, CONFIGS, MINIMAL)
    assert (status, body["error"]["type"]) == (500, "api_error")
    status, body = await stripe_get(client, CONFIGS)
    assert (status, body["object"]) == (200, "invoice")
    assert state_of(client).configurations == {}


# ------------------------------------------------------------------ sessions and configurations

OFFERING: Pairs = [
    ("features[payment_method_update][enabled]", "true"),
    (f"{SC}[enabled]", "true"),
    *products_pairs(("prod_Pro", ["price_ProYearly"])),
]
SESSION_FLOWS: dict[str, Pairs] = {
    "payment_method_update": [("flow_data[type]", "payment_method_update")],
    "subscription_cancel": [
        ("flow_data[type]", "subscription_cancel"),
        ("flow_data[subscription_cancel][subscription]", "sub_1"),
    ],
    "subscription_update": [
        ("flow_data[type]", "subscription_update"),
        ("flow_data[subscription_update][subscription]", "sub_1"),
    ],
    "subscription_update_confirm": [
        ("flow_data[type]", "subscription_update_confirm"),
        (f"{SUC}[subscription]", "sub_1"),
        (f"{SUC}[items][0][id]", "si_1"),
        (f"{SUC}[items][0][price]", "price_ProYearly"),
    ],
}
FEATURE_OF_FLOW = {
    "payment_method_update": "features[payment_method_update][enabled]",
    "subscription_cancel": f"{SC}[enabled]",
    "subscription_update": f"{SU}[enabled]",
    "subscription_update_confirm": f"{SU}[enabled]",
}


@pytest.mark.parametrize("flow", list(SESSION_FLOWS))
async def test_session_needs_the_flows_feature_enabled(client: Client, flow: str) -> None:
    config = await create_configuration(client, OFFERING)
    session = [*CUS, ("configuration", config["id"]), *SESSION_FLOWS[flow]]
    status, body, _ = await post_session(client, session)
    assert (status, body.get("configuration")) == (200, config["id"]), body

    status, _, _ = await stripe_post(
        client, f"{CONFIGS}/{config['id']}", [(FEATURE_OF_FLOW[flow], "false")]
    )
    assert status == 200
    status, body, _ = await post_session(client, session)
    assert error_of(status, body) == (400, "feature_disabled", "flow_data[type]")
    assert FEATURE_OF_FLOW[flow].removesuffix("[enabled]") in body["error"]["message"]
    # A session without a flow only needs the configuration to be active.
    status, body, _ = await post_session(client, [*CUS, ("configuration", config["id"])])
    assert status == 200


async def test_session_refuses_an_inactive_configuration(client: Client) -> None:
    config = await create_configuration(client, OFFERING)
    await stripe_post(client, f"{CONFIGS}/{config['id']}", [("active", "false")])
    status, body, _ = await post_session(client, [*CUS, ("configuration", config["id"])])
    assert error_of(status, body) == (400, "configuration_inactive", "configuration")


async def test_session_confirm_price_must_be_offered(client: Client) -> None:
    config = await create_configuration(client, OFFERING)
    confirm = [*CUS, ("configuration", config["id"]), *SESSION_FLOWS["subscription_update_confirm"]]
    other_price = [(k, "price_TeamMonthly" if k.endswith("[price]") else v) for k, v in confirm]
    status, body, _ = await post_session(client, other_price)
    assert error_of(status, body) == (400, "price_not_offered", f"{SUC}[items][0][price]")
    # A quantity-only change names no price: nothing to check.
    no_price = [(k, v) for k, v in confirm if not k.endswith("[price]")]
    status, body, _ = await post_session(client, [*no_price, (f"{SUC}[items][0][quantity]", "2")])
    assert status == 200, body
    # Without products, no price is offered.
    await stripe_post(client, f"{CONFIGS}/{config['id']}", [(f"{SU}[products]", "")])
    status, body, _ = await post_session(client, confirm)
    assert error_of(status, body) == (400, "price_not_offered", f"{SUC}[items][0][price]")


async def test_session_configuration_must_be_on_the_callers_account(client: Client) -> None:
    on_a = await create_configuration(client, OFFERING, account="acct_A")
    status, body, _ = await post_session(client, [*CUS, ("configuration", on_a["id"])])
    assert error_of(status, body) == (400, "resource_missing", "configuration")
    status, body, _ = await post_session(
        client, [*CUS, ("configuration", on_a["id"])], {"Stripe-Account": "acct_A"}
    )
    assert status == 200, body
    # A configuration never made here passes, as every id never seeded does.
    status, body, _ = await post_session(client, [*CUS, ("configuration", "bpc_1Elsewhere")])
    assert (status, body["configuration"]) == (200, "bpc_1Elsewhere")


# --------------------------------------------------------------------------- the Dashboard


async def test_dashboard_edit_changes_the_configuration_and_answers_it(client: Client) -> None:
    config = await create_configuration(client, OFFERING)
    edited = await control(
        client,
        "POST",
        f"billing_portal/configurations/{config['id']}",
        {
            "features": {"subscription_cancel": {"enabled": False}},
            "business_profile": {"headline": "Edited by hand"},
            "metadata": {"owner": "ops"},
            "name": "hand-made",
        },
    )
    assert edited["updated"] > config["updated"]
    assert edited["features"]["subscription_cancel"] == {
        **config["features"]["subscription_cancel"],
        "enabled": False,
    }
    assert edited["features"]["payment_method_update"] == {"enabled": True}
    assert edited["business_profile"]["headline"] == "Edited by hand"
    assert (edited["metadata"], edited["name"]) == ({"owner": "ops"}, "hand-made")
    status, retrieved = await stripe_get(client, f"{CONFIGS}/{config['id']}")
    assert (status, retrieved) == (200, edited)

    event = configuration_event(
        "billing_portal.configuration.updated", edited, previous=config, account="acct_A"
    )
    assert (event["type"], event["created"], event["account"]) == (
        "billing_portal.configuration.updated",
        edited["updated"],
        "acct_A",
    )
    assert event["data"] == {
        "object": edited,
        "previous_attributes": {
            "business_profile": {"headline": None},
            "features": {"subscription_cancel": {"enabled": True}},
            "metadata": {"owner": None},
            "name": None,
            "updated": config["updated"],
        },
    }
    created = configuration_event("billing_portal.configuration.created", config)
    assert "account" not in created
    assert created["data"] == {"object": config}

    deactivated = await control(
        client,
        "POST",
        f"billing_portal/configurations/{config['id']}",
        {
            "active": False,
            "metadata": {"owner": None},
            "features": {
                "subscription_update": {"products": [{"product": "prod_B", "prices": ["price_B"]}]}
            },
        },
    )
    assert (deactivated["active"], deactivated["metadata"]) == (False, {})
    assert deactivated["features"]["subscription_update"]["products"] == [
        {
            "adjustable_quantity": {"enabled": False, "maximum": None, "minimum": 1},
            "prices": ["price_B"],
            "product": "prod_B",
        }
    ]
    assert deactivated["updated"] > edited["updated"]
    status, body, _ = await post_session(client, [*CUS, ("configuration", config["id"])])
    assert error_of(status, body) == (400, "configuration_inactive", "configuration")


@pytest.mark.parametrize(
    "edit",
    [
        {},
        [],
        {"id": "bpc_other"},
        {"updated": 1},
        {"color": "red"},
        {"features": {"subscription_pause": {"enabled": True}}},
        {"active": "false"},
        {"active": None},
        {"features": {"invoice_history": True}},
        {"features": {"subscription_update": {"products": [{"product": "prod_x"}]}}},
        {"metadata": {"k": 1}},
    ],
)
async def test_dashboard_edit_refuses_what_the_object_has_not(client: Client, edit: object) -> None:
    config = await create_configuration(client)
    path = f"/_standin/billing_portal/configurations/{config['id']}"
    async with client.post(path, json=edit) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]
    assert state_of(client).configurations[config["id"]] == config


async def test_dashboard_edit_of_an_unknown_configuration_is_refused(client: Client) -> None:
    async with client.post("/_standin/billing_portal/configurations/bpc_1Nope", json={}) as resp:
        assert resp.status == 400


async def test_configurations_are_cleared_and_reset(client: Client) -> None:
    await control(client, "POST", "catalogue", {"products": CATALOGUE})
    await create_configuration(client)
    assert await control(client, "DELETE", "billing_portal/configurations") == {"deleted": 1}
    await create_configuration(client, account="acct_A")
    await control(client, "POST", "reset")
    state = state_of(client)
    assert (state.configurations, state.catalogue.products, state.accounts) == ({}, {}, {})


# --------------------------------------------------------------------------- portal pages


def session_page_path(url: str) -> str:
    """The stand-in path of a portal session URL, whatever host it names."""
    path = url.split("://", 1)[1].partition("/")[2]
    assert path.startswith("p/session/test_"), url
    return "/" + path


async def test_session_urls_point_at_stripe_by_default_and_have_a_page(client: Client) -> None:
    assert state_of(client).session_url_base == "https://billing.stripe.com"
    status, body, _ = await post_session(client, list(BASE))
    assert status == 200
    assert body["url"].startswith("https://billing.stripe.com/p/session/test_")
    assert len(body["url"].rpartition("/test_")[2]) == 64

    async with client.get(session_page_path(body["url"])) as resp:
        page = await resp.text()
        assert resp.status == 200, page
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Content-Security-Policy"] == "default-src 'none'"
    assert "<title>Stand-in customer portal</title>" in page
    assert '<h1 id="portal">Customer portal</h1>' in page
    assert '<code id="customer">cus_NciAYcXfLnqBoz</code>' in page
    assert '<a id="return" href="https://example.com/account">' in page
    # The page is for browsers, not a Stripe API call: it is not recorded.
    assert [r.path for r in state_of(client).requests] == [SESSIONS]


async def test_session_urls_under_the_stand_in_itself_open_its_page(client: Client) -> None:
    base = str(client.make_url("")).rstrip("/")
    state_of(client).session_url_base = base  # what the browser test does
    status, body, _ = await post_session(client, list(BASE), {"Idempotency-Key": "page"})
    assert status == 200
    assert body["url"].startswith(f"{base}/p/session/test_")

    # The absolute URL, as a browser would open it.
    async with client.session.get(body["url"]) as resp:
        assert resp.status == 200
        assert "cus_NciAYcXfLnqBoz" in await resp.text()
    # An idempotent replay answers the same URL, which still opens.
    _, replay, _ = await post_session(client, list(BASE), {"Idempotency-Key": "page"})
    assert replay["url"] == body["url"]
    async with client.session.get(replay["url"]) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "path",
    [
        "/p/session/test_" + "a" * 64,  # well-formed, never created
        "/p/session/bps_1NciAYcXfLnqBoz",
        "/p/session/",
    ],
)
async def test_a_session_the_stand_in_did_not_create_has_no_page(client: Client, path: str) -> None:
    await post_session(client, list(BASE))
    async with client.get(path) as resp:
        assert resp.status == 404
        page = await resp.text()
    if path != "/p/session/":  # the router's own 404 for a missing id
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "No such portal session" in page
        assert 'id="portal"' not in page


async def test_a_refused_or_distorted_session_has_no_page(client: Client) -> None:
    status, _, _ = await post_session(client, [("return_url", "https://example.com")])
    assert status == 400
    await control(client, "POST", "faults", {"faults": [{"wrong_object": True}]})
    await post_session(client, list(BASE))
    assert state_of(client).portal_sessions == {}


async def test_a_session_for_an_account_shows_the_account(client: Client) -> None:
    status, body, _ = await post_session(client, [("customer_account", "acct_1Nv0FGQ9RKHgCVdK")])
    assert status == 200, body
    async with client.get(session_page_path(body["url"])) as resp:
        page = await resp.text()
    assert '<code id="customer">acct_1Nv0FGQ9RKHgCVdK</code>' in page
    assert 'id="return"' not in page  # no return_url, no way back to show


async def test_the_page_escapes_what_the_session_echoes(client: Client) -> None:
    pairs = [("customer", "cus_NciAYcXfLnqBoz"), ("return_url", 'https://example.com/?a=1&b="<x>')]
    status, body, _ = await post_session(client, pairs)
    assert status == 200, body
    async with client.get(session_page_path(body["url"])) as resp:
        page = await resp.text()
    assert 'href="https://example.com/?a=1&amp;b=&quot;&lt;x&gt;"' in page
    assert "<x>" not in page


async def test_session_url_base_through_the_control_api(client: Client) -> None:
    assert await control(client, "GET", "session_url_base") == {
        "base": "https://billing.stripe.com"
    }
    # A trailing slash is dropped so URLs never hold "//p/session".
    assert await control(
        client, "POST", "session_url_base", {"base": "http://127.0.0.1:12111/"}
    ) == {"base": "http://127.0.0.1:12111"}
    _, body, _ = await post_session(client, list(BASE))
    assert body["url"].startswith("http://127.0.0.1:12111/p/session/test_")
    assert await control(client, "GET", "session_url_base") == {"base": "http://127.0.0.1:12111"}

    await control(client, "POST", "reset")
    assert state_of(client).session_url_base == "https://billing.stripe.com"
    # Reset forgets the sessions too: their pages are gone.
    async with client.get(session_page_path(body["url"])) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    "base",
    [None, 1, "", "billing.stripe.com", "ftp://h", "http://", "http://h/?q=1", "http://h/#f"],
)
async def test_bad_session_url_bases_are_refused(client: Client, base: object) -> None:
    async with client.post("/_standin/session_url_base", json={"base": base}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]
    assert state_of(client).session_url_base == "https://billing.stripe.com"


async def test_session_url_base_given_at_creation_is_what_reset_restores(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await aiohttp_client(create_app(session_url_base="http://127.0.0.1:12111/"))
    state = state_of(client)
    assert state.session_url_base == "http://127.0.0.1:12111"
    state.set_session_url_base("https://portal.example.com/custom")
    _, body, _ = await post_session(client, list(BASE))
    assert body["url"].startswith("https://portal.example.com/custom/p/session/test_")
    state.reset()
    assert state.session_url_base == "http://127.0.0.1:12111"
    with pytest.raises(ValueError, match="base must be"):
        create_app(session_url_base="not a url")
