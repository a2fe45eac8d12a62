"""Portal configuration objects (``bpc_…``): how parameters become one, and what it allows.

* :func:`new_configuration` and :func:`apply_params`: the object a validated
  create or update leaves behind (defaults for what create leaves out; update
  merges nested objects field by field, a list sent replaces the old one, ``""``
  clears, ``metadata[key]=""`` removes a key), then :func:`check_cancellation`;
* :func:`session_refusal`: why a portal session cannot use a configuration
  (inactive, the flow's feature disabled, a confirm price it does not offer);
* :func:`dashboard_edit`: an edit "in the Dashboard" from the control API.

The parameter schemas are in :mod:`.configuration_params`; the endpoints, the
catalogue check and the per-account storage in :mod:`.configuration_endpoints`
and :mod:`.state`.
"""

from __future__ import annotations

import copy
from typing import Any

from .configuration_params import UPDATE_CONFIGURATION
from .control_input import ControlError
from .responses import random_token
from .validation import Arr, Map, Obj, Params, Scalar, Spec, StripeError, Value

__all__ = [
    "FLOW_FEATURES",
    "apply_params",
    "check_cancellation",
    "dashboard_edit",
    "new_configuration",
    "new_configuration_id",
    "offered_prices",
    "session_refusal",
]

# The feature a portal-session flow needs enabled.
FLOW_FEATURES = {
    "payment_method_update": "payment_method_update",
    "subscription_cancel": "subscription_cancel",
    "subscription_update": "subscription_update",
    "subscription_update_confirm": "subscription_update",
}

# Fields the Dashboard cannot change: they are Stripe's, not the configuration's.
_NOT_EDITABLE = ("id", "object", "created", "updated", "livemode", "application")


def new_configuration_id() -> str:
    return "bpc_1" + random_token(23)


def _login_url() -> str:
    return "https://billing.stripe.com/p/login/test_" + random_token(24)


def new_configuration(config_id: str, params: Params, now: int) -> dict[str, Any]:
    """The object a validated create makes: Stripe's defaults, then ``params``."""
    config: dict[str, Any] = {
        "id": config_id,
        "object": "billing_portal.configuration",
        "active": True,
        "application": None,
        "business_profile": {
            "headline": None,
            "privacy_policy_url": None,
            "terms_of_service_url": None,
        },
        "created": now,
        "default_return_url": None,
        "features": {
            "customer_update": {"allowed_updates": [], "enabled": False},
            "invoice_history": {"enabled": False},
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
        },
        "is_default": False,
        "livemode": False,
        "login_page": {"enabled": False, "url": None},
        "metadata": {},
        "name": None,
        "updated": now,
    }
    apply_params(config, params)
    return config


def apply_params(config: dict[str, Any], params: Params) -> None:
    """Merge validated create/update ``params`` into ``config`` (in place)."""
    body = {key: value for key, value in params.items() if key != "expand"}
    _merge(config, body, UPDATE_CONFIGURATION)
    login = config["login_page"]
    if not login["enabled"]:
        login["url"] = None
    elif login["url"] is None:
        login["url"] = _login_url()


def _merge(target: dict[str, Any], params: dict[str, Value], spec: Obj) -> None:
    for key, value in params.items():
        child_spec = spec.fields[key]
        if isinstance(child_spec, Map):
            target[key] = _merged_map(target.get(key) or {}, value)
        elif value == "":
            # "" unsets: a list empties (products goes back to null), a string is null.
            target[key] = [] if isinstance(child_spec, Arr) and key != "products" else None
        elif isinstance(child_spec, Obj) and isinstance(target.get(key), dict):
            assert isinstance(value, dict)
            _merge(target[key], value, child_spec)
        else:
            target[key] = _to_object(value, child_spec)


def _merged_map(old: dict[str, str], value: Value) -> dict[str, str]:
    if value == "":
        return {}
    assert isinstance(value, dict)
    merged = dict(old)
    for key, child in value.items():
        if child == "":
            merged.pop(key, None)
        else:
            assert isinstance(child, str)
            merged[key] = child
    return merged


def _to_object(value: Value, spec: Spec) -> Any:
    """A validated parameter as the object shows it: booleans, integers, full products."""
    if isinstance(spec, Scalar):
        assert isinstance(value, str)
        if spec.kind == "boolean":
            return value == "true"
        return int(value) if spec.kind == "integer" else value
    if isinstance(spec, Arr):
        assert isinstance(value, list)
        return [_to_object(item, spec.item) for item in value]
    assert isinstance(spec, Obj)
    assert isinstance(value, dict)
    obj = {key: _to_object(child, spec.fields[key]) for key, child in value.items()}
    if "product" in spec.fields:
        # A products[] entry: what was left out of adjustable_quantity gets Stripe's default.
        obj["adjustable_quantity"] = {
            "enabled": False,
            "maximum": None,
            "minimum": 1,
            **obj.get("adjustable_quantity", {}),
        }
        return dict(sorted(obj.items()))  # Stripe's key order
    return obj


def check_cancellation(config: dict[str, Any]) -> None:
    """Stripe's rule on cancellation prorations, on the configuration as it would be."""
    cancel = config["features"]["subscription_cancel"]
    param = "features[subscription_cancel][proration_behavior]"
    if cancel["proration_behavior"] == "always_invoice":
        raise StripeError(
            "Invalid features[subscription_cancel][proration_behavior]: always_invoice is "
            "not supported for subscription cancellations in the customer portal.",
            code="parameter_invalid_string",
            param=param,
        )
    if cancel["proration_behavior"] == "create_prorations" and cancel["mode"] != "immediately":
        raise StripeError(
            "features[subscription_cancel][proration_behavior] can only be create_prorations "
            "when features[subscription_cancel][mode] is immediately.",
            code="parameter_invalid_string",
            param=param,
        )


def offered_prices(config: dict[str, Any]) -> set[str]:
    """Every price ``features.subscription_update.products[].prices`` names."""
    products = config["features"]["subscription_update"]["products"] or []
    return {price for product in products for price in product["prices"]}


def session_refusal(config: dict[str, Any], params: Params) -> StripeError | None:
    """Why a portal session with ``params`` cannot use ``config``; None when it can.

    The codes are the stand-in's own (Stripe's wording differs); each names the
    parameter at fault, so a client's error mapping can tell them apart.
    """
    if not config["active"]:
        return StripeError(
            f"The configuration '{config['id']}' is not active. Only an active "
            "configuration can be used to create a portal session.",
            code="configuration_inactive",
            param="configuration",
        )
    flow = params.get("flow_data")
    flow_type = flow.get("type") if isinstance(flow, dict) else None
    if not isinstance(flow, dict) or not isinstance(flow_type, str):
        return None
    feature = FLOW_FEATURES[flow_type]
    if not config["features"][feature]["enabled"]:
        return StripeError(
            f"The {flow_type} flow needs features[{feature}][enabled] in the configuration "
            f"'{config['id']}', and it is disabled.",
            code="feature_disabled",
            param="flow_data[type]",
        )
    confirm = flow.get("subscription_update_confirm")
    items = confirm.get("items") if isinstance(confirm, dict) else None
    offered = offered_prices(config)
    for index, item in enumerate(items if isinstance(items, list) else []):
        price = item.get("price") if isinstance(item, dict) else None
        if isinstance(price, str) and price not in offered:
            return StripeError(
                f"The price '{price}' is not one of the prices the configuration "
                f"'{config['id']}' offers in features[subscription_update][products].",
                code="price_not_offered",
                param=f"flow_data[subscription_update_confirm][items][{index}][price]",
            )
    return None


def dashboard_edit(config: dict[str, Any], edit: object) -> None:
    """Apply a partial object (``{"active": false, "features": {...}}``) in place.

    Objects merge field by field, any other value replaces the old one (metadata
    takes any key); each field must exist and keep its JSON type (null where it
    may be null). All or nothing: nothing changes when the edit is refused.
    """
    if not isinstance(edit, dict) or not edit:
        raise ControlError("the edit must be a non-empty JSON object of configuration fields")
    for key in edit:
        if key in _NOT_EDITABLE:
            raise ControlError(f"{key} cannot be edited")
    edited = copy.deepcopy(config)
    _edit(edited, edit, "")
    login = edited["login_page"]
    login["url"] = (login["url"] or _login_url()) if login["enabled"] else None
    config.update(edited)


def _edit(target: dict[str, Any], edit: dict[str, Any], where: str) -> None:
    for key, value in edit.items():
        name = f"{where}.{key}" if where else key
        old = target.get(key)
        if where == "metadata":
            if value is not None and not isinstance(value, str):
                raise ControlError(f"{name} must be a string, or null to remove it")
            target[key] = value
            if value is None:
                del target[key]
        elif key not in target:
            raise ControlError(f"unknown configuration field {name}")
        elif isinstance(old, dict) and isinstance(value, dict):
            _edit(old, value, name)
        elif key == "products":
            target[key] = None if value is None else _edited_products(value)
        elif type(old) is type(value) or (value is None and isinstance(old, str)):
            target[key] = value  # only the strings of the object may be null
        elif old is None and isinstance(value, str):
            target[key] = value
        else:
            raise ControlError(f"{name} must be a {type(old).__name__}")


def _edited_products(value: object) -> list[dict[str, Any]]:
    """``features.subscription_update.products`` from a Dashboard edit, with defaults."""
    entries = value if isinstance(value, list) else None
    if entries is None or not all(
        isinstance(entry, dict)
        and isinstance(entry.get("product"), str)
        and isinstance(entry.get("prices"), list)
        and all(isinstance(price, str) for price in entry["prices"])
        for entry in entries
    ):
        raise ControlError("products must be null or a list of {product, prices: [price ids]}")
    default = {"enabled": False, "maximum": None, "minimum": 1}
    return [
        {
            "adjustable_quantity": {**default, **entry.get("adjustable_quantity", {})},
            "prices": list(entry["prices"]),
            "product": entry["product"],
        }
        for entry in entries
    ]
