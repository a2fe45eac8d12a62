"""What each imitated Stripe endpoint answers, once :mod:`.stripe_api` lets it.

* ``POST /v1/billing_portal/sessions``: validated as strictly as Stripe, then a
  ``billing_portal.session`` echoing the request;
* ``GET /v1/subscriptions``: filters and pages over the seeded subscriptions;
* any other ``/v1/...``: Stripe's 404.

Each endpoint is an :class:`~stripe_standin.stripe_api.ApiRoute` (``*_ROUTE``,
mounted by :mod:`.app`): the implementation, and a ``_fake_*`` body that a
wrong_object or truncated fault distorts, built without validating the request.
"""

from __future__ import annotations

import time
from typing import Any, Final

from .responses import random_token
from .state import StandinState
from .stripe_api import ApiCall, ApiRoute
from .validation import (
    LIST_STATUS_FILTERS,
    LIST_SUBSCRIPTIONS,
    PORTAL_SESSION,
    IdRef,
    Params,
    StripeError,
    Value,
    list_subscription_ids,
    portal_session_ids,
    validate,
)

__all__ = ["DEFAULT_CONFIGURATION", "PORTAL_SESSIONS_ROUTE", "SUBSCRIPTIONS_ROUTE", "UNKNOWN_ROUTE"]

# The configuration Stripe would pick when the request names none.
DEFAULT_CONFIGURATION: Final = "bpc_1StandinDefaultConfig0"


def _str(value: Value | None) -> str | None:
    return value if isinstance(value, str) else None


def _obj(value: Value | None) -> dict[str, Value]:
    return value if isinstance(value, dict) else {}


def _list(value: Value | None) -> list[Value]:
    return value if isinstance(value, list) else []


# --------------------------------------------------------------------------- portal sessions


def _new_session_url() -> str:
    return "https://billing.stripe.com/p/session/test_" + random_token(64)


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
            "url": _new_session_url(),
        }
    )
    return session


def _create_portal_session(state: StandinState, call: ApiCall) -> dict[str, Any]:
    validate(call.params, PORTAL_SESSION)
    state.check_ids(portal_session_ids(call.params))
    return _session_object(call.params)


def _fake_portal_session(params: Params | None) -> dict[str, Any]:
    return _session_object(params or {}, validated=False)


PORTAL_SESSIONS_ROUTE: Final = ApiRoute(_create_portal_session, _fake_portal_session)


# --------------------------------------------------------------------------- list subscriptions


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
    state.check_ids(list_subscription_ids(params))
    customer = _str(params.get("customer"))
    price = _str(params.get("price"))
    wanted = _str(params.get("status"))
    assert wanted is None or wanted in LIST_STATUS_FILTERS
    limit = int(_str(params.get("limit")) or "10")
    # Newest first like Stripe; sorted() is stable, so ties keep seed order.
    ordered = sorted(state.subscriptions.values(), key=lambda sub: -int(sub["created"]))
    ids = [sub["id"] for sub in ordered]
    candidates = ordered
    for cursor_param in ("starting_after", "ending_before"):
        cursor = _str(params.get(cursor_param))
        if cursor is None:
            continue
        if cursor not in ids:
            raise IdRef(cursor_param, cursor, "subscription", "sub_").error()
        index = ids.index(cursor)
        candidates = ordered[index + 1 :] if cursor_param == "starting_after" else ordered[:index]

    def matches(sub: dict[str, Any]) -> bool:
        prices = {item["price"]["id"] for item in sub["items"]["data"]}
        return (
            (customer is None or sub["customer"] == customer)
            and (price is None or price in prices)
            and _status_matches(sub["status"], wanted)
        )

    selected = [sub for sub in candidates if matches(sub)]
    page = selected[-limit:] if "ending_before" in params else selected[:limit]
    return {
        "object": "list",
        "data": page,
        "has_more": len(selected) > limit,
        "url": "/v1/subscriptions",
    }


def _fake_subscription_list(params: Params | None) -> dict[str, Any]:
    return {"object": "list", "data": [], "has_more": False, "url": "/v1/subscriptions"}


SUBSCRIPTIONS_ROUTE: Final = ApiRoute(_list_subscriptions, _fake_subscription_list)


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
