"""``POST /v1/portal-sessions``."""

from __future__ import annotations

import orjson
from aiohttp import web
from aiohttp_apigami import response_schema

from service import keys
from service.audit import ACTION_CREATE_SESSION
from service.auth import SCOPE_CREATE_SESSIONS
from service.handlers.openapi import docs, problem_responses
from service.middlewares import log_fields
from service.portal import open_portal_session
from service.protected import Call, protected
from service.schemas import PortalSessionRequestSchema, PortalSessionSchema

# Every code each error status can carry here (SPEC §2): the document's per-status
# enums of `code` and their descriptions are made from this one table.
ERROR_CODES: dict[int, tuple[str, ...]] = {
    400: ("malformed_json", "invalid_header", "header_too_large"),
    401: ("unauthenticated",),
    403: ("forbidden_user", "insufficient_scope", "return_url_not_allowed"),
    404: (
        "unknown_user",
        "unknown_subscription",
        "no_open_subscription",
        "unknown_plan",
        "unknown_offer",
        "unknown_portal",
    ),
    408: ("request_timeout",),
    409: (
        "subscription_ambiguous",
        "subscription_not_open",
        "subscription_not_updatable",
        "idempotency_conflict",
    ),
    413: ("payload_too_large",),
    415: ("unsupported_media_type",),
    422: ("validation_failed",),
    429: ("rate_limited",),
    500: ("internal_error",),
    502: ("upstream_rejected", "upstream_auth_failed", "upstream_bad_response"),
    503: ("upstream_unavailable", "database_unavailable", "overloaded", "draining"),
    504: ("upstream_timeout",),
}
NOTES = {429: " (with `Retry-After`)", 503: " (with `Retry-After`)"}


@docs(
    tags=["portal sessions"],
    summary="Open a Stripe customer-portal session for one of our users",
    description=(
        "Authenticate with `Authorization: Bearer <token>`: a service-client token "
        "(`pgw_…`) acting for any user, or an end user's JWT acting for its `sub` only. "
        "Optional `Idempotency-Key` (1-255 printable ASCII): the same key and body within "
        "the TTL return the same session."
    ),
    parameters=[
        {
            "in": "header",
            "name": "Idempotency-Key",
            "required": False,
            # Printable ASCII; HTTP drops a header value's outer spaces, so the
            # key starts and ends with a visible character.
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "pattern": r"^[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?$",
            },
        },
        {
            "in": "header",
            "name": "X-Request-ID",
            "required": False,
            # Any value is taken: a tracing header never fails a request (SPEC §2).
            "description": "Echoed if 1-128 of `[A-Za-z0-9._:-]`, else replaced by a "
            "generated id. Every response carries it.",
            "schema": {"type": "string"},
        },
    ],
    security=[{"bearerAuth": []}],
    responses=problem_responses(ERROR_CODES, NOTES),
)
@response_schema(PortalSessionSchema, 201, description="The session was opened.")
@protected(
    scope=SCOPE_CREATE_SESSIONS,
    action=ACTION_CREATE_SESSION,
    body=PortalSessionRequestSchema,
    idempotent=True,
)
async def create_portal_session(call: Call) -> web.Response:
    """Resolve → call Stripe (the use case), then answer 201 with the portal URL."""
    app = call.request.app
    opened = await open_portal_session(
        app[keys.PORTAL],
        call.principal,
        call.body,
        idempotency_key=call.idempotency_key,
        audit=call.audit,
        deadline=call.deadline,
    )
    session = opened.session
    log_fields(call.request, upstream_request_id=session.request_id, attempts=session.attempts)
    app[keys.METRICS].sessions_created.labels(
        flow=opened.flow or "home", principal_type=call.principal.type
    ).inc()
    body = {
        "id": session.id,
        "url": session.url,
        "created": session.created,
        "user_id": opened.user_id,
        "flow": opened.flow,
        "locale": session.locale,
        "return_url": session.return_url,
        "livemode": session.livemode,
    }
    return web.Response(
        status=201,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
