"""``POST /v1/portal-sessions``."""

from __future__ import annotations

import orjson
from aiohttp import web
from aiohttp_apigami import response_schema

from service import keys
from service.audit import ACTION_CREATE_SESSION
from service.auth import SCOPE_CREATE_SESSIONS
from service.errors import MAPPING_API_CODES, PORTAL_LINK_CODES, codes_by_status
from service.handlers.openapi import (
    IDEMPOTENCY_KEY_PARAMETER,
    REQUEST_ID_PARAMETER,
    docs,
    problem_responses,
)
from service.middlewares import log_fields
from service.portal import open_portal_session
from service.protected import Call, protected
from service.schemas import PortalSessionRequestSchema, PortalSessionSchema

# Every code each error status can carry here: all of SPEC §2's, from errors.py.
ERROR_CODES = codes_by_status(excluding=MAPPING_API_CODES | PORTAL_LINK_CODES)
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
        IDEMPOTENCY_KEY_PARAMETER,
        REQUEST_ID_PARAMETER,
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
    confirms_token=True,
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
    app[keys.METRICS].session_created(opened.flow or "home", call.principal.type)
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
