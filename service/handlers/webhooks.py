"""``POST /v1/stripe/webhooks``: Stripe's signed events, no bearer auth.

The raw body is read once, within a size limit, because the signature covers
the exact bytes Stripe sent; the use case in ``service/webhooks.py`` does the rest.
"""

from __future__ import annotations

import orjson
from aiohttp import web
from aiohttp_apigami import response_schema

from service import keys
from service.client_ip import client_ip
from service.handlers.openapi import REQUEST_ID_PARAMETER, docs, problem_responses
from service.middlewares import log_fields
from service.request_body import read_request_body
from service.schemas import WebhookReceiptSchema
from service.webhooks import CONFIGURATION_EVENTS, WebhookDeps, receive

# Stripe event payloads are a few KiB, an invoice with many lines a few hundred.
BODY_LIMIT = 1024 * 1024


# Every code each error status can carry here: the document's enums of `code`.
ERROR_CODES: dict[int, tuple[str, ...]] = {
    400: (
        "invalid_signature",
        "malformed_json",
        "invalid_event",
        "invalid_header",
        "header_too_large",
    ),
    408: ("request_timeout",),
    413: ("payload_too_large",),
    500: ("internal_error",),
    503: ("database_unavailable", "overloaded", "draining"),
}
NOTES = {
    400: ": nothing was applied (`invalid_signature`: missing, malformed, wrong or expired)",
    503: " (Stripe retries)",
}


@docs(
    tags=["webhooks"],
    summary="Receive a Stripe event (subscription and customer changes)",
    description=(
        "Called by Stripe, not by our callers: no bearer token. The `Stripe-Signature` "
        "header must carry a valid HMAC-SHA256 signature of the exact body under one of "
        "the configured endpoint secrets, made within the last 5 minutes. A verified "
        "event is answered 200 even when it changes nothing (a replay, an older event, "
        "an unknown customer, an event type that is not handled)."
    ),
    parameters=[
        {
            "in": "header",
            "name": "Stripe-Signature",
            "required": True,
            "schema": {"type": "string"},
            "description": "`t=<unix time>,v1=<hex signature>[,v1=...]`",
        },
        REQUEST_ID_PARAMETER,
    ],
    requestBody={
        "required": True,
        "description": "A Stripe event object, exactly as Stripe sent it.",
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
    security=[],
    responses=problem_responses(ERROR_CODES, NOTES),
)
@response_schema(WebhookReceiptSchema, 200, description="The event was verified and recorded.")
async def receive_stripe_event(request: web.Request) -> web.Response:
    """Read the raw body once, hand it to the use case, acknowledge with 200."""
    payload = await read_request_body(request, BODY_LIMIT)
    app = request.app
    receipt = await receive(
        WebhookDeps(app[keys.SETTINGS], app[keys.DB], app[keys.METRICS], app.get(keys.BACKFILLER)),
        payload,
        request.headers.get("Stripe-Signature"),
        request_id=request[keys.REQUEST_ID],
        client_ip=client_ip(request),
        user_agent=request.headers.get("User-Agent"),
    )
    if receipt.event_type in CONFIGURATION_EVENTS and receipt.result == "applied":
        app[keys.PROFILE_DRIFT].invalidate()  # this replica's next scrape shows it
    log_fields(
        request,
        event_id=receipt.event_id,
        event_type=receipt.event_type,
        webhook_result=receipt.result,
    )
    body = {"received": True, "id": receipt.event_id, "result": receipt.result}
    return web.Response(
        status=200,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
