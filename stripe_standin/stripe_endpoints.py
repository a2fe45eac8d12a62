"""What each imitated Stripe endpoint answers, once :mod:`.stripe_api` lets it.

* ``POST /v1/billing_portal/sessions``: validated as strictly as Stripe, then a
  ``billing_portal.session`` echoing the request, its ``url`` under the state's
  ``session_url_base`` (:mod:`.portal_page` serves it); refused when the named
  configuration (one made through the API) cannot serve it (inactive, the
  flow's feature disabled, a confirm price it does not offer);
* ``GET /v1/subscriptions``: filters and pages over the seeded subscriptions;
* ``GET /v1/customers`` and ``GET /v1/customers/{id}``: the seeded customers;
* any other ``/v1/...``: Stripe's 404.

(The portal configuration endpoints are in :mod:`.configuration_endpoints`.)

With a ``Stripe-Account`` header (Connect) a request sees only the objects
seeded on that account; without one, only the platform's.

Each endpoint is an :class:`~stripe_standin.stripe_api.ApiRoute` (``*_ROUTE``,
mounted by :mod:`.app`): the implementation, and a ``_fake_*`` body that a
wrong_object or truncated fault distorts, built without validating the request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from .configurations import session_refusal
from .customers import deleted_customer
from .listing import ListOf
from .responses import random_token
from .state import DEFAULT_SESSION_URL_BASE, StandinState
from .stripe_api import ApiCall, ApiRoute
from .validation import (
    LIST_CUSTOMERS,
    LIST_STATUS_FILTERS,
    LIST_SUBSCRIPTIONS,
    PORTAL_SESSION,
    RETRIEVE,
    Params,
    StripeError,
    Value,
    list_subscription_ids,
    portal_session_ids,
    validate,
)

__all__ = [
    "CUSTOMERS_ROUTE",
    "CUSTOMER_ROUTE",
    "DEFAULT_CONFIGURATION",
    "PORTAL_SESSIONS_ROUTE",
    "SUBSCRIPTIONS_ROUTE",
    "UNKNOWN_ROUTE",
]

# The configuration Stripe would pick when the request names none.
DEFAULT_CONFIGURATION: Final = "bpc_1StandinDefaultConfig0"


def _str(value: Value | None) -> str | None:
    return value if isinstance(value, str) else None


def _obj(value: Value | None) -> dict[str, Value]:
    return value if isinstance(value, dict) else {}


def _list(value: Value | None) -> list[Value]:
    return value if isinstance(value, list) else []


# --------------------------------------------------------------------------- portal sessions


def _fake_session_url() -> str:
    # A distorted body is never opened in a browser: Stripe's own host will do.
    return f"{DEFAULT_SESSION_URL_BASE}/p/session/test_" + random_token(64)


def _flow_object(flow_data: dict[str, Value]) -> dict[str, Any]:
    """The session's ``flow``: the requested flow echoed with Stripe's nulls filled in."""
    flow_type = _str(flow_data.get("type"))
    after = _obj(flow_data.get("after_completion"))
    # Stripe's default when after_completion is not given.
    after_type = _str(after.get("type")) or "portal_homepage"
    hosted = _obj(after.get("hosted_confirmation"))
    redirect = _obj(after.get("redirect"))
    flow: dict[str, Any] = {
        "after_completion": {
            "hosted_confirmation": (
                {"custom_message": _str(hosted.get("custom_message"))}
                if after_type == "hosted_confirmation"
                else None
            ),
            "redirect": (
                {"return_url": _str(redirect.get("return_url"))}
                if after_type == "redirect"
                else None
            ),
            "type": after_type,
        },
        "subscription_cancel": None,
        "subscription_update": None,
        "subscription_update_confirm": None,
        "type": flow_type,
    }
    if flow_type == "subscription_cancel":
        cancel = _obj(flow_data.get("subscription_cancel"))
        retention = cancel.get("retention")
        flow["subscription_cancel"] = {
            "retention": None
            if retention is None
            else {
                "coupon_offer": {
                    "coupon": _str(_obj(_obj(retention).get("coupon_offer")).get("coupon"))
                },
                "type": _str(_obj(retention).get("type")),
            },
            "subscription": _str(cancel.get("subscription")),
        }
    elif flow_type == "subscription_update":
        update = _obj(flow_data.get("subscription_update"))
        flow["subscription_update"] = {"subscription": _str(update.get("subscription"))}
    elif flow_type == "subscription_update_confirm":
        confirm = _obj(flow_data.get("subscription_update_confirm"))
        items = []
        for item in _list(confirm.get("items")):
            quantity = _str(_obj(item).get("quantity"))
            items.append(
                {
                    "id": _str(_obj(item).get("id")),
                    "price": _str(_obj(item).get("price")),
                    "quantity": int(quantity) if quantity is not None else None,
                }
            )
        discounts = [
            {
                "coupon": _str(_obj(discount).get("coupon")),
                "promotion_code": _str(_obj(discount).get("promotion_code")),
            }
            for discount in _list(confirm.get("discounts"))
        ]
        flow["subscription_update_confirm"] = {
            "discounts": discounts if "discounts" in confirm else None,
            "items": items,
            "subscription": _str(confirm.get("subscription")),
        }
    return flow


def _session_object(params: Params, *, validated: bool = True) -> dict[str, Any]:
    """A ``billing_portal.session`` as Stripe returns it for ``params``."""
    session: dict[str, Any] = {
        "id": "bps_1" + random_token(23),
        "object": "billing_portal.session",
        "configuration": _str(params.get("configuration")) or DEFAULT_CONFIGURATION,
        "created": int(time.time()),
        "customer": _str(params.get("customer")),
    }
    if "customer_account" in params:
        session["customer_account"] = _str(params.get("customer_account"))
    flow_data = params.get("flow_data")
    session.update(
        {
            "flow": _flow_object(_obj(flow_data)) if validated and flow_data else None,
            "livemode": False,
            "locale": _str(params.get("locale")),
            "on_behalf_of": _str(params.get("on_behalf_of")),
            "return_url": _str(params.get("return_url")),
            "url": _fake_session_url(),
        }
    )
    return session


def _create_portal_session(state: StandinState, call: ApiCall) -> dict[str, Any]:
    validate(call.params, PORTAL_SESSION)
    # A customer or subscription seeded on another account is "no such" here.
    state.check_ids(portal_session_ids(call.params), call.stripe_account)
    # A configuration never made here passes (like every id never seeded).
    config = state.configurations.get(_str(call.params.get("configuration")) or "")
    refusal = session_refusal(config, call.params) if config is not None else None
    if refusal is not None:
        raise refusal
    session = _session_object(call.params)
    # Under the state's base, and remembered: GET /p/session/{id} shows its page.
    session["url"] = state.new_session_url(session)
    return session


def _fake_portal_session(params: Params | None) -> dict[str, Any]:
    return _session_object(params or {}, validated=False)


PORTAL_SESSIONS_ROUTE: Final = ApiRoute(_create_portal_session, _fake_portal_session)


# --------------------------------------------------------------------------- list subscriptions


_SUBSCRIPTION_LIST: Final = ListOf("/v1/subscriptions", "subscription", "sub_")


def _status_matches(status: str, wanted: str | None) -> bool:
    if wanted is None:
        return status != "canceled"  # Stripe's default hides canceled subscriptions
    if wanted == "all":
        return True
    if wanted == "ended":
        return status in ("canceled", "incomplete_expired")
    return status == wanted


def _list_subscriptions(state: StandinState, call: ApiCall) -> dict[str, Any]:
    params = call.params
    validate(params, LIST_SUBSCRIPTIONS)
    state.check_ids(list_subscription_ids(params), call.stripe_account)
    customer = _str(params.get("customer"))
    price = _str(params.get("price"))
    wanted = _str(params.get("status"))
    assert wanted is None or wanted in LIST_STATUS_FILTERS
    # Newest first like Stripe; sorted() is stable, so ties keep seed order.
    ordered = sorted(state.subscriptions.values(), key=lambda sub: -int(sub["created"]))

    def matches(sub: dict[str, Any]) -> bool:
        prices = {item["price"]["id"] for item in sub["items"]["data"]}
        return (
            (customer is None or sub["customer"] == customer)
            and (price is None or price in prices)
            and _status_matches(sub["status"], wanted)
        )

    return _SUBSCRIPTION_LIST.page(
        ordered, params, visible=_on_account(state, call), matches=matches
    )


def _fake_subscription_list(params: Params | None) -> dict[str, Any]:
    return _SUBSCRIPTION_LIST.empty()


SUBSCRIPTIONS_ROUTE: Final = ApiRoute(_list_subscriptions, _fake_subscription_list)


# --------------------------------------------------------------------------- customers


_CUSTOMER_LIST: Final = ListOf("/v1/customers", "customer", "cus_")


def _on_account(state: StandinState, call: ApiCall) -> Callable[[dict[str, Any]], bool]:
    """Whether a seeded object lives on the account the call acts as."""
    return lambda obj: state.account_of(obj["id"]) == call.stripe_account


def _list_customers(state: StandinState, call: ApiCall) -> dict[str, Any]:
    params = call.params
    validate(params, LIST_CUSTOMERS)
    email = _str(params.get("email"))
    ordered, positions = state.customer_order()

    def matches(customer: dict[str, Any]) -> bool:
        # Deleted customers are not listed (they can still be a cursor).
        return not customer.get("deleted") and (email is None or customer["email"] == email)

    visible = _on_account(state, call)
    return _CUSTOMER_LIST.page(
        ordered, params, visible=visible, matches=matches, positions=positions
    )


def _fake_customer_list(params: Params | None) -> dict[str, Any]:
    return _CUSTOMER_LIST.empty()


CUSTOMERS_ROUTE: Final = ApiRoute(_list_customers, _fake_customer_list)


def _retrieve_customer(state: StandinState, call: ApiCall) -> dict[str, Any]:
    validate(call.params, RETRIEVE)
    customer_id = call.resource_id or ""
    customer = state.customers.get(customer_id)
    if (
        customer is None
        or customer_id in state.missing_ids
        or state.account_of(customer_id) != call.stripe_account
    ):
        raise StripeError(
            f"No such customer: '{customer_id}'", status=404, code="resource_missing", param="id"
        )
    # Stripe answers 200 for a deleted customer, with only the id and the flag.
    return deleted_customer(customer) if customer.get("deleted") else customer


def _fake_customer(params: Params | None) -> dict[str, Any]:
    return {"id": "cus_1StandinFake", "object": "customer", "metadata": {}, "livemode": False}


CUSTOMER_ROUTE: Final = ApiRoute(_retrieve_customer, _fake_customer)


# --------------------------------------------------------------------------- unknown routes


def _unknown_route(state: StandinState, call: ApiCall) -> dict[str, Any]:
    raise StripeError(
        f"Unrecognized request URL ({call.method}: {call.path}). Please see "
        "https://stripe.com/docs or we can help at https://support.stripe.com/.",
        status=404,
    )


def _fake_unknown(params: Params | None) -> dict[str, Any]:
    return {"object": "unknown"}


UNKNOWN_ROUTE: Final = ApiRoute(_unknown_route, _fake_unknown)
