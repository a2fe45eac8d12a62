"""Stripe's portal configuration endpoints, as :class:`~stripe_standin.stripe_api.ApiRoute` s.

* ``POST /v1/billing_portal/configurations``: create (``active: true``,
  ``is_default: false``), on the account the call acts as (``Stripe-Account``);
* ``POST /v1/billing_portal/configurations/{id}``: update (merge, ``""``
  clears, ``active``), ``updated`` moves;
* ``GET /v1/billing_portal/configurations/{id}``: retrieve;
* ``GET /v1/billing_portal/configurations``: list, newest first, filtered by
  ``active`` / ``is_default``, paginated like every list.

An id made on another account (or on the platform, for a call with
``Stripe-Account``) is a ``404 resource_missing`` (``param: id``).
Idempotency-Key replay and conflicts are handled for every POST by
:mod:`.stripe_api`. ``updated`` always moves forward by at least a second, so a
client ordering reports by it never sees two states with the same time.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Final

from .configuration_params import (
    CREATE_CONFIGURATION,
    LIST_CONFIGURATIONS,
    RETRIEVE_CONFIGURATION,
    UPDATE_CONFIGURATION,
)
from .configurations import (
    apply_params,
    check_cancellation,
    new_configuration,
    new_configuration_id,
)
from .listing import ListOf
from .state import StandinState
from .stripe_api import ApiCall, ApiRoute
from .validation import Params, Value, validate

__all__ = [
    "CONFIGURATIONS_ROUTE",
    "CONFIGURATION_ROUTE",
    "CREATE_CONFIGURATION_ROUTE",
    "UPDATE_CONFIGURATION_ROUTE",
    "next_updated",
]

_CONFIGURATION_LIST: Final = ListOf("/v1/billing_portal/configurations", "configuration", "bpc_")


def next_updated(config: dict[str, Any]) -> int:
    """The ``updated`` of a change made now: the clock, but never at or before the last one."""
    return max(int(time.time()), int(config["updated"]) + 1)


def _products(params: Params) -> Value | None:
    features = params.get("features")
    update = features.get("subscription_update") if isinstance(features, dict) else None
    return update.get("products") if isinstance(update, dict) else None


def _create(state: StandinState, call: ApiCall) -> dict[str, Any]:
    validate(call.params, CREATE_CONFIGURATION)
    state.check_catalogue(_products(call.params), call.stripe_account)
    config_id = new_configuration_id()
    while config_id in state.configurations:
        config_id = new_configuration_id()
    config = new_configuration(config_id, call.params, int(time.time()))
    check_cancellation(config)
    state.add_configuration(config, call.stripe_account)
    return config


def _update(state: StandinState, call: ApiCall) -> dict[str, Any]:
    config = state.configuration(call.resource_id or "", call.stripe_account)
    validate(call.params, UPDATE_CONFIGURATION)
    state.check_catalogue(_products(call.params), call.stripe_account)
    # Checked on a copy: a refused update changes nothing.
    updated = copy.deepcopy(config)
    apply_params(updated, call.params)
    check_cancellation(updated)
    updated["updated"] = next_updated(config)
    config.clear()
    config.update(updated)
    return config


def _retrieve(state: StandinState, call: ApiCall) -> dict[str, Any]:
    config = state.configuration(call.resource_id or "", call.stripe_account)
    validate(call.params, RETRIEVE_CONFIGURATION)
    return config


def _list(state: StandinState, call: ApiCall) -> dict[str, Any]:
    params = call.params
    validate(params, LIST_CONFIGURATIONS)
    active = params.get("active")
    is_default = params.get("is_default")

    def matches(config: dict[str, Any]) -> bool:
        return (active is None or config["active"] == (active == "true")) and (
            is_default is None or config["is_default"] == (is_default == "true")
        )

    return _CONFIGURATION_LIST.page(
        state.configuration_order(),
        params,
        visible=lambda config: state.account_of(config["id"]) == call.stripe_account,
        matches=matches,
    )


def _fake_configuration(params: Params | None) -> dict[str, Any]:
    now = int(time.time())
    return new_configuration("bpc_1StandinFake", {}, now)


def _fake_list(params: Params | None) -> dict[str, Any]:
    return _CONFIGURATION_LIST.empty()


CREATE_CONFIGURATION_ROUTE: Final = ApiRoute(_create, _fake_configuration)
UPDATE_CONFIGURATION_ROUTE: Final = ApiRoute(_update, _fake_configuration)
CONFIGURATION_ROUTE: Final = ApiRoute(_retrieve, _fake_configuration)
CONFIGURATIONS_ROUTE: Final = ApiRoute(_list, _fake_list)
