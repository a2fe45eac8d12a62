"""The control API (``/_standin/...``, no auth): how tests and the demo drive the stand-in.

Read and clear what was received; queue faults; set the standing latency and
the base of portal session URLs;
declare ids (objects or connected accounts) that do not exist; seed the
subscriptions ``GET /v1/subscriptions`` returns, the customers
``GET /v1/customers`` returns and the products and prices portal
configurations may name, each optionally on a connected account
(``account``); edit a portal configuration "in the Dashboard"; reset
everything. Each handler here is a thin JSON face over a
:class:`~stripe_standin.state.StandinState` method; :mod:`.app` maps the URLs.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .configuration_endpoints import next_updated
from .configurations import dashboard_edit
from .control_input import ControlError
from .responses import Handler, json_response
from .state import STATE, StandinState

__all__ = [
    "ControlHandler",
    "control_endpoint",
    "delete_catalogue",
    "delete_configurations",
    "delete_customers",
    "delete_faults",
    "delete_missing",
    "delete_requests",
    "delete_subscriptions",
    "get_catalogue",
    "get_configurations",
    "get_customers",
    "get_faults",
    "get_latency",
    "get_missing",
    "get_requests",
    "get_session_url_base",
    "get_subscriptions",
    "health",
    "post_catalogue",
    "post_configuration_edit",
    "post_customers",
    "post_faults",
    "post_latency",
    "post_missing",
    "post_reset",
    "post_session_url_base",
    "post_subscriptions",
]

ControlHandler = Callable[[web.Request, StandinState], Awaitable[object]]


def control_endpoint(handler: ControlHandler) -> Handler:
    """A control endpoint: JSON out, ``400 {"error": ...}`` for bad input."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            result = await handler(request, request.app[STATE])
        except ControlError as error:
            return json_response({"error": str(error)}, 400)
        return json_response(result)

    return handle


async def _json_object(request: web.Request, field_name: str) -> object:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ControlError(f"body must be JSON: {error}") from None
    if not isinstance(body, dict) or field_name not in body:
        raise ControlError(f'body must be a JSON object with "{field_name}"')
    return body[field_name]


async def _json_list(request: web.Request, field_name: str) -> list[object]:
    value = await _json_object(request, field_name)
    if not isinstance(value, list):
        raise ControlError(f'"{field_name}" must be a list')
    return value


async def health(request: web.Request, state: StandinState) -> object:
    return {"status": "ok"}


async def get_requests(request: web.Request, state: StandinState) -> object:
    return state.requests_json()


async def delete_requests(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_requests()}


async def get_faults(request: web.Request, state: StandinState) -> object:
    return {"faults": [fault.to_json() for fault in state.faults]}


async def post_faults(request: web.Request, state: StandinState) -> object:
    queued = state.queue_faults(await _json_list(request, "faults"))
    return {"queued": queued, "pending": len(state.faults)}


async def delete_faults(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_faults()}


async def get_latency(request: web.Request, state: StandinState) -> object:
    return {"ms": state.latency_ms}


async def post_latency(request: web.Request, state: StandinState) -> object:
    return {"ms": state.set_latency(await _json_object(request, "ms"))}


async def get_session_url_base(request: web.Request, state: StandinState) -> object:
    return {"base": state.session_url_base}


async def post_session_url_base(request: web.Request, state: StandinState) -> object:
    return {"base": state.set_session_url_base(await _json_object(request, "base"))}


async def get_missing(request: web.Request, state: StandinState) -> object:
    return {"ids": sorted(state.missing_ids)}


async def post_missing(request: web.Request, state: StandinState) -> object:
    state.declare_missing(await _json_list(request, "ids"))
    return {"ids": sorted(state.missing_ids)}


async def delete_missing(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_missing()}


async def get_subscriptions(request: web.Request, state: StandinState) -> object:
    return {"subscriptions": list(state.subscriptions.values())}


async def post_subscriptions(request: web.Request, state: StandinState) -> object:
    seeded = state.seed_subscriptions(await _json_list(request, "subscriptions"))
    return {"seeded": seeded, "total": len(state.subscriptions)}


async def delete_subscriptions(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_subscriptions()}


def _with_accounts(state: StandinState, objects: dict[str, dict[str, Any]]) -> list[object]:
    """The objects, each with the account it lives on.

    The account is not part of a Stripe object; shown here so a test can check it.
    """
    return [{**obj, "account": state.account_of(obj_id)} for obj_id, obj in objects.items()]


async def get_customers(request: web.Request, state: StandinState) -> object:
    return {"customers": _with_accounts(state, state.customers)}


async def post_customers(request: web.Request, state: StandinState) -> object:
    ids = state.seed_customers(await _json_list(request, "customers"))
    return {"seeded": len(ids), "ids": ids, "total": len(state.customers)}


async def delete_customers(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_customers()}


async def get_catalogue(request: web.Request, state: StandinState) -> object:
    return {"products": state.catalogue.to_json(state.account_of)}


async def post_catalogue(request: web.Request, state: StandinState) -> object:
    ids = state.seed_catalogue(await _json_list(request, "products"))
    return {"seeded": ids, "total": len(state.catalogue.products)}


async def delete_catalogue(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_catalogue()}


async def get_configurations(request: web.Request, state: StandinState) -> object:
    return {"configurations": _with_accounts(state, state.configurations)}


async def post_configuration_edit(request: web.Request, state: StandinState) -> object:
    """An edit "in the Dashboard": the body is a partial configuration object.

    Answers the whole configuration as it now is (``updated`` moved), which is
    what a ``billing_portal.configuration.updated`` event would carry.
    """
    config = state.configurations.get(request.match_info["id"])
    if config is None:
        raise ControlError(f"no configuration {request.match_info['id']}")
    try:
        edit = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ControlError(f"body must be JSON: {error}") from None
    updated = next_updated(config)
    dashboard_edit(config, edit)
    config["updated"] = updated
    return config


async def delete_configurations(request: web.Request, state: StandinState) -> object:
    return {"deleted": state.clear_configurations()}


async def post_reset(request: web.Request, state: StandinState) -> object:
    state.reset()
    return {"reset": True}
