"""The mapping API (SPEC §11): ``PUT``/``DELETE /v1/users/{user_id}/customer``,
``GET /v1/users/{user_id}``.

For service clients with ``mappings:write`` / ``mappings:read`` (end users never
have them). Service-to-service: no CORS. The use cases are in
``service/mapping_api.py``; here the routes declare what they need and shape
the answer.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp_apigami import response_schema

from service import keys
from service.audit import ACTION_MAPPING_API_DELETE, ACTION_MAPPING_API_GET, ACTION_MAPPING_API_PUT
from service.auth import SCOPE_MAPPINGS_READ, SCOPE_MAPPINGS_WRITE
from service.db.users import UserMapping
from service.errors import codes_by_status
from service.handlers.openapi import REQUEST_ID_PARAMETER, docs, problem_responses
from service.mapping_api import delete_customer, put_customer, read_user
from service.protected import Call, protected
from service.schemas import (
    CustomerMappingRequestSchema,
    PutMappingSchema,
    UserMappingSchema,
    UserPathSchema,
)

# The codes every operation here can answer: the head, the token, the scope, the
# path parameter, the rate limit, the database and the load.
_EVERY_CALL = {
    "invalid_header",
    "header_too_large",
    "unauthenticated",
    "insufficient_scope",
    "validation_failed",
    "rate_limited",
    "internal_error",
    "database_unavailable",
    "overloaded",
    "draining",
}
READ_CODES = codes_by_status(_EVERY_CALL | {"unknown_user"})
DELETE_CODES = READ_CODES
PUT_CODES = codes_by_status(
    _EVERY_CALL
    | {
        # the body
        "malformed_json",
        "request_timeout",
        "payload_too_large",
        "unsupported_media_type",
        # our side
        "unknown_portal",
        "unknown_user",
        "customer_already_mapped",
        # Stripe's
        "stripe_customer_not_found",
        "upstream_rejected",
        "upstream_auth_failed",
        "upstream_bad_response",
        "upstream_unavailable",
        "upstream_timeout",
    }
)
NOTES = {429: " (with `Retry-After`)", 503: " (with `Retry-After`)"}
PUT_NOTES = {
    **NOTES,
    404: " (`unknown_user`: a DELETE removed the mapping while it was written)",
    409: ": another user is mapped to this Stripe id (delete that mapping first)",
    422: " (`stripe_customer_not_found`: unknown to Stripe, on that connected account, "
    "deleted, or of the other test/live mode; the detail says which)",
}
SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}]


@docs(
    tags=["mappings"],
    summary="Map one of our users to their Stripe customer",
    description=(
        "Scope `mappings:write` (service clients only). The body is the whole mapping: "
        "`stripe_customer_id` (`cus_…`) or `stripe_account_id` (`acct_…`, Accounts v2), "
        "optional `portal`, `locale`, `connected_account`; an omitted field becomes null. "
        "A customer id is first checked with Stripe (`GET /v1/customers/{id}`, with "
        "`Stripe-Account` when `connected_account` is given): it must exist, not be "
        "deleted and be of this service's test/live mode. An Accounts v2 id is not "
        "checked. The mapping is written with source `api` (it wins over Stripe "
        "metadata), then the user's subscriptions are read from Stripe before the "
        "answer (`backfill`). PUT is idempotent by itself: no `Idempotency-Key`; a "
        "repeat answers 200 with the same mapping."
    ),
    parameters=[REQUEST_ID_PARAMETER],
    security=SECURITY,
    responses=problem_responses(PUT_CODES, PUT_NOTES),
)
@response_schema(PutMappingSchema, 201, description="The user had no mapping; now they do.")
@response_schema(
    PutMappingSchema, 200, description="The user's mapping was replaced, or was already this."
)
@protected(
    scope=SCOPE_MAPPINGS_WRITE,
    action=ACTION_MAPPING_API_PUT,
    body=CustomerMappingRequestSchema,
    path=UserPathSchema,
)
async def put_user_customer(call: Call) -> web.Response:
    """Verify with Stripe, write, backfill (the use case); answer the mapping."""
    outcome = await put_customer(
        call.request.app[keys.MAPPING_API],
        call.principal,
        call.path["user_id"],
        call.body,
        audit=call.audit,
        deadline=call.deadline,
    )
    body = {**_user_body(outcome.mapping), "backfill": outcome.backfill}
    return _json(PutMappingSchema().dump(body), 201 if outcome.created else 200)


@docs(
    tags=["mappings"],
    summary="Read one user's customer mapping and subscriptions",
    description="Scope `mappings:read` (service clients only).",
    parameters=[REQUEST_ID_PARAMETER],
    security=SECURITY,
    responses=problem_responses(READ_CODES, NOTES),
)
@response_schema(UserMappingSchema, 200, description="The mapping and the subscriptions.")
@protected(scope=SCOPE_MAPPINGS_READ, action=ACTION_MAPPING_API_GET, body=None, path=UserPathSchema)
async def get_user(call: Call) -> web.Response:
    """One round trip; 404 ``unknown_user`` without a mapping."""
    mapping = await read_user(
        call.request.app[keys.MAPPING_API], call.path["user_id"], audit=call.audit
    )
    return _json(UserMappingSchema().dump(_user_body(mapping)), 200)


@docs(
    tags=["mappings"],
    summary="Remove one user's customer mapping and their subscriptions",
    description=(
        "Scope `mappings:write` (service clients only). The user's portal calls are "
        "`404 unknown_user` until they are mapped again."
    ),
    parameters=[REQUEST_ID_PARAMETER],
    security=SECURITY,
    responses={
        204: {"description": "Removed."},
        **problem_responses(DELETE_CODES, NOTES),
    },
)
@protected(
    scope=SCOPE_MAPPINGS_WRITE,
    action=ACTION_MAPPING_API_DELETE,
    body=None,
    path=UserPathSchema,
)
async def delete_user_customer(call: Call) -> web.Response:
    """204, or 404 ``unknown_user`` without a mapping."""
    await delete_customer(
        call.request.app[keys.MAPPING_API], call.path["user_id"], audit=call.audit
    )
    return web.Response(status=204, headers={"Cache-Control": "no-store"})


def _user_body(mapping: UserMapping) -> dict[str, Any]:
    """The mapping as the schemas dump it (datetimes become ISO 8601)."""
    return {
        "user_id": mapping.user_id,
        "customer": {
            "stripe_customer_id": mapping.stripe_customer_id,
            "stripe_account_id": mapping.stripe_account_id,
            "source": mapping.source,
            "source_at": mapping.source_at,
            "stale": mapping.stale,
            "portal": mapping.portal,
            "locale": mapping.locale,
            "connected_account": mapping.connected_account,
        },
        "subscriptions": [
            {
                "ref": s.ref,
                "stripe_subscription_id": s.stripe_subscription_id,
                "status": s.status,
                "cancel_at": s.cancel_at,
                "cancel_at_period_end": s.cancel_at_period_end,
                "item_id": s.item_id,
                "price_id": s.price_id,
                "plan": s.plan,
                "quantity": s.quantity,
            }
            for s in mapping.subscriptions
        ],
    }


def _json(body: Any, status: int) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
