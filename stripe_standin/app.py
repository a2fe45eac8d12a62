"""The Stripe stand-in's aiohttp application: :func:`create_app` and its wiring.

Two faces, each in its own modules:

* the imitation of Stripe's API (``/v1/...``): the shared handling in
  :mod:`.stripe_api`, each endpoint in :mod:`.stripe_endpoints`, parameter rules
  in :mod:`.validation`, scripted faults in :mod:`.faults` and
  :mod:`.fault_responses`;
* the control API (``/_standin/...``, no auth) in :mod:`.control`, through which
  tests and the demo read what was received and script what happens next;
* the portal page a session URL opens (``/p/session/{id}``) in :mod:`.portal_page`.

All of it lives in one :class:`~stripe_standin.state.StandinState`
(``app[STATE]``), so in-process tests can inspect and script it directly as well.
This module only builds the application: middleware, URL table and shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiohttp import web

from . import configuration_endpoints, control, portal_page, stripe_endpoints
from .control_input import MAX_LATENCY_MS
from .responses import Handler, current_request_id, json_response, random_token
from .state import DEFAULT_API_KEY_PREFIXES, DEFAULT_SESSION_URL_BASE, STATE, StandinState
from .stripe_api import api_handler

__all__ = ["create_app"]

log = logging.getLogger("stripe_standin")


@web.middleware
async def _request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every response a Stripe-style ``Request-Id``, router errors included."""
    token = current_request_id.set("req_" + random_token(14))
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # Only control-API misses land here: /v1 has its own Stripe-shaped catch-all.
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = json_response({"error": exc.reason}, exc.status, headers)
        except Exception:
            log.exception("stripe stand-in control API failed on %s", request.path)
            response = json_response({"error": "internal error"}, 500)
        if not response.prepared:
            response.headers.setdefault("Request-Id", current_request_id.get())
        return response
    finally:
        current_request_id.reset(token)


async def _release_waiters(app: web.Application) -> None:
    app[STATE].closing.set()


def create_app(
    *,
    api_key_prefixes: Iterable[str] = DEFAULT_API_KEY_PREFIXES,
    latency_ms: float = 0,
    session_url_base: str = DEFAULT_SESSION_URL_BASE,
) -> web.Application:
    """Build the stand-in application (no I/O; run it with any aiohttp runner).

    ``api_key_prefixes``: keys accepted as ``Authorization: Bearer <key>``.
    ``latency_ms``: standing delay before every API answer (``POST /_standin/latency``
    changes it; ``POST /_standin/reset`` restores this value).
    ``session_url_base``: what portal session URLs start with; the stand-in's own
    URL makes them pages a browser can open (``GET /p/session/{id}``);
    ``POST /_standin/session_url_base`` changes it, ``POST /_standin/reset`` restores it.
    """
    prefixes = tuple(api_key_prefixes)
    if not prefixes or not all(prefixes):
        raise ValueError("api_key_prefixes must be non-empty strings")
    if not 0 <= latency_ms <= MAX_LATENCY_MS:
        raise ValueError(f"latency_ms must be between 0 and {MAX_LATENCY_MS:.0f}")
    app = web.Application(middlewares=[_request_id_middleware])
    app[STATE] = StandinState(
        api_key_prefixes=prefixes,
        latency_ms=float(latency_ms),
        session_url_base=session_url_base,
    )
    app.on_shutdown.append(_release_waiters)

    control_routes: list[tuple[str, str, control.ControlHandler]] = [
        ("GET", "/_standin/health", control.health),
        ("GET", "/_standin/requests", control.get_requests),
        ("DELETE", "/_standin/requests", control.delete_requests),
        ("GET", "/_standin/faults", control.get_faults),
        ("POST", "/_standin/faults", control.post_faults),
        ("DELETE", "/_standin/faults", control.delete_faults),
        ("GET", "/_standin/latency", control.get_latency),
        ("POST", "/_standin/latency", control.post_latency),
        ("GET", "/_standin/session_url_base", control.get_session_url_base),
        ("POST", "/_standin/session_url_base", control.post_session_url_base),
        ("GET", "/_standin/missing", control.get_missing),
        ("POST", "/_standin/missing", control.post_missing),
        ("DELETE", "/_standin/missing", control.delete_missing),
        ("GET", "/_standin/subscriptions", control.get_subscriptions),
        ("POST", "/_standin/subscriptions", control.post_subscriptions),
        ("DELETE", "/_standin/subscriptions", control.delete_subscriptions),
        ("GET", "/_standin/customers", control.get_customers),
        ("POST", "/_standin/customers", control.post_customers),
        ("DELETE", "/_standin/customers", control.delete_customers),
        ("GET", "/_standin/catalogue", control.get_catalogue),
        ("POST", "/_standin/catalogue", control.post_catalogue),
        ("DELETE", "/_standin/catalogue", control.delete_catalogue),
        ("GET", "/_standin/billing_portal/configurations", control.get_configurations),
        ("DELETE", "/_standin/billing_portal/configurations", control.delete_configurations),
        (
            "POST",
            "/_standin/billing_portal/configurations/{id}",
            control.post_configuration_edit,
        ),
        ("POST", "/_standin/reset", control.post_reset),
    ]
    for method, path, control_handler in control_routes:
        app.router.add_route(method, path, control.control_endpoint(control_handler))

    app.router.add_post(
        "/v1/billing_portal/sessions", api_handler(stripe_endpoints.PORTAL_SESSIONS_ROUTE)
    )
    configurations = "/v1/billing_portal/configurations"
    app.router.add_post(
        configurations, api_handler(configuration_endpoints.CREATE_CONFIGURATION_ROUTE)
    )
    app.router.add_get(configurations, api_handler(configuration_endpoints.CONFIGURATIONS_ROUTE))
    app.router.add_post(
        configurations + "/{id}", api_handler(configuration_endpoints.UPDATE_CONFIGURATION_ROUTE)
    )
    app.router.add_get(
        configurations + "/{id}", api_handler(configuration_endpoints.CONFIGURATION_ROUTE)
    )
    app.router.add_get("/v1/subscriptions", api_handler(stripe_endpoints.SUBSCRIPTIONS_ROUTE))
    app.router.add_get("/v1/customers", api_handler(stripe_endpoints.CUSTOMERS_ROUTE))
    app.router.add_get("/v1/customers/{id}", api_handler(stripe_endpoints.CUSTOMER_ROUTE))
    # The portal a session URL opens, when session_url_base is the stand-in itself.
    app.router.add_get("/p/session/{id}", portal_page.session_page)
    # Registered last so it only catches what the routes above do not (wrong path
    # or wrong method), which Stripe answers with a 404 in its own error shape.
    app.router.add_route("*", "/v1/{tail:.*}", api_handler(stripe_endpoints.UNKNOWN_ROUTE))
    return app
